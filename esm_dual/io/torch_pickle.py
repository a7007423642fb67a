"""``.bin`` / ``.pt`` files: ``torch.load(weights_only=True)`` with an explicit allowlist, nothing executed.

Everything a fair-esm or HF file may name beyond torch's own tensor allowlist (``argparse.Namespace``, numpy
dtypes and scalars, fairseq's omegaconf configs) is built from inert stand-ins; a file that needs any other
global is refused with an error naming the file and the globals. What the unpickler built is turned into plain
Python by :func:`to_plain`, whose work is bounded by the file's size: an object referenced many times is
converted once and shared, never copied per reference.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .base import CheckpointError
from .dtypes import import_torch, torch_to_numpy


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


def stand_in(qualified: str) -> type:
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
_OMEGACONF = {n: stand_in(n) for n in _OMEGACONF_NAMES}
_TYPING_ANY = stand_in("typing.Any")  # a marker; typing.Any itself has no __qualname__ on Python 3.10


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


def safe_globals() -> list[Any]:
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


def torch_load(path: str, *, mmap: bool = True) -> Any:
    """``torch.load(weights_only=True)`` with the allowlist; refuses (without executing anything) files that
    need any other global, naming the file and the globals."""
    torch = import_torch()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with torch.serialization.safe_globals(safe_globals()):
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




def to_plain(obj: Any) -> Any:
    """What the allowlisted unpickler built, as plain Python (dicts, lists, tuples, scalars; tensors kept):
    ``Namespace``, omegaconf stand-ins and other stand-ins become dicts (omegaconf nodes their value).

    Each object is converted once: an object the file references many times (a pickle memo reference costs
    two bytes) becomes one shared converted object, so the work is bounded by the file's size, and reference
    cycles stay cycles instead of recursing forever.
    """
    memo: dict[int, Any] = {}
    keep: list[Any] = []  # the originals stay alive, so their ids stay theirs while converting

    def conv(o: Any) -> Any:
        key = id(o)
        if key in memo:
            return memo[key]
        if isinstance(o, argparse.Namespace):
            return fill_dict(o, vars(o).items())
        if isinstance(o, _StandIn):
            name = type(o).__qualname__
            d = o.__dict__
            if name == "DictConfig":
                content = d.get("_content")
                if isinstance(content, dict):
                    return fill_dict(o, ((str(k), v) for k, v in content.items()))
                return remember(o, conv(content))
            if name == "ListConfig":
                content = d.get("_content")
                if isinstance(content, (list, tuple)):
                    return fill_list(o, content)
                return remember(o, conv(content))
            if name.endswith("Node"):
                return remember(o, conv(d.get("_val")))
            return fill_dict(o, d.items())
        if isinstance(o, (dict, OrderedDict, defaultdict)):
            return fill_dict(o, o.items())
        if isinstance(o, list):
            return fill_list(o, o)
        if isinstance(o, tuple):
            return remember(o, tuple(conv(v) for v in o))
        return o

    def remember(o: Any, out: Any) -> Any:
        memo[id(o)] = out
        keep.append(o)
        return out

    def fill_dict(o: Any, items: Any) -> dict:
        out: dict = remember(o, {})
        for k, v in list(items):
            out[k] = conv(v)
        return out

    def fill_list(o: Any, values: Any) -> list:
        out: list = remember(o, [])
        out.extend(conv(v) for v in values)
        return out

    try:
        return conv(obj)
    except RecursionError:
        raise CheckpointError("the file's objects are nested too deeply to be a checkpoint") from None


def tensor_to_numpy(t: Any, name: str, source: str) -> np.ndarray:
    """Entry ``name`` of ``source`` as an array that owns its memory; ``CheckpointError`` unless a tensor."""
    torch = import_torch()
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{source}: entry {name!r} is a {type(t).__name__}, not a tensor")
    try:
        return torch_to_numpy(t, copy=True)
    except TypeError:
        raise CheckpointError(f"{source}: tensor {name!r} has unsupported dtype {t.dtype}") from None


def read_torch_state_dict(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` of a ``pytorch_model.bin`` state dict (memory-mapped, one array at a time)."""
    data = torch_load(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(data).__name__}")
    for name in list(data):
        yield name, tensor_to_numpy(data[name], name, path)


__all__ = ["read_torch_state_dict", "safe_globals", "stand_in", "tensor_to_numpy", "to_plain", "torch_load"]
