"""esm_dual.convert on inputs that must be refused early or reported: untied LM heads, head tensors of
another architecture, incomplete optional heads, buffers a target cannot hold, messages that name the
user's paths (never the staging directory), and the dtype recorded in the config written."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import esm_dual
import esm_dual.conversion as conv
from esm_dual.cli.main import main
from esm_dual.io.base import CheckpointError
from esm_dual.io.hub import save_checkpoint
from tests.conftest import tiny_config
from tests.conversion.helpers import assert_same_tensors, hub_tensors, leftovers, make_hub
from tests.utils import random_hub_tensors

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A hub MLM checkpoint with tie_word_embeddings=False and its own decoder, as transformers saves it."""
    d = str(tmp_path_factory.mktemp("untied") / "hub")
    config = tiny_config("esm2", intermediate_size=72, tie_word_embeddings=False, architectures=["EsmForMaskedLM"])
    tensors = random_hub_tensors(config, "mlm", 0)
    rng = np.random.default_rng(1)
    tensors["lm_head.decoder.weight"] = rng.normal(0, 0.2, size=(33, 18)).astype(np.float32)
    save_checkpoint(d, config, tensors)
    return d


@pytest.mark.parametrize("to", ["hf", "keras", "tf-h5"])
def test_untied_decoder_converts_and_round_trips(untied, tmp_path, to):
    dst = {"hf": str(tmp_path / "o"), "keras": str(tmp_path / "o.keras"), "tf-h5": str(tmp_path / "o_tf")}[to]
    report = esm_dual.convert(untied, dst, to=to, verify=True)
    assert max(report.verify.values()) <= report.tolerance
    if to == "tf-h5":
        with h5py.File(os.path.join(dst, "tf_model.h5"), "r") as f:  # transformers 4.x TF: lm_head/decoder Dense
            assert "tf_esm_for_masked_lm/lm_head/decoder/kernel:0" in f["lm_head"]
    back = str(tmp_path / "back")
    esm_dual.convert(dst, back, to="hf", verify=True)
    assert_same_tensors(hub_tensors(untied), hub_tensors(back), skip=report.dropped)


def test_untied_decoder_refused_by_fair_esm_before_writing(untied, tmp_path):
    dst = str(tmp_path / "esm2_t3_x.pt")
    with pytest.raises(CheckpointError, match=r"esm2_t3_x.pt: fair-esm cannot represent .*tie_word_embeddings"):
        esm_dual.convert(untied, dst, to="fair-esm")
    assert os.listdir(tmp_path) == []


def test_tied_config_with_a_different_decoder_is_refused(untied, tmp_path):
    src = str(tmp_path / "src")
    cfg = json.loads(open(os.path.join(untied, "config.json")).read())
    save_checkpoint(src, conv.EsmConfig.from_dict({**cfg, "tie_word_embeddings": True}), hub_tensors(untied))
    with pytest.raises(CheckpointError, match=r"src: tensor 'lm_head.decoder.weight' differs from"):
        esm_dual.convert(src, str(tmp_path / "o"), to="hf")


def _with(src: str, dst: str, add: dict | None = None, drop: tuple = ()) -> str:
    t = load_file(os.path.join(src, "model.safetensors"))
    t = {k: v for k, v in t.items() if k not in drop}
    t.update(add or {})
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mlm") / "hub")
    make_hub(d, "esm2", "mlm")
    return d


@pytest.mark.parametrize("to", ["hf", "keras", "tf-h5", "fair-esm"])
def test_head_tensors_of_another_architecture_are_named_before_writing(mlm, tmp_path, to):
    src = _with(mlm, str(tmp_path / "src"), {"classifier.weight": np.zeros((2, 18), np.float32),
                                             "classifier.bias": np.zeros(2, np.float32)})
    dst = str(tmp_path / ("esm2_x.pt" if to == "fair-esm" else "o.keras" if to == "keras" else "o"))
    with pytest.raises(CheckpointError, match=r"src: head tensor\(s\) that an ESM EsmForMaskedLM does not have.*"
                                              r"classifier.bias, classifier.weight"):
        esm_dual.convert(src, dst, to=to)
    assert not os.path.exists(dst) and leftovers(str(tmp_path)) == []


def test_unknown_tensor_in_a_known_head_is_named(mlm, tmp_path):
    src = _with(mlm, str(tmp_path / "src"), {"lm_head.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"src: tensor\(s\) that are not part of .*lm_head.extra.weight"):
        esm_dual.convert(src, str(tmp_path / "o.keras"), to="keras")


@pytest.mark.parametrize("verify", [False, True])
def test_incomplete_contact_head_refused_when_read(mlm, tmp_path, capsys, verify):
    src = _with(mlm, str(tmp_path / "src"), drop=("esm.contact_head.regression.weight",))
    dst = str(tmp_path / "o")
    with pytest.raises(CheckpointError, match=r"src: the contact_head is incomplete: missing tensor\(s\) "
                                              r"esm.contact_head.regression.weight"):
        esm_dual.convert(src, dst, to="hf", verify=verify)
    assert not os.path.exists(dst)
    args = ["convert", src, dst, "--to", "hf"] + (["--verify"] if verify else [])
    assert main(args) == 2  # bad input (1 is for a verification that fails)
    err = capsys.readouterr().err
    assert src in err and "esm.contact_head.regression.weight" in err
    assert not os.path.exists(dst)


def test_tf_h5_lists_the_position_ids_it_drops(mlm, tmp_path):
    src = _with(mlm, str(tmp_path / "src"), {"esm.embeddings.position_ids": np.arange(1026, dtype=np.int64)[None]})
    report = esm_dual.convert(src, str(tmp_path / "o"), to="tf-h5")
    assert "esm.embeddings.position_ids" in report.dropped


def test_errors_name_the_destination_not_the_staging_directory(mlm, tmp_path, monkeypatch, capsys):
    """A writer failing inside the staging directory, and a destination that does not load back (--verify)."""
    import ml_dtypes

    orig = conv._get_hook

    def hook(source):
        get = orig(source)
        return lambda n: get(n).astype(ml_dtypes.bfloat16) if n == "lm_head.bias" else get(n)

    monkeypatch.setattr(conv, "_get_hook", hook)
    dst = str(tmp_path / "out_tf")
    with pytest.raises(CheckpointError) as e:
        esm_dual.convert(mlm, dst, to="tf-h5")
    assert ".tmp-" not in str(e.value) and f"{dst}/tf_model.h5: tensor 'lm_head.bias'" in str(e.value)
    assert main(["convert", mlm, dst, "--to", "tf-h5"]) == 2
    err = capsys.readouterr().err
    assert ".tmp-" not in err and f"{dst}/tf_model.h5" in err

    def transposing(source):
        get = orig(source)
        name = "esm.encoder.layer.1.intermediate.dense.weight"
        return lambda n: np.ascontiguousarray(get(n).T) if n == name else get(n)

    monkeypatch.setattr(conv, "_get_hook", transposing)
    with pytest.raises(conv.VerificationError) as e:
        esm_dual.convert(mlm, dst, to="tf-h5", verify=True)
    assert ".tmp-" not in str(e.value) and str(e.value).startswith(f"{dst}: the converted checkpoint does not load")
    assert not os.path.exists(dst) and leftovers(str(tmp_path)) == []


@pytest.mark.parametrize("to", ["hf", "tf-h5"])
def test_cast_records_the_new_dtype_in_the_config(mlm, tmp_path, to):
    dst = str(tmp_path / "o")
    esm_dual.convert(mlm, dst, to=to, dtype="float16")
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["dtype"] == "float16"
    from esm_dual.pt import EsmForMaskedLM

    if to == "hf":
        assert EsmForMaskedLM.from_pretrained(dst, torch_dtype="auto").dtype == torch.float16
