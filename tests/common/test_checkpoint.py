"""Checkpoint I/O: hub layout (safetensors, shards, pytorch_model.bin), fair-esm files, safety, errors."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from esm_dual.common.config import EsmConfig
from esm_dual.io.base import Checkpoint, CheckpointError
from esm_dual.io.fair_esm import read_fair_esm, save_fair_esm
from esm_dual.io.hub import (
    iter_checkpoint_tensors,
    load_checkpoint,
    parse_size,
    read_checkpoint_config,
    save_checkpoint,
)
from esm_dual.io.resolve import resolve_checkpoint
from esm_dual.io.schema import (
    BENIGN_ALWAYS,
    DEFAULT_BENIGN,
    benign_tensor_patterns,
    check_tensor_names,
    validate_shapes,
)
from tests.conftest import make_batch, tiny_config
from tests.utils import hf_model, random_hub_tensors, write_hub_checkpoint

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = np.dtype(ml_dtypes.bfloat16)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMB = "esm.embeddings.word_embeddings.weight"
FAIR_STEMS = {"esm2": "esm2_t3_tiny", "esm1b": "esm1b_t3_tiny", "esm1v": "esm1v_t3_tiny_1"}


def _fair_config(flavour: str) -> EsmConfig:
    # fair-esm's ESM2 hard-codes the FFN width to 4 * embed_dim
    return tiny_config(flavour, intermediate_size=72) if flavour == "esm2" else tiny_config(flavour)


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of an array (bit-exact comparisons, NaN-safe, dtype-agnostic)."""
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(_bits(a[k]), _bits(b[k]), err_msg=k)


def _torch_to_numpy_bits(t) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return _bits(t.numpy())


# ================================================================================================
# hub layout
# ================================================================================================


@pytest.mark.parametrize("head", ["mlm", "base", "seq", "tok"])
def test_hub_layout_roundtrip_is_bit_exact(tmp_path, flavour, head):
    cfg = tiny_config(flavour)
    src = tmp_path / "src"
    tensors = write_hub_checkpoint(str(src), cfg, head=head)
    ckpt = load_checkpoint(str(src))
    assert isinstance(ckpt, Checkpoint) and ckpt.layout == "safetensors" and ckpt.source == str(src)
    assert ckpt.config == EsmConfig.from_json_file(str(src / "config.json"))
    _assert_same(ckpt.tensors, tensors)  # names kept as stored (no esm. prefix for EsmModel files)
    if head == "base":
        assert "embeddings.word_embeddings.weight" in ckpt.tensors
    if flavour == "esm2":  # what real facebook/esm2 files hold
        assert any(k.endswith("rotary_embeddings.inv_freq") for k in ckpt.tensors)

    out = tmp_path / "out"
    assert save_checkpoint(str(out), ckpt.config, ckpt.tensors) == str(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    again = load_checkpoint(str(out))
    _assert_same(again.tensors, tensors)
    assert again.config == ckpt.config
    with open(src / "config.json") as f1, open(out / "config.json") as f2:
        assert json.load(f1) == json.load(f2)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_low_precision_roundtrip_and_interop_with_safetensors(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cfg = tiny_config("esm2")
    tensors = random_hub_tensors(cfg)
    np_dtype = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    cast = {k: v.astype(np_dtype) for k, v in tensors.items()}

    # ours -> ours
    save_checkpoint(str(tmp_path / "a"), cfg, cast, metadata={"note": "x"})
    ck = load_checkpoint(str(tmp_path / "a"))
    _assert_same(ck.tensors, cast)
    assert all(v.dtype == np_dtype for v in ck.tensors.values())

    # ours -> safetensors' own reader (via torch): bit-identical, metadata as HF writes it
    theirs = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert set(theirs) == set(cast)
    for k, t in theirs.items():
        assert str(t.dtype) == f"torch.{dtype}"
        np.testing.assert_array_equal(_torch_to_numpy_bits(t), _bits(cast[k]), err_msg=k)
    with safe_open(str(tmp_path / "a" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}

    # safetensors' own writer (via torch) -> ours
    tt = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in tensors.items()}
    (tmp_path / "b").mkdir()
    save_file(tt, str(tmp_path / "b" / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(tmp_path / "b"))
    ck = load_checkpoint(str(tmp_path / "b"))
    for k, t in tt.items():
        assert ck.tensors[k].dtype == np_dtype
        np.testing.assert_array_equal(_bits(ck.tensors[k]), _torch_to_numpy_bits(t), err_msg=k)


def test_bfloat16_without_ml_dtypes_reads_exact_float32(tmp_path, monkeypatch):
    import esm_dual.io.safetensors as ckmod

    cfg = tiny_config("esm2")
    tensors = {k: v.astype(BF16) for k, v in random_hub_tensors(cfg).items()}
    save_checkpoint(str(tmp_path / "d"), cfg, tensors)
    monkeypatch.setattr(ckmod, "bfloat16", lambda: None)
    monkeypatch.setitem(ckmod._ST_NUMPY, "BF16", lambda: None)
    with pytest.warns(UserWarning, match="ml_dtypes is not installed"):
        ck = load_checkpoint(str(tmp_path / "d"))
    for k, v in tensors.items():
        assert ck.tensors[k].dtype == np.float32
        np.testing.assert_array_equal(ck.tensors[k], v.astype(np.float32), err_msg=k)


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
    _assert_same(ck.tensors, tensors)
    streamed = list(iter_checkpoint_tensors(str(out)))
    assert sorted(k for k, _ in streamed) == sorted(tensors)
    _assert_same(dict(streamed), tensors)
    assert read_checkpoint_config(str(out)) == cfg

    # one shard only -> plain model.safetensors, and the stale shards + index of the earlier save go
    save_checkpoint(str(out), cfg, tensors, max_shard_size="1GB")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    _assert_same(load_checkpoint(str(out)).tensors, tensors)


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


def _state_dict_bin(tensors: dict, dtype=None) -> dict:
    out = {}
    for k, v in tensors.items():
        t = torch.from_numpy(v.copy())
        out[k] = t.to(dtype) if dtype is not None else t
    return out


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
        np.testing.assert_array_equal(_bits(ck.tensors[k]), _torch_to_numpy_bits(t), err_msg=k)
    _assert_same(dict(iter_checkpoint_tensors(str(d))), ck.tensors)

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
    _assert_same(ck2.tensors, ck.tensors)


def test_safetensors_preferred_and_explicit_file(tmp_path):
    cfg = tiny_config("esm2")
    d = tmp_path / "both"
    tensors = write_hub_checkpoint(str(d), cfg)
    other = {k: v + 1.0 for k, v in tensors.items()}
    torch.save(_state_dict_bin(other), str(d / "pytorch_model.bin"))
    _assert_same(load_checkpoint(str(d)).tensors, tensors)  # safetensors first
    ck = load_checkpoint(str(d / "pytorch_model.bin"))  # but an explicit file is honoured
    assert ck.layout == "pytorch-bin"
    _assert_same(ck.tensors, other)
    _assert_same(load_checkpoint(str(d / "config.json")).tensors, tensors)


def test_dtype_cast(tmp_path):
    cfg = tiny_config("esm2")
    tensors = write_hub_checkpoint(str(tmp_path / "d"), cfg)
    for spec, want in (("float16", np.float16), ("bfloat16", BF16), (np.float16, np.float16)):
        ck = load_checkpoint(str(tmp_path / "d"), dtype=spec)
        for k, v in ck.tensors.items():
            if k.endswith("inv_freq"):  # stored values kept exactly
                assert v.dtype == np.float32
                np.testing.assert_array_equal(v, tensors[k])
            else:
                assert v.dtype == np.dtype(want), k
                np.testing.assert_array_equal(v, tensors[k].astype(want))
    for bad in ("int8", "float128x", np.int32):
        with pytest.raises(CheckpointError):
            load_checkpoint(str(tmp_path / "d"), dtype=bad)


# ================================================================================================
# errors
# ================================================================================================


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


def test_truncated_and_corrupt_safetensors(tmp_path):
    cfg = tiny_config("esm2")
    d = tmp_path / "d"
    write_hub_checkpoint(str(d), cfg)
    path = d / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])

    path.write_bytes(data[:-10])  # truncated inside the last tensor
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_checkpoint(str(d))
    assert str(path) in str(e.value) and last in str(e.value)

    path.write_bytes(data[: 8 + n // 2])  # truncated inside the header
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_checkpoint(str(d))
    assert str(path) in str(e.value)

    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_checkpoint(str(d))
    assert str(path) in str(e.value)

    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(str(d))

    # header entry inconsistent with its dtype/shape
    bad = dict(header)
    bad[last] = dict(header[last], shape=[999])
    raw = json.dumps(bad).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as e:
        load_checkpoint(str(d))
    assert last in str(e.value)


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


# ================================================================================================
# resolving names / hub ids
# ================================================================================================


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
    _assert_same(load_checkpoint(path).tensors, tensors)


def test_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="huggingface_hub is not installed") as e:
        resolve_checkpoint("facebook/esm1b_t33_650M_UR50S")
    assert "esm1b_t33_650M_UR50S.pt" in str(e.value)
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)  # local paths need nothing
    with pytest.raises(CheckpointError, match="not an existing file"):
        resolve_checkpoint("no such thing")


def test_import_does_not_pull_torch_or_tensorflow():
    code = ("import sys, esm_dual.io.hub, esm_dual.common.presets; "
            "bad = [m for m in ('torch', 'tensorflow', 'huggingface_hub') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ================================================================================================
# fair-esm files
# ================================================================================================


def _fair_esm_load(path):
    esm = pytest.importorskip("esm")
    # fair-esm calls torch.load without weights_only; torch >= 2.6 then needs Namespace allowlisted
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    return model.eval(), alphabet


@pytest.mark.filterwarnings("ignore:Regression weights not found")
def test_fair_esm_roundtrip_matches_fair_esm_and_transformers(tmp_path, flavour, batch):
    cfg = _fair_config(flavour)
    tensors = random_hub_tensors(cfg)
    path = tmp_path / f"{FAIR_STEMS[flavour]}.pt"
    assert save_fair_esm(str(path), cfg, tensors) == str(path)
    assert (tmp_path / f"{FAIR_STEMS[flavour]}-contact-regression.pt").is_file()

    # fair-esm's own loader reads it (strict load: every name mapped) ...
    model, alphabet = _fair_esm_load(path)
    assert alphabet.mask_idx == 32 and alphabet.padding_idx == 1
    ids, mask = batch
    with torch.no_grad():
        out = model(torch.tensor(ids), return_contacts=flavour != "esm1v")
    fair_logits = out["logits"].numpy()
    assert fair_logits.std() > 0.1

    # ... and read_fair_esm gives back the original tensors (fair-esm's <mask> row zeroing for 1b/1v)
    ck = read_fair_esm(str(path))
    assert ck.layout == "fair-esm" and ck.source == str(path)
    expected = {k: v.copy() for k, v in tensors.items()}
    if flavour == "esm2":
        del expected["esm.embeddings.position_embeddings.weight"]  # HF's unused table; fair-esm has none
    else:
        expected[EMB][32] = 0.0
        assert np.abs(tensors[EMB][32]).sum() > 0
    _assert_same(ck.tensors, expected)
    c = ck.config
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "position_embedding_type", "emb_layer_norm_before", "token_dropout", "vocab_size",
                  "pad_token_id", "mask_token_id", "layer_norm_eps", "max_position_embeddings"):
        assert getattr(c, field) == getattr(cfg, field), field
    assert c.hidden_dropout_prob == 0.0 and c.attention_probs_dropout_prob == 0.0

    # transformers on the same weights gives the same logits (and contacts): the mapping is right both ways
    save_checkpoint(str(tmp_path / "hf"), ck.config, ck.tensors)
    hf = hf_model(str(tmp_path / "hf"))
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        hf_logits = hf(input_ids=t_ids, attention_mask=t_mask).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits[real], fair_logits[real], atol=1e-5, rtol=0)
    if flavour != "esm1v":
        with torch.no_grad():
            hf_contacts = hf.predict_contacts(t_ids, t_mask).numpy()
        fair_contacts = out["contacts"].numpy()
        for b, n in enumerate(mask.sum(1) - 2):
            np.testing.assert_allclose(hf_contacts[b, :n, :n], fair_contacts[b, :n, :n], atol=1e-5, rtol=0)

    # and the file written back from what was read is read identically
    path2 = tmp_path / "again" / path.name
    save_fair_esm(str(path2), ck.config, ck.tensors)
    _assert_same(read_fair_esm(str(path2)).tensors, ck.tensors)
    _assert_same(dict(iter_checkpoint_tensors(str(path2))), ck.tensors)
    assert load_checkpoint(str(path2)).config == ck.config


def test_fair_esm_file_layout(tmp_path):
    """What save_fair_esm writes is shaped like the released files (as fair-esm's loader expects)."""
    cfg = _fair_config("esm2")
    path = tmp_path / "esm2_t3_tiny.pt"
    save_fair_esm(str(path), cfg, random_hub_tensors(cfg))
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(str(path), weights_only=True)
        reg = torch.load(str(tmp_path / "esm2_t3_tiny-contact-regression.pt"), weights_only=True)
    ns = data["cfg"]["model"]
    assert isinstance(ns, argparse.Namespace)
    assert (ns.encoder_layers, ns.encoder_embed_dim, ns.encoder_attention_heads, ns.token_dropout) == (3, 18, 3, True)
    sd = data["model"]
    assert "encoder.sentence_encoder.layers.0.self_attn.rot_emb.inv_freq" in sd
    assert "encoder.sentence_encoder.emb_layer_norm_after.weight" in sd
    assert "encoder.lm_head.dense.weight" in sd
    # tied decoder: the very same storage, as in released files
    assert sd["encoder.lm_head.weight"].data_ptr() == sd["encoder.sentence_encoder.embed_tokens.weight"].data_ptr()
    assert not any("embed_positions" in k or "contact_head" in k for k in sd)
    assert set(reg["model"]) == {"contact_head.regression.weight", "contact_head.regression.bias"}

    cfg1 = _fair_config("esm1b")
    p1 = tmp_path / "esm1b_t3_tiny.pt"
    save_fair_esm(str(p1), cfg1, random_hub_tensors(cfg1))
    with torch.serialization.safe_globals([argparse.Namespace]):
        d1 = torch.load(str(p1), weights_only=True)
    assert d1["args"].arch == "roberta_large" and d1["args"].max_positions == 1024
    assert "encoder.sentence_encoder.embed_positions.weight" in d1["model"]
    assert "encoder.sentence_encoder.emb_layer_norm_before.weight" in d1["model"]


def test_fair_esm_untied_decoder_kept(tmp_path):
    cfg = _fair_config("esm1b")
    tensors = random_hub_tensors(cfg)
    path = tmp_path / "esm1b_t3_tiny.pt"
    save_fair_esm(str(path), cfg, tensors)
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(str(path), weights_only=True)
    untied = data["model"]["encoder.sentence_encoder.embed_tokens.weight"].clone() + 1.0
    data["model"]["encoder.lm_head.weight"] = untied
    torch.save(data, str(path))
    ck = read_fair_esm(str(path))
    np.testing.assert_array_equal(ck.tensors["lm_head.decoder.weight"], untied.numpy())
    assert ck.tensors[EMB][32].sum() == 0
    with pytest.raises(CheckpointError, match="lm_head.decoder.weight"):
        save_fair_esm(str(tmp_path / "esm1b_t3_b.pt"), ck.config, ck.tensors)


def test_save_fair_esm_refuses_what_fair_esm_cannot_load(tmp_path):
    cfg = _fair_config("esm2")
    tensors = random_hub_tensors(cfg)
    with pytest.raises(CheckpointError, match="start with 'esm2'"):
        save_fair_esm(str(tmp_path / "model.pt"), cfg, tensors)
    cfg1 = _fair_config("esm1b")
    with pytest.raises(CheckpointError, match="not start with 'esm2'"):
        save_fair_esm(str(tmp_path / "esm2_fake.pt"), cfg1, random_hub_tensors(cfg1))
    cfg37 = tiny_config("esm2")  # FFN 37 != 4 * 18
    with pytest.raises(CheckpointError, match="intermediate_size"):
        save_fair_esm(str(tmp_path / "esm2_x.pt"), cfg37, random_hub_tensors(cfg37))
    base = random_hub_tensors(cfg, head="base")  # EsmModel: a pooler, no LM head
    with pytest.raises(CheckpointError, match="no fair-esm equivalent: pooler.dense.bias, pooler.dense.weight"):
        save_fair_esm(str(tmp_path / "esm2_y.pt"), cfg, base)
    no_pooler = {k: v for k, v in base.items() if not k.startswith("pooler.")}
    with pytest.raises(CheckpointError, match="lm_head"):
        save_fair_esm(str(tmp_path / "esm2_y.pt"), cfg, no_pooler)
    seq = random_hub_tensors(cfg, head="seq")
    with pytest.raises(CheckpointError, match="classifier"):
        save_fair_esm(str(tmp_path / "esm2_z.pt"), cfg, seq)
    assert sorted(os.listdir(tmp_path)) == []  # nothing half-written


def test_fair_esm_without_regression_file(tmp_path):
    cfg = _fair_config("esm2")
    tensors = {k: v for k, v in random_hub_tensors(cfg).items() if "contact_head" not in k}
    path = tmp_path / "esm2_t3_tiny.pt"
    with pytest.warns(UserWarning, match="contact-regression"):
        save_fair_esm(str(path), cfg, tensors)
    ck = read_fair_esm(str(path))
    assert not any("contact_head" in k for k in ck.tensors)


def test_fair_esm_esm1v_regression_not_needed(tmp_path, recwarn):
    cfg = _fair_config("esm1v")
    tensors = {k: v for k, v in random_hub_tensors(cfg).items() if "contact_head" not in k}
    save_fair_esm(str(tmp_path / "esm1v_t3_tiny_1.pt"), cfg, tensors)
    assert not [w for w in recwarn if "contact-regression" in str(w.message)]
    assert not (tmp_path / "esm1v_t3_tiny_1-contact-regression.pt").exists()
    model, _ = _fair_esm_load(tmp_path / "esm1v_t3_tiny_1.pt")  # fair-esm skips regression for esm1v
    assert model.args.arch == "roberta_large"


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipfile", [True, False])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    path = tmp_path / "esm2_t3_evil.pt"
    torch.save({"cfg": {"model": _Evil(str(marker))}, "model": {}}, str(path),
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError) as e:
        read_fair_esm(str(path))
    msg = str(e.value)
    assert str(path) in msg and "refusing" in msg
    assert "system" in msg  # names the global (posix.system / nt.system)
    assert not marker.exists()

    # the same for pytorch_model.bin in a hub directory
    d = tmp_path / "hub"
    d.mkdir()
    tiny_config("esm2").save_pretrained(str(d))
    torch.save({"x": _Evil(str(marker))}, str(d / "pytorch_model.bin"), _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(str(d))
    assert not marker.exists()


def test_other_unlisted_globals_are_named(tmp_path):
    import collections

    path = tmp_path / "esm2_t3_x.pt"
    torch.save({"model": {}, "cfg": {"model": collections.Counter(a=1)}, "x": collections.deque([1])}, str(path))
    with pytest.raises(CheckpointError, match="collections.deque"):
        read_fair_esm(str(path))


_FAKE_OMEGACONF = {
    "omegaconf/__init__.py": "",
    "omegaconf/base.py": """
        from dataclasses import dataclass, field
        from collections import defaultdict
        from typing import Any, Dict, Optional

        @dataclass
        class Metadata:
            ref_type: Any
            object_type: Any
            optional: bool
            key: Any
            flags: Optional[Dict[str, bool]] = None
            flags_root: bool = False

        @dataclass
        class ContainerMetadata(Metadata):
            resolver_cache: Dict[str, Any] = field(default_factory=lambda: defaultdict(dict))
            key_type: Any = None
            element_type: Any = None
    """,
    "omegaconf/nodes.py": """
        class AnyNode:
            def __init__(self, value, key, parent):
                from typing import Any
                from omegaconf.base import Metadata
                self.__dict__.update(_metadata=Metadata(Any, None, True, key, {}, False), _parent=parent,
                                     _val=value)
    """,
    "omegaconf/listconfig.py": """
        class ListConfig:
            def __init__(self, items, key, parent):
                from typing import Any
                from omegaconf.base import ContainerMetadata
                from omegaconf.dictconfig import _wrap
                self.__dict__.update(_metadata=ContainerMetadata(Any, list, True, key, {}, False, key_type=int,
                                                                 element_type=Any),
                                     _parent=parent, _content=[_wrap(v, i, self) for i, v in enumerate(items)])
    """,
    "omegaconf/dictconfig.py": """
        def _wrap(value, key, parent):
            from omegaconf.listconfig import ListConfig
            from omegaconf.nodes import AnyNode
            if isinstance(value, dict):
                return DictConfig(value, key, parent)
            if isinstance(value, list):
                return ListConfig(value, key, parent)
            return AnyNode(value, key, parent)

        class DictConfig:
            def __init__(self, content, key=None, parent=None):
                from typing import Any
                from omegaconf.base import ContainerMetadata
                self.__dict__.update(_metadata=ContainerMetadata(Any, dict, True, key, {}, False, key_type=Any,
                                                                 element_type=Any),
                                     _parent=parent, _content={k: _wrap(v, k, self) for k, v in content.items()})

            def __getstate__(self):
                return self.__dict__

            def __setstate__(self, d):
                self.__dict__.update(d)
    """,
}


def test_fairseq_omegaconf_cfg_without_omegaconf(tmp_path):
    """ESM-2 files may carry fairseq's cfg as an omegaconf DictConfig: read it with stand-ins, executing
    nothing and without omegaconf installed (the writer runs in a subprocess with a mimic package whose
    pickles name the same omegaconf classes)."""
    cfg = _fair_config("esm2")
    tensors = random_hub_tensors(cfg)
    plain = tmp_path / "esm2_t3_plain.pt"
    save_fair_esm(str(plain), cfg, tensors)
    pkg = tmp_path / "fakepkg"
    for rel, src in _FAKE_OMEGACONF.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(textwrap.dedent(src))
    target = tmp_path / "esm2_t3_omega.pt"
    code = textwrap.dedent(f"""
        import argparse, torch, numpy as np
        from omegaconf.dictconfig import DictConfig
        with torch.serialization.safe_globals([argparse.Namespace]):
            d = torch.load({str(plain)!r}, weights_only=True)
        model = vars(d["cfg"]["model"])
        d["cfg"] = DictConfig({{"model": model, "common": {{"seed": 1, "fp16": True, "lst": [1, 2.5, "a"]}}}})
        d["extra_state"] = {{"val_loss": np.float64(2.5)}}
        torch.save(d, {str(target)!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(pkg))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(target)))
    assert {"omegaconf.dictconfig.DictConfig", "omegaconf.nodes.AnyNode", "omegaconf.base.ContainerMetadata",
            "omegaconf.listconfig.ListConfig", "typing.Any", "collections.defaultdict"} <= names
    assert "omegaconf" not in sys.modules
    ck = read_fair_esm(str(target))
    ref = read_fair_esm(str(plain))
    assert ck.config == ref.config
    expected = {k: v for k, v in ref.tensors.items() if "contact_head" not in k}  # regression file not beside it
    _assert_same(ck.tensors, expected)
    assert "omegaconf" not in sys.modules


def test_read_fair_esm_errors(tmp_path):
    p = tmp_path / "esm2_t3_bad.pt"
    torch.save({"weights": {}}, str(p))
    with pytest.raises(CheckpointError, match="not a fair-esm checkpoint"):
        read_fair_esm(str(p))
    torch.save({"model": {}, "args": argparse.Namespace(arch="protein_bert_base")}, str(p))
    with pytest.raises(CheckpointError, match="protein_bert_base"):
        read_fair_esm(str(p))
    torch.save({"model": {"encoder.foo.weight": torch.zeros(2)},
                "cfg": {"model": argparse.Namespace(encoder_layers=1, encoder_embed_dim=2,
                                                    encoder_attention_heads=1, token_dropout=True)}}, str(p))
    with pytest.raises(CheckpointError, match="foo.weight"):
        read_fair_esm(str(p))
    p.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError) as e:
        read_fair_esm(str(p))
    assert str(p) in str(e.value)
    with pytest.raises(CheckpointError, match="no such file"):
        read_fair_esm(str(tmp_path / "missing.pt"))


def test_make_batch_has_padding_and_masks():
    ids, mask = make_batch()
    assert (ids == 32).any() and (mask == 0).any()
