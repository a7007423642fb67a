"""esm_dual.io.schema: shapes a config implies, tensor-name checks, integer and non-finite weights refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from esm_dual.io.base import CheckpointError
from esm_dual.io.hub import (
    load_checkpoint,
    save_checkpoint,
)
from esm_dual.io.schema import (
    BENIGN_ALWAYS,
    DEFAULT_BENIGN,
    benign_tensor_patterns,
    check_tensor_names,
    validate_shapes,
)
from tests.conftest import tiny_config
from tests.utils import random_hub_tensors, write_hub_checkpoint


def test_validate_shapes(tmp_path):
    cfg = tiny_config("esm1b")
    tensors = random_hub_tensors(cfg)
    validate_shapes(cfg, tensors, "mem")  # consistent
    bad = dict(tensors)
    bad["esm.encoder.layer.1.intermediate.dense.weight"] = np.zeros((36, 18), np.float32)
    with pytest.raises(CheckpointError) as e:
        validate_shapes(cfg, bad, "somewhere")
    msg = str(e.value)
    assert "somewhere" in msg and "esm.encoder.layer.1.intermediate.dense.weight" in msg
    assert "[37, 18]" in msg and "[36, 18]" in msg
    bad = dict(tensors, **{"esm.encoder.layer.3.output.dense.bias": np.zeros(18, np.float32)})
    with pytest.raises(CheckpointError, match="layer 3"):
        validate_shapes(cfg, bad, "x")
    # load_checkpoint checks shapes against config.json
    write_hub_checkpoint(str(tmp_path / "d"), cfg)
    cfg.copy(intermediate_size=40).save_pretrained(str(tmp_path / "d"))
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.weight.*\[40, 18\].*\[37, 18\]"):
        load_checkpoint(str(tmp_path / "d"))
    # classification heads follow num_labels
    seq = random_hub_tensors(tiny_config("esm2", num_labels=3), head="seq")
    validate_shapes(tiny_config("esm2", num_labels=3), seq, "x")
    with pytest.raises(CheckpointError, match="classifier.out_proj.weight"):
        validate_shapes(tiny_config("esm2", num_labels=4), seq, "x")


def test_check_tensor_names():
    expected = {"esm.a.weight", "esm.b.weight", "lm_head.decoder.weight", "esm.embeddings.position_ids"}
    found = {"esm.a.weight", "esm.b.weight", "esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq",
             "esm.embeddings.position_embeddings.weight"}
    ignored_missing, ignored_unexpected = check_tensor_names(expected, found, "src")
    assert ignored_missing == {"lm_head.decoder.weight", "esm.embeddings.position_ids"}
    assert ignored_unexpected == {"esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq",
                                  "esm.embeddings.position_embeddings.weight"}
    with pytest.raises(CheckpointError) as e:
        check_tensor_names(expected | {"esm.c.bias"}, found | {"esm.zzz"}, "file.safetensors")
    msg = str(e.value)
    assert "file.safetensors" in msg and "missing tensor(s): esm.c.bias" in msg
    assert "unexpected tensor(s): esm.zzz" in msg
    with pytest.raises(CheckpointError, match="lm_head.decoder.weight"):
        check_tensor_names(expected, found, "x", benign=())
    # config-aware list: a learned position table is only benign for rotary models
    assert benign_tensor_patterns(tiny_config("esm2")) == DEFAULT_BENIGN
    assert benign_tensor_patterns(tiny_config("esm1b")) == BENIGN_ALWAYS
    with pytest.raises(CheckpointError, match="position_embeddings"):
        check_tensor_names({"esm.embeddings.position_embeddings.weight"}, set(), "x",
                           benign=benign_tensor_patterns(tiny_config("esm1b")))


def test_integer_weight_is_refused_naming_the_tensor(tmp_path):
    cfg = tiny_config("esm2")
    tensors = random_hub_tensors(cfg)
    name = "esm.encoder.layer.0.attention.self.query.weight"
    tensors[name] = tensors[name].astype(np.int32)
    save_checkpoint(str(tmp_path), cfg, tensors)
    with pytest.raises(CheckpointError, match=rf"{name}: stored as int32, but ESM weights are floating point"):
        load_checkpoint(str(tmp_path))


NAN_NAME = "esm.encoder.layer.1.attention.self.value.weight"
INF_NAME = "lm_head.bias"


def _non_finite_hub(tmp_path) -> str:
    d = str(tmp_path / "nan")
    tensors = write_hub_checkpoint(d, tiny_config("esm2"))
    ck = load_checkpoint(d)
    ck.tensors[NAN_NAME] = ck.tensors[NAN_NAME].copy()
    ck.tensors[NAN_NAME][0, 3] = np.nan
    ck.tensors[INF_NAME] = ck.tensors[INF_NAME].copy()
    ck.tensors[INF_NAME][5] = -np.inf
    save_checkpoint(d, ck.config, ck.tensors)
    assert set(ck.tensors) == set(tensors)
    return d


def test_check_finite_names_the_tensors():
    from esm_dual.io.schema import check_finite

    ok = {"a": np.ones(3, np.float32), "ids": np.arange(3)}
    check_finite(ok, "mem")
    bad = dict(ok, b=np.array([1.0, np.inf], np.float16), c=np.array([np.nan], np.float64))
    with pytest.raises(CheckpointError, match="mem: tensor.*NaN or infinite") as e:
        check_finite(bad, "mem")
    assert "b (0 NaN, 1 inf of 2 values)" in str(e.value) and "c (1 NaN, 0 inf" in str(e.value)


def test_non_finite_weights_are_refused_when_a_model_is_built(tmp_path, capsys):
    """NaN/inf weights would give NaN outputs and exit 0; every model built from tensors refuses them by name."""
    pytest.importorskip("torch")
    from esm_dual.cli.main import main
    from esm_dual.pt import EsmForMaskedLM, EsmModel

    d = _non_finite_hub(tmp_path)
    for cls in (EsmForMaskedLM, EsmModel):
        with pytest.raises(CheckpointError, match="NaN or infinite") as e:
            cls.from_pretrained(d)
        assert NAN_NAME in str(e.value) and INF_NAME in str(e.value) and d in str(e.value)
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    rc = main(["embed", str(fasta), str(tmp_path / "out.h5"), "--model", d, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and NAN_NAME in err, err
    assert not (tmp_path / "out.h5").exists()


def test_non_finite_weights_are_refused_by_the_keras_model(tmp_path):
    pytest.importorskip("tensorflow")
    from esm_dual.tf import TFEsmForMaskedLM

    d = _non_finite_hub(tmp_path)
    with pytest.raises(CheckpointError, match="NaN or infinite") as e:
        TFEsmForMaskedLM.from_pretrained(d)
    assert NAN_NAME in str(e.value)
