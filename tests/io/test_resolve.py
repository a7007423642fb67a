"""esm_dual.io.resolve: hub ids offline, without huggingface_hub, from a cached snapshot."""

from __future__ import annotations

import os
import sys

import pytest

from esm_dual.io.base import CheckpointError
from esm_dual.io.hub import (
    load_checkpoint,
)
from esm_dual.io.resolve import resolve_checkpoint
from tests.conftest import tiny_config
from tests.io.helpers import assert_same
from tests.utils import write_hub_checkpoint


def test_offline_hub_id_says_what_to_pass(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spelling in ("facebook/esm2_t6_8M_UR50D", "esm2_t6_8M_UR50D", "esm2_t6_8M_UR50D.pt"):
        with pytest.raises(CheckpointError) as e:
            resolve_checkpoint(spelling, cache_dir=tmp_path / "cache")
        msg = str(e.value)
        assert "facebook/esm2_t6_8M_UR50D" in msg and "offline" in msg
        assert "config.json" in msg and "model.safetensors" in msg
        assert "https://huggingface.co/facebook/esm2_t6_8M_UR50D" in msg
        assert "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt" in msg
        assert "https://dl.fbaipublicfiles.com/fair-esm/regression/esm2_t6_8M_UR50D-contact-regression.pt" in msg
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("esm1v_t33_650M_UR90S_2", cache_dir=tmp_path / "cache")
    assert "esm1v_t33_650M_UR90S_2.pt" in str(e.value) and "contact-regression" not in str(e.value)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("someone/some_model", cache_dir=tmp_path / "cache")
    assert "someone/some_model" in str(e.value) and "fair-esm .pt file path" in str(e.value)
    with pytest.raises(CheckpointError, match="offline"):
        load_checkpoint("esm2_t6_8M_UR50D")


def test_offline_uses_a_cached_snapshot(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    repo = cache / "models--facebook--esm2_t6_8M_UR50D"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    cfg = tiny_config("esm2")
    tensors = write_hub_checkpoint(str(snap), cfg)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    path = resolve_checkpoint("esm2_t6_8M_UR50D", cache_dir=cache)
    assert os.path.samefile(path, snap)
    assert_same(load_checkpoint(path).tensors, tensors)


def test_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="huggingface_hub is not installed") as e:
        resolve_checkpoint("facebook/esm1b_t33_650M_UR50S")
    assert "esm1b_t33_650M_UR50S.pt" in str(e.value)
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)  # local paths need nothing
    with pytest.raises(CheckpointError, match="not an existing file"):
        resolve_checkpoint("no such thing")
