"""esm_dual.io.safetensors: low-precision dtypes interoperate with the reference library; headers are checked as
the reference library checks them, and malformed files are refused naming the file and the tensor or field."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from esm_dual.io.base import CheckpointError
from esm_dual.io.hub import (
    load_checkpoint,
    save_checkpoint,
)
from tests.conftest import tiny_config
from tests.io.helpers import assert_same, bits, torch_bits
from tests.utils import random_hub_tensors, write_hub_checkpoint

torch = pytest.importorskip("torch")


ml_dtypes = pytest.importorskip("ml_dtypes")


BF16 = np.dtype(ml_dtypes.bfloat16)


NAME = "esm.encoder.layer.0.LayerNorm.bias"


@pytest.fixture
def hub(tmp_path):
    d = tmp_path / "hub"
    write_hub_checkpoint(str(d), tiny_config("esm2"))
    path = d / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return d, path, json.loads(data[8:8 + n]), data[8 + n:]


def _write(path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _refused(d, path, *fragments) -> None:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(d))
    msg = str(e.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg


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
    assert_same(ck.tensors, cast)
    assert all(v.dtype == np_dtype for v in ck.tensors.values())

    # ours -> safetensors' own reader (via torch): bit-identical, metadata as HF writes it
    theirs = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert set(theirs) == set(cast)
    for k, t in theirs.items():
        assert str(t.dtype) == f"torch.{dtype}"
        np.testing.assert_array_equal(torch_bits(t), bits(cast[k]), err_msg=k)
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
        np.testing.assert_array_equal(bits(ck.tensors[k]), torch_bits(t), err_msg=k)


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


@pytest.mark.parametrize("edit,fragment", [
    (lambda e: {**e, "data_offsets": [None, 5]}, "data_offsets must be two non-negative integers"),
    (lambda e: {**e, "data_offsets": [e["data_offsets"][0]]}, "data_offsets must be two non-negative integers"),
    (lambda e: {**e, "data_offsets": [True, 5]}, "data_offsets must be two non-negative integers"),
    (lambda e: {**e, "shape": [18.5]}, "shape must be a list of non-negative integers, got [18.5]"),
    (lambda e: {**e, "shape": [18.0]}, "shape must be a list of non-negative integers"),
    (lambda e: {**e, "shape": "18"}, "shape must be a list of non-negative integers"),
    (lambda e: {**e, "dtype": 5}, "unsupported dtype 5"),
    (lambda e: [1, 2], "expected an object with dtype, shape and data_offsets"),
    (lambda e: {"dtype": e["dtype"], "shape": e["shape"]}, "no data_offsets"),
])
def test_malformed_header_entry_is_named(hub, edit, fragment):
    d, path, header, body = hub
    _write(path, {**header, NAME: edit(header[NAME])}, body)
    _refused(d, path, NAME, fragment)


def test_overlapping_data_offsets_are_refused(hub):
    d, path, header, body = hub
    names = [k for k in header if k != "__metadata__" and header[k]["shape"] == [18] and k != NAME]
    other = names[0]
    bad = {**header, NAME: {**header[NAME], "data_offsets": header[other]["data_offsets"]}}
    _write(path, bad, body)
    _refused(d, path, "overlaps")


def test_gap_and_trailing_bytes_are_refused(hub):
    d, path, header, body = hub
    _write(path, header, body + b"\0" * 8)
    _refused(d, path, "the tensors cover")
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    b, e = header[last]["data_offsets"]
    _write(path, {**header, last: {**header[last], "data_offsets": [b + 4, e + 4]}}, body + b"\0" * 4)
    _refused(d, path, last, "leaves a gap")


def test_metadata_must_map_strings_to_strings(hub):
    d, path, header, body = hub
    _write(path, {**header, "__metadata__": {"format": 1}}, body)
    _refused(d, path, "__metadata__")
