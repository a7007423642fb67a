"""Shared fixtures: seeded tiny configs in the three ESM flavours and padded batches with <mask>."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from esm_dual.common.config import EsmConfig  # noqa: E402
from tests.utils import DATA_DIR  # noqa: E402,F401  (re-exported: tests import it from here too)

# Odd sizes on purpose: 3 heads (not a power of two), head dim 6 (even, for rotary).
_BASE = dict(
    vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=18, num_hidden_layers=3,
    num_attention_heads=3, intermediate_size=37, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5, max_position_embeddings=1026,
)

TINY_CONFIGS = {
    # ESM-2: rotary, token dropout, no embedding LayerNorm.
    "esm2": dict(_BASE, position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False),
    # ESM-1b: learned positions, embedding LayerNorm before the encoder, token dropout.
    "esm1b": dict(_BASE, position_embedding_type="absolute", token_dropout=True, emb_layer_norm_before=True),
    # ESM-1v: learned positions, no embedding LayerNorm, token dropout.
    "esm1v": dict(_BASE, position_embedding_type="absolute", token_dropout=True, emb_layer_norm_before=False),
}


# The longest end-to-end tests: multi-process training and embedding, whole fit loops, the benchmarks' CPU smoke
# runs. The README's test command (-m "not gpu and not slow") leaves them out so that it stays under five minutes
# on a 2-core machine; CI (.ci/run, -m "not gpu") runs them too. Node-id prefixes; tests can also be marked
# with @pytest.mark.slow where they are written (the README's blocks are).
SLOW_TESTS = (
    "tests/distributed/",
    "tests/tf/test_fit_e2e.py",
    "tests/pt/test_encoder_gpu_bench.py::test_cpu_smoke_with_bounds",
    "tests/cli/test_embed_gpu_bench.py::test_cpu_smoke",
    "tests/pt/test_esmfold_gpu_bench.py",
    "tests/pt/test_training_pt.py::test_training_loop_reduces_mlm_loss",
    "tests/tf/test_keras_training.py::test_mlm_trains_on_its_own_loss_with_labels_as_y",
    "tests/tf/test_keras_training.py::test_keras_loss_and_metrics_on_the_logits",
    "tests/tf/test_keras_training.py::test_labels_in_the_input_dict",
    "tests/tf/test_keras_training.py::test_fit_on_the_tf_data_pipeline",
    "tests/tf/test_keras_training.py::test_mixed_bfloat16_close_to_float32",
    "tests/tf/test_keras_training.py::test_xla_jit_compile_fit_matches_eager_fit",
    "tests/tf/test_keras_training.py::test_compile_without_a_loss_returns_to_the_own_loss",
    "tests/tf/test_keras_training.py::test_mirrored_strategy_build_compile_fit",
    "tests/tf/test_modeling_tf.py::test_export_saved_model_serves_same_logits",
    "tests/pt/test_training_pt.py::test_torch_compile_fullgraph_same_output",
    "tests/tf/test_keras_gpu_bench.py",
    "tests/tf/test_keras_training.py::test_metrics_skip_positions_labelled_minus_100",
    "tests/tf/test_keras_training.py::test_frozen_encoder_survives_keras_save",
    "tests/tf/test_backends.py::test_keras_file_loads_on_another_backend",
    "tests/tf/test_pydataset.py::test_fit_on_this_backend",
    "tests/conversion/test_convert.py::test_transformers5_saved_checkpoint",
    "tests/cli/test_cli_args.py::test_quiet_silences_tensorflow",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


def tiny_config(flavour: str = "esm2", **changes) -> EsmConfig:
    return EsmConfig.from_dict({**TINY_CONFIGS[flavour], **changes})


@pytest.fixture(params=sorted(TINY_CONFIGS))
def flavour(request) -> str:
    return request.param


def make_batch(seed: int = 0, lengths=(11, 7, 14, 3), mask_frac: float = 0.2, vocab_size: int = 33):
    """Token ids [B, L] with BOS/EOS, padding (id 1), different lengths and <mask> (id 32) tokens.

    Every sequence but the first has at least one <mask>; the first has none (ratio 0 path).
    """
    rng = np.random.default_rng(seed)
    L = max(lengths) + 2
    ids = np.full((len(lengths), L), 1, dtype=np.int64)
    mask = np.zeros((len(lengths), L), dtype=np.int64)
    for b, n in enumerate(lengths):
        res = rng.integers(4, 24, size=n)
        if b > 0:
            m = rng.random(n) < mask_frac
            m[rng.integers(0, n)] = True
            res[m] = 32
        ids[b, 0] = 0
        ids[b, 1 : n + 1] = res
        ids[b, n + 1] = 2
        mask[b, : n + 2] = 1
    return ids, mask


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture
def data_dir() -> str:
    return DATA_DIR


def _one_thread():
    torch = pytest.importorskip("torch")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: tiny models gain nothing from more on a busy 2-core box."""
    yield from _one_thread()


@pytest.fixture(scope="module")
def one_torch_thread_module():
    """``one_torch_thread`` for a whole module (``pytestmark = pytest.mark.usefixtures(...)`` or an autouse)."""
    yield from _one_thread()


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """``hub_dir(flavour, head, **config_changes)``: a tiny hub checkpoint directory, written once per module and
    key (seeds 0, 1, 2, ... in the order of first use)."""
    from tests.utils import write_hub_checkpoint

    cache = {}

    def get(flavour: str, head: str, **changes) -> str:
        key = (flavour, head, tuple(sorted(changes.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{flavour}_{head}")
            write_hub_checkpoint(str(d), tiny_config(flavour, **changes), head=head, seed=len(cache))
            cache[key] = str(d)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def esmfold_dir(tmp_path_factory) -> str:
    """A tiny random ESMFold checkpoint in the hub layout (config.json + model.safetensors), one per module."""
    from tests.pt.test_esmfold import write_tiny_esmfold

    d = str(tmp_path_factory.mktemp("esmfold"))
    write_tiny_esmfold(d)
    return d
