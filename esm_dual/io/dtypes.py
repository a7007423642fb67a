"""Dtypes: bfloat16 and friends (through ``ml_dtypes``), casting rules, and the one numpy <-> torch converter.

``ml_dtypes`` (a dependency; TensorFlow and JAX ship it too) gives numpy its ``bfloat16`` and float8 types.
Without it (an install that lacks it, or a broken one) nothing fails: a torch ``bfloat16`` tensor becomes an
exact ``float32`` array, and bfloat16 safetensors tensors are read as exact ``float32`` (with a warning), so a
torch-only install still saves and loads bfloat16 models bit for bit (the config records the dtype).

This module imports neither torch nor TensorFlow at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import CheckpointError

_FLOAT8 = ("float8_e4m3fn", "float8_e5m2")


def ml_dtype(name: str) -> np.dtype | None:
    """numpy dtype ``name`` (``"bfloat16"``, ``"float8_e4m3fn"``, ...) from ``ml_dtypes``; None without it."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(getattr(ml_dtypes, name))


def bfloat16() -> np.dtype | None:
    """numpy's bfloat16 dtype (``ml_dtypes``), or None when ``ml_dtypes`` is not importable."""
    return ml_dtype("bfloat16")


def is_floating(dtype: Any) -> bool:
    """A floating dtype (numpy's, or ml_dtypes' bfloat16 / float8)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name in ("bfloat16", *_FLOAT8)


def weights_dtype(tensors: Mapping[str, Any]) -> str | None:
    """The dtype name of a checkpoint's weights, as transformers takes it: that of the first floating tensor,
    rotary ``inv_freq`` tables (float32 in every ESM-2 file, whatever the weights) and buffers aside."""
    for name, a in tensors.items():
        if not name.endswith(("inv_freq", "position_ids")) and is_floating(a.dtype):
            return np.dtype(a.dtype).name
    return None


def resolve_dtype(dtype: Any) -> np.dtype:
    """numpy dtype of ``"float32"``/``"fp32"``/``"float16"``/``"fp16"``/``"half"``/``"bfloat16"``/``"bf16"``/
    ``"float64"`` (``"torch."`` prefixes allowed) or of a numpy floating dtype."""
    if isinstance(dtype, str):
        name = dtype.lower().replace("torch.", "")
        if name in ("bfloat16", "bf16"):
            bf16 = bfloat16()
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


def cast_dtype(name: str, dtype: Any, target: np.dtype | None) -> np.dtype:
    """The dtype tensor ``name`` of dtype ``dtype`` gets when cast to ``target``: floating tensors take it;
    integer/bool tensors and rotary ``inv_freq`` tables (fp16-rounded values in real ESM-2 files, kept as
    stored) keep theirs."""
    if target is None or not is_floating(dtype) or name.endswith("inv_freq"):
        return np.dtype(dtype)
    return target


def cast_tensor(name: str, arr: np.ndarray, target: np.dtype | None) -> np.ndarray:
    """``arr`` cast to :func:`cast_dtype` (the array itself when that is its dtype)."""
    want = cast_dtype(name, arr.dtype, target)
    return arr if arr.dtype == want else arr.astype(want)


def cast_tensors(tensors: Mapping[str, np.ndarray], dtype: Any) -> dict[str, np.ndarray]:
    """Cast the floating tensors to ``dtype`` (integer/bool tensors and rotary ``inv_freq`` are kept:
    the stored ``inv_freq`` values are fp16-rounded in real ESM-2 files and must stay as they are)."""
    target = resolve_dtype(dtype)
    return {name: cast_tensor(name, arr, target) for name, arr in tensors.items()}


# ================================================================================================
# numpy <-> torch (the one converter pair; torch is imported when called)
# ================================================================================================


def import_torch():
    """``torch``, or ``CheckpointError`` saying how to install it."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "reading .bin/.pt files needs PyTorch (pip install 'esm-dual[torch]'); safetensors files do not"
        ) from None
    return torch


def numpy_dtype_of(torch_dtype: Any) -> np.dtype:
    """The numpy dtype :func:`torch_to_numpy` gives a tensor of ``torch_dtype``."""
    torch = import_torch()
    if torch_dtype == torch.bfloat16:
        return bfloat16() or np.dtype(np.float32)
    return torch.empty((), dtype=torch_dtype).numpy().dtype


def torch_to_numpy(t: Any, *, copy: bool = False) -> np.ndarray:
    """A CPU numpy array of torch tensor ``t`` (bfloat16 through ``ml_dtypes``; without it, exact float32).
    ``copy``: an array that owns its memory (not a view of a memory-mapped file or of a model's weight)."""
    torch = import_torch()
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        bf16 = bfloat16()
        if bf16 is None:
            return t.float().numpy()  # a new array; bf16 -> f32 is exact
        arr = t.view(torch.int16).numpy().view(bf16)
    else:
        arr = t.numpy()
    return arr.copy() if copy else arr


def numpy_to_torch(arr: np.ndarray) -> Any:
    """A torch tensor sharing ``arr``'s memory when it can (C-contiguous and writable), else of a copy;
    bfloat16 arrays become ``torch.bfloat16``."""
    torch = import_torch()
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


__all__ = [
    "bfloat16",
    "cast_dtype",
    "cast_tensor",
    "cast_tensors",
    "import_torch",
    "is_floating",
    "ml_dtype",
    "numpy_dtype_of",
    "numpy_to_torch",
    "resolve_dtype",
    "torch_to_numpy",
    "weights_dtype",
]
