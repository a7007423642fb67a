"""esm_dual.io.hub: the hub layout (safetensors, shards, pytorch_model.bin) read and written bit-exactly and
atomically; errors name the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from esm_dual.common.config import EsmConfig
from esm_dual.io.base import Checkpoint, CheckpointError
from esm_dual.io.hub import (
    iter_checkpoint_tensors,
    load_checkpoint,
    parse_size,
    read_checkpoint_config,
    save_checkpoint,
)
from tests.conftest import make_batch, tiny_config
from tests.io.helpers import assert_same, bits, torch_bits
from tests.utils import ROOT, hf_model, random_hub_tensors, write_hub_checkpoint

torch = pytest.importorskip("torch")


ml_dtypes = pytest.importorskip("ml_dtypes")


BF16 = np.dtype(ml_dtypes.bfloat16)




def _state_dict_bin(tensors: dict, dtype=None) -> dict:
    out = {}
    for k, v in tensors.items():
        t = torch.from_numpy(v.copy())
        out[k] = t.to(dtype) if dtype is not None else t
    return out


@pytest.mark.parametrize("head", ["mlm", "base", "seq", "tok"])
def test_hub_layout_roundtrip_is_bit_exact(tmp_path, flavour, head):
    cfg = tiny_config(flavour)
    src = tmp_path / "src"
    tensors = write_hub_checkpoint(str(src), cfg, head=head)
    ckpt = load_checkpoint(str(src))
    assert isinstance(ckpt, Checkpoint) and ckpt.layout == "safetensors" and ckpt.source == str(src)
    assert ckpt.config == EsmConfig.from_json_file(str(src / "config.json"))
    assert_same(ckpt.tensors, tensors)  # names kept as stored (no esm. prefix for EsmModel files)
    if head == "base":
        assert "embeddings.word_embeddings.weight" in ckpt.tensors
    if flavour == "esm2":  # what real facebook/esm2 files hold
        assert any(k.endswith("rotary_embeddings.inv_freq") for k in ckpt.tensors)

    out = tmp_path / "out"
    assert save_checkpoint(str(out), ckpt.config, ckpt.tensors) == str(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    again = load_checkpoint(str(out))
    assert_same(again.tensors, tensors)
    assert again.config == ckpt.config
    with open(src / "config.json") as f1, open(out / "config.json") as f2:
        assert json.load(f1) == json.load(f2)


def test_saved_directory_loads_in_transformers(tmp_path, batch):
    cfg = tiny_config("esm1b")
    write_hub_checkpoint(str(tmp_path / "src"), cfg)
    ck = load_checkpoint(str(tmp_path / "src"))
    save_checkpoint(str(tmp_path / "single"), ck.config, ck.tensors)
    save_checkpoint(str(tmp_path / "sharded"), ck.config, ck.tensors, max_shard_size="40KB")
    ids, mask = (torch.tensor(a) for a in batch)
    logits = {}
    for name in ("src", "single", "sharded"):
        with torch.no_grad():
            logits[name] = hf_model(str(tmp_path / name))(input_ids=ids, attention_mask=mask).logits.numpy()
    assert logits["src"].std() > 0.1
    np.testing.assert_array_equal(logits["src"], logits["single"])
    np.testing.assert_array_equal(logits["src"], logits["sharded"])


def test_sharded_write_and_read(tmp_path):
    cfg = tiny_config("esm2")
    tensors = random_hub_tensors(cfg)
    total = sum(v.nbytes for v in tensors.values())
    biggest = max(v.nbytes for v in tensors.values())
    out = tmp_path / "sharded"
    save_checkpoint(str(out), cfg, tensors, max_shard_size=20_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    n = len(shards)
    assert n > 2 and "model.safetensors" not in files
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    with open(out / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"] == {"total_size": total}
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    from safetensors.torch import load_file

    for shard in shards:  # each shard within the limit unless it holds a single larger tensor
        content = load_file(str(out / shard))
        size = sum(t.numel() * t.element_size() for t in content.values())
        assert size <= max(20_000, biggest)
        assert all(index["weight_map"][k] == shard for k in content)

    ck = load_checkpoint(str(out))
    assert ck.layout == "safetensors-sharded"
    assert_same(ck.tensors, tensors)
    streamed = list(iter_checkpoint_tensors(str(out)))
    assert sorted(k for k, _ in streamed) == sorted(tensors)
    assert_same(dict(streamed), tensors)
    assert read_checkpoint_config(str(out)) == cfg

    # one shard only -> plain model.safetensors, and the stale shards + index of the earlier save go
    save_checkpoint(str(out), cfg, tensors, max_shard_size="1GB")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert_same(load_checkpoint(str(out)).tensors, tensors)


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2MiB") == 2 * 2**20
    assert parse_size("10kb") == 10_000
    for bad in ("lots", "-1GB", 0, "5XB", True):
        with pytest.raises(CheckpointError):
            parse_size(bad)


def test_failed_save_leaves_nothing(tmp_path):
    cfg = tiny_config("esm2")
    tensors = random_hub_tensors(cfg)
    target = tmp_path / "target"
    with pytest.raises(CheckpointError, match="metadata"):
        save_checkpoint(str(target), cfg, tensors, metadata={"format": 1})
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary directory
    bad = dict(tensors, weird=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError, match="weird"):
        save_checkpoint(str(target), cfg, bad)
    assert os.listdir(tmp_path) == []
    # an existing checkpoint is left as it was by a failed save
    save_checkpoint(str(target), cfg, tensors)
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    with pytest.raises(CheckpointError):
        save_checkpoint(str(target), cfg, bad)
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["target"]


def test_save_keeps_other_files_and_permissions(tmp_path):
    cfg = tiny_config("esm2")
    tensors = random_hub_tensors(cfg)
    target = tmp_path / "t"
    save_checkpoint(str(target), cfg, tensors)
    mode = os.stat(target).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask
    (target / "vocab.txt").write_text("<cls>\n")
    save_checkpoint(str(target), cfg, tensors)
    assert (target / "vocab.txt").read_text() == "<cls>\n"


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_pytorch_model_bin(tmp_path, dtype):
    cfg = tiny_config("esm1v")
    tensors = random_hub_tensors(cfg)
    d = tmp_path / "bin"
    d.mkdir()
    cfg.save_pretrained(str(d))
    sd = _state_dict_bin(tensors, dtype)
    torch.save(sd, str(d / "pytorch_model.bin"))
    ck = load_checkpoint(str(d))
    assert ck.layout == "pytorch-bin"
    assert set(ck.tensors) == set(tensors)
    for k, t in sd.items():
        assert ck.tensors[k].dtype == (BF16 if dtype is not None else np.float32)
        np.testing.assert_array_equal(bits(ck.tensors[k]), torch_bits(t), err_msg=k)
    assert_same(dict(iter_checkpoint_tensors(str(d))), ck.tensors)

    # sharded .bin with an index (what the 3B and 15B repos hold)
    s = tmp_path / "bin_sharded"
    s.mkdir()
    cfg.save_pretrained(str(s))
    names = sorted(sd)
    half = len(names) // 2
    parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for fname, keys in parts.items():
        torch.save({k: sd[k] for k in keys}, str(s / fname))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (s / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ck2 = load_checkpoint(str(s))
    assert ck2.layout == "pytorch-bin-sharded"
    assert_same(ck2.tensors, ck.tensors)


def test_safetensors_preferred_and_explicit_file(tmp_path):
    cfg = tiny_config("esm2")
    d = tmp_path / "both"
    tensors = write_hub_checkpoint(str(d), cfg)
    other = {k: v + 1.0 for k, v in tensors.items()}
    torch.save(_state_dict_bin(other), str(d / "pytorch_model.bin"))
    assert_same(load_checkpoint(str(d)).tensors, tensors)  # safetensors first
    ck = load_checkpoint(str(d / "pytorch_model.bin"))  # but an explicit file is honoured
    assert ck.layout == "pytorch-bin"
    assert_same(ck.tensors, other)
    assert_same(load_checkpoint(str(d / "config.json")).tensors, tensors)


def test_missing_config_and_weights(tmp_path):
    cfg = tiny_config("esm2")
    d = tmp_path / "d"
    write_hub_checkpoint(str(d), cfg)
    os.remove(d / "config.json")
    with pytest.raises(CheckpointError, match=r"missing config\.json") as e:
        load_checkpoint(str(d))
    assert str(d) in str(e.value)

    e2 = tmp_path / "e"
    e2.mkdir()
    cfg.save_pretrained(str(e2))
    with pytest.raises(CheckpointError, match="no weights file") as e:
        load_checkpoint(str(e2))
    assert str(e2) in str(e.value)

    with pytest.raises(CheckpointError, match="not an existing file"):
        load_checkpoint(str(tmp_path / "nothing" / "here"))


def test_sharded_errors(tmp_path):
    cfg = tiny_config("esm2")
    tensors = random_hub_tensors(cfg)
    d = tmp_path / "s"
    save_checkpoint(str(d), cfg, tensors, max_shard_size=30_000)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"]["esm.ghost.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost"):
        load_checkpoint(str(d))
    os.remove(d / shard)
    with pytest.raises(CheckpointError, match="missing") as e:
        load_checkpoint(str(d))
    assert shard in str(e.value)
    index_path.write_text("{")
    with pytest.raises(CheckpointError, match="index"):
        load_checkpoint(str(d))


def test_import_does_not_pull_torch_or_tensorflow():
    code = ("import sys, esm_dual.io.hub, esm_dual.common.presets; "
            "bad = [m for m in ('torch', 'tensorflow', 'huggingface_hub') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_make_batch_has_padding_and_masks():
    ids, mask = make_batch()
    assert (ids == 32).any() and (mask == 0).any()


@pytest.mark.parametrize("absolute", [False, True])
def test_shard_index_pointing_outside_the_directory_is_refused(tmp_path, absolute):
    cfg = tiny_config("esm2")
    tensors = random_hub_tensors(cfg)
    other = tmp_path / "other"
    save_checkpoint(str(other), cfg, tensors)  # a complete, loadable checkpoint outside
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(cfg.to_json_string())
    target = str(other / "model.safetensors") if absolute else "../other/model.safetensors"
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, target)}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="leaves the checkpoint directory") as e:
        load_checkpoint(str(d))
    assert str(d / "model.safetensors.index.json") in str(e.value) and target in str(e.value)


def test_invalid_config_json_names_the_file_once(tmp_path):
    d = tmp_path / "m"
    write_hub_checkpoint(str(d), tiny_config("esm2"))
    (d / "config.json").write_text('{"hidden_size": 18,')
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(d))
    msg = str(e.value)
    assert "not valid JSON" in msg and msg.count("config.json") == 1, msg
