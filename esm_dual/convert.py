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

``esm_dual.convert`` is this module and is callable: ``esm_dual.convert(src, dst, to="keras")``.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .common import checkpoint as _ck
from .common.checkpoint import CheckpointError
from .common.config import CONFIG_NAME, ConfigError, EsmConfig, with_recorded_dtype
from .common.loading import LoadingError, canonical_tensor_name, is_floating

TARGETS = ("hf", "keras", "tf-h5", "fair-esm")
SOURCES = ("hf", "fair-esm", "tf-h5", "keras", "keras-weights", "keras-hub")
FRAMEWORK = {"hf": "pt", "fair-esm": "pt", "tf-h5": "tf", "keras": "tf", "keras-weights": "tf", "keras-hub": "tf"}
ARCHITECTURES = ("EsmModel", "EsmForMaskedLM", "EsmForSequenceClassification", "EsmForTokenClassification")
DEFAULT_MAX_SHARD_SIZE = "5GB"
TOLERANCE_SAME_FRAMEWORK = 1e-5
TOLERANCE_CROSS_FRAMEWORK = 1e-4
STORED_DTYPES_KEY = "esm_dual_stored_dtypes"  # in a .keras model's config: tensors kept in a wider dtype


class VerificationError(CheckpointError):
    """``verify=True`` found outputs that differ by more than the tolerance; nothing was written."""


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


# ================================================================================================
# Format detection
# ================================================================================================


def _is_keras_hub_config(path: str) -> bool:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and ("registered_name" in d or "class_name" in d) and "config" in d and \
        "model_type" not in d


def detect_format(path: str | os.PathLike) -> str:
    """The source format of ``path`` (one of :data:`SOURCES`)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"{p}: no such file or directory")
    if os.path.isdir(p):
        cfg = os.path.join(p, CONFIG_NAME)
        if os.path.isfile(cfg) and _is_keras_hub_config(cfg):
            return "keras-hub"
        names = set(os.listdir(p))
        if names & {_ck.SAFE_WEIGHTS_NAME, _ck.SAFE_WEIGHTS_INDEX_NAME, _ck.PT_WEIGHTS_NAME, _ck.PT_WEIGHTS_INDEX_NAME}:
            return "hf"
        if "tf_model.h5" in names:
            return "tf-h5"
        raise CheckpointError(
            f"{p}: no checkpoint found: expected config.json with model.safetensors (or shards + index, or "
            f"pytorch_model.bin), tf_model.h5, or a keras-hub preset; the directory holds {sorted(names)}"
        )
    base = os.path.basename(p)
    if base.endswith(".pt"):
        return "fair-esm"
    if base.endswith(".keras"):
        return "keras"
    if base.endswith(".weights.h5"):
        return "keras-weights"
    if base.endswith(".h5"):
        return "tf-h5"
    if base == CONFIG_NAME:
        return detect_format(os.path.dirname(os.path.abspath(p)))
    if base.endswith((".safetensors", ".bin", ".index.json")):
        return "hf"
    raise CheckpointError(
        f"{p}: unknown checkpoint file type (expected a hub-layout directory, a fair-esm .pt, a .keras, a "
        ".weights.h5, a tf_model.h5 or a keras-hub preset directory)"
    )


def _target_from_path(dst: str) -> str | None:
    if dst.endswith(".keras"):
        return "keras"
    if dst.endswith(".pt"):
        return "fair-esm"
    return None


# ================================================================================================
# Sources: config + tensors by name, read one at a time
# ================================================================================================


class _Source:
    format: str
    path: str
    config: EsmConfig
    renamed: int = 0  # legacy names mapped to the canonical ones

    def names(self) -> list[str]:
        raise NotImplementedError

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def framework(self) -> str:
        return FRAMEWORK[self.format]

    def nbytes(self) -> int:
        total = 0
        for n in self.names():
            shape, dtype = self.spec(n)
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return total


class _MemorySource(_Source):
    def __init__(self, fmt: str, path: str, config: EsmConfig, tensors: dict[str, np.ndarray]):
        self.format, self.path, self.config, self.tensors = fmt, path, config, tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        a = self.tensors[name]
        return tuple(a.shape), a.dtype

    def get(self, name: str) -> np.ndarray:
        return self.tensors[name]


class _HubSource(_Source):
    """Hub layout; safetensors tensors are read from disk on demand, .bin files are memory-mapped."""

    format = "hf"

    def __init__(self, path: str):
        kind, directory, weights = _ck._classify(path)
        self.path = directory
        self.config = _ck._read_config(directory)
        layout, files, weight_map = _ck._hub_weights(directory, weights)
        self.layout = layout
        self._where: dict[str, tuple[Any, str]] = {}
        for file in files:
            if layout in (_ck.LAYOUT_SAFETENSORS, _ck.LAYOUT_SAFETENSORS_SHARDED):
                st = _ck._SafetensorsFile(file)
                names = st.keys()
                holder: Any = st
            else:
                holder = _ck._torch_load(file)
                if not isinstance(holder, dict):
                    raise CheckpointError(f"{file}: expected a state dict, got {type(holder).__name__}")
                names = list(holder)
            if weight_map is not None:
                expected = {k for k, v in weight_map.items() if v == os.path.basename(file)}
                missing = expected - set(names)
                if missing:
                    raise CheckpointError(
                        f"{file}: tensor(s) {_ck._fmt_names(missing)} listed in the index are not in the shard")
            for n in names:
                if n in self._where:
                    raise CheckpointError(f"{file}: tensor {n!r} appears in more than one shard")
                self._where[n] = (holder, file)

    def names(self) -> list[str]:
        return list(self._where)

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        holder, file = self._where[name]
        if isinstance(holder, _ck._SafetensorsFile):
            tag, shape = holder.dtype_shape(name)
            dt = _ck._ST_NUMPY[tag]()
            return shape, dt if dt is not None else np.dtype(np.float32)
        t = holder[name]
        if not hasattr(t, "shape") or not hasattr(t, "dtype"):
            raise CheckpointError(f"{file}: entry {name!r} is a {type(t).__name__}, not a tensor")
        import torch

        if t.dtype == torch.bfloat16:
            dt = _ck._bfloat16()
        else:
            dt = torch.empty((), dtype=t.dtype).numpy().dtype
        return tuple(t.shape), dt

    def get(self, name: str) -> np.ndarray:
        holder, file = self._where[name]
        if isinstance(holder, _ck._SafetensorsFile):
            return holder.get(name)
        return _ck._tensor_to_numpy(holder[name], name, file)


class _TfH5Source(_Source):
    format = "tf-h5"

    def __init__(self, path: str, config: EsmConfig | None):
        from .common.tf_h5 import TFH5File

        self._f = TFH5File(path, config)
        self.path, self.config = self._f.path, self._f.config

    def names(self) -> list[str]:
        return self._f.keys()

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        return self._f.shape(name), self._f.dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._f.get(name)

    def close(self) -> None:
        self._f.close()


class _View(_Source):
    """Another source's tensors under other names (``mapping``: new name -> source name)."""

    def __init__(self, base: _Source, mapping: dict[str, str]):
        self.base, self.mapping = base, mapping
        self.format, self.path, self.config = base.format, base.path, base.config
        self.renamed = base.renamed

    def names(self) -> list[str]:
        return list(self.mapping)

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        return self.base.spec(self.mapping[name])

    def get(self, name: str) -> np.ndarray:
        return self.base.get(self.mapping[name])

    def close(self) -> None:
        self.base.close()


_MODEL_LEVEL_ROTARY = re.compile(r"^(esm\.)?(rotary_embeddings\.inv_freq|encoder\.layer\.\*\.attention\.self\."
                                 r"rotary_embeddings\.inv_freq)$")


def _per_layer_rotary(s: _Source) -> _Source:
    """transformers 5 saves one model-level rotary table (literally ``esm.encoder.layer.*.attention.self.
    rotary_embeddings.inv_freq``); layouts with per-layer tables (tf_model.h5, fair-esm) get it per layer."""
    names = s.names()
    model_level = [n for n in names if _MODEL_LEVEL_ROTARY.match(n)]
    if not model_level:
        return s
    prefix = "esm." if any(n.startswith("esm.") for n in names) else ""
    mapping = {n: n for n in names if n not in model_level}
    for i in range(s.config.num_hidden_layers):
        mapping.setdefault(f"{prefix}encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq", model_level[0])
    return _View(s, mapping)


def _load_config_file(path: str | os.PathLike | EsmConfig | None) -> EsmConfig | None:
    if path is None or isinstance(path, EsmConfig):
        return path
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, CONFIG_NAME)
    try:
        return EsmConfig.from_json_file(p)
    except (ConfigError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{p}: {e}") from None


def _tf_model_class(config: EsmConfig):
    import esm_dual.tf as etf

    arch = _architecture(config, None)
    return getattr(etf, "TF" + arch)


def _tf_model_tensors(model: Any) -> dict[str, np.ndarray]:
    import keras

    out = {}
    for name, (var, transposed) in model._hub_state().items():
        arr = keras.ops.convert_to_numpy(var)
        out[name] = np.ascontiguousarray(arr.T) if transposed else arr
    return out


def _read_keras(path: str) -> _MemorySource:
    model = _load_keras_model(path)
    arch = type(model).__name__[2:]
    d = model.config.to_dict()
    stored = d.pop(STORED_DTYPES_KEY, None) or {}
    config = EsmConfig.from_dict({**d, "architectures": [arch]})
    tensors = _tf_model_tensors(model)
    for name, dt in stored.items():
        if name in tensors:
            back = tensors[name].astype(_ck._resolve_dtype(dt) if dt == "bfloat16" else np.dtype(dt))
            if not np.array_equal(back.astype(np.float64), tensors[name].astype(np.float64)):
                raise CheckpointError(f"{path}: tensor {name!r} no longer fits its recorded dtype {dt}")
            tensors[name] = back
    return _MemorySource("keras", path, config, tensors)


def _load_keras_model(path: str) -> Any:
    import zipfile

    if not zipfile.is_zipfile(path):
        size = os.path.getsize(path)
        raise CheckpointError(f"{path}: not a .keras archive (not a zip file; {size} bytes; truncated or corrupt?)")
    import keras

    import esm_dual.tf as etf  # registers the esm_dual classes with Keras

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = keras.saving.load_model(path, compile=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the .keras file ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(model, etf.TFEsmPreTrainedModel):
        raise CheckpointError(
            f"{path}: holds a {type(model).__name__}, not an esm_dual TFEsm* model (unknown architecture)")
    return model


def _read_keras_weights(path: str, config: EsmConfig | None) -> _MemorySource:
    if config is None:
        raise CheckpointError(
            f"{path}: a .weights.h5 file holds no configuration; pass the model's config.json (--config)")
    model = _build_keras_weights_model(path, config)
    return _MemorySource("keras-weights", path, config.copy(architectures=[type(model).__name__[2:]]),
                         _tf_model_tensors(model))


def _build_keras_weights_model(path: str, config: EsmConfig) -> Any:
    cls = _tf_model_class(config)
    kwargs = {}
    if cls.__name__ == "TFEsmModel":
        kwargs["add_pooling_layer"] = bool((config.to_dict().get("esm_dual") or {}).get("add_pooling_layer", False))
    model = cls(config, **kwargs)
    try:
        model.load_weights(path)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot load these weights into a {cls.__name__} built from the config "
            f"({type(e).__name__}: {_one_line(e)})") from None
    return model


# keras-hub ESMBackbone: (layer attribute path, variable) -> hub name (base model, no "esm." prefix)
def _keras_hub_config(path: str) -> tuple[EsmConfig, dict[str, Any]]:
    import json

    cfg_path = os.path.join(path, CONFIG_NAME)
    with open(cfg_path, encoding="utf-8") as f:
        d = json.load(f)
    name = str(d.get("registered_name") or d.get("class_name"))
    if "ESM" not in name.upper():
        raise CheckpointError(f"{cfg_path}: a keras-hub {name} preset, not an ESM backbone (unknown architecture)")
    c = d["config"]
    try:
        vocab = int(c["vocabulary_size"])
        config = EsmConfig(
            vocab_size=vocab,
            hidden_size=int(c["hidden_dim"]),
            num_hidden_layers=int(c["num_layers"]),
            num_attention_heads=int(c["num_heads"]),
            intermediate_size=int(c["intermediate_dim"]),
            hidden_dropout_prob=float(c.get("dropout", 0.0)),
            attention_probs_dropout_prob=float(c.get("dropout", 0.0)),
            layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
            emb_layer_norm_before=bool(c.get("use_pre_layer_norm", False)),
            position_embedding_type=str(c.get("position_embedding_type", "rotary")),
            pad_token_id=int(c.get("pad_token_id", 1)),
            mask_token_id=32 if vocab == 33 else None,
            max_position_embeddings=int(c.get("max_sequence_length") or 1026),
            rope_theta=float(c.get("max_wavelength", 10000)),
            # Every ESM-1b / ESM-2 model was trained with token dropout; keras-hub does not implement it.
            token_dropout=vocab == 33,
            architectures=["EsmModel"],
        )
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{cfg_path}: not a usable keras-hub ESM config ({type(e).__name__}: {e})") from None
    return config, d


def _load_keras_hub_backbone(path: str) -> Any:
    try:
        import keras_hub
    except ImportError:
        raise CheckpointError(f"{path}: reading a keras-hub preset needs keras-hub (pip install keras-hub)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return keras_hub.models.Backbone.from_preset(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the keras-hub preset ({type(e).__name__}: {_one_line(e)})") \
            from None


def keras_hub_tensors(backbone: Any) -> dict[str, np.ndarray]:
    """Hub names (``EsmModel`` layout) of a keras-hub ``ESMBackbone``'s variables."""
    import keras

    def np_(v: Any) -> np.ndarray:
        return keras.ops.convert_to_numpy(v)

    def dense(prefix: str, layer: Any) -> dict[str, np.ndarray]:
        k = np_(layer.kernel)
        k = k.reshape(k.shape[0], -1) if k.ndim == 3 else k.reshape(-1, k.shape[-1])
        out = {f"{prefix}.weight": np.ascontiguousarray(k.T)}
        if getattr(layer, "bias", None) is not None:
            out[f"{prefix}.bias"] = np_(layer.bias).reshape(-1)
        return out

    def norm(prefix: str, layer: Any) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": np_(layer.gamma), f"{prefix}.bias": np_(layer.beta)}

    t: dict[str, np.ndarray] = {"embeddings.word_embeddings.weight": np_(backbone.token_embedding.embeddings)}
    if backbone.position_embedding_type == "absolute":
        t["embeddings.position_embeddings.weight"] = np_(backbone.position_embedding.position_embeddings)
    if backbone.use_pre_layer_norm:
        t.update(norm("embeddings.layer_norm", backbone.emb_layer_norm))
    for i, block in enumerate(backbone.transformer_layers):
        p = f"encoder.layer.{i}"
        a = block.attention_layer
        t.update(dense(f"{p}.attention.self.query", a.q_dense))
        t.update(dense(f"{p}.attention.self.key", a.k_dense))
        t.update(dense(f"{p}.attention.self.value", a.v_dense))
        t.update(dense(f"{p}.attention.output.dense", a.o_dense))
        t.update(norm(f"{p}.attention.LayerNorm", block.attention_norm))
        t.update(dense(f"{p}.intermediate.dense", block.feedforward_intermediate_dense))
        t.update(dense(f"{p}.output.dense", block.feedforward_output_dense))
        t.update(norm(f"{p}.LayerNorm", block.feedforward_norm))
    t.update(norm("encoder.emb_layer_norm_after", backbone.output_layer_norm))
    return t


def _read_keras_hub(path: str) -> _MemorySource:
    config, _ = _keras_hub_config(path)
    backbone = _load_keras_hub_backbone(path)
    return _MemorySource("keras-hub", path, config, keras_hub_tensors(backbone))


def open_source(src: str | os.PathLike, *, config: str | os.PathLike | EsmConfig | None = None) -> _Source:
    """Open a checkpoint for conversion: config + tensors (hub names, PyTorch orientation) on demand.
    ``src`` may also be a preset name or a hub id (fetched into the HF cache when the network allows)."""
    p = os.fspath(src)
    if not os.path.exists(p):
        p = _ck.resolve_checkpoint(p)
    fmt = detect_format(p)
    cfg = _load_config_file(config)
    if fmt == "hf":
        s: _Source = _HubSource(p)
    elif fmt == "fair-esm":
        ck = _ck.read_fair_esm(p)
        s = _MemorySource("fair-esm", p, ck.config, ck.tensors)
    elif fmt == "tf-h5":
        s = _TfH5Source(p, cfg)
    elif fmt == "keras":
        s = _read_keras(p)
    elif fmt == "keras-weights":
        s = _read_keras_weights(p, cfg)
    else:
        s = _read_keras_hub(p)
    legacy = {n for n in s.names() if n.endswith(("LayerNorm.gamma", "LayerNorm.beta"))}
    if legacy:
        # transformers 5 saves modules named "LayerNorm" with the legacy gamma/beta leaf names.
        s = _View(s, {canonical_tensor_name(n): n for n in s.names()})
        s.renamed = len(legacy)
    if cfg is not None and fmt in ("hf", "fair-esm", "keras"):
        warnings.warn(f"{p}: the checkpoint carries its own config; the given config is not used", stacklevel=2)
    try:
        _check_source(s)
    except Exception:
        s.close()
        raise
    return s


# ================================================================================================
# Checks
# ================================================================================================

_BENIGN_EXTRA = re.compile(r"(^|.*\.)(position_ids|rotary_embeddings\.inv_freq)$|^lm_head\.decoder\.weight$")


def _architecture(config: EsmConfig, names: list[str] | None) -> str:
    archs = config.architectures or []
    if archs:
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise CheckpointError(
                f"unknown architecture {arch!r}: convert handles {', '.join(ARCHITECTURES)}"
                + (" (ESMFold checkpoints are not converted)" if "Folding" in arch else "")
            )
        return arch
    from .common.loading import task_head_kind

    kind = task_head_kind(dict.fromkeys(names or [])) if names is not None else None
    return {"mlm": "EsmForMaskedLM", "seq": "EsmForSequenceClassification", "tok": "EsmForTokenClassification",
            None: "EsmModel" if names and not any(n.startswith("esm.") for n in names) else "EsmForMaskedLM"}[kind]


def _check_source(s: _Source) -> None:
    """Architecture known, every tensor named and shaped as the config says, no encoder tensor missing."""
    names = s.names()
    arch = _architecture(s.config, names)
    if not s.config.architectures:
        s.config = s.config.copy(architectures=[arch])
    specs = {n: np.broadcast_to(np.empty((), s.spec(n)[1]), s.spec(n)[0]) for n in names}
    _ck.validate_shapes(s.config, specs, s.path)
    unknown = [n for n in names if _ck.expected_shape(s.config, n) is None and not _BENIGN_EXTRA.match(n)]
    if unknown:
        raise CheckpointError(f"{s.path}: tensor(s) that are not part of an ESM {arch}: {_ck._fmt_names(unknown)}")
    base = arch == "EsmModel" and not any(n.startswith("esm.") for n in names)
    prefix = "" if base else "esm."
    c = s.config
    required = [f"{prefix}embeddings.word_embeddings.weight", f"{prefix}encoder.emb_layer_norm_after.weight",
                f"{prefix}encoder.emb_layer_norm_after.bias"]
    if c.position_embedding_type == "absolute":
        required.append(f"{prefix}embeddings.position_embeddings.weight")
    if c.emb_layer_norm_before:
        required += [f"{prefix}embeddings.layer_norm.weight", f"{prefix}embeddings.layer_norm.bias"]
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "attention.LayerNorm", "intermediate.dense", "output.dense", "LayerNorm"]
    for i in range(c.num_hidden_layers):
        for m in per_layer:
            required += [f"{prefix}encoder.layer.{i}.{m}.weight", f"{prefix}encoder.layer.{i}.{m}.bias"]
    heads = {"EsmForMaskedLM": ["lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight",
                                "lm_head.layer_norm.bias", "lm_head.bias"],
             "EsmForSequenceClassification": ["classifier.dense.weight", "classifier.dense.bias",
                                              "classifier.out_proj.weight", "classifier.out_proj.bias"],
             "EsmForTokenClassification": ["classifier.weight", "classifier.bias"]}
    untied = arch == "EsmForMaskedLM" and not c.tie_word_embeddings
    required += heads.get(arch, []) + (["lm_head.decoder.weight"] if untied else [])
    have = set(names)
    missing = [n for n in required if n not in have]
    if missing:
        raise CheckpointError(f"{s.path}: missing tensor(s) of an ESM {arch}: {_ck._fmt_names(missing)}")
    # Head tensors the architecture does not have (an MLM file carrying classifier.* tensors, a sequence
    # classifier's tensors in a token-classification file, a pooler in a task model's file ...).
    own_heads = set(heads.get(arch, [])) | {"lm_head.decoder.weight"}
    if arch == "EsmModel":
        own_heads |= {f"{prefix}pooler.dense.weight", f"{prefix}pooler.dense.bias"}
    foreign = [n for n in names if n.startswith(("lm_head.", "classifier.", "pooler.", "esm.pooler."))
               and n not in own_heads]
    if foreign:
        raise CheckpointError(f"{s.path}: head tensor(s) that an ESM {arch} does not have (the config's "
                              f"architectures says {arch}): {_ck._fmt_names(foreign)}")
    # Optional heads (contact regression, pooler) are all there or not at all.
    optional = {"contact_head": [f"{prefix}contact_head.regression.weight", f"{prefix}contact_head.regression.bias"],
                "pooler": [f"{prefix}pooler.dense.weight", f"{prefix}pooler.dense.bias"]}
    for head, tensors in optional.items():
        absent = [n for n in tensors if n not in have]
        if absent and len(absent) < len(tensors):
            raise CheckpointError(f"{s.path}: the {head} is incomplete: missing tensor(s) {', '.join(absent)}")
    if arch == "EsmForMaskedLM" and c.tie_word_embeddings and "lm_head.decoder.weight" in have:
        emb = f"{prefix}embeddings.word_embeddings.weight"
        if not np.array_equal(s.get("lm_head.decoder.weight"), s.get(emb)):
            raise CheckpointError(f"{s.path}: tensor 'lm_head.decoder.weight' differs from {emb!r}, but the config "
                                  "ties them (tie_word_embeddings=True)")


# ================================================================================================
# Writers (each writes into a staging path)
# ================================================================================================


def _cast(name: str, arr: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None or not is_floating(arr.dtype) or arr.dtype == dtype or name.endswith("inv_freq"):
        return arr
    return arr.astype(dtype)


def _out_dtype(name: str, dtype: np.dtype, target: np.dtype | None) -> np.dtype:
    if target is None or not is_floating(dtype) or name.endswith("inv_freq"):
        return np.dtype(dtype)
    return target


def _write_hf(out_dir: str, s: _Source, names: list[str], get: Callable[[str], np.ndarray],
              dtype: np.dtype | None, max_shard_size: int | str | None) -> None:
    """config.json + safetensors. Shards and headers are planned from the tensor specs first; then each
    tensor is read, cast and written straight to its place, so at most one tensor is in memory."""
    import json

    os.makedirs(out_dir)
    specs = []
    for n in names:
        shape, dt = s.spec(n)
        odt = _out_dtype(n, dt, dtype)
        specs.append((n, tuple(int(x) for x in shape), odt, int(np.prod(shape, dtype=np.int64)) * odt.itemsize))
    limit = _ck.parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[list[tuple[str, tuple[int, ...], np.dtype, int]]] = [[]]
    size = 0
    for spec in specs:
        if limit is not None and shards[-1] and size + spec[3] > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec[3]
    n_shards = len(shards)
    files = [_ck.SAFE_WEIGHTS_NAME] if n_shards == 1 else \
        [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    weight_map = {}
    for fname, shard in zip(files, shards):
        shard = sorted(shard, key=lambda t: (-t[2].itemsize, t[0]))  # the reference writer's data order
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for n, shape, odt, nb in shard:
            header[n] = {"dtype": _ck._st_tag(odt), "shape": list(shape), "data_offsets": [offset, offset + nb]}
            offset += nb
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for n, shape, odt, nb in shard:
                arr = np.ascontiguousarray(_cast(n, get(n), dtype))
                if arr.dtype != odt or tuple(arr.shape) != shape or arr.nbytes != nb:
                    raise CheckpointError(
                        f"{s.path}: tensor {n!r} changed while reading ({arr.dtype}{list(arr.shape)})")
                if arr.dtype.byteorder == ">":  # pragma: no cover
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
                del arr
        weight_map.update({n: fname for n, *_ in shard})
    if n_shards > 1:
        index = {"metadata": {"total_size": int(sum(t[3] for t in specs))},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, _ck.SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(s.config.to_json_string())


def _check_fair_esm_target(path: str, config: EsmConfig) -> None:
    """The checks of ``checkpoint.save_fair_esm``, made before anything is read."""
    _ck.check_fair_esm_config(path, config)
    arch = _architecture(config, None)
    if arch != "EsmForMaskedLM":
        raise CheckpointError(f"{path}: fair-esm holds masked-LM models only; this checkpoint is an {arch}")


def _write_fair_esm(path: str, s: _Source, names: list[str], get: Callable[[str], np.ndarray],
                    dtype: np.dtype | None, report: ConversionReport) -> None:
    """The file ``checkpoint.save_fair_esm`` writes, built tensor by tensor (one copy of the weights in memory:
    each array becomes a torch tensor without a copy)."""
    import argparse
    from collections import OrderedDict

    import torch

    config = s.config
    rotary = config.position_embedding_type == "rotary"
    prefix = "encoder.sentence_encoder."
    model: OrderedDict[str, Any] = OrderedDict()
    regression: OrderedDict[str, Any] = OrderedDict()
    emb = None
    decoder_name = None
    for name in names:
        key = name if name.startswith(("esm.", "lm_head.")) else "esm." + name
        if key == "lm_head.decoder.weight":
            decoder_name = name
            continue
        if key == "esm.embeddings.position_embeddings.weight" and rotary:
            report.dropped.append(name)  # ESM-2 has no learned positions; hub files carry an unused table
            continue
        if key.endswith("position_ids"):
            report.dropped.append(name)
            continue
        fair = _ck._hf_name_to_fair(key)
        if fair is None:
            raise CheckpointError(f"{path}: tensor {name!r} has no fair-esm equivalent")
        t = _to_torch(_cast(name, get(name), dtype))
        if fair.startswith("contact_head."):
            regression[fair] = t
        elif fair.startswith("lm_head."):
            model["encoder." + fair] = t
        else:
            model[prefix + fair] = t
            if fair == "embed_tokens.weight":
                emb = t
                if not rotary and bool(t[_ck.ESM_MASK_IDX].any()):
                    raise CheckpointError(
                        f"{s.path}: the <mask> row (32) of the word embeddings is non-zero, but fair-esm zeroes it "
                        "when it loads an ESM-1b/1v file, so the converted model would compute different logits "
                        "(released ESM-1b/1v checkpoints have it zeroed)")
    if emb is None:
        raise CheckpointError(f"{s.path}: missing the word embeddings")
    if decoder_name is not None and not torch.equal(_to_torch(_cast(decoder_name, get(decoder_name), dtype)), emb):
        raise CheckpointError(f"{path}: fair-esm ties lm_head.weight to embed_tokens, but tensor "
                              "'lm_head.decoder.weight' differs from the word embeddings")
    model["encoder.lm_head.weight"] = emb  # tied: the same tensor, as in released files
    if rotary:
        k = config.head_dim
        inv = torch.from_numpy((1.0 / (10000.0 ** (np.arange(0, k, 2, dtype=np.float32) / k))).astype(np.float32))
        for i in range(config.num_hidden_layers):
            model.setdefault(f"{prefix}layers.{i}.self_attn.rot_emb.inv_freq", inv.clone())
    common = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, token_dropout=bool(config.token_dropout))
    fields = dict(encoder_layers=config.num_hidden_layers, encoder_embed_dim=config.hidden_size,
                  encoder_ffn_embed_dim=config.intermediate_size,
                  encoder_attention_heads=config.num_attention_heads,
                  max_positions=config.max_position_embeddings - _ck.ESM_PAD_IDX - 1, **common)
    if rotary:
        data: dict[str, Any] = {"cfg": {"model": argparse.Namespace(_name="esm2", arch="esm2", **fields)},
                                "model": model}
    else:
        data = {"args": argparse.Namespace(arch="roberta_large", **fields), "model": model}
    torch.save(data, path)
    if regression:
        torch.save({"model": regression}, _ck._regression_path(path))
    elif "esm1v" not in os.path.basename(path):
        report.notes.append(f"no contact-regression tensors: fair-esm's load_model_and_alphabet_local expects "
                            f"{os.path.basename(_ck._regression_path(path))} beside the file")


def _to_torch(arr: np.ndarray) -> Any:
    import torch

    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _write_tf_h5(out_dir: str, s: _Source, names: list[str], get: Callable[[str], np.ndarray],
                 dtype: np.dtype | None) -> None:
    from .common.tf_h5 import TF_WEIGHTS_NAME, write_tf_h5

    os.makedirs(out_dir)
    write_tf_h5(os.path.join(out_dir, TF_WEIGHTS_NAME), s.config,
                ((n, _cast(n, get(n), dtype)) for n in names))
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(s.config.to_json_string())


def _keras_policy(tensors: dict[str, np.ndarray]) -> str:
    floats = {a.dtype.name for n, a in tensors.items() if is_floating(a.dtype) and not n.endswith("inv_freq")}
    if len(floats) > 1:
        raise CheckpointError(f"a .keras model holds one float dtype; the checkpoint mixes {sorted(floats)} "
                              "(convert with a dtype)")
    return floats.pop() if floats else "float32"


def _write_keras(path: str, s: _Source, names: list[str], get: Callable[[str], np.ndarray],
                 dtype: np.dtype | None, report: ConversionReport) -> None:
    tensors = {n: _cast(n, get(n), dtype) for n in names}
    policy = _keras_policy(tensors)
    model = _keras_model_from_tensors(s.config, tensors, policy, s.path)
    held = _tf_model_tensors(model)
    lost = [n for n, a in held.items() if n in tensors and not _bit_equal(a, tensors[n])]
    if lost:
        raise CheckpointError(f"{path}: tensors not exactly representable in the Keras model: {_ck._fmt_names(lost)}")
    dropped = [n for n in tensors if n not in held]
    benign = re.compile(_ck.BENIGN_UNUSED_POSITION_TABLE if s.config.position_embedding_type == "rotary" else "^$")
    bad = [n for n in dropped if not (benign.match(n) or _BENIGN_EXTRA.match(n))]
    if bad:
        raise CheckpointError(f"{path}: the Keras model has no place for tensor(s) {_ck._fmt_names(bad)}")
    report.dropped.extend(dropped)
    # Layers our TF models keep in float32 under a low-precision policy (LayerNorms, contact head) hold
    # upcast values; the stored dtypes are recorded in the config so that reading the file gives them back.
    changed = {n: tensors[n].dtype.name for n, a in held.items() if n in tensors and a.dtype != tensors[n].dtype}
    if changed:
        model.config = EsmConfig.from_dict({**model.config.to_dict(), STORED_DTYPES_KEY: changed})
    model.save(path)


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and (a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
                                   or a.dtype != b.dtype and np.array_equal(a.astype(np.float64), b.astype(np.float64)))


def _keras_model_from_tensors(config: EsmConfig, tensors: dict[str, np.ndarray], policy: str, source: str) -> Any:
    from .common.loading import checkpoint_has_pooler

    cls = _tf_model_class(config)
    kwargs: dict[str, Any] = {"dtype": policy}
    if cls.__name__ == "TFEsmModel":
        kwargs["add_pooling_layer"] = checkpoint_has_pooler(tensors)
    model = cls(config, **kwargs)
    import logging

    logger = logging.getLogger("esm_dual")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model.load_hub_tensors(tensors, source=source)
    finally:
        logger.setLevel(level)
    return model


# ================================================================================================
# Staging: write beside dst, move into place at the end
# ================================================================================================


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


class _Staging:
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


# ================================================================================================
# convert
# ================================================================================================


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500]


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str | None = None,
    dtype: Any = None,
    verify: bool = False,
    overwrite: bool = False,
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
    ``tolerance``, default 1e-5 within a framework and 1e-4 across); ``overwrite`` replaces an existing
    ``dst``; ``config`` is the configuration a ``.weights.h5`` source needs; ``max_shard_size`` shards hub
    output above that size (``None``: one file). Returns a :class:`ConversionReport`.
    """
    src_s, dst_s = os.fspath(src), os.fspath(dst)
    to = to or _target_from_path(dst_s)
    if to is None:
        raise CheckpointError(f"{dst_s}: say which layout to write (to= one of {', '.join(TARGETS)})")
    if to not in TARGETS:
        raise CheckpointError(f"unknown target layout {to!r}; choose one of {', '.join(TARGETS)}")
    target_dtype = _ck._resolve_dtype(dtype) if dtype is not None else None
    if to == "hf" and max_shard_size is not None:
        _ck.parse_size(max_shard_size)
    if os.path.lexists(dst_s) and not overwrite:
        raise CheckpointError(f"{dst_s}: already exists; pass overwrite=True (--overwrite) to replace it")
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
            source = _per_layer_rotary(source)
        if to == "fair-esm":
            _check_fair_esm_target(dst_s, source.config)
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
        extra = [_ck._regression_path(os.path.abspath(dst_s))] if to == "fair-esm" else []
        for e in extra:
            if os.path.lexists(e) and not overwrite:
                raise CheckpointError(f"{e}: already exists; pass overwrite=True (--overwrite) to replace it")
        if target_dtype is not None:
            # The config written records the weights' new dtype, as transformers 5 records it ("dtype").
            source.config = with_recorded_dtype(source.config, target_dtype.name)
        staging = _Staging(dst_s, overwrite, extra)
        try:
            get = _get_hook(source)
            say(f"converting {src_s} ({source.format}, {len(names)} tensors, {source.nbytes() / 1e6:.1f} MB) -> "
                f"{dst_s} ({to})")
            if to == "hf":
                _write_hf(staging.path, source, names, get, target_dtype, max_shard_size)
            elif to == "tf-h5":
                _write_tf_h5(staging.path, source, names, get, target_dtype)
                # tf_model.h5 has no place for position_ids buffers (recomputed by every framework)
                report.dropped.extend(n for n in names if n.endswith("position_ids"))
            elif to == "fair-esm":
                _write_fair_esm(staging.path, source, names, get, target_dtype, report)
            else:
                _write_keras(staging.path, source, names, get, target_dtype, report)
            kept = [n for n in names if n not in report.dropped]
            report.num_tensors = len(kept)
            report.num_bytes = int(sum(np.prod(source.spec(n)[0], dtype=np.int64) *
                                       _out_dtype(n, source.spec(n)[1], target_dtype).itemsize for n in kept))
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


def _get_hook(source: _Source) -> Callable[[str], np.ndarray]:
    """How writers read a tensor (a seam for tests)."""
    return source.get


# ================================================================================================
# Verification
# ================================================================================================


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
        a = _cast(n, a, dtype)
        out[n] = a.astype(np.float32) if is_floating(a.dtype) else a
    return out


def _run_pt(config: EsmConfig, tensors: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray,
            contacts: bool, source: str = "source") -> dict[str, np.ndarray]:
    import torch

    import esm_dual.pt as ept
    from esm_dual.common.loading import checkpoint_has_pooler

    cls = getattr(ept, _architecture(config, list(tensors)))
    kwargs = {"add_pooling_layer": checkpoint_has_pooler(tensors)} if cls is ept.EsmModel else {}
    model = cls(config, **kwargs).eval()
    _quiet(model.load_hub_tensors, tensors, source)
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


def _run_tf(model: Any, ids: np.ndarray, mask: np.ndarray, contacts: bool) -> dict[str, np.ndarray]:
    import tensorflow as tf

    t_ids, t_mask = tf.constant(ids.astype(np.int32)), tf.constant(mask.astype(np.int32))
    o = model(t_ids, attention_mask=t_mask, output_hidden_states=True)
    out: dict[str, np.ndarray] = {}
    if getattr(o, "logits", None) is not None:
        out["logits"] = np.asarray(o.logits, np.float32)
    out["last_hidden_state"] = np.asarray(o.hidden_states[-1], np.float32)
    if contacts:
        out["contacts"] = np.asarray(model.predict_contacts(t_ids, t_mask), np.float32)
    return out


def _quiet(fn: Callable, *args: Any) -> Any:
    import logging

    logger = logging.getLogger("esm_dual")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return fn(*args)
    finally:
        logger.setLevel(level)


def _has_contacts(names: list[str]) -> bool:
    return any(n.endswith("contact_head.regression.weight") for n in names)


def _outputs(fmt: str, path: str, config: EsmConfig, tensors: dict[str, np.ndarray] | None, ids: np.ndarray,
             mask: np.ndarray, contacts: bool, dtype: np.dtype | None) -> dict[str, np.ndarray]:
    """Run a checkpoint in its own framework (float32)."""
    if fmt in ("hf", "fair-esm"):
        assert tensors is not None
        return _run_pt(config, _floats32(tensors, dtype), ids, mask, contacts, path)
    if fmt == "keras-hub":
        backbone = _load_keras_hub_backbone(path)
        import keras

        x = backbone({"token_ids": keras.ops.convert_to_tensor(ids.astype(np.int32))})
        return {"last_hidden_state": np.asarray(keras.ops.convert_to_numpy(x), np.float32)}
    if fmt == "keras":
        model = _load_keras_model(path)
    elif fmt == "keras-weights":
        model = _build_keras_weights_model(path, config)
    else:
        assert tensors is not None
        model = None
    if model is not None:
        if dtype is not None or any(v.dtype != "float32" for v in model.weights):
            tensors = _tf_model_tensors(model)
            model = None
    if model is None:
        model = _keras_model_from_tensors(config, _floats32(tensors, dtype), "float32", path)
    return _run_tf(model, ids, mask, contacts)


def _read_all(s: _Source) -> dict[str, np.ndarray]:
    return {n: s.get(n) for n in s.names()}


def verify_conversion(
    src: str | os.PathLike | _Source,
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
    source = src if isinstance(src, _Source) else open_source(src, config=config)
    dst_s = os.fspath(dst)
    fmt_dst = {"hf": "hf", "fair-esm": "fair-esm", "tf-h5": "tf-h5", "keras": "keras"}.get(to or "", None) \
        or detect_format(dst_s)
    target = _ck._resolve_dtype(dtype) if dtype is not None else None
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
    frameworks = f"{source.framework} -> {FRAMEWORK[dst_source.format]}"
    for key, d in diffs.items():
        say(f"verify {key}: max |diff| = {d:.3g} ({frameworks}, tolerance {tol:g}) "
            f"{'ok' if d <= tol else 'FAILED'}")
    bad = {k: d for k, d in diffs.items() if not d <= tol}
    if bad:
        raise VerificationError(
            "verification failed: " + ", ".join(f"{k} max |diff| {d:.3g}" for k, d in bad.items())
            + f" > tolerance {tol:g} ({frameworks}); nothing was written")
    return diffs, tol


# ``esm_dual.convert`` (this module, via the package's lazy table) is callable: esm_dual.convert(src, dst, ...).
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> ConversionReport:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "ConversionReport",
    "SOURCES",
    "TARGETS",
    "VerificationError",
    "convert",
    "detect_format",
    "keras_hub_tensors",
    "open_source",
    "verification_batch",
    "verify_conversion",
]
