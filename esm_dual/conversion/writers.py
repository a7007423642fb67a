"""Conversion writers: each writes one target layout into a staging path, reading the source one tensor at a
time where the format allows (hub -> hub and hub -> tf-h5 never hold two copies; fair-esm holds one: a ``.pt``
file is one pickle); :class:`Staging` moves the result into place at the end.

Targets: ``hf`` (``config.json`` + safetensors, sharded above ``max_shard_size``), ``keras`` (``.keras``),
``tf-h5`` (``config.json`` + ``tf_model.h5`` that transformers 4.x loads), ``fair-esm`` (``.pt``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..common.config import CONFIG_NAME, EsmConfig
from ..io.base import Checkpoint, CheckpointError, format_names
from ..io.dtypes import cast_dtype, cast_tensor, is_floating
from ..io.fair_esm import check_fair_esm_config, save_fair_esm
from ..io.hub import write_hub_weights
from ..io.schema import BENIGN_UNUSED_POSITION_TABLE
from ..io.tf_h5 import TF_WEIGHTS_NAME, write_tf_h5
from .sources import BENIGN_EXTRA, STORED_DTYPES_KEY, Source, architecture, tf_model_class, tf_model_tensors


@contextmanager
def quiet() -> Iterator[None]:
    """Library warnings (logger "esm_dual") silenced: loading messages of models built only to write or check."""
    logger = logging.getLogger("esm_dual")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def write_hf(out_dir: str, s: Source, names: list[str], get: Callable[[str], np.ndarray],
             dtype: np.dtype | None, max_shard_size: int | str | None) -> None:
    """config.json + safetensors. Shards and headers are planned from the tensor specs first; then each
    tensor is read, cast and written straight to its place, so at most one tensor is in memory."""
    os.makedirs(out_dir)
    specs = []
    for n in names:
        shape, dt = s.spec(n)
        specs.append((n, shape, cast_dtype(n, dt, dtype)))
    write_hub_weights(out_dir, specs, lambda n: cast_tensor(n, get(n), dtype), max_shard_size=max_shard_size,
                      source=s.path)
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(s.config.to_json_string())


def check_fair_esm_target(path: str, config: EsmConfig) -> None:
    """The checks of ``save_fair_esm``, made before anything is read."""
    check_fair_esm_config(path, config)
    arch = architecture(config, None)
    if arch != "EsmForMaskedLM":
        raise CheckpointError(f"{path}: fair-esm holds masked-LM models only; this checkpoint is an {arch}")


class _CastView(Mapping):
    """``names`` read through ``get`` and cast to ``dtype`` when asked for (a lazy mapping for ``save_fair_esm``)."""

    def __init__(self, names: list[str], get: Callable[[str], np.ndarray], dtype: np.dtype | None):
        self.names, self.get, self.dtype = names, get, dtype

    def __getitem__(self, name: str) -> np.ndarray:
        return cast_tensor(name, self.get(name), self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def write_fair_esm(path: str, s: Source, names: list[str], get: Callable[[str], np.ndarray],
                   dtype: np.dtype | None, dropped: list[str], notes: list[str]) -> None:
    """The file ``save_fair_esm`` writes, fed tensor by tensor (one copy of the weights in memory)."""
    save_fair_esm(path, s.config, _CastView(names, get, dtype), source=s.path, check_mask_row=True,
                  dropped=dropped, notes=notes)


def write_tf_h5_dir(out_dir: str, s: Source, names: list[str], get: Callable[[str], np.ndarray],
                    dtype: np.dtype | None) -> None:
    """config.json + tf_model.h5, tensor by tensor."""
    os.makedirs(out_dir)
    write_tf_h5(os.path.join(out_dir, TF_WEIGHTS_NAME), s.config,
                ((n, cast_tensor(n, get(n), dtype)) for n in names))
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(s.config.to_json_string())


def keras_policy(tensors: dict[str, np.ndarray]) -> str:
    floats = {a.dtype.name for n, a in tensors.items() if is_floating(a.dtype) and not n.endswith("inv_freq")}
    if len(floats) > 1:
        raise CheckpointError(f"a .keras model holds one float dtype; the checkpoint mixes {sorted(floats)} "
                              "(convert with a dtype)")
    return floats.pop() if floats else "float32"


def write_keras(path: str, s: Source, names: list[str], get: Callable[[str], np.ndarray],
                dtype: np.dtype | None, dropped: list[str]) -> None:
    """A ``.keras`` file of the matching ``esm_dual.tf`` model, every tensor checked bit-exact after loading."""
    tensors = {n: cast_tensor(n, get(n), dtype) for n in names}
    policy = keras_policy(tensors)
    model = keras_model_from_tensors(s.config, tensors, policy, s.path)
    held = tf_model_tensors(model)
    lost = [n for n, a in held.items() if n in tensors and not bit_equal(a, tensors[n])]
    if lost:
        raise CheckpointError(f"{path}: tensors not exactly representable in the Keras model: {format_names(lost)}")
    extra = [n for n in tensors if n not in held]
    benign = re.compile(BENIGN_UNUSED_POSITION_TABLE if s.config.position_embedding_type == "rotary" else "^$")
    bad = [n for n in extra if not (benign.match(n) or BENIGN_EXTRA.match(n))]
    if bad:
        raise CheckpointError(f"{path}: the Keras model has no place for tensor(s) {format_names(bad)}")
    dropped.extend(extra)
    # Layers our TF models keep in float32 under a low-precision policy (LayerNorms, contact head) hold
    # upcast values; the stored dtypes are recorded in the config so that reading the file gives them back.
    changed = {n: tensors[n].dtype.name for n, a in held.items() if n in tensors and a.dtype != tensors[n].dtype}
    if changed:
        model.config = EsmConfig.from_dict({**model.config.to_dict(), STORED_DTYPES_KEY: changed})
    model.save(path)


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and (a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
                                   or a.dtype != b.dtype and np.array_equal(a.astype(np.float64), b.astype(np.float64)))


def keras_model_from_tensors(config: EsmConfig, tensors: dict[str, np.ndarray], policy: str | None,
                             source: str) -> Any:
    """The ``esm_dual.tf`` model of ``config``'s architecture, built by its ``from_checkpoint``."""
    with quiet():
        return tf_model_class(config).from_checkpoint(Checkpoint(config, tensors, source, "tensors"), dtype=policy)


_OWNER = ".owner"  # inside a staging directory: the pid of the process writing it


def remove_stale_staging(dst: str) -> list[str]:
    """Remove the staging directories ``.<name>.tmp-XXXXXXXX`` beside ``dst`` that earlier runs left (killed,
    segfaulted, out of disk): only directories of exactly that name whose writer (``.owner`` pid) is gone."""
    dst = os.path.abspath(dst)
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    pattern = re.compile(re.escape(f".{base}.tmp-") + r"[a-z0-9_]{8}")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if not pattern.fullmatch(name) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            with open(os.path.join(path, _OWNER)) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            continue  # a conversion running now
        except (OSError, ValueError):
            pass
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class Staging:
    """A temporary directory beside ``dst``; ``commit`` moves what was written there into place."""

    def __init__(self, dst: str, overwrite: bool, extra: list[str] | None = None):
        self.user_dst = dst  # as the caller wrote it, for messages
        self.dst = os.path.abspath(dst)
        self.overwrite = overwrite
        self.extra = extra or []  # files written beside dst (fair-esm contact regression)
        parent = os.path.dirname(self.dst)
        if not os.path.isdir(parent):
            raise CheckpointError(f"{dst}: the parent directory {parent} does not exist")
        remove_stale_staging(self.dst)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.tmp-", dir=parent)
        with open(os.path.join(self.tmp, _OWNER), "w") as f:
            f.write(str(os.getpid()))
        self.path = os.path.join(self.tmp, os.path.basename(self.dst))

    def commit(self) -> None:
        old = os.path.join(self.tmp, ".old")
        os.makedirs(old)
        moves = [(self.path, self.dst)] + [(os.path.join(self.tmp, os.path.basename(e)), e) for e in self.extra]
        for new, final in moves:
            if os.path.lexists(final):
                os.replace(final, os.path.join(old, os.path.basename(final)))
            if os.path.lexists(new):
                umask = os.umask(0)
                os.umask(umask)
                if os.path.isdir(new):
                    os.chmod(new, 0o777 & ~umask)
                os.replace(new, final)

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def renamed(self, e: Exception) -> Exception:
        """``e`` with the staging paths in its message replaced by the user's destination: the staging
        directory is gone once the error reaches the caller."""
        msg = str(e)
        if self.tmp not in msg:
            return e
        msg = msg.replace(self.path, self.user_dst)
        msg = msg.replace(self.tmp + os.sep, os.path.join(os.path.dirname(self.user_dst), ""))
        msg = msg.replace(self.tmp, os.path.dirname(self.user_dst) or ".")
        try:
            return type(e)(msg)
        except Exception:  # pragma: no cover - an exception type with another constructor
            return e




__all__ = [
    "Staging",
    "remove_stale_staging",
    "bit_equal",
    "check_fair_esm_target",
    "keras_model_from_tensors",
    "keras_policy",
    "quiet",
    "write_fair_esm",
    "write_hf",
    "write_keras",
    "write_tf_h5_dir",
]
