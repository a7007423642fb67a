"""Checkpoint I/O: ``{canonical HF name: np.ndarray}`` + ``EsmConfig``, for every layout users hold.

Layouts read:

* the HF hub layout (``config.json`` + ``model.safetensors``, or ``model.safetensors.index.json`` +
  shards, or ``pytorch_model.bin`` / ``pytorch_model.bin.index.json`` + shards);
* fair-esm ``.pt`` files (ESM-2 "v2" files with ``cfg``, ESM-1b/ESM-1v "v1" files with ``args``), with
  ``<stem>-contact-regression.pt`` beside them when present;
* a preset name or a hub id (downloaded with ``huggingface_hub`` when the network allows).

Tensor names are the HF hub names of the checkpoint as stored (``esm.encoder.layer.0...`` for the MLM and
classification models, no ``esm.`` prefix for ``EsmModel`` files); arrays are in PyTorch orientation
(``Linear.weight`` is ``[out, in]``) and keep the stored dtype (``bfloat16`` through ``ml_dtypes``).

Safety: nothing here unpickles with code execution. Safetensors files are parsed directly (header +
raw little-endian data); ``.bin``/``.pt`` files go through ``torch.load(weights_only=True)`` with an
explicit allowlist, and a file needing any other global is refused with an error naming it.

This module imports neither torch nor TensorFlow at import time; torch is imported inside the
functions that read or write ``.bin``/``.pt`` files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import CONFIG_NAME, ConfigError, EsmConfig
from .loading import is_floating

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

LAYOUT_SAFETENSORS = "safetensors"
LAYOUT_SAFETENSORS_SHARDED = "safetensors-sharded"
LAYOUT_PYTORCH_BIN = "pytorch-bin"
LAYOUT_PYTORCH_BIN_SHARDED = "pytorch-bin-sharded"
LAYOUT_FAIR_ESM = "fair-esm"

ESM_MASK_IDX = 32
ESM_PAD_IDX = 1
ESM_VOCAB_SIZE = 33


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or used; the message names the file and the tensor."""


@dataclass
class Checkpoint:
    """A checkpoint in memory.

    Attributes:
        config: the model configuration.
        tensors: canonical HF name -> array (PyTorch orientation, stored dtype).
        source: where it was read from (path or description).
        layout: one of ``"safetensors"``, ``"safetensors-sharded"``, ``"pytorch-bin"``,
            ``"pytorch-bin-sharded"``, ``"fair-esm"``.
    """

    config: EsmConfig
    tensors: dict[str, np.ndarray]
    source: str
    layout: str

    def __repr__(self) -> str:
        n = sum(int(a.size) for a in self.tensors.values())
        return (
            f"Checkpoint(source={self.source!r}, layout={self.layout!r}, tensors={len(self.tensors)}, "
            f"parameters={n})"
        )


# ================================================================================================
# dtypes
# ================================================================================================


def _bfloat16() -> np.dtype | None:
    """numpy bfloat16 dtype from ``ml_dtypes`` if installed."""
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes ships with TF/JAX; exercised only without it
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _ml_dtype(name: str) -> np.dtype | None:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover
        return None
    return np.dtype(getattr(ml_dtypes, name))


# safetensors dtype tag -> numpy dtype factory
_ST_NUMPY = {
    "F64": lambda: np.dtype("<f8"),
    "F32": lambda: np.dtype("<f4"),
    "F16": lambda: np.dtype("<f2"),
    "BF16": _bfloat16,
    "I64": lambda: np.dtype("<i8"),
    "I32": lambda: np.dtype("<i4"),
    "I16": lambda: np.dtype("<i2"),
    "I8": lambda: np.dtype("i1"),
    "U64": lambda: np.dtype("<u8"),
    "U32": lambda: np.dtype("<u4"),
    "U16": lambda: np.dtype("<u2"),
    "U8": lambda: np.dtype("u1"),
    "BOOL": lambda: np.dtype("bool"),
    "F8_E4M3": lambda: _ml_dtype("float8_e4m3fn"),
    "F8_E5M2": lambda: _ml_dtype("float8_e5m2"),
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


def _st_tag(dtype: np.dtype) -> str:
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


def _resolve_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str):
        name = dtype.lower().replace("torch.", "")
        if name in ("bfloat16", "bf16"):
            bf16 = _bfloat16()
            if bf16 is None:
                raise CheckpointError("dtype='bfloat16' needs the ml_dtypes package (pip install ml_dtypes)")
            return bf16
        aliases = {
            "float32": "float32",
            "fp32": "float32",
            "float": "float32",
            "float16": "float16",
            "fp16": "float16",
            "half": "float16",
            "float64": "float64",
            "fp64": "float64",
        }
        if name not in aliases:
            raise CheckpointError(f"unsupported dtype {dtype!r}; use 'float32', 'float16' or 'bfloat16'")
        return np.dtype(aliases[name])
    try:
        out = np.dtype(dtype)
    except TypeError:
        raise CheckpointError(f"unsupported dtype {dtype!r}") from None
    if not is_floating(out):
        raise CheckpointError(f"dtype must be a floating type, got {out}")
    return out


def cast_tensors(tensors: Mapping[str, np.ndarray], dtype: Any) -> dict[str, np.ndarray]:
    """Cast the floating tensors to ``dtype`` (integer/bool tensors and rotary ``inv_freq`` are kept:
    the stored ``inv_freq`` values are fp16-rounded in real ESM-2 files and must stay as they are)."""
    target = _resolve_dtype(dtype)
    out = {}
    for name, arr in tensors.items():
        if is_floating(arr.dtype) and arr.dtype != target and not name.endswith("inv_freq"):
            arr = arr.astype(target)
        out[name] = arr
    return out


# ================================================================================================
# safetensors (parsed directly: safetensors.numpy has no bfloat16)
# ================================================================================================


class _SafetensorsFile:
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
            self.entries[name] = _parse_st_entry(path, name, info, data_size, size, self.data_start)
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


def _parse_st_entry(
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


def _write_safetensors(
    path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
) -> None:
    """Write a safetensors file (same layout as the reference implementation: data ordered by dtype size
    then name, header padded with spaces to a multiple of 8)."""
    items = []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        items.append((name, _st_tag(arr.dtype), arr))
    items.sort(key=lambda t: (-t[2].dtype.itemsize, t[0]))
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"{path}: safetensors metadata must map str to str (bad keys: {bad})")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tag, arr in items:
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, arr in items:
            if arr.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            f.write(np.ascontiguousarray(arr).tobytes())


# ================================================================================================
# torch (.bin / .pt): weights_only loading with an explicit allowlist
# ================================================================================================


def _import_torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "reading .bin/.pt files needs PyTorch (pip install 'esm-dual[torch]'); safetensors files do not"
        ) from None
    return torch


class _StandIn:
    """Inert stand-in for a class named in a pickle: records its state, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
            if slots:
                self.__dict__.update(slots)
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_state"] = state


def _stand_in(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (_StandIn,), {"__module__": module, "__qualname__": name})


# omegaconf (fairseq configs) without importing or needing omegaconf
_OMEGACONF_NAMES = (
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
)
_OMEGACONF = {n: _stand_in(n) for n in _OMEGACONF_NAMES}
_TYPING_ANY = _stand_in("typing.Any")  # a marker; typing.Any itself has no __qualname__ on Python 3.10


class _NumpyDtype(_StandIn):
    """Stand-in for ``numpy.dtype`` as pickled (``dtype(name, align, copy)`` + state)."""

    __module__ = "numpy"
    __qualname__ = "dtype"

    def __init__(self, name: Any = None, *args: Any) -> None:
        self.name = str(name)

    def to_numpy(self) -> np.dtype:
        state = self.__dict__.get("_state")
        order = state[1] if isinstance(state, tuple) and len(state) > 1 and state[1] in "<>|=" else "="
        try:
            return np.dtype(self.name).newbyteorder(order) if order != "|" else np.dtype(self.name)
        except TypeError:
            raise CheckpointError(f"unsupported numpy dtype {self.name!r} in checkpoint") from None


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for ``numpy.core.multiarray.scalar``: a numpy scalar from its dtype and raw bytes."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("unsupported numpy scalar in checkpoint")
    np_dtype = dtype.to_numpy()
    if np_dtype.hasobject or np_dtype.kind not in "biufc?" or len(data) != np_dtype.itemsize:
        raise CheckpointError(f"unsupported numpy scalar of dtype {np_dtype} in checkpoint")
    return np.frombuffer(bytes(data), dtype=np_dtype)[0].item()


def _with_name(fn: Any, qualified: str) -> Any:
    def wrapper(*args: Any) -> Any:
        return fn(*args)

    wrapper.__module__, _, wrapper.__qualname__ = qualified.rpartition(".")
    wrapper.__name__ = wrapper.__qualname__
    return wrapper


_NUMPY_SCALARS = [
    _with_name(_numpy_scalar, "numpy.core.multiarray.scalar"),
    _with_name(_numpy_scalar, "numpy._core.multiarray.scalar"),
]


def _safe_globals() -> list[Any]:
    """Everything a fair-esm / HF ``.pt``/``.bin`` file may name, beyond torch's own tensor allowlist."""
    return [
        argparse.Namespace,
        defaultdict,
        dict,
        list,
        tuple,
        int,
        float,
        str,
        bool,
        _TYPING_ANY,
        _NumpyDtype,
        *_NUMPY_SCALARS,
        *_OMEGACONF.values(),
    ]


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _torch_load(path: str, *, mmap: bool = True) -> Any:
    """``torch.load(weights_only=True)`` with the allowlist; refuses (without executing anything) files that
    need any other global, naming the file and the globals."""
    torch = _import_torch()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with torch.serialization.safe_globals(_safe_globals()):
        unsafe: list[str] = []
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # legacy (non-zip) format or older torch: the unpickler below still refuses
            unsafe = []
        if unsafe:
            raise CheckpointError(
                f"{path}: refusing to load: the file needs global(s) {', '.join(unsafe)} which are not on "
                "esm-dual's allowlist (loading would execute code from the file); nothing was executed"
            )
        try:
            return _torch_load_translated(torch, path, mmap=mmap)
        except _NoMmap:  # legacy (pre-1.6) format: no mmap
            return _torch_load_translated(torch, path, mmap=False)


class _NoMmap(Exception):
    pass


def _unpickler_reason(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[-1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else ln)
    return lines[-1] if lines else message


def _torch_load_translated(torch: Any, path: str, *, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap can only be used" in str(e):
            raise _NoMmap() from None
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    except Exception as e:
        if type(e).__name__ == "UnpicklingError":
            names = sorted(set(_GLOBAL_RE.findall(str(e))))
            if names:
                raise CheckpointError(
                    f"{path}: refusing to load: the file needs global(s) {', '.join(names)} which are not on "
                    "esm-dual's allowlist (loading would execute code from the file); nothing was executed"
                ) from None
            raise CheckpointError(
                f"{path}: not a readable torch file ({_unpickler_reason(str(e))}); nothing was executed"
            ) from None
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _plain(obj: Any) -> Any:
    """Convert what the allowlisted unpickler built into plain Python (dict/list/scalars); tensors kept."""
    if isinstance(obj, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, _StandIn):
        name = type(obj).__qualname__
        d = obj.__dict__
        if name == "DictConfig":
            content = d.get("_content")
            return {str(k): _plain(v) for k, v in content.items()} if isinstance(content, dict) else content
        if name == "ListConfig":
            content = d.get("_content")
            return [_plain(v) for v in content] if isinstance(content, (list, tuple)) else content
        if name.endswith("Node"):
            return _plain(d.get("_val"))
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(obj, (dict, OrderedDict, defaultdict)):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def _tensor_to_numpy(t: Any, name: str, source: str) -> np.ndarray:
    torch = _import_torch()
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{source}: entry {name!r} is a {type(t).__name__}, not a tensor")
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        bf16 = _bfloat16()
        if bf16 is None:  # pragma: no cover
            return t.float().numpy().copy()
        return t.view(torch.int16).numpy().view(bf16).copy()
    try:
        return t.numpy().copy()
    except TypeError:
        raise CheckpointError(f"{source}: tensor {name!r} has unsupported dtype {t.dtype}") from None


def _numpy_to_tensor(arr: np.ndarray) -> Any:
    torch = _import_torch()
    arr = np.ascontiguousarray(arr)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


def _read_torch_state_dict(path: str) -> Iterator[tuple[str, np.ndarray]]:
    data = _torch_load(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(data).__name__}")
    for name in list(data):
        yield name, _tensor_to_numpy(data[name], name, path)


# ================================================================================================
# Hub layout
# ================================================================================================


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid shard index ({type(e).__name__}: {e})") from None
    return {str(k): str(v) for k, v in weight_map.items()}


def _sharded(directory: str, index_name: str, layout: str) -> tuple[str, list[str], dict[str, str]]:
    index_path = os.path.join(directory, index_name)
    weight_map = _read_index(index_path)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        norm = os.path.normpath(shard)
        if (not shard or os.path.isabs(shard) or os.path.splitdrive(shard)[0] or norm in (".", os.pardir)
                or norm.startswith(os.pardir + os.sep) or "\\" in shard):
            names = sorted(k for k, v in weight_map.items() if v == shard)
            raise CheckpointError(
                f"{index_path}: shard file name {shard!r} (for tensor {names[0]!r}) is absolute or leaves the "
                "checkpoint directory; shard files must be inside it"
            )
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
        raise CheckpointError(
            f"{index_path}: shard file(s) {', '.join(missing)} listed in the index are missing"
        )
    return layout, [os.path.join(directory, s) for s in shards], weight_map


def _hub_weights(directory: str, weights: str | None = None) -> tuple[str, list[str], dict[str, str] | None]:
    """(layout, files, weight_map) of a hub-layout directory: safetensors first (as transformers does),
    or the one weights file ``weights`` (a file name in ``directory``) when given."""

    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(directory, name)) and (weights is None or weights == name)

    if has(SAFE_WEIGHTS_NAME):
        return LAYOUT_SAFETENSORS, [os.path.join(directory, SAFE_WEIGHTS_NAME)], None
    if has(SAFE_WEIGHTS_INDEX_NAME):
        return _sharded(directory, SAFE_WEIGHTS_INDEX_NAME, LAYOUT_SAFETENSORS_SHARDED)
    if has(PT_WEIGHTS_NAME):
        return LAYOUT_PYTORCH_BIN, [os.path.join(directory, PT_WEIGHTS_NAME)], None
    if has(PT_WEIGHTS_INDEX_NAME):
        return _sharded(directory, PT_WEIGHTS_INDEX_NAME, LAYOUT_PYTORCH_BIN_SHARDED)
    if weights is not None:
        file = os.path.join(directory, weights)
        if weights.endswith(".safetensors"):
            return LAYOUT_SAFETENSORS, [file], None
        if weights.endswith(".bin"):
            return LAYOUT_PYTORCH_BIN, [file], None
        if weights.endswith(".index.json"):
            layout = LAYOUT_SAFETENSORS_SHARDED if "safetensors" in weights else LAYOUT_PYTORCH_BIN_SHARDED
            return _sharded(directory, weights, layout)
    present = sorted(os.listdir(directory))
    hint = ""
    if any(n == "tf_model.h5" or n.endswith((".keras", ".weights.h5")) for n in present):
        hint = "; " + convert_hint(directory)
    raise CheckpointError(
        f"{directory}: no weights file: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} (+ shards), "
        f"{PT_WEIGHTS_NAME} or {PT_WEIGHTS_INDEX_NAME} (+ shards); the directory holds {present}{hint}"
    )


def convert_hint(path: str) -> str:
    """How to turn a TensorFlow/Keras checkpoint (``.keras``, ``.weights.h5``, ``tf_model.h5``), which only
    ``esm-dual convert`` and ``esm_dual.tf`` read, into the hub layout that every reader takes."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "model"
    extra = " --config config.json" if path.endswith(".weights.h5") else ""
    return (f"`esm-dual convert {path} {stem}_hf --to hf{extra}` writes a hub-layout directory (config.json + "
            "model.safetensors) that from_pretrained, embed, score and info read")


def _read_config(directory: str) -> EsmConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory}: missing {CONFIG_NAME} (a hub-layout checkpoint directory needs "
            f"{CONFIG_NAME} beside its weights)"
        )
    try:
        return EsmConfig.from_json_file(path)
    except (ConfigError, FileNotFoundError) as e:
        msg = str(e)  # from_json_file's messages already start with the path
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def _iter_hub_dir(directory: str, weights: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    layout, files, weight_map = _hub_weights(directory, weights)
    seen: set[str] = set()
    for file in files:
        if layout in (LAYOUT_SAFETENSORS, LAYOUT_SAFETENSORS_SHARDED):
            st = _SafetensorsFile(file)
            if weight_map is not None:
                expected = {k for k, v in weight_map.items() if v == os.path.basename(file)}
                missing = expected - set(st.keys())
                if missing:
                    raise CheckpointError(
                        f"{file}: tensor(s) {', '.join(sorted(missing))} listed in the index are not in "
                        "the shard"
                    )
            items: Iterable[tuple[str, np.ndarray]] = st
        else:
            items = _read_torch_state_dict(file)
        for name, arr in items:
            if name in seen:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one shard")
            seen.add(name)
            yield name, arr


# ================================================================================================
# Resolving names and hub ids
# ================================================================================================

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _manual_instructions(hub_id: str) -> str:
    from .presets import get_preset

    preset = get_preset(hub_id, missing_ok=True)
    lines = [
        "Pass a local path instead, either:",
        f"  * a directory in the hub layout holding {CONFIG_NAME} and {SAFE_WEIGHTS_NAME} (or "
        f"{SAFE_WEIGHTS_INDEX_NAME} + its shards): fetch them by hand from "
        f"https://huggingface.co/{hub_id}/tree/main "
        f"(e.g. `hf download {hub_id} {CONFIG_NAME} {SAFE_WEIGHTS_NAME} --local-dir DIR` on a "
        "machine with network access) and pass DIR;",
    ]
    if preset is not None and preset.family != "esmfold":
        extra = f" and {preset.contact_regression_url} beside it" if preset.contact_regression_url else ""
        lines.append(
            f"  * or a fair-esm .pt file: download {preset.fair_esm_url}{extra}, and pass the .pt path."
        )
    elif preset is not None:
        lines.append(
            f"  * or fair-esm's {preset.fair_esm_url} with the ESM-2 3B stem esm2_t36_3B_UR50D.pt beside it "
            "(or --esm-checkpoint), and pass the .pt path."
        )
    else:
        lines.append("  * or a fair-esm .pt file path.")
    return "\n".join(lines)


def resolve_checkpoint(x: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn ``x`` into a local path.

    An existing file or directory is returned as is; a preset name becomes its hub id; a hub id
    (``"owner/name"``) is downloaded with ``huggingface_hub.snapshot_download`` into the HF cache (only
    ``config.json``, ``*.safetensors``, ``*.json``, ``vocab.txt``; ``pytorch_model*.bin`` only when the repo
    has no safetensors). Offline (``HF_HUB_OFFLINE=1``), without ``huggingface_hub``, or on a connection
    error, a cached snapshot is used if there is one, else ``CheckpointError`` says what to pass instead.
    """
    s = os.fspath(x)
    if os.path.exists(s):
        return s
    from .presets import get_preset

    preset = get_preset(s, missing_ok=True)
    if preset is not None:
        hub_id = preset.hub_id
    elif _HUB_ID_RE.match(s):
        hub_id = s
    else:
        raise CheckpointError(
            f"{s!r} is not an existing file or directory, a known preset or a hub id ('owner/name')"
        )
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"cannot download {hub_id!r}: huggingface_hub is not installed (pip install 'esm-dual[hub]').\n"
            + _manual_instructions(hub_id)
        ) from None
    kwargs: dict[str, Any] = {"repo_id": hub_id}
    if cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    patterns = [CONFIG_NAME, "*.safetensors", "*.json", "vocab.txt"]
    bin_patterns = [PT_WEIGHTS_NAME, "pytorch_model-*.bin", PT_WEIGHTS_INDEX_NAME]

    def has_weights(d: str) -> bool:
        return any(os.path.isfile(os.path.join(d, n)) for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))

    try:
        if _offline():
            path = huggingface_hub.snapshot_download(
                **kwargs, allow_patterns=patterns + bin_patterns, local_files_only=True
            )
        else:
            path = huggingface_hub.snapshot_download(**kwargs, allow_patterns=patterns)
            if not has_weights(path):
                path = huggingface_hub.snapshot_download(**kwargs, allow_patterns=patterns + bin_patterns)
    except Exception as e:  # offline mode, connection errors, missing repos: all end the same way
        reason = (
            "offline mode (HF_HUB_OFFLINE=1) and no cached copy" if _offline() else f"{type(e).__name__}: {e}"
        )
        raise CheckpointError(
            f"cannot fetch {hub_id!r} from the Hugging Face hub ({reason}).\n" + _manual_instructions(hub_id)
        ) from None
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise CheckpointError(
            f"{hub_id!r}: the downloaded snapshot at {path} has no {CONFIG_NAME}.\n"
            + _manual_instructions(hub_id)
        )
    return path


# ================================================================================================
# Public readers
# ================================================================================================


def _classify(path: str) -> tuple[str, str, str | None]:
    """(kind, hub directory, weights file name or None); kind is 'hub' or 'fair-esm'."""
    if os.path.isdir(path):
        return "hub", path, None
    base = os.path.basename(path)
    directory = os.path.dirname(os.path.abspath(path))
    if base.endswith(".pt"):
        return "fair-esm", path, None
    if base == CONFIG_NAME:
        return "hub", directory, None
    if base.endswith((".safetensors", ".bin", ".index.json")):
        return "hub", directory, base
    if base.endswith((".keras", ".h5")):
        raise CheckpointError(f"{path}: a TensorFlow/Keras file, read by `esm-dual convert` and esm_dual.tf "
                              f"(keras.models.load_model after `import esm_dual.tf`); " + convert_hint(path))
    raise CheckpointError(
        f"{path}: unknown checkpoint file type (expected a hub-layout directory, a fair-esm .pt file, or "
        f"a file of a hub-layout directory)"
    )


def iter_checkpoint_tensors(x: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` one tensor at a time (safetensors shards are read tensor by tensor; ``.bin``
    files are memory-mapped). Names and dtypes as in :func:`load_checkpoint`."""
    path = resolve_checkpoint(x)
    kind, directory, weights = _classify(path)
    if kind == "fair-esm":
        yield from read_fair_esm(path).tensors.items()
        return
    yield from _iter_hub_dir(directory, weights)


def read_checkpoint_config(x: str | os.PathLike) -> EsmConfig:
    """The configuration of a checkpoint without reading its hub-layout weights."""
    path = resolve_checkpoint(x)
    kind, directory, _ = _classify(path)
    if kind == "fair-esm":
        return read_fair_esm(path).config
    return _read_config(directory)


def load_checkpoint(x: str | os.PathLike, *, dtype: Any = None) -> Checkpoint:
    """Read a checkpoint into memory.

    ``x``: a hub-layout directory (``config.json`` + ``model.safetensors`` | ``model.safetensors.index.json``
    + shards | ``pytorch_model.bin`` [+ index]), a file inside one, a fair-esm ``.pt`` file, a preset name
    or a hub id. ``dtype`` (``"float32"``, ``"float16"``, ``"bfloat16"`` or a numpy dtype) casts the floating
    tensors (rotary ``inv_freq`` excepted). Shapes are checked against the config.
    """
    path = resolve_checkpoint(x)
    kind, directory, weights = _classify(path)
    if kind == "fair-esm":
        ckpt = read_fair_esm(path)
    else:
        config = _read_config(directory)
        layout, _, _ = _hub_weights(directory, weights)
        tensors = dict(_iter_hub_dir(directory, weights))
        validate_shapes(config, tensors, directory)
        ckpt = Checkpoint(config=config, tensors=tensors, source=directory, layout=layout)
    if dtype is not None:
        ckpt.tensors = cast_tensors(ckpt.tensors, dtype)
    return ckpt


# ================================================================================================
# Writer
# ================================================================================================

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10**9) or ``"500MiB"`` (2**20)."""
    if isinstance(size, bool):
        raise CheckpointError(f"invalid size {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise CheckpointError(f"size must be positive, got {size}")
        return size
    m = _SIZE_RE.match(str(size))
    if not m:
        raise CheckpointError(f"invalid size {size!r}; use bytes or a string like '5GB' / '500MB'")
    n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()])
    if n <= 0:
        raise CheckpointError(f"size must be positive, got {size!r}")
    return n


def _shard(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """HF's greedy split: tensors in order; a new shard when the next would overflow it; a tensor larger
    than ``max_bytes`` gets a shard of its own."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        nbytes = np.asarray(arr).nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += nbytes
    return shards


def save_checkpoint(
    directory: str | os.PathLike,
    config: EsmConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``config.json`` + ``model.safetensors`` (or, with ``max_shard_size``, shards
    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` in HF's format).

    Files are written to a temporary directory beside ``directory`` and moved in at the end, so a failure
    leaves nothing half-written; stale ``model*.safetensors`` files of an earlier save are removed.
    Returns the directory.
    """
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise CheckpointError(f"{directory}: exists and is a file, not a directory")
    arrays = {str(k): np.asarray(v) for k, v in tensors.items()}
    for name, arr in arrays.items():
        if arr.dtype == object:
            raise CheckpointError(f"{directory}: tensor {name!r} is not a numeric array")
    meta = {"format": "pt", **(dict(metadata) if metadata else {})}
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(directory))}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(config.to_json_string())
        shards = [arrays] if max_shard_size is None else _shard(arrays, parse_size(max_shard_size))
        if len(shards) == 1:
            _write_safetensors(os.path.join(tmp, SAFE_WEIGHTS_NAME), shards[0], meta)
        else:
            n = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                _write_safetensors(os.path.join(tmp, fname), shard, meta)
                weight_map.update({k: fname for k in shard})
            index = {
                "metadata": {"total_size": int(sum(a.nbytes for a in arrays.values()))},
                "weight_map": dict(sorted(weight_map.items())),
            }
            with open(os.path.join(tmp, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written = set(os.listdir(tmp))
        if not os.path.exists(directory):
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
            os.replace(tmp, directory)
            return directory
        for name in sorted(written - {CONFIG_NAME}) + [CONFIG_NAME]:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        for name in os.listdir(directory):
            stale = name == SAFE_WEIGHTS_INDEX_NAME or re.fullmatch(
                r"model(-\d{5}-of-\d{5})?\.safetensors", name
            )
            if stale and name not in written:
                os.remove(os.path.join(directory, name))
        return directory
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ================================================================================================
# Tensor name checks and shapes
# ================================================================================================

BENIGN_ALWAYS: tuple[str, ...] = (
    r"(^|.*\.)position_ids$",  # buffers saved by old transformers versions
    r"(^|.*\.)rotary_embeddings\.inv_freq$",  # per-layer rotary tables (the model owns/loads its own)
    r"^lm_head\.decoder\.weight$",  # tied to the word embeddings; absent from hub files
)
BENIGN_UNUSED_POSITION_TABLE = r"^(esm\.)?embeddings\.position_embeddings\.weight$"  # ESM-2 files carry one
DEFAULT_BENIGN: tuple[str, ...] = (*BENIGN_ALWAYS, BENIGN_UNUSED_POSITION_TABLE)


def benign_tensor_patterns(config: EsmConfig) -> tuple[str, ...]:
    """Known-benign names for ``config``: the unused position table only for rotary (ESM-2) models."""
    return DEFAULT_BENIGN if config.position_embedding_type == "rotary" else BENIGN_ALWAYS


def _fmt_names(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_tensor_names(
    expected: Iterable[str],
    found: Iterable[str],
    source: str,
    benign: Iterable[str] | None = DEFAULT_BENIGN,
) -> tuple[set[str], set[str]]:
    """Compare the names a model expects with the names a checkpoint holds.

    Raises ``CheckpointError`` naming every missing and every unexpected tensor that is not known-benign
    (``benign``: regular expressions, default :data:`DEFAULT_BENIGN`; use :func:`benign_tensor_patterns`
    for a config-aware list). Returns ``(ignored_missing, ignored_unexpected)``.
    """
    expected, found = set(expected), set(found)
    patterns = [re.compile(p) for p in (benign or ())]

    def is_benign(name: str) -> bool:
        return any(p.match(name) for p in patterns)

    missing = expected - found
    unexpected = found - expected
    bad_missing = {n for n in missing if not is_benign(n)}
    bad_unexpected = {n for n in unexpected if not is_benign(n)}
    if bad_missing or bad_unexpected:
        parts = []
        if bad_missing:
            parts.append(f"missing tensor(s): {_fmt_names(bad_missing)}")
        if bad_unexpected:
            parts.append(f"unexpected tensor(s): {_fmt_names(bad_unexpected)}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    return missing - bad_missing, unexpected - bad_unexpected


_LAYER_RE = re.compile(r"^(?:esm\.)?encoder\.layer\.(\d+)\.(.+)$")


def expected_shape(config: EsmConfig, name: str) -> tuple[int, ...] | None:
    """The shape ``config`` implies for tensor ``name`` (with or without the ``esm.`` prefix), or ``None``
    for names it does not describe."""
    d, f, n_layers, heads = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
    )
    v = config.vocab_size
    m = _LAYER_RE.match(name)
    if m:
        sub = m.group(2)
        per_layer = {
            "attention.self.query.weight": (d, d),
            "attention.self.query.bias": (d,),
            "attention.self.key.weight": (d, d),
            "attention.self.key.bias": (d,),
            "attention.self.value.weight": (d, d),
            "attention.self.value.bias": (d,),
            "attention.self.rotary_embeddings.inv_freq": (config.head_dim // 2,),
            "attention.output.dense.weight": (d, d),
            "attention.output.dense.bias": (d,),
            "attention.LayerNorm.weight": (d,),
            "attention.LayerNorm.bias": (d,),
            "intermediate.dense.weight": (f, d),
            "intermediate.dense.bias": (f,),
            "output.dense.weight": (d, f),
            "output.dense.bias": (d,),
            "LayerNorm.weight": (d,),
            "LayerNorm.bias": (d,),
        }
        return per_layer.get(sub)
    base = name[len("esm.") :] if name.startswith("esm.") else name
    shapes: dict[str, tuple[int, ...] | None] = {
        "embeddings.word_embeddings.weight": (v, d) if v else None,
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, d),
        "embeddings.layer_norm.weight": (d,),
        "embeddings.layer_norm.bias": (d,),
        "encoder.emb_layer_norm_after.weight": (d,),
        "encoder.emb_layer_norm_after.bias": (d,),
        "contact_head.regression.weight": (1, n_layers * heads),
        "contact_head.regression.bias": (1,),
        "pooler.dense.weight": (d, d),
        "pooler.dense.bias": (d,),
    }
    if base in shapes:
        return shapes[base]
    heads_shapes: dict[str, tuple[int, ...] | None] = {
        "lm_head.dense.weight": (d, d),
        "lm_head.dense.bias": (d,),
        "lm_head.layer_norm.weight": (d,),
        "lm_head.layer_norm.bias": (d,),
        "lm_head.decoder.weight": (v, d) if v else None,
        "lm_head.bias": (v,) if v else None,
        "classifier.dense.weight": (d, d),
        "classifier.dense.bias": (d,),
        "classifier.out_proj.weight": (config.num_labels, d),
        "classifier.out_proj.bias": (config.num_labels,),
        "classifier.weight": (config.num_labels, d),
        "classifier.bias": (config.num_labels,),
    }
    return heads_shapes.get(name)


def validate_shapes(config: EsmConfig, tensors: Mapping[str, Any], source: str) -> None:
    """Raise ``CheckpointError`` for every tensor whose shape contradicts ``config`` (naming the tensor, the
    expected and the actual shape) and for layers beyond ``num_hidden_layers``."""
    errors = []
    for name, arr in tensors.items():
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= config.num_hidden_layers:
            errors.append(
                f"{name}: layer {m.group(1)} but the config has num_hidden_layers={config.num_hidden_layers}"
            )
            continue
        want = expected_shape(config, name)
        got = tuple(np.shape(arr))
        if want is not None and got != want:
            errors.append(f"{name}: expected shape {list(want)} from the config, got {list(got)}")
        dtype = getattr(arr, "dtype", None)
        if (want is not None or name.endswith("inv_freq")) and dtype is not None and not is_floating(dtype):
            errors.append(f"{name}: stored as {np.dtype(dtype)}, but ESM weights are floating point")
    if errors:
        raise CheckpointError(f"{source}: tensors contradict the config:\n  " + "\n  ".join(errors))


# ================================================================================================
# fair-esm .pt files
# ================================================================================================

# fair-esm (prefix-stripped) name -> HF name; {i} is the layer index
_FAIR_TO_HF_LAYER = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "final_layer_norm": "LayerNorm",
}
_FAIR_TO_HF_TOP = {
    "embed_tokens.weight": "esm.embeddings.word_embeddings.weight",
    "embed_positions.weight": "esm.embeddings.position_embeddings.weight",
    "emb_layer_norm_before.weight": "esm.embeddings.layer_norm.weight",
    "emb_layer_norm_before.bias": "esm.embeddings.layer_norm.bias",
    "emb_layer_norm_after.weight": "esm.encoder.emb_layer_norm_after.weight",
    "emb_layer_norm_after.bias": "esm.encoder.emb_layer_norm_after.bias",
    "contact_head.regression.weight": "esm.contact_head.regression.weight",
    "contact_head.regression.bias": "esm.contact_head.regression.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
    "lm_head.weight": "lm_head.decoder.weight",
}
_HF_TO_FAIR_TOP = {v: k for k, v in _FAIR_TO_HF_TOP.items()}
_HF_TO_FAIR_LAYER = {v: k for k, v in _FAIR_TO_HF_LAYER.items()}
_FAIR_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_FAIR_ROT_RE = re.compile(r"^layers\.(\d+)\.self_attn\.rot_emb\.inv_freq$")


def _fair_name_to_hf(name: str) -> str | None:
    if name in _FAIR_TO_HF_TOP:
        return _FAIR_TO_HF_TOP[name]
    m = _FAIR_ROT_RE.match(name)
    if m:
        return f"esm.encoder.layer.{m.group(1)}.attention.self.rotary_embeddings.inv_freq"
    m = _FAIR_LAYER_RE.match(name)
    if m and m.group(2) in _FAIR_TO_HF_LAYER:
        return f"esm.encoder.layer.{m.group(1)}.{_FAIR_TO_HF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def _hf_name_to_fair(name: str) -> str | None:
    if name in _HF_TO_FAIR_TOP:
        return _HF_TO_FAIR_TOP[name]
    m = _LAYER_RE.match(name)
    if not m:
        return None
    i, sub = m.group(1), m.group(2)
    if sub == "attention.self.rotary_embeddings.inv_freq":
        return f"layers.{i}.self_attn.rot_emb.inv_freq"
    module, _, leaf = sub.rpartition(".")
    if module in _HF_TO_FAIR_LAYER and leaf in ("weight", "bias"):
        return f"layers.{i}.{_HF_TO_FAIR_LAYER[module]}.{leaf}"
    return None


def _strip_v2(name: str) -> str:
    """fair-esm ``_load_model_and_alphabet_core_v2``: drop 'encoder.sentence_encoder.' or 'encoder.'."""
    return re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", name)


def _strip_v1(name: str) -> str:
    """fair-esm ``_load_model_and_alphabet_core_v1`` for roberta_large (same string surgery)."""
    if "sentence_encoder" in name:
        name = "".join(name.split("sentence_encoder.")[1:])
    if "encoder" in name:
        name = "".join(name.split("encoder.")[1:])
    return name


def _strip_arg_v1(name: str) -> str:
    return "".join(name.split("encoder_")[1:]) if "encoder" in name else name


def _regression_path(path: str) -> str:
    return os.path.splitext(path)[0] + "-contact-regression.pt"


def _get(cfg: Mapping[str, Any], key: str, source: str, default: Any = ...) -> Any:
    if key in cfg:
        return cfg[key]
    if default is not ...:
        return default
    raise CheckpointError(f"{source}: the fair-esm model config has no {key!r}")


def _get_int(cfg: Mapping[str, Any], key: str, source: str) -> int:
    """A positive integer field of a fair-esm model config; ``CheckpointError`` naming the field otherwise."""
    value = _get(cfg, key, source)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (number > 0 and number.is_integer()):
        raise CheckpointError(
            f"{source}: the fair-esm model config's {key!r} must be a positive integer, got {value!r}"
        )
    return int(number)


def read_fair_esm(path: str | os.PathLike) -> Checkpoint:
    """Read a fair-esm ``.pt`` file (ESM-2, ESM-1b, ESM-1v) and ``<stem>-contact-regression.pt`` beside it.

    Names are mapped to the HF hub names of ``EsmForMaskedLM``; the tied ``lm_head.weight`` is dropped
    (kept as ``lm_head.decoder.weight`` only if it differs from the embeddings). For ESM-1b/1v files the
    ``<mask>`` row of the embeddings is zeroed, as fair-esm does when loading. The config is built the way
    HF's conversion did (vocab 33, pad 1, mask 32, eps 1e-5, no dropout, 1026 positions).
    """
    path = os.fspath(path)
    data = _plain(_torch_load(path))
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(
            f"{path}: not a fair-esm checkpoint (expected a dict with a 'model' state dict)"
        )
    state: dict[str, Any] = dict(data["model"])
    reg_path = _regression_path(path)
    if os.path.isfile(reg_path):
        reg = _plain(_torch_load(reg_path))
        if not isinstance(reg, dict) or not isinstance(reg.get("model"), dict):
            raise CheckpointError(f"{reg_path}: not a fair-esm contact-regression file (no 'model' dict)")
        state.update(reg["model"])

    cfg = data.get("cfg")
    args = data.get("args")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        model_cfg = cfg["model"]
        if "trunk" in model_cfg or "esm_type" in model_cfg:
            raise CheckpointError(
                f"{path}: an ESMFold checkpoint; reading fair-esm ESMFold .pt files is not "
                "supported yet (use the hub directory facebook/esmfold_v1)"
            )
        version = 2
        state = {_strip_v2(k): v for k, v in state.items()}
        n_layers = _get_int(model_cfg, "encoder_layers", path)
        d = _get_int(model_cfg, "encoder_embed_dim", path)
        heads = _get_int(model_cfg, "encoder_attention_heads", path)
        token_dropout = bool(_get(model_cfg, "token_dropout", path))
    elif isinstance(args, dict):
        version = 1
        model_args = {_strip_arg_v1(k): v for k, v in args.items()}
        arch = model_args.get("arch")
        if arch != "roberta_large":
            raise CheckpointError(
                f"{path}: fair-esm architecture {arch!r} is not supported (ESM-1b/ESM-1v files "
                "have arch 'roberta_large'; ESM-1, MSA Transformer and ESM-IF are not read)"
            )
        state = {_strip_v1(k): v for k, v in state.items()}
        n_layers = _get_int(model_args, "layers", path)
        d = _get_int(model_args, "embed_dim", path)
        heads = _get_int(model_args, "attention_heads", path)
        token_dropout = bool(model_args.get("token_dropout", False))
    else:
        raise CheckpointError(
            f"{path}: not a fair-esm checkpoint (neither 'cfg' with a 'model' config nor 'args')"
        )

    tensors: dict[str, np.ndarray] = {}
    unknown = []
    for name, value in state.items():
        hf = _fair_name_to_hf(name)
        if hf is None:
            unknown.append(name)
            continue
        tensors[hf] = _tensor_to_numpy(value, name, path)
    if unknown:
        raise CheckpointError(f"{path}: unsupported fair-esm tensor(s): {_fmt_names(unknown)}")

    emb_name = "esm.embeddings.word_embeddings.weight"
    if emb_name not in tensors:
        raise CheckpointError(f"{path}: missing tensor 'embed_tokens.weight'")
    emb = tensors[emb_name]
    decoder = tensors.pop("lm_head.decoder.weight", None)
    if decoder is not None and not (decoder.shape == emb.shape and np.array_equal(decoder, emb)):
        tensors["lm_head.decoder.weight"] = decoder  # untied (never the case in released files)
    if emb.shape[0] != ESM_VOCAB_SIZE:
        raise CheckpointError(
            f"{path}: tensor 'embed_tokens.weight' has {emb.shape[0]} rows; the ESM alphabet "
            f"has {ESM_VOCAB_SIZE}"
        )
    if version == 1:
        emb[ESM_MASK_IDX] = 0  # fair-esm: model_state["embed_tokens.weight"][alphabet.mask_idx].zero_()

    fc1 = tensors.get("esm.encoder.layer.0.intermediate.dense.weight")
    ffn = int(fc1.shape[0]) if fc1 is not None else 4 * d
    if version == 1:
        pos = tensors.get("esm.embeddings.position_embeddings.weight")
        if pos is None:
            raise CheckpointError(f"{path}: missing tensor 'embed_positions.weight' of an ESM-1b/1v model")
        max_pos = int(pos.shape[0])
    else:
        max_pos = 1026
    try:
        config = EsmConfig(
            vocab_size=ESM_VOCAB_SIZE,
            mask_token_id=ESM_MASK_IDX,
            pad_token_id=ESM_PAD_IDX,
            hidden_size=d,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=max_pos,
            layer_norm_eps=1e-5,  # PyTorch default used in fairseq
            attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
            emb_layer_norm_before="esm.embeddings.layer_norm.weight" in tensors,
            token_dropout=token_dropout,
            position_embedding_type="rotary" if version == 2 else "absolute",
            architectures=["EsmForMaskedLM"],
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: the fair-esm model config does not make a valid ESM config ({e})") from None
    validate_shapes(config, tensors, path)
    return Checkpoint(config=config, tensors=tensors, source=path, layout=LAYOUT_FAIR_ESM)


def check_fair_esm_config(path: str, config: EsmConfig) -> None:
    """Raise ``CheckpointError`` unless fair-esm can hold ``config`` in a file named ``path``.

    fair-esm picks the file format from the stem (``esm2*`` is ESM-2) and hard-codes the alphabet,
    LayerNorm eps and, for ESM-2, the FFN width, rotary base and the absence of an embedding LayerNorm.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    rotary = config.position_embedding_type == "rotary"
    if not path.endswith(".pt"):
        raise CheckpointError(f"{path}: fair-esm files end in .pt")
    if rotary != stem.startswith("esm2"):
        want = "start with 'esm2'" if rotary else "not start with 'esm2'"
        raise CheckpointError(
            f"{path}: fair-esm picks the file format from the name: the stem of an "
            f"{'ESM-2' if rotary else 'ESM-1b/1v'} file must {want}"
        )
    problems = []
    if (
        config.vocab_size != ESM_VOCAB_SIZE
        or config.pad_token_id != ESM_PAD_IDX
        or config.mask_token_id != ESM_MASK_IDX
    ):
        problems.append("the ESM alphabet (vocab_size 33, pad_token_id 1, mask_token_id 32)")
    if not math.isclose(config.layer_norm_eps, 1e-5):
        problems.append("layer_norm_eps 1e-5")
    if rotary and config.intermediate_size != 4 * config.hidden_size:
        problems.append(
            f"intermediate_size = 4 * hidden_size = {4 * config.hidden_size} (hard-coded in ESM2)"
        )
    if rotary and config.emb_layer_norm_before:
        problems.append("no emb_layer_norm_before (ESM2 has none)")
    if rotary and not math.isclose(config.rope_theta, 10000.0):
        problems.append("rope_theta 10000")
    if not config.tie_word_embeddings:
        problems.append("tie_word_embeddings=True (fair-esm ties lm_head.weight to embed_tokens)")
    if problems:
        raise CheckpointError(
            f"{path}: fair-esm cannot represent this config; it needs " + "; ".join(problems)
        )


def save_fair_esm(path: str | os.PathLike, config: EsmConfig, tensors: Mapping[str, np.ndarray]) -> str:
    """Write a fair-esm ``.pt`` file that ``esm.pretrained.load_model_and_alphabet_local`` loads.

    ESM-2 (rotary) configs give a v2 file (``cfg={"model": Namespace(...)}``; the stem must start with
    ``"esm2"``, which is how fair-esm picks the format); ESM-1b/1v (learned positions) give a v1 file
    (``args=Namespace(arch="roberta_large", ...)``; the stem must not start with ``"esm2"``). Contact
    regression tensors, when present, go to ``<stem>-contact-regression.pt`` beside it (fair-esm reads
    that file for every stem not containing ``"esm1v"``). Tensor names: HF MLM names, with or without
    the ``esm.`` prefix. Returns the path.
    """
    torch = _import_torch()
    path = os.fspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    check_fair_esm_config(path, config)
    rotary = config.position_embedding_type == "rotary"

    canon = {}
    for name, arr in tensors.items():
        key = name
        if not key.startswith(("esm.", "lm_head.")) and (
            key.startswith(("embeddings.", "encoder.", "contact_head."))
        ):
            key = "esm." + key
        canon[key] = np.asarray(arr)
    validate_shapes(config, canon, path)
    emb_name = "esm.embeddings.word_embeddings.weight"
    decoder = canon.pop("lm_head.decoder.weight", None)
    if emb_name in canon and decoder is not None and not np.array_equal(decoder, canon[emb_name]):
        raise CheckpointError(
            f"{path}: fair-esm ties lm_head.weight to embed_tokens, but tensor "
            "'lm_head.decoder.weight' differs from 'esm.embeddings.word_embeddings.weight'"
        )

    model: OrderedDict[str, Any] = OrderedDict()
    regression: OrderedDict[str, Any] = OrderedDict()
    unknown = []
    for name, arr in canon.items():
        if name == "esm.embeddings.position_embeddings.weight" and rotary:
            continue  # ESM-2 has no learned positions; HF files carry an unused table
        if name.endswith("position_ids") or name in (
            "esm.rotary_embeddings.inv_freq",
            "esm.encoder.rotary_embeddings.inv_freq",
        ):
            continue  # buffers recomputed by fair-esm
        fair = _hf_name_to_fair(name)
        if fair is None:
            unknown.append(name)
            continue
        t = _numpy_to_tensor(arr)
        if fair.startswith("contact_head."):
            regression[fair] = t
        elif fair.startswith("lm_head."):
            model["encoder." + fair] = t
        else:
            model["encoder.sentence_encoder." + fair] = t
    if unknown:
        raise CheckpointError(f"{path}: tensor(s) with no fair-esm equivalent: {_fmt_names(unknown)}")

    prefix = "encoder.sentence_encoder."
    emb_key = prefix + "embed_tokens.weight"
    required = [emb_key, "encoder.lm_head.dense.weight", "encoder.lm_head.bias"]
    missing = [k for k in required if k not in model]
    if missing:
        raise CheckpointError(
            f"{path}: fair-esm needs the full masked-LM model; missing {', '.join(missing)}"
        )
    model["encoder.lm_head.weight"] = model[emb_key]  # tied: the same tensor, as in released files
    if rotary:
        k = config.head_dim
        inv = torch.from_numpy(
            (1.0 / (10000.0 ** (np.arange(0, k, 2, dtype=np.float32) / k))).astype(np.float32)
        )
        for i in range(config.num_hidden_layers):
            key = f"{prefix}layers.{i}.self_attn.rot_emb.inv_freq"
            if key not in model:
                model[key] = inv.clone()

    common = dict(
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, token_dropout=bool(config.token_dropout)
    )
    if rotary:
        ns = argparse.Namespace(
            _name="esm2",
            arch="esm2",
            encoder_layers=config.num_hidden_layers,
            encoder_embed_dim=config.hidden_size,
            encoder_ffn_embed_dim=config.intermediate_size,
            encoder_attention_heads=config.num_attention_heads,
            max_positions=config.max_position_embeddings - ESM_PAD_IDX - 1,
            **common,
        )
        data: dict[str, Any] = {"cfg": {"model": ns}, "model": model}
    else:
        ns = argparse.Namespace(
            arch="roberta_large",
            encoder_layers=config.num_hidden_layers,
            encoder_embed_dim=config.hidden_size,
            encoder_ffn_embed_dim=config.intermediate_size,
            encoder_attention_heads=config.num_attention_heads,
            max_positions=config.max_position_embeddings - ESM_PAD_IDX - 1,
            **common,
        )
        data = {"args": ns, "model": model}
    reg_path = _regression_path(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".pt.tmp", dir=parent)
    os.close(fd)
    tmp_reg = None
    try:
        torch.save(data, tmp)
        if regression:
            fd, tmp_reg = tempfile.mkstemp(prefix=f".{stem}.", suffix=".reg.tmp", dir=parent)
            os.close(fd)
            torch.save({"model": regression}, tmp_reg)
            os.replace(tmp_reg, reg_path)
            tmp_reg = None
        os.replace(tmp, path)
        if not regression and os.path.lexists(reg_path):
            os.remove(reg_path)  # a stale head of an earlier save would be read back with this file
    finally:
        for t in (tmp, tmp_reg):
            if t is not None and os.path.exists(t):
                os.remove(t)
    if not regression and "esm1v" not in stem:
        warnings.warn(
            f"{path}: no contact-regression tensors; fair-esm's load_model_and_alphabet_local expects "
            f"{os.path.basename(reg_path)} beside the file for this name",
            stacklevel=2,
        )
    return path


__all__ = [
    "BENIGN_ALWAYS",
    "Checkpoint",
    "CheckpointError",
    "DEFAULT_BENIGN",
    "benign_tensor_patterns",
    "cast_tensors",
    "check_tensor_names",
    "expected_shape",
    "iter_checkpoint_tensors",
    "load_checkpoint",
    "parse_size",
    "read_checkpoint_config",
    "read_fair_esm",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_fair_esm",
    "validate_shapes",
]
