"""Conversion verification: source and destination run in their own frameworks (PyTorch for hub / fair-esm
files, Keras on its configured backend for ``.keras`` / ``.weights.h5`` / ``tf_model.h5`` / keras-hub) on a
fixed batch with padding and ``<mask>`` tokens; logits, last hidden state and contacts (when both have a
contact head) are compared: tolerance 1e-4 across frameworks, 1e-5 within one. With ``dtype`` the reference
is the source with its weights rounded to that dtype (both computed in float32).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ..common.config import EsmConfig
from ..io.base import Checkpoint, CheckpointError
from ..io.dtypes import cast_tensor, is_floating, resolve_dtype
from ..io.keras_hub import load_keras_hub_backbone
from .sources import (
    FRAMEWORK,
    Source,
    architecture,
    build_keras_weights_model,
    detect_format,
    load_keras_model,
    open_source,
    tf_model_tensors,
)
from .writers import keras_model_from_tensors, quiet

TOLERANCE_SAME_FRAMEWORK = 1e-5
TOLERANCE_CROSS_FRAMEWORK = 1e-4


class VerificationError(CheckpointError):
    """``verify=True`` found outputs that differ by more than the tolerance; nothing was written."""


def verification_batch(vocab_size: int = 33, padded: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fixed token ids [4, 14] with BOS/EOS, padding (1), different lengths and ``<mask>`` (32) tokens (only
    for the 33-token ESM alphabet). ``padded=False``: four full-length sequences without ``<mask>``."""
    rng = np.random.default_rng(20240531)
    lengths = (12, 7, 10, 3) if padded else (12, 12, 12, 12)
    L = max(lengths) + 2
    ids = np.full((len(lengths), L), 1, dtype=np.int64)
    mask = np.zeros((len(lengths), L), dtype=np.int64)
    for b, n in enumerate(lengths):
        res = rng.integers(4, min(24, vocab_size), size=n)
        if padded and b > 0 and vocab_size == 33:
            res[rng.integers(0, n)] = 32
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = 0, res, 2
        mask[b, :n + 2] = 1
    return ids, mask


def _floats32(tensors: dict[str, np.ndarray], dtype: np.dtype | None) -> dict[str, np.ndarray]:
    out = {}
    for n, a in tensors.items():
        a = cast_tensor(n, a, dtype)
        out[n] = a.astype(np.float32) if is_floating(a.dtype) else a
    return out


def _run_pt(config: EsmConfig, tensors: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray,
            contacts: bool, source: str = "source") -> dict[str, np.ndarray]:
    import torch

    import esm_dual.pt as ept

    cls = getattr(ept, architecture(config, list(tensors)))
    with quiet():
        model = cls.from_checkpoint(Checkpoint(config, tensors, source, "tensors"))
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        o = model(t_ids, attention_mask=t_mask, output_hidden_states=True)
        if getattr(o, "logits", None) is not None:
            out["logits"] = o.logits.float().numpy()
        out["last_hidden_state"] = o.hidden_states[-1].float().numpy()
        if contacts:
            out["contacts"] = model.predict_contacts(t_ids, t_mask).float().numpy()
    return out


def _run_keras(model: Any, ids: np.ndarray, mask: np.ndarray, contacts: bool) -> dict[str, np.ndarray]:
    """A Keras model on the batch, on whichever Keras backend runs (TensorFlow, JAX or PyTorch)."""
    import keras

    def numpy(x) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(x), np.float32)

    t_ids = keras.ops.convert_to_tensor(ids.astype(np.int32))
    t_mask = keras.ops.convert_to_tensor(mask.astype(np.int32))
    o = model(t_ids, attention_mask=t_mask, output_hidden_states=True)
    out: dict[str, np.ndarray] = {}
    if getattr(o, "logits", None) is not None:
        out["logits"] = numpy(o.logits)
    out["last_hidden_state"] = numpy(o.hidden_states[-1])
    if contacts:
        out["contacts"] = numpy(model.predict_contacts(t_ids, t_mask))
    return out


def _label(framework: str) -> str:
    """"pt", "tf" (Keras on TensorFlow) or "keras-jax" / "keras-torch" (Keras on another backend)."""
    if framework != "tf":
        return framework
    import keras

    backend = keras.backend.backend()
    return "tf" if backend == "tensorflow" else f"keras-{backend}"


def _has_contacts(names: list[str]) -> bool:
    return any(n.endswith("contact_head.regression.weight") for n in names)


def _outputs(fmt: str, path: str, config: EsmConfig, tensors: dict[str, np.ndarray] | None, ids: np.ndarray,
             mask: np.ndarray, contacts: bool, dtype: np.dtype | None) -> dict[str, np.ndarray]:
    """Run a checkpoint in its own framework (float32)."""
    if fmt in ("hf", "fair-esm"):
        assert tensors is not None
        return _run_pt(config, _floats32(tensors, dtype), ids, mask, contacts, path)
    if fmt == "keras-hub":
        backbone = load_keras_hub_backbone(path)
        import keras

        x = backbone({"token_ids": keras.ops.convert_to_tensor(ids.astype(np.int32))})
        return {"last_hidden_state": np.asarray(keras.ops.convert_to_numpy(x), np.float32)}
    if fmt == "keras":
        model = load_keras_model(path)
    elif fmt == "keras-weights":
        model = build_keras_weights_model(path, config)
    else:
        assert tensors is not None
        model = None
    if model is not None:
        if dtype is not None or any(v.dtype != "float32" for v in model.weights):
            tensors = tf_model_tensors(model)
            model = None
    if model is None:
        model = keras_model_from_tensors(config, _floats32(tensors, dtype), "float32", path)
    return _run_keras(model, ids, mask, contacts)


def _read_all(s: Source) -> dict[str, np.ndarray]:
    return {n: s.get(n) for n in s.names()}


def verify_conversion(
    src: str | os.PathLike | Source,
    dst: str | os.PathLike,
    to: str | None = None,
    *,
    dtype: Any = None,
    tolerance: float | None = None,
    config: str | os.PathLike | EsmConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], float]:
    """Run ``src`` and ``dst`` in their own frameworks on :func:`verification_batch`; return
    ``({output: max-abs difference}, tolerance)`` or raise :class:`VerificationError` above the tolerance.

    ``dtype``: the destination's dtype when the conversion cast (the source's weights are rounded to it
    for the reference). keras-hub sources run on sequences without padding and ``<mask>`` and against a
    destination without token dropout (keras-hub implements neither padding-aware attention nor token
    dropout as ESM does).
    """
    say = log or (lambda msg: None)
    source = src if isinstance(src, Source) else open_source(src, config=config)
    dst_s = os.fspath(dst)
    fmt_dst = {"hf": "hf", "fair-esm": "fair-esm", "tf-h5": "tf-h5", "keras": "keras"}.get(to or "", None) \
        or detect_format(dst_s)
    target = resolve_dtype(dtype) if dtype is not None else None
    try:
        dst_source = open_source(dst_s, config=source.config if fmt_dst == "keras-weights" else None)
    except CheckpointError as e:
        raise VerificationError(f"{dst_s}: the converted checkpoint does not load: {e}") from None
    try:
        src_t, dst_t = _read_all(source), _read_all(dst_source)
        contacts = _has_contacts(list(src_t)) and _has_contacts(list(dst_t))
        keras_hub = source.format == "keras-hub"
        ids, mask = verification_batch(source.config.vocab_size, padded=not keras_hub)
        dst_config, dst_fmt = dst_source.config, dst_source.format
        if keras_hub:
            # Run the destination as keras-hub computes: no token dropout, and learned positions read from
            # row pad_token_id + j for token j (ESM reads row pad_token_id + 1 + j): keras-hub's
            # PositionEmbedding(start_index=pad_token_id). The weights written are the unshifted ones.
            dst_config = dst_config.copy(token_dropout=False)
            dst_fmt = "tf-h5" if FRAMEWORK[dst_fmt] == "tf" else "hf"  # run from the tensors, with dst_config
            pos = [n for n in dst_t if n.endswith("embeddings.position_embeddings.weight")]
            if pos and dst_config.position_embedding_type == "absolute":
                dst_t = dict(dst_t)
                dst_t[pos[0]] = np.roll(dst_t[pos[0]], 1, axis=0)
                say("verify: keras-hub reads learned positions one row early; the reference run emulates it")
        a = _outputs(source.format, source.path, source.config, src_t, ids, mask, contacts, target)
        b = _outputs(dst_fmt, dst_s, dst_config, dst_t, ids, mask, contacts, None)
    finally:
        if dst_source is not source:
            dst_source.close()
    same = FRAMEWORK[source.format] == FRAMEWORK[dst_source.format]
    tol = tolerance if tolerance is not None else (TOLERANCE_SAME_FRAMEWORK if same else TOLERANCE_CROSS_FRAMEWORK)
    real = mask.astype(bool)
    diffs: dict[str, float] = {}
    for key in ("logits", "last_hidden_state", "contacts"):
        if key not in a or key not in b:
            continue
        x, y = a[key], b[key]
        if x.shape != y.shape:
            raise VerificationError(f"verify: {key} has shape {x.shape} from the source, {y.shape} from {dst_s}")
        if key == "contacts":
            keep = real[:, 1:-1, None] & real[:, None, 1:-1] if x.ndim == 3 else np.ones(x.shape, bool)
            keep = np.broadcast_to(keep, x.shape)
        elif x.ndim == 3:
            keep = np.broadcast_to(real[:, :, None], x.shape)
        else:
            keep = np.ones(x.shape, bool)
        diffs[key] = float(np.max(np.abs(x - y)[keep])) if keep.any() else 0.0
    frameworks = f"{_label(source.framework)} -> {_label(FRAMEWORK[dst_source.format])}"
    for key, d in diffs.items():
        say(f"verify {key}: max |diff| = {d:.3g} ({frameworks}, tolerance {tol:g}) "
            f"{'ok' if d <= tol else 'FAILED'}")
    bad = {k: d for k, d in diffs.items() if not d <= tol}
    if bad:
        raise VerificationError(
            "verification failed: " + ", ".join(f"{k} max |diff| {d:.3g}" for k, d in bad.items())
            + f" > tolerance {tol:g} ({frameworks}); nothing was written")
    return diffs, tol




__all__ = ["TOLERANCE_CROSS_FRAMEWORK", "TOLERANCE_SAME_FRAMEWORK", "VerificationError", "verification_batch",
           "verify_conversion"]
