"""Conversion sources: a checkpoint of any layout opened as config + tensors (hub names, PyTorch orientation),
read one tensor at a time where the format allows, and checked before anything is written.

Formats (detected from the path): ``hf`` (the hub layout, or a file inside it), ``fair-esm`` (``.pt``),
``tf-h5`` (transformers 4.x's ``tf_model.h5``), ``keras`` (a ``.keras`` file of an ``esm_dual.tf`` model),
``keras-weights`` (its ``.weights.h5``; needs a config), ``keras-hub`` (a keras-hub ESM preset directory).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import numpy as np

from ..common.config import CONFIG_NAME, ConfigError, EsmConfig
from ..io.base import (
    PT_WEIGHTS_INDEX_NAME,
    PT_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    CheckpointError,
    format_names,
    one_line,
)
from ..io.dtypes import numpy_dtype_of, resolve_dtype
from ..io.fair_esm import read_fair_esm
from ..io.hub import LAYOUT_SAFETENSORS, LAYOUT_SAFETENSORS_SHARDED, classify_path, hub_weights, read_hub_config
from ..io.keras_hub import is_keras_hub_config, read_keras_hub
from ..io.resolve import resolve_checkpoint
from ..io.safetensors import SafetensorsFile, numpy_dtype
from ..io.schema import canonical_tensor_name, expected_shape, task_head_kind, validate_shapes
from ..io.tf_h5 import TFH5File
from ..io.torch_pickle import tensor_to_numpy, torch_load

SOURCES = ("hf", "fair-esm", "tf-h5", "keras", "keras-weights", "keras-hub")
FRAMEWORK = {"hf": "pt", "fair-esm": "pt", "tf-h5": "tf", "keras": "tf", "keras-weights": "tf", "keras-hub": "tf"}
ARCHITECTURES = ("EsmModel", "EsmForMaskedLM", "EsmForSequenceClassification", "EsmForTokenClassification")
STORED_DTYPES_KEY = "esm_dual_stored_dtypes"  # in a .keras model's config: tensors kept in a wider dtype


# ================================================================================================
# Format detection
# ================================================================================================


def detect_format(path: str | os.PathLike) -> str:
    """The source format of ``path`` (one of :data:`SOURCES`)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"{p}: no such file or directory")
    if os.path.isdir(p):
        cfg = os.path.join(p, CONFIG_NAME)
        if os.path.isfile(cfg) and is_keras_hub_config(cfg):
            return "keras-hub"
        names = set(os.listdir(p))
        if names & {SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, PT_WEIGHTS_NAME, PT_WEIGHTS_INDEX_NAME}:
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


# ================================================================================================
# Sources: config + tensors by name, read one at a time
# ================================================================================================


class Source:
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


class MemorySource(Source):
    def __init__(self, fmt: str, path: str, config: EsmConfig, tensors: dict[str, np.ndarray]):
        self.format, self.path, self.config, self.tensors = fmt, path, config, tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        a = self.tensors[name]
        return tuple(a.shape), a.dtype

    def get(self, name: str) -> np.ndarray:
        return self.tensors[name]


class HubSource(Source):
    """Hub layout; safetensors tensors are read from disk on demand, .bin files are memory-mapped."""

    format = "hf"

    def __init__(self, path: str):
        kind, directory, weights = classify_path(path)
        self.path = directory
        self.config = read_hub_config(directory)
        layout, files, weight_map = hub_weights(directory, weights)
        self.layout = layout
        self._where: dict[str, tuple[Any, str]] = {}
        for file in files:
            if layout in (LAYOUT_SAFETENSORS, LAYOUT_SAFETENSORS_SHARDED):
                st = SafetensorsFile(file)
                names = st.keys()
                holder: Any = st
            else:
                holder = torch_load(file)
                if not isinstance(holder, dict):
                    raise CheckpointError(f"{file}: expected a state dict, got {type(holder).__name__}")
                names = list(holder)
            if weight_map is not None:
                expected = {k for k, v in weight_map.items() if v == os.path.basename(file)}
                missing = expected - set(names)
                if missing:
                    raise CheckpointError(
                        f"{file}: tensor(s) {format_names(missing)} listed in the index are not in the shard")
            for n in names:
                if n in self._where:
                    raise CheckpointError(f"{file}: tensor {n!r} appears in more than one shard")
                self._where[n] = (holder, file)

    def names(self) -> list[str]:
        return list(self._where)

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        holder, file = self._where[name]
        if isinstance(holder, SafetensorsFile):
            tag, shape = holder.dtype_shape(name)
            return shape, numpy_dtype(tag)
        t = holder[name]
        if not hasattr(t, "shape") or not hasattr(t, "dtype"):
            raise CheckpointError(f"{file}: entry {name!r} is a {type(t).__name__}, not a tensor")
        return tuple(t.shape), numpy_dtype_of(t.dtype)

    def get(self, name: str) -> np.ndarray:
        holder, file = self._where[name]
        if isinstance(holder, SafetensorsFile):
            return holder.get(name)
        return tensor_to_numpy(holder[name], name, file)


class TfH5Source(Source):
    format = "tf-h5"

    def __init__(self, path: str, config: EsmConfig | None):
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


class View(Source):
    """Another source's tensors under other names (``mapping``: new name -> source name)."""

    def __init__(self, base: Source, mapping: dict[str, str]):
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


def per_layer_rotary(s: Source) -> Source:
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
    return View(s, mapping)


def load_config_file(path: str | os.PathLike | EsmConfig | None) -> EsmConfig | None:
    if path is None or isinstance(path, EsmConfig):
        return path
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, CONFIG_NAME)
    try:
        return EsmConfig.from_json_file(p)
    except (ConfigError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{p}: {e}") from None


def tf_model_class(config: EsmConfig):
    import esm_dual.tf as etf

    arch = architecture(config, None)
    return getattr(etf, "TF" + arch)


def tf_model_tensors(model: Any) -> dict[str, np.ndarray]:
    """Hub-named arrays (PyTorch orientation) of an ``esm_dual.tf`` model's variables."""
    import keras

    from esm_dual.tf import hub_variable_map

    out = {}
    for name, (var, transposed) in hub_variable_map(model).items():
        arr = keras.ops.convert_to_numpy(var)
        out[name] = np.ascontiguousarray(arr.T) if transposed else arr
    return out


def _read_keras(path: str) -> MemorySource:
    model = load_keras_model(path)
    arch = type(model).__name__[2:]
    d = model.config.to_dict()
    stored = d.pop(STORED_DTYPES_KEY, None) or {}
    config = EsmConfig.from_dict({**d, "architectures": [arch]})
    tensors = tf_model_tensors(model)
    for name, dt in stored.items():
        if name in tensors:
            back = tensors[name].astype(resolve_dtype(dt) if dt == "bfloat16" else np.dtype(dt))
            if not np.array_equal(back.astype(np.float64), tensors[name].astype(np.float64)):
                raise CheckpointError(f"{path}: tensor {name!r} no longer fits its recorded dtype {dt}")
            tensors[name] = back
    return MemorySource("keras", path, config, tensors)


def load_keras_model(path: str) -> Any:
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
        raise CheckpointError(f"{path}: cannot load the .keras file ({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(model, etf.TFEsmPreTrainedModel):
        raise CheckpointError(
            f"{path}: holds a {type(model).__name__}, not an esm_dual TFEsm* model (unknown architecture)")
    return model


def _read_keras_weights(path: str, config: EsmConfig | None) -> MemorySource:
    if config is None:
        raise CheckpointError(
            f"{path}: a .weights.h5 file holds no configuration; pass the model's config.json (--config)")
    model = build_keras_weights_model(path, config)
    return MemorySource("keras-weights", path, config.copy(architectures=[type(model).__name__[2:]]),
                         tf_model_tensors(model))


def build_keras_weights_model(path: str, config: EsmConfig) -> Any:
    cls = tf_model_class(config)
    kwargs = {}
    if cls.__name__ == "TFEsmModel":
        kwargs["add_pooling_layer"] = bool((config.to_dict().get("esm_dual") or {}).get("add_pooling_layer", False))
    model = cls(config, **kwargs)
    try:
        model.load_weights(path)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot load these weights into a {cls.__name__} built from the config "
            f"({type(e).__name__}: {one_line(e)})") from None
    return model


def _read_keras_hub(path: str) -> MemorySource:
    ck = read_keras_hub(path)
    return MemorySource("keras-hub", path, ck.config, ck.tensors)


def open_source(src: str | os.PathLike, *, config: str | os.PathLike | EsmConfig | None = None) -> Source:
    """Open a checkpoint for conversion: config + tensors (hub names, PyTorch orientation) on demand.
    ``src`` may also be a preset name or a hub id (fetched into the HF cache when the network allows)."""
    p = os.fspath(src)
    if not os.path.exists(p):
        p = resolve_checkpoint(p)
    fmt = detect_format(p)
    cfg = load_config_file(config)
    if fmt == "hf":
        s: Source = HubSource(p)
    elif fmt == "fair-esm":
        ck = read_fair_esm(p)
        s = MemorySource("fair-esm", p, ck.config, ck.tensors)
    elif fmt == "tf-h5":
        s = TfH5Source(p, cfg)
    elif fmt == "keras":
        s = _read_keras(p)
    elif fmt == "keras-weights":
        s = _read_keras_weights(p, cfg)
    else:
        s = _read_keras_hub(p)
    legacy = {n for n in s.names() if n.endswith(("LayerNorm.gamma", "LayerNorm.beta"))}
    if legacy:
        # transformers 5 saves modules named "LayerNorm" with the legacy gamma/beta leaf names.
        s = View(s, {canonical_tensor_name(n): n for n in s.names()})
        s.renamed = len(legacy)
    if cfg is not None and fmt in ("hf", "fair-esm", "keras"):
        warnings.warn(f"{p}: the checkpoint carries its own config; the given config is not used", stacklevel=2)
    try:
        check_source(s)
    except Exception:
        s.close()
        raise
    return s


# ================================================================================================
# Checks
# ================================================================================================

BENIGN_EXTRA = re.compile(r"(^|.*\.)(position_ids|rotary_embeddings\.inv_freq)$|^lm_head\.decoder\.weight$")


def architecture(config: EsmConfig, names: list[str] | None) -> str:
    archs = config.architectures or []
    if archs:
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise CheckpointError(
                f"unknown architecture {arch!r}: convert handles {', '.join(ARCHITECTURES)}"
                + (" (ESMFold checkpoints are not converted)" if "Folding" in arch else "")
            )
        return arch
    kind = task_head_kind(dict.fromkeys(names or [])) if names is not None else None
    return {"mlm": "EsmForMaskedLM", "seq": "EsmForSequenceClassification", "tok": "EsmForTokenClassification",
            None: "EsmModel" if names and not any(n.startswith("esm.") for n in names) else "EsmForMaskedLM"}[kind]


def check_source(s: Source) -> None:
    """Architecture known, every tensor named and shaped as the config says, no encoder tensor missing."""
    names = s.names()
    arch = architecture(s.config, names)
    if not s.config.architectures:
        s.config = s.config.copy(architectures=[arch])
    specs = {n: np.broadcast_to(np.empty((), s.spec(n)[1]), s.spec(n)[0]) for n in names}
    validate_shapes(s.config, specs, s.path)
    unknown = [n for n in names if expected_shape(s.config, n) is None and not BENIGN_EXTRA.match(n)]
    if unknown:
        raise CheckpointError(f"{s.path}: tensor(s) that are not part of an ESM {arch}: {format_names(unknown)}")
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
        raise CheckpointError(f"{s.path}: missing tensor(s) of an ESM {arch}: {format_names(missing)}")
    # Head tensors the architecture does not have (an MLM file carrying classifier.* tensors, a sequence
    # classifier's tensors in a token-classification file, a pooler in a task model's file ...).
    own_heads = set(heads.get(arch, [])) | {"lm_head.decoder.weight"}
    if arch == "EsmModel":
        own_heads |= {f"{prefix}pooler.dense.weight", f"{prefix}pooler.dense.bias"}
    foreign = [n for n in names if n.startswith(("lm_head.", "classifier.", "pooler.", "esm.pooler."))
               and n not in own_heads]
    if foreign:
        raise CheckpointError(f"{s.path}: head tensor(s) that an ESM {arch} does not have (the config's "
                              f"architectures says {arch}): {format_names(foreign)}")
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




__all__ = [
    "ARCHITECTURES",
    "BENIGN_EXTRA",
    "FRAMEWORK",
    "SOURCES",
    "STORED_DTYPES_KEY",
    "HubSource",
    "MemorySource",
    "Source",
    "TfH5Source",
    "View",
    "architecture",
    "build_keras_weights_model",
    "check_source",
    "detect_format",
    "load_config_file",
    "load_keras_model",
    "open_source",
    "per_layer_rotary",
    "tf_model_class",
    "tf_model_tensors",
]
