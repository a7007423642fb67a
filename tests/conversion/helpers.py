"""Shared helpers for the conversion tests: tiny hub checkpoints and exact tensor comparison."""

from __future__ import annotations

import os

import numpy as np

from esm_dual.io.hub import load_checkpoint, save_checkpoint
from tests.conftest import tiny_config
from tests.utils import random_hub_tensors

ARCH = {"base": "EsmModel", "mlm": "EsmForMaskedLM", "seq": "EsmForSequenceClassification",
        "tok": "EsmForTokenClassification"}
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "tf_model_h5")


def make_hub(directory: str, flavour: str = "esm2", head: str = "mlm", seed: int = 0, **changes) -> dict:
    """A tiny hub checkpoint (config.json + model.safetensors). ``intermediate_size = 4 * hidden`` so fair-esm
    can hold ESM-2 configs; the ``<mask>`` row of the embeddings is zero (as in released ESM-1b files)."""
    changes.setdefault("intermediate_size", 72)
    if head == "seq":
        changes.setdefault("num_labels", 3)
    config = tiny_config(flavour, architectures=[ARCH[head]], **changes)
    tensors = random_hub_tensors(config, head, seed)
    emb = "embeddings.word_embeddings.weight" if head == "base" else "esm.embeddings.word_embeddings.weight"
    tensors[emb][32] = 0.0
    save_checkpoint(directory, config, tensors)
    return tensors


def assert_same_tensors(a: dict, b: dict, skip=()) -> None:
    """Same names (but ``skip``), dtypes, shapes and bytes."""
    names_a = set(a) - set(skip)
    assert names_a == set(b), sorted(names_a ^ set(b))
    for k in names_a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype, (k, x.dtype, y.dtype)
        assert x.shape == y.shape, (k, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), k


def hub_tensors(path: str) -> dict:
    return load_checkpoint(path).tensors


def leftovers(parent: str) -> list[str]:
    """Staging directories left behind in ``parent``."""
    return [n for n in os.listdir(parent) if ".tmp-" in n]
