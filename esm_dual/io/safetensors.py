"""safetensors files, parsed and written directly (``safetensors.numpy`` has no bfloat16).

A file is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` (plus
an optional ``__metadata__`` of strings) and the raw little-endian data. The reader validates the header as
the reference library does (known dtypes, non-negative shapes, offsets that tile the data exactly, inside the
file) before reading anything, and reads one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .base import CheckpointError
from .dtypes import bfloat16, ml_dtype

# safetensors dtype tag -> numpy dtype factory
_ST_NUMPY = {
    "F64": lambda: np.dtype("<f8"),
    "F32": lambda: np.dtype("<f4"),
    "F16": lambda: np.dtype("<f2"),
    "BF16": bfloat16,
    "I64": lambda: np.dtype("<i8"),
    "I32": lambda: np.dtype("<i4"),
    "I16": lambda: np.dtype("<i2"),
    "I8": lambda: np.dtype("i1"),
    "U64": lambda: np.dtype("<u8"),
    "U32": lambda: np.dtype("<u4"),
    "U16": lambda: np.dtype("<u2"),
    "U8": lambda: np.dtype("u1"),
    "BOOL": lambda: np.dtype("bool"),
    "F8_E4M3": lambda: ml_dtype("float8_e4m3fn"),
    "F8_E5M2": lambda: ml_dtype("float8_e5m2"),
}
_ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def safetensors_tag(dtype: np.dtype) -> str:
    """safetensors dtype tag of a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "BF16"
    if dtype.name == "float8_e4m3fn":
        return "F8_E4M3"
    if dtype.name == "float8_e5m2":
        return "F8_E5M2"
    tags = {
        "f8": "F64",
        "f4": "F32",
        "f2": "F16",
        "i8": "I64",
        "i4": "I32",
        "i2": "I16",
        "i1": "I8",
        "u8": "U64",
        "u4": "U32",
        "u2": "U16",
        "u1": "U8",
        "b1": "BOOL",
    }
    key = f"{dtype.kind}{dtype.itemsize}"
    if key not in tags:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
    return tags[key]


def numpy_dtype(tag: str) -> np.dtype:
    """The numpy dtype the reader gives a tensor of safetensors dtype ``tag`` (bfloat16 without ``ml_dtypes``:
    float32)."""
    dt = _ST_NUMPY[tag]()
    if dt is None:
        if tag != "BF16":
            raise CheckpointError(f"safetensors dtype {tag} needs ml_dtypes (pip install ml_dtypes)")
        return np.dtype(np.float32)
    return dt


class SafetensorsFile:
    """A validated safetensors file: header parsed, tensors read one at a time."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: not a safetensors file (truncated: {size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise CheckpointError(
                        f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = metadata or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = _parse_entry(path, name, info, data_size, size, self.data_start)
        # As the reference library validates: the tensors' byte ranges tile the data buffer exactly,
        # in offset order, with no gap and no overlap.
        position = 0
        for name in sorted(self.entries, key=lambda k: self.entries[k][2:]):
            _, _, begin, end = self.entries[name]
            if begin != position:
                what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: tensor {name!r} data_offsets [{begin}, {end}] "
                    f"{what} (expected to start at byte {position} of the data)"
                )
            position = end
        if position != data_size:
            raise CheckpointError(
                f"{path}: corrupt safetensors file: the tensors cover {position} bytes of data but the file holds "
                f"{data_size} after the header"
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype_shape(self, name: str) -> tuple[str, tuple[int, ...]]:
        tag, shape, _, _ = self.entries[name]
        return tag, shape

    def get(self, name: str) -> np.ndarray:
        tag, shape, begin, end = self.entries[name]
        dtype = _ST_NUMPY[tag]()
        fallback = dtype is None
        if fallback:
            if tag != "BF16":
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {tag}, which needs ml_dtypes")
            warnings.warn(
                f"ml_dtypes is not installed: bfloat16 tensor {name!r} of {self.path} is read as float32 (exact)",
                stacklevel=3,
            )
            dtype = np.dtype("<u2")
        count = math.prod(shape)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            arr = np.fromfile(f, dtype=dtype, count=count)  # one owning, writable allocation
        if arr.size != count:
            raise CheckpointError(f"{self.path}: truncated safetensors file while reading tensor {name!r}")
        if fallback:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif arr.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return arr.reshape(shape)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in sorted(self.entries, key=lambda k: self.entries[k][2]):
            yield name, self.get(name)


def _parse_entry(
    path: str, name: str, info: Any, data_size: int, size: int, data_start: int
) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype tag, shape, begin, end) of one safetensors header entry, validated as the reference library
    does: ``dtype`` a known tag, ``shape`` a list of non-negative integers, ``data_offsets`` two
    non-negative integers ``[begin, end]`` spanning exactly the tensor's bytes, inside the file."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r}: {what}")

    def is_uint(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(info, dict):
        raise bad(f"expected an object with dtype, shape and data_offsets, got {info!r}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(tag, str) or tag not in _ST_ITEMSIZE:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {tag!r}")
    if not isinstance(shape, list) or not all(is_uint(d) for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_uint(o) for o in offsets):
        raise bad(f"data_offsets must be two non-negative integers [begin, end], got {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * _ST_ITEMSIZE[tag]
    if end < begin or end - begin != nbytes:
        raise CheckpointError(
            f"{path}: corrupt safetensors header: tensor {name!r} {tag}{list(shape)} needs {nbytes} "
            f"bytes but its data offsets are [{begin}, {end}]"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
            f"{data_start + end} but the file has {size} bytes"
        )
    return tag, tuple(shape), begin, end


def write_safetensors_from(
    path: str,
    specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    read: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    source: str | None = None,
) -> None:
    """Write a safetensors file from ``specs`` (name, shape, dtype) and ``read(name)``, one tensor in memory at a
    time: the header is planned from the specs, then each tensor is read and written straight to its place.
    Same layout as the reference implementation: data ordered by dtype size then name, header padded with
    spaces to a multiple of 8. ``source`` names where ``read`` reads from (for the message when a tensor read
    does not match its spec)."""
    items = sorted(((str(n), tuple(int(x) for x in shape), np.dtype(dt)) for n, shape, dt in specs),
                   key=lambda t: (-t[2].itemsize, t[0]))
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"{path}: safetensors metadata must map str to str (bad keys: {bad})")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dt in items:
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": safetensors_tag(dt), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dt in items:
            arr = np.ascontiguousarray(read(name))
            if arr.dtype != dt or tuple(arr.shape) != shape:
                raise CheckpointError(
                    f"{source or path}: tensor {name!r} changed while reading ({arr.dtype}{list(arr.shape)})")
            if arr.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file (see :func:`write_safetensors_from`)."""
    arrays = {name: np.asarray(arr) for name, arr in tensors.items()}
    write_safetensors_from(path, [(n, a.shape, a.dtype) for n, a in arrays.items()], arrays.__getitem__, metadata)


__all__ = ["SafetensorsFile", "safetensors_tag", "numpy_dtype", "write_safetensors", "write_safetensors_from"]
