"""The HF hub layout: ``config.json`` + ``model.safetensors`` | ``model.safetensors.index.json`` + shards |
``pytorch_model.bin`` [+ index and shards]; the readers of every local layout and the sharded writer.

:func:`load_checkpoint` reads a hub directory, a file inside one, a fair-esm ``.pt`` file, a preset name or a
hub id (names and ids are resolved by :mod:`esm_dual.io.resolve`); :func:`save_checkpoint` writes the
canonical layout atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..common.config import CONFIG_NAME, ConfigError, EsmConfig
from .base import (
    LAYOUT_PYTORCH_BIN,
    LAYOUT_PYTORCH_BIN_SHARDED,
    LAYOUT_SAFETENSORS,
    LAYOUT_SAFETENSORS_SHARDED,
    PT_WEIGHTS_INDEX_NAME,
    PT_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    Checkpoint,
    CheckpointError,
)
from .dtypes import cast_tensors
from .fair_esm import read_fair_esm
from .resolve import resolve_checkpoint
from .safetensors import SafetensorsFile, write_safetensors_from
from .schema import validate_shapes
from .torch_pickle import read_torch_state_dict


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


def hub_weights(directory: str, weights: str | None = None) -> tuple[str, list[str], dict[str, str] | None]:
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


def read_hub_config(directory: str) -> EsmConfig:
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


def iter_hub_dir(directory: str, weights: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    layout, files, weight_map = hub_weights(directory, weights)
    seen: set[str] = set()
    for file in files:
        if layout in (LAYOUT_SAFETENSORS, LAYOUT_SAFETENSORS_SHARDED):
            st = SafetensorsFile(file)
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
            items = read_torch_state_dict(file)
        for name, arr in items:
            if name in seen:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one shard")
            seen.add(name)
            yield name, arr


# ================================================================================================
# Readers of every local layout
# ================================================================================================


def classify_path(path: str) -> tuple[str, str, str | None]:
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
    kind, directory, weights = classify_path(path)
    if kind == "fair-esm":
        yield from read_fair_esm(path).tensors.items()
        return
    yield from iter_hub_dir(directory, weights)


def read_checkpoint_config(x: str | os.PathLike) -> EsmConfig:
    """The configuration of a checkpoint without reading its hub-layout weights."""
    path = resolve_checkpoint(x)
    kind, directory, _ = classify_path(path)
    if kind == "fair-esm":
        return read_fair_esm(path).config
    return read_hub_config(directory)


def load_checkpoint(x: str | os.PathLike, *, dtype: Any = None) -> Checkpoint:
    """Read a checkpoint into memory.

    ``x``: a hub-layout directory (``config.json`` + ``model.safetensors`` | ``model.safetensors.index.json``
    + shards | ``pytorch_model.bin`` [+ index]), a file inside one, a fair-esm ``.pt`` file, a preset name
    or a hub id. ``dtype`` (``"float32"``, ``"float16"``, ``"bfloat16"`` or a numpy dtype) casts the floating
    tensors (rotary ``inv_freq`` excepted). Shapes are checked against the config.
    """
    path = resolve_checkpoint(x)
    kind, directory, weights = classify_path(path)
    if kind == "fair-esm":
        ckpt = read_fair_esm(path)
    else:
        config = read_hub_config(directory)
        layout, _, _ = hub_weights(directory, weights)
        tensors = dict(iter_hub_dir(directory, weights))
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


def _shard(sizes: Iterable[tuple[str, int]], max_bytes: int | None) -> list[list[str]]:
    """HF's greedy split of ``(name, nbytes)``: tensors in order; a new shard when the next would overflow it;
    a tensor larger than ``max_bytes`` gets a shard of its own (``None``: one shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_hub_weights(
    directory: str,
    specs: Iterable[tuple[str, tuple[int, ...], Any]],
    read: Any,
    *,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    source: str | None = None,
) -> list[str]:
    """Write the weights of a hub directory: ``model.safetensors``, or above ``max_shard_size`` the shards
    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` in HF's format. ``specs``: (name,
    shape, dtype) in order; ``read(name)`` gives each array when its turn comes (one in memory at a time).
    The metadata is ``{"format": "pt"}`` plus ``metadata``. Returns the files written."""
    specs = [(str(n), tuple(int(x) for x in shape), np.dtype(dt)) for n, shape, dt in specs]
    nbytes = {n: int(np.prod(shape, dtype=np.int64)) * dt.itemsize for n, shape, dt in specs}
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    shards = _shard(((n, nbytes[n]) for n, _, _ in specs), limit)
    by_name = {n: (n, shape, dt) for n, shape, dt in specs}
    meta = {"format": "pt", **(dict(metadata) if metadata else {})}
    n_shards = len(shards)
    files = [SAFE_WEIGHTS_NAME] if n_shards == 1 else \
        [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    weight_map = {}
    for fname, names in zip(files, shards):
        write_safetensors_from(os.path.join(directory, fname), [by_name[n] for n in names], read, meta, source=source)
        weight_map.update(dict.fromkeys(names, fname))
    if n_shards > 1:
        index = {"metadata": {"total_size": int(sum(nbytes.values()))}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(SAFE_WEIGHTS_INDEX_NAME)
    return files


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
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(directory))}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(config.to_json_string())
        write_hub_weights(tmp, [(n, a.shape, a.dtype) for n, a in arrays.items()], arrays.__getitem__,
                          max_shard_size=max_shard_size, metadata=metadata)
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


__all__ = [
    "PT_WEIGHTS_INDEX_NAME",
    "PT_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "classify_path",
    "hub_weights",
    "iter_checkpoint_tensors",
    "iter_hub_dir",
    "load_checkpoint",
    "parse_size",
    "read_checkpoint_config",
    "read_hub_config",
    "save_checkpoint",
    "write_hub_weights",
]
