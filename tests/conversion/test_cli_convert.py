"""``esm-dual convert``: output, exit status, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import esm_dual.conversion as conv
from esm_dual.cli.main import main
from tests.conversion.helpers import assert_same_tensors, hub_tensors, leftovers, make_hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cli") / "esm2")
    make_hub(d, "esm2", "mlm")
    return d


def test_convert_with_verify(hub, tmp_path, capsys):
    dst = str(tmp_path / "esm2_t3.pt")
    assert main(["convert", hub, dst, "--verify"]) == 0  # --to inferred from .pt
    out, err = capsys.readouterr()
    assert f"wrote {dst} (fair-esm" in out
    assert "verify logits: max |diff| = 0 (pt -> pt, tolerance 1e-05) ok" in err
    assert "verify contacts" in err
    assert "esm.embeddings.position_embeddings.weight" in err  # said to be left out
    back = str(tmp_path / "back")
    assert main(["convert", dst, back, "--to", "hf", "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert_same_tensors(hub_tensors(hub), hub_tensors(back), skip=["esm.embeddings.position_embeddings.weight"])


def test_convert_dtype_and_shards(hub, tmp_path, capsys):
    dst = str(tmp_path / "o")
    assert main(["convert", hub, dst, "--to", "hf", "--dtype", "fp16", "--max-shard-size", "30KB"]) == 0
    assert "cast to float16" in capsys.readouterr().out
    assert os.path.exists(os.path.join(dst, "model.safetensors.index.json"))
    assert hub_tensors(dst)["lm_head.bias"].dtype == np.float16


@pytest.mark.parametrize("argv, message", [
    (["--to", "hf"], "already exists; pass overwrite=True (--overwrite)"),
    (["--to", "tf-h5", "--dtype", "bf16"], "cannot hold bfloat16"),
    ([], "say which layout to write"),
])
def test_errors_one_line_exit_2(hub, tmp_path, capsys, argv, message):
    dst = tmp_path / "exists"
    dst.mkdir()
    if "exists" not in message and "already" not in message:
        dst.rmdir()
    assert main(["convert", hub, str(dst), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("esm-dual: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert leftovers(str(tmp_path)) == []


def test_bad_source_exit_2(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x10\x00")
    (tmp_path / "config.json").write_text("{}")
    assert main(["convert", str(bad), str(tmp_path / "o"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.safetensors" in err and "Traceback" not in err


def test_verify_failure_exit_1(hub, tmp_path, capsys, monkeypatch):
    orig = conv._get_hook

    def hook(source):
        get = orig(source)
        return lambda n: get(n) * np.float32(1.01) if n == "lm_head.dense.weight" else get(n)

    monkeypatch.setattr(conv, "_get_hook", hook)
    dst = str(tmp_path / "o")
    assert main(["convert", hub, dst, "--to", "tf-h5", "--verify"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "esm-dual: error: verification failed: logits max |diff|" in err
    assert "nothing was written" in err
    assert not os.path.exists(dst) and leftovers(str(tmp_path)) == []


def test_help_lists_convert():
    r = subprocess.run([sys.executable, "-m", "esm_dual.cli.main", "convert", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    for flag in ("--to", "--dtype", "--verify", "--overwrite", "--config", "--max-shard-size"):
        assert flag in r.stdout
