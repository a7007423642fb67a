"""Checkpoint conversion between every layout ESM users hold: ``esm_dual.convert(src, dst, to=...)``.

Sources (detected from the path):

* ``hf``: the HF hub layout: a directory with ``config.json`` + ``model.safetensors`` | sharded safetensors
  with an index | ``pytorch_model.bin`` [+ index] (or a file inside such a directory);
* ``fair-esm``: a fair-esm ``.pt`` file (+ ``<stem>-contact-regression.pt`` beside it);
* ``tf-h5``: transformers 4.x's TensorFlow ``tf_model.h5`` (+ ``config.json`` beside it);
* ``keras``: a ``.keras`` file saved from an ``esm_dual.tf`` model;
* ``keras-weights``: a ``.weights.h5`` file of an ``esm_dual.tf`` model (needs ``config``);
* ``keras-hub``: a keras-hub ESM backbone preset directory (``config.json`` + ``model.weights.h5``).

Targets: ``hf`` (canonical: ``config.json`` + safetensors, sharded above ``max_shard_size``), ``keras``
(``.keras``), ``tf-h5`` (a directory with ``config.json`` + ``tf_model.h5`` that transformers 4.x loads) and
``fair-esm`` (``.pt`` that ``esm.pretrained.load_model_and_alphabet_local`` loads).

Guarantees:

* Lossless: every tensor the destination can hold is written bit-exactly in its stored dtype; a dtype
  changes only when ``dtype`` is given (rotary ``inv_freq`` and integer buffers are never cast). What a
  destination cannot hold is listed in the report (``dropped``), and is known-benign (the unused
  position table of ESM-2 files for fair-esm, ...). Anything else that does not fit is an error.
* Streaming: hub -> hub and hub -> tf-h5 read and write one tensor at a time (safetensors shards are
  planned from the headers, then filled tensor by tensor), so a multi-GB checkpoint never sits in memory
  twice; hub -> fair-esm holds one copy (a ``.pt`` file is one pickle). See ``conversion/README.md``.
* Atomic: everything is written under a temporary directory beside ``dst`` and renamed into place at the
  end (after verification, if asked); a failure leaves ``dst`` as it was. An existing ``dst`` is refused
  unless ``overwrite=True``.
* ``verify=True`` runs source and destination in their own frameworks (PyTorch for hub / fair-esm files,
  TensorFlow for ``.keras`` / ``.weights.h5`` / ``tf_model.h5`` / keras-hub) on a fixed batch with padding
  and ``<mask>`` tokens, and compares logits, last hidden state and contacts (when both have a contact head):
  tolerance 1e-4 across frameworks, 1e-5 within one. With ``dtype`` the reference is the source with its
  weights rounded to that dtype (both computed in float32).

``esm_dual.convert`` is :func:`convert`: ``esm_dual.convert(src, dst, to="keras")``. The parts: :mod:`.sources`
(reading and checking), :mod:`.writers` (one per target, staging), :mod:`.verify`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.config import ConfigError, EsmConfig, with_recorded_dtype
from ..io.base import CheckpointError
from ..io.dtypes import cast_dtype, resolve_dtype
from ..io.fair_esm import regression_path
from ..io.hub import parse_size
from ..io.schema import LoadingError
from .sources import SOURCES, Source, detect_format, open_source, per_layer_rotary
from .verify import VerificationError, verification_batch, verify_conversion
from .writers import Staging, check_fair_esm_target, write_fair_esm, write_hf, write_keras, write_tf_h5_dir

TARGETS = ("hf", "keras", "tf-h5", "fair-esm")
DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class ConversionReport:
    """What ``convert`` did. ``verify``: output name -> max-abs difference (None without verification)."""

    src: str
    dst: str
    source_format: str
    target_format: str
    num_tensors: int
    num_bytes: int
    dtype: str | None = None
    dropped: list[str] = field(default_factory=list)
    verify: dict[str, float] | None = None
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)


def _target_from_path(dst: str) -> str | None:
    if dst.endswith(".keras"):
        return "keras"
    if dst.endswith(".pt"):
        return "fair-esm"
    return None


# The files a checkpoint directory consists of (what overwrite=True may replace; overwrite="dir" replaces all).
_CHECKPOINT_FILES = re.compile(
    r"(config\.json|generation_config\.json|model\.safetensors|model-\d+-of-\d+\.safetensors"
    r"|model\.safetensors\.index\.json|pytorch_model\.bin|pytorch_model-\d+-of-\d+\.bin"
    r"|pytorch_model\.bin\.index\.json|tf_model\.h5|tf_model\.h5\.index\.json|tokenizer_config\.json"
    r"|special_tokens_map\.json|vocab\.txt|tokenizer\.json|added_tokens\.json|\.gitattributes)")


def check_replaceable(dst: str | os.PathLike) -> None:
    """Refuse (``CheckpointError`` naming them) to replace a directory that holds files other than a
    checkpoint's: replacing it would delete them with the old checkpoint. Files and missing paths pass."""
    dst = os.fspath(dst)
    if not os.path.isdir(dst):
        return
    foreign = sorted(n + ("/" if os.path.isdir(os.path.join(dst, n)) else "") for n in os.listdir(dst)
                     if not _CHECKPOINT_FILES.fullmatch(n))
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise CheckpointError(f"{dst}: holds files that are not part of a checkpoint ({shown}); overwriting would "
                              "delete them with the old checkpoint. Move them, write elsewhere, or replace the "
                              "whole directory (overwrite='dir', --overwrite-dir)")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str | None = None,
    dtype: Any = None,
    verify: bool = False,
    overwrite: bool | str = False,
    *,
    config: str | os.PathLike | EsmConfig | None = None,
    max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
    tolerance: float | None = None,
    log: Callable[[str], None] | None = None,
) -> ConversionReport:
    """Convert the checkpoint ``src`` into ``dst`` in layout ``to`` (one of :data:`TARGETS`; inferred from a
    ``.keras`` / ``.pt`` destination when not given).

    ``dtype`` (``"float32"``, ``"float16"``, ``"bfloat16"``) casts the floating tensors (never ``inv_freq``);
    ``verify`` compares the two models' outputs before ``dst`` is put in place (``VerificationError`` above
    ``tolerance``, default 1e-5 within a framework and 1e-4 across); ``overwrite=True`` replaces an existing
    ``dst`` that is a checkpoint (a file, or a directory of checkpoint files only: a directory that holds other
    files is refused, naming them, see :func:`check_replaceable`), ``overwrite="dir"`` replaces ``dst`` whole;
    ``config`` is the configuration a ``.weights.h5`` source needs; ``max_shard_size`` shards hub
    output above that size (``None``: one file). Returns a :class:`ConversionReport`.
    """
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    to = to or _target_from_path(dst_s)
    if to is None:
        raise CheckpointError(f"{dst_s}: say which layout to write (to= one of {', '.join(TARGETS)})")
    if to not in TARGETS:
        raise CheckpointError(f"unknown target layout {to!r}; choose one of {', '.join(TARGETS)}")
    target_dtype = resolve_dtype(dtype) if dtype is not None else None
    if to == "hf" and max_shard_size is not None:
        parse_size(max_shard_size)
    if overwrite not in (False, True, "dir"):
        raise ValueError(f"overwrite must be False, True or 'dir', not {overwrite!r}")
    if os.path.lexists(dst_s) and not overwrite:
        raise CheckpointError(f"{dst_s}: already exists; pass overwrite=True (--overwrite) to replace it")
    if overwrite is True:
        check_replaceable(dst_s)
    if os.path.exists(dst_s) and os.path.exists(src_s):
        real_src, real_dst = os.path.realpath(src_s), os.path.realpath(dst_s)
        if real_src == real_dst or real_src.startswith(real_dst.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"{dst_s}: holds the source {src_s}; replacing it would delete the source")
    if to == "keras" and not dst_s.endswith(".keras"):
        raise CheckpointError(f"{dst_s}: a Keras model file must end in .keras")
    if to == "fair-esm" and not dst_s.endswith(".pt"):
        raise CheckpointError(f"{dst_s}: fair-esm files end in .pt")
    if to in ("hf", "tf-h5") and os.path.splitext(dst_s)[1] in (".pt", ".keras", ".h5", ".safetensors", ".bin"):
        raise CheckpointError(f"{dst_s}: the {to} layout is a directory; give a directory path")
    if to == "tf-h5" and target_dtype is not None and target_dtype.name == "bfloat16":
        raise CheckpointError(f"{dst_s}: tf_model.h5 cannot hold bfloat16 (HDF5 has no such type); use float16 "
                              "or float32")
    say = log or (lambda msg: None)

    source = open_source(src_s, config=config)
    try:
        if to in ("tf-h5", "fair-esm"):
            source = per_layer_rotary(source)
        if to == "fair-esm":
            check_fair_esm_target(dst_s, source.config)
        names = source.names()
        report = ConversionReport(src=src_s, dst=dst_s, source_format=source.format, target_format=to,
                                  num_tensors=0, num_bytes=0,
                                  dtype=target_dtype.name if target_dtype is not None else None)
        if to == "tf-h5":
            floats = {source.spec(n)[1].name for n in names}
            if target_dtype is None and "bfloat16" in floats:
                raise CheckpointError(f"{src_s}: bfloat16 tensors; tf_model.h5 cannot hold bfloat16 (HDF5 has no "
                                      "such type): convert with dtype float32 (exact) or float16")
        if source.renamed:
            report.notes.append(f"{source.renamed} LayerNorm tensors stored with the legacy names gamma/beta "
                                "(as transformers 5 saves them) are written as weight/bias")
        if source.format == "keras-hub":
            report.notes.append("keras-hub's ESMBackbone has no token dropout; the config written says "
                                f"token_dropout={source.config.token_dropout} (ESM-1b/ESM-2 were trained with it)")
        extra = [regression_path(os.path.abspath(dst_s))] if to == "fair-esm" else []
        for e in extra:
            if os.path.lexists(e) and not overwrite:
                raise CheckpointError(f"{e}: already exists; pass overwrite=True (--overwrite) to replace it")
        if target_dtype is not None:
            # The config written records the weights' new dtype, as transformers 5 records it ("dtype").
            source.config = with_recorded_dtype(source.config, target_dtype.name)
        staging = Staging(dst_s, bool(overwrite), extra)
        try:
            get = _get_hook(source)
            say(f"converting {src_s} ({source.format}, {len(names)} tensors, {source.nbytes() / 1e6:.1f} MB) -> "
                f"{dst_s} ({to})")
            if to == "hf":
                write_hf(staging.path, source, names, get, target_dtype, max_shard_size)
            elif to == "tf-h5":
                write_tf_h5_dir(staging.path, source, names, get, target_dtype)
                # tf_model.h5 has no place for position_ids buffers (recomputed by every framework)
                report.dropped.extend(n for n in names if n.endswith("position_ids"))
            elif to == "fair-esm":
                write_fair_esm(staging.path, source, names, get, target_dtype, report.dropped, report.notes)
            else:
                write_keras(staging.path, source, names, get, target_dtype, report.dropped)
            kept = [n for n in names if n not in report.dropped]
            report.num_tensors = len(kept)
            report.num_bytes = int(sum(np.prod(source.spec(n)[0], dtype=np.int64) *
                                       cast_dtype(n, source.spec(n)[1], target_dtype).itemsize for n in kept))
            if verify:
                diffs, tol = verify_conversion(source, staging.path, to, dtype=target_dtype, tolerance=tolerance,
                                               log=say)
                report.verify, report.tolerance = diffs, tol
            staging.commit()
        except (CheckpointError, LoadingError, ConfigError) as e:
            raise staging.renamed(e) from None
        finally:
            staging.cleanup()
    finally:
        source.close()
    return report


def _get_hook(source: Source) -> Callable[[str], np.ndarray]:
    """How writers read a tensor (a seam for tests)."""
    return source.get




__all__ = [
    "ConversionReport",
    "DEFAULT_MAX_SHARD_SIZE",
    "SOURCES",
    "TARGETS",
    "CheckpointError",
    "VerificationError",
    "check_replaceable",
    "convert",
    "detect_format",
    "open_source",
    "verification_batch",
    "verify_conversion",
]
