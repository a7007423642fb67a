"""The tensor inventory of an ESM checkpoint and the matching of a checkpoint's tensors to a model's.

* What a config implies: :func:`expected_shape` of every hub tensor name, :func:`validate_shapes`, the
  known-benign extras (:data:`DEFAULT_BENIGN`), :func:`rotary_inv_freq` (the rotary table a config computes
  when a file lacks it), :func:`check_finite` (NaN/inf weights are refused by name).
* :func:`match_state`, shared by ``esm_dual.pt`` and ``esm_dual.tf``: a checkpoint's names are the hub's
  (``esm.encoder.layer.0...`` for task models, no ``esm.`` prefix for files saved from ``EsmModel``);
  ``match_state`` turns them into exactly the names a model expects: it adds or strips the ``esm.`` prefix,
  drops a head the model does not have (a classifier of the other layout included), reports a head the model
  has but the file lacks (initialised fresh) and unknown tensors inside a head it has (ignored), spreads a
  single model-level rotary table to every layer, drops known-benign extras, and raises an error naming every
  missing or unused encoder tensor and every integer weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..common.config import EsmConfig
from .base import CheckpointError, format_names
from .dtypes import is_floating

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
            parts.append(f"missing tensor(s): {format_names(bad_missing)}")
        if bad_unexpected:
            parts.append(f"unexpected tensor(s): {format_names(bad_unexpected)}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    return missing - bad_missing, unexpected - bad_unexpected


LAYER_RE = re.compile(r"^(?:esm\.)?encoder\.layer\.(\d+)\.(.+)$")


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
    m = LAYER_RE.match(name)
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
        m = LAYER_RE.match(name)
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



def rotary_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """The rotary frequencies ``1 / theta ** (2i / head_dim)``, float32 [head_dim // 2]: what a model uses when
    a checkpoint has no stored table (ESM-2 files store fp16-rounded values, which are loaded instead)."""
    return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)


def check_finite(tensors: Mapping[str, Any], source: str) -> None:
    """Raise ``CheckpointError`` naming every floating tensor that holds NaN or infinity (one pass per tensor,
    no copy beyond a boolean reduction): such weights give NaN outputs, never an error of their own."""
    bad = []
    for name, arr in tensors.items():
        a = np.asarray(arr)
        if not is_floating(a.dtype):
            continue
        if a.dtype.kind != "f":  # bfloat16 / float8 (ml_dtypes): np.isfinite works on a float32 view of it
            a = a.astype(np.float32)
        if not np.isfinite(a).all():
            n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            bad.append(f"{name} ({n_nan} NaN, {n_inf} inf of {a.size} values)")
    if bad:
        raise CheckpointError(f"{source}: tensor(s) with NaN or infinite values: " + "; ".join(bad[:12])
                              + (f"; ... ({len(bad) - 12} more)" if len(bad) > 12 else ""))


# ================================================================================================
# Matching a checkpoint's tensors to a model's
# ================================================================================================

BASE_PREFIX = "esm."
# Tensor-name prefixes of the heads, in the task models' naming (with "esm." for the contact head).
HEAD_PREFIXES = {
    "lm_head": ("lm_head.",),
    "classifier": ("classifier.",),
    "pooler": ("esm.pooler.",),
    "contact_head": ("esm.contact_head.",),
}
_ROTARY_LAYER = re.compile(r"^esm\.encoder\.layer\.(\d+)\.attention\.self\.rotary_embeddings\.inv_freq$")


class LoadingError(ValueError):
    """Checkpoint tensors do not fit the model; the message names them."""


@dataclass
class MatchResult:
    tensors: dict[str, np.ndarray]
    messages: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)  # model tensors left at their fresh init


def _head_of(name: str) -> str | None:
    for head, prefixes in HEAD_PREFIXES.items():
        if name.startswith(prefixes):
            return head
    return None


def _short(names: list[str], limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def canonical_tensor_name(k: str) -> str:
    """``LayerNorm.gamma``/``.beta`` (what transformers 5 writes for modules named ``LayerNorm``) ->
    ``LayerNorm.weight``/``.bias``; other names unchanged."""
    if k.endswith("LayerNorm.gamma"):
        return k[: -len("gamma")] + "weight"
    if k.endswith("LayerNorm.beta"):
        return k[: -len("beta")] + "bias"
    return k


def describe_mismatch(missing: list[str], unused: list[str]) -> str:
    """"missing N tensor(s): a, b; unused M tensor(s): c" (at most 12 names each)."""
    parts = []
    for what, names in (("missing", missing), ("unused", unused)):
        if names:
            more = " ..." if len(names) > 12 else ""
            parts.append(f"{what} {len(names)} tensor(s): {', '.join(names[:12])}{more}")
    return "; ".join(parts)


def to_task_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Names with the ``esm.`` prefix (task-model layout), whichever layout the file used."""
    tensors = {canonical_tensor_name(k): v for k, v in tensors.items()}
    if any(k.startswith(BASE_PREFIX) for k in tensors):
        return tensors
    out = {}
    for k, v in tensors.items():
        out[k if k.startswith(("lm_head.", "classifier.")) else BASE_PREFIX + k] = v
    return out


def match_state(
    tensors: dict[str, np.ndarray],
    expected: Iterable[str],
    *,
    base_model: bool,
    num_layers: int,
    source: str = "checkpoint",
    word_embeddings: str = "esm.embeddings.word_embeddings.weight",
) -> MatchResult:
    """Map ``tensors`` (hub names) onto the ``expected`` names of a model.

    ``expected`` uses the model's own names: without ``esm.`` for ``EsmModel`` (``base_model=True``),
    with it for the task models.
    """
    found = to_task_names(tensors)
    want = set(expected)
    want_task = {BASE_PREFIX + k for k in want} if base_model else set(want)
    messages: list[str] = []
    initialised: list[str] = []

    # Benign extras: buffers HF writes, the unused learned-position table of ESM-2 files.
    for k in list(found):
        if k.endswith("position_ids") and k not in want_task:
            del found[k]
        elif k == "esm.embeddings.position_embeddings.weight" and k not in want_task:
            del found[k]

    # Rotary tables: per layer in hub files; HF 5 keeps one model-level table and writes it either
    # as "esm.rotary_embeddings.inv_freq" or, literally, as "esm.encoder.layer.*.attention...".
    model_level = found.pop("esm.rotary_embeddings.inv_freq", None)
    wildcard = found.pop("esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq", None)
    model_level = model_level if model_level is not None else wildcard
    wanted_rot = {k for k in want_task if _ROTARY_LAYER.match(k)}
    if wanted_rot:
        for k in sorted(wanted_rot):
            if k not in found and model_level is not None:
                found[k] = model_level
        missing_rot = [k for k in wanted_rot if k not in found]
        if missing_rot:
            initialised.extend(missing_rot)  # computed from rope_theta; not an error
    else:
        for k in [k for k in found if _ROTARY_LAYER.match(k)]:
            del found[k]

    # Tied decoder: drop it when equal to the word embeddings; keep an untied one only if expected
    # (a model built with tie_word_embeddings=False lists "lm_head.decoder.weight" among its tensors).
    dec = "lm_head.decoder.weight"
    if dec in found and dec not in want_task:
        emb = found.get(word_embeddings)
        if emb is not None and emb.shape == found[dec].shape and np.array_equal(emb, found[dec]):
            del found[dec]
        elif "lm_head" not in {_head_of(k) for k in want_task}:
            pass  # dropped with the head below
        else:
            raise LoadingError(
                f"{source}: tensor lm_head.decoder.weight differs from the word embeddings, but the config "
                "ties them (tie_word_embeddings=True); load it with tie_word_embeddings=False")

    # Heads: drop the ones the model lacks, initialise the ones the file lacks. A classifier of the
    # other layout (sequence: classifier.dense/out_proj, token: classifier.weight/bias) is a head the
    # model lacks: it is dropped and the model's own classifier initialised.
    heads_want = {_head_of(k) for k in want_task} - {None}
    other = [k for k in found if _head_of(k) == "classifier"]
    if "classifier" in heads_want and other and not any(k in want_task for k in other):
        for k in other:
            del found[k]
        layout = "sequence" if any(k.startswith("classifier.out_proj.") for k in other) else "token"
        messages.append(f"{source}: dropping the classifier ({len(other)} tensors, a {layout}-classification "
                        "head) this model does not use")
    heads_found = {_head_of(k) for k in found} - {None}
    for head in sorted(heads_found - heads_want):
        names = [k for k in found if _head_of(k) == head]
        for k in names:
            del found[k]
        if head != "pooler":
            messages.append(f"{source}: dropping the {head} ({len(names)} tensors) this model does not use")
    for head in sorted(heads_want - heads_found):
        names = sorted(k for k in want_task if _head_of(k) == head)
        initialised.extend(names)
        messages.append(f"{source}: no {head} in the checkpoint; {len(names)} tensors newly initialised"
                        + (" (train it before use)" if head in ("classifier", "lm_head") else ""))
    for head in sorted(heads_want & heads_found):
        missing = sorted(k for k in want_task if _head_of(k) == head and k not in found)
        if missing:
            raise LoadingError(f"{source}: the {head} is incomplete; missing tensors: {', '.join(missing)}")
        unused = sorted(k for k in found if _head_of(k) == head and k not in want_task)
        if unused:
            for k in unused:
                del found[k]
            messages.append(f"{source}: ignoring {len(unused)} unknown tensor(s) in the {head}: {_short(unused)}")

    # Encoder tensors: exact match required.
    enc_want = {k for k in want_task if _head_of(k) is None and k not in initialised}
    enc_found = {k for k in found if _head_of(k) is None}
    missing = sorted(enc_want - enc_found)
    unused = sorted(enc_found - enc_want)
    if missing or unused:
        raise LoadingError(f"{source} does not match the model: " + describe_mismatch(missing, unused))

    out = {k: v for k, v in found.items() if k in want_task}
    not_float = sorted(k for k, v in out.items() if not is_floating(np.asarray(v).dtype))
    if not_float:
        raise LoadingError(f"{source}: tensor(s) of an integer or boolean dtype where the model has floating "
                           "weights: " + ", ".join(f"{k} ({np.asarray(out[k]).dtype})" for k in not_float[:12]))
    if base_model:
        out = {k[len(BASE_PREFIX):]: v for k, v in out.items()}
        initialised = [k[len(BASE_PREFIX):] if k.startswith(BASE_PREFIX) else k for k in initialised]
    return MatchResult(out, messages, initialised)


def checkpoint_has_pooler(tensors: dict[str, np.ndarray]) -> bool:
    return any(k.startswith(("pooler.", "esm.pooler.")) for k in tensors)


def task_head_kind(tensors: dict[str, np.ndarray]) -> str | None:
    """Which task head a checkpoint carries: "mlm", "seq", "tok" or None."""
    if any(k.startswith("lm_head.") for k in tensors):
        return "mlm"
    if any(k.startswith("classifier.out_proj.") for k in tensors):
        return "seq"
    if any(k.startswith("classifier.") for k in tensors):
        return "tok"
    return None


__all__ = [
    "BASE_PREFIX",
    "BENIGN_ALWAYS",
    "BENIGN_UNUSED_POSITION_TABLE",
    "DEFAULT_BENIGN",
    "HEAD_PREFIXES",
    "LoadingError",
    "MatchResult",
    "benign_tensor_patterns",
    "canonical_tensor_name",
    "check_finite",
    "check_tensor_names",
    "checkpoint_has_pooler",
    "describe_mismatch",
    "expected_shape",
    "match_state",
    "rotary_inv_freq",
    "task_head_kind",
    "to_task_names",
    "validate_shapes",
]
