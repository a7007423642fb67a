"""HF transformers' legacy TensorFlow checkpoint ``tf_model.h5``: read and write it with h5py alone.

transformers 4.x saved its TF models (``TFEsmForMaskedLM.save_pretrained``) with Keras 2's HDF5 weight
format. Layout (what this module reads and writes)::

    /                                   attrs: layer_names = [b"esm", b"lm_head"], backend, keras_version
    /esm                                attrs: weight_names = [b"tf_esm_for_masked_lm/esm/embeddings/...:0", ...]
    /esm/tf_esm_for_masked_lm/esm/encoder/layer_._0/attention/self/query/kernel:0     dataset [in, out]
    /lm_head/tf_esm_for_masked_lm/esm/embeddings/word_embeddings/embeddings:0          the MLM decoder
    ...

One group per top-level Keras layer of the model (``esm`` and the head); inside it, one dataset per
variable at the variable's full name (model name first). Names map to the hub's PyTorch names by one
generic rule: drop the model name and ``:0``, ``layer_._3`` -> ``layer.3``, ``/`` -> ``.``, leaf ``kernel``
-> ``weight`` (transposed: Dense kernels are [in, out], ``Linear.weight`` [out, in]), ``gamma``/``beta``
-> ``weight``/``bias``, ``embeddings`` -> ``weight``. The one exception: the MLM head's decoder is stored
in the ``lm_head`` group under the word embeddings' name (transformers 4.x ties it by name); it maps to
``lm_head.decoder.weight`` and is dropped when equal to the embeddings, as hub files do.

Attributes longer than HDF5's object-header limit are split into ``name0``, ``name1``, ... as Keras does
(needed for ESM-2 15B's weight list). Tensors transformers 4.x's TF model always has but a hub file may
lack (the unused learned-position table of ESM-2) are written as zeros and listed in the root attribute
``esm_dual_synthesized``, so reading the file back gives exactly the tensors that were written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..common.config import CONFIG_NAME, ConfigError, EsmConfig
from .base import CheckpointError
from .schema import validate_shapes

TF_WEIGHTS_NAME = "tf_model.h5"
HDF5_OBJECT_HEADER_LIMIT = 64512  # Keras' limit for one attribute
SYNTHESIZED_ATTR = "esm_dual_synthesized"

# architecture -> (Keras model name of the TF class, top-level layers in model order)
TF_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "EsmModel": ("tf_esm_model", ("esm",)),
    "EsmForMaskedLM": ("tf_esm_for_masked_lm", ("esm", "lm_head")),
    "EsmForSequenceClassification": ("tf_esm_for_sequence_classification", ("esm", "classifier")),
    "EsmForTokenClassification": ("tf_esm_for_token_classification", ("esm", "dropout", "classifier")),
}
_DECODER = "lm_head.decoder.weight"
_WORD_EMB = "esm.embeddings.word_embeddings.weight"
_LN_MODULES = ("LayerNorm", "layer_norm", "emb_layer_norm_after")
_EMB_MODULES = ("word_embeddings", "position_embeddings")
_LAYER_ITEM = re.compile(r"^(\w+)_\._(\d+)$")


def _import_h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        raise CheckpointError("reading/writing tf_model.h5 needs h5py (pip install h5py)") from None
    return h5py


# ================================================================================================
# Names
# ================================================================================================


def tf_to_hub_name(weight_name: str) -> tuple[str, bool]:
    """``"tf_esm_for_masked_lm/esm/encoder/layer_._0/attention/self/query/kernel:0"`` ->
    ``("esm.encoder.layer.0.attention.self.query.weight", True)`` (True: stored transposed)."""
    parts = weight_name.split("/")[1:]
    if not parts:
        raise CheckpointError(f"unexpected TF weight name {weight_name!r}")
    leaf = parts[-1].split(":")[0]
    path = []
    for p in parts[:-1]:
        m = _LAYER_ITEM.match(p)
        path.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    transposed = False
    if leaf == "kernel":
        leaf, transposed = "weight", True
    elif leaf in ("gamma", "embeddings"):
        leaf = "weight"
    elif leaf == "beta":
        leaf = "bias"
    return ".".join(path + [leaf]), transposed


def hub_to_tf_name(hub_name: str, model_name: str) -> tuple[str, bool]:
    """Inverse of :func:`tf_to_hub_name` for a task-model hub name (with ``esm.``)."""
    parts = hub_name.split(".")
    leaf, module = parts[-1], parts[-2] if len(parts) > 1 else ""
    transposed = False
    if leaf == "weight":
        if module in _LN_MODULES:
            leaf = "gamma"
        elif module in _EMB_MODULES:
            leaf = "embeddings"
        else:
            leaf, transposed = "kernel", True
    elif leaf == "bias" and module in _LN_MODULES:
        leaf = "beta"
    path = []
    i = 0
    body = parts[:-1]
    while i < len(body):
        if body[i] == "layer" and i + 1 < len(body) and body[i + 1].isdigit():
            path.append(f"layer_._{body[i + 1]}")
            i += 2
        else:
            path.append(body[i])
            i += 1
    return "/".join([model_name, *path, leaf]) + ":0", transposed


def _task_name(name: str) -> str:
    """Hub name with the ``esm.`` prefix (EsmModel files store the base names without it)."""
    return name if name.startswith(("esm.", "lm_head.", "classifier.")) else "esm." + name


# ================================================================================================
# Attributes (Keras 2 conventions, chunked above the object-header limit)
# ================================================================================================


def _read_attr_list(obj: Any, name: str) -> list[str]:
    if name in obj.attrs:
        values = list(obj.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in obj.attrs:
            values.extend(obj.attrs[f"{name}{i}"])
            i += 1
        if i == 0:
            raise KeyError(name)
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _write_attr_list(obj: Any, name: str, values: list[str]) -> None:
    data = np.array([v.encode("utf8") for v in values]) if values else np.array([], dtype="S1")
    if data.nbytes <= HDF5_OBJECT_HEADER_LIMIT:
        obj.attrs[name] = data
        return
    n = 1
    while True:
        chunks = np.array_split(data, n)
        if all(c.nbytes <= HDF5_OBJECT_HEADER_LIMIT for c in chunks):
            break
        n += 1
    for i, chunk in enumerate(chunks):
        obj.attrs[f"{name}{i}"] = chunk


# ================================================================================================
# Reader
# ================================================================================================


def find_tf_h5(path: str | os.PathLike) -> str | None:
    """The ``tf_model.h5`` file that ``path`` names or holds, else None."""
    p = os.fspath(path)
    if os.path.isdir(p):
        f = os.path.join(p, TF_WEIGHTS_NAME)
        return f if os.path.isfile(f) else None
    return p if p.endswith(".h5") and not p.endswith(".weights.h5") and os.path.isfile(p) else None


def is_tf_h5(path: str) -> bool:
    """A Keras 2 HDF5 weights file with ``layer_names`` (what transformers 4.x wrote)."""
    h5py = _import_h5py()
    try:
        with h5py.File(path, "r") as f:
            return "layer_names" in f.attrs or "layer_names0" in f.attrs
    except OSError:
        return False


class TFH5File:
    """A transformers 4.x ``tf_model.h5``: config + hub-named tensors read one at a time.

    ``path``: the ``.h5`` file or a directory holding ``tf_model.h5``; ``config.json`` must be beside it
    (or be given as ``config``).
    """

    def __init__(self, path: str | os.PathLike, config: EsmConfig | None = None):
        h5py = _import_h5py()
        p = os.fspath(path)
        file = find_tf_h5(p)
        if file is None:
            raise CheckpointError(f"{p}: no {TF_WEIGHTS_NAME} (a transformers 4.x TensorFlow checkpoint)")
        self.path = file
        directory = os.path.dirname(os.path.abspath(file))
        if config is None:
            cfg_path = os.path.join(directory, CONFIG_NAME)
            if not os.path.isfile(cfg_path):
                raise CheckpointError(f"{directory}: missing {CONFIG_NAME} beside {os.path.basename(file)}")
            try:
                config = EsmConfig.from_json_file(cfg_path)
            except (ConfigError, FileNotFoundError) as e:
                raise CheckpointError(f"{cfg_path}: {e}") from None
        self.config = config
        try:
            self._f = h5py.File(file, "r")
        except OSError as e:
            raise CheckpointError(f"{file}: not a readable HDF5 file ({_h5_reason(e)})") from None
        try:
            self._index()
        except Exception:
            self._f.close()
            raise

    def _index(self) -> None:
        f, file = self._f, self.path
        try:
            layer_names = _read_attr_list(f, "layer_names")
        except KeyError:
            raise CheckpointError(
                f"{file}: not a transformers TF checkpoint (no 'layer_names' attribute; a Keras 3 "
                "'.weights.h5' file is read with --config instead)"
            ) from None
        synthesized = set(_read_attr_list(f, SYNTHESIZED_ATTR)) if SYNTHESIZED_ATTR in f.attrs else set()
        self.layer_names = layer_names
        self.model_name: str | None = None
        # hub name -> (dataset path, transposed)
        self.entries: dict[str, tuple[str, bool]] = {}
        for layer in layer_names:
            if layer not in f:
                raise CheckpointError(f"{file}: layer group {layer!r} listed in layer_names is missing")
            try:
                weight_names = _read_attr_list(f[layer], "weight_names")
            except KeyError:
                raise CheckpointError(f"{file}: layer group {layer!r} has no weight_names attribute") from None
            for wn in weight_names:
                ds_path = f"{layer}/{wn}"
                if ds_path not in f or not isinstance(f[ds_path], _import_h5py().Dataset):
                    raise CheckpointError(f"{file}: weight {wn!r} listed in layer {layer!r} has no dataset")
                _check_own_bytes(f, ds_path, file)
                self.model_name = self.model_name or wn.split("/")[0]
                hub, transposed = tf_to_hub_name(wn)
                if layer == "lm_head" and hub == _WORD_EMB:
                    hub = _DECODER  # the MLM decoder, stored under the embeddings' name
                if hub in synthesized:
                    continue
                if hub in self.entries:
                    raise CheckpointError(f"{file}: weight {wn!r} appears twice")
                self.entries[hub] = (ds_path, transposed)
        if not self.entries:
            raise CheckpointError(f"{file}: no weights")
        # EsmModel files use the base names (no "esm." prefix), as the PyTorch hub files do.
        arch = (self.config.architectures or [None])[0]
        heads = {n.split(".")[0] for n in self.entries} - {"esm"}
        if arch is None:
            arch = ("EsmForMaskedLM" if "lm_head" in heads else "EsmForSequenceClassification"
                    if any(n.startswith("classifier.out_proj.") for n in self.entries)
                    else "EsmForTokenClassification" if "classifier" in heads else "EsmModel")
        self.base_model = arch == "EsmModel"
        self._names = {}
        for hub in list(self.entries):
            name = hub[len("esm."):] if self.base_model and hub.startswith("esm.") else hub
            self._names[name] = hub
        self._drop_tied_decoder()
        validate_shapes(self.config, {n: _Spec(self.shape(n)) for n in self._names}, file)

    def _drop_tied_decoder(self) -> None:
        if not self.config.tie_word_embeddings:
            return  # untied: the decoder is a weight of its own
        if _DECODER in self._names and _WORD_EMB in self._names:
            if np.array_equal(self.get(_DECODER), self.get(_WORD_EMB)):
                del self._names[_DECODER]

    # ---- access ----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def shape(self, name: str) -> tuple[int, ...]:
        ds_path, transposed = self.entries[self._names[name]]
        shape = tuple(self._f[ds_path].shape)
        return shape[::-1] if transposed else shape

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._f[self.entries[self._names[name]][0]].dtype)

    def get(self, name: str) -> np.ndarray:
        ds_path, transposed = self.entries[self._names[name]]
        try:
            arr = self._f[ds_path][()]
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read weight {ds_path!r} ({_h5_reason(e)})") from None
        arr = np.asarray(arr)
        if arr.dtype.byteorder == ">":  # pragma: no cover
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return np.ascontiguousarray(arr.T) if transposed else arr

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._names:
            yield name, self.get(name)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TFH5File:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_own_bytes(f: Any, ds_path: str, file: str) -> None:
    """Refuse a dataset whose bytes would not come from ``file`` itself: HDF5 external storage (raw data in
    another file, any file on this machine), a virtual dataset (mapped from other datasets or files), a link
    into another file, or a non-numeric type (references, strings). Nothing is read before this check."""
    h5py = _import_h5py()
    link = f.get(ds_path, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise CheckpointError(f"{file}: dataset {ds_path!r} is an external link to {link.filename!r}; "
                              "refusing to read weights from outside the file")
    ds = f[ds_path]
    if os.path.realpath(ds.file.filename) != os.path.realpath(f.filename):
        raise CheckpointError(f"{file}: dataset {ds_path!r} lives in another file ({ds.file.filename}); "
                              "refusing to read weights from outside the file")
    if ds.is_virtual:
        raise CheckpointError(f"{file}: dataset {ds_path!r} is a virtual dataset (its data is mapped from other "
                              "datasets or files); refusing to read weights from outside the file")
    if ds.external:
        where = ", ".join(str(e[0]) for e in ds.external)
        raise CheckpointError(f"{file}: dataset {ds_path!r} uses HDF5 external storage (its data is read from "
                              f"{where}); refusing to read weights from outside the file")
    if ds.dtype.kind not in "fiub":
        raise CheckpointError(f"{file}: dataset {ds_path!r} has dtype {ds.dtype}, not a numeric weight")


class _Spec:
    """Shape-only stand-in for ``validate_shapes``."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def _h5_reason(e: BaseException) -> str:
    msg = str(e)
    if "truncated" in msg:
        m = re.search(r"eof = (\d+), sblock->base_addr = \d+, stored_eof = (\d+)", msg)
        return (f"truncated file: {m.group(1)} bytes of {m.group(2)}" if m else "truncated file")
    if "file signature not found" in msg:
        return "not an HDF5 file (file signature not found)"
    return msg


def read_tf_h5(path: str | os.PathLike, config: EsmConfig | None = None) -> tuple[EsmConfig, dict[str, np.ndarray]]:
    """Read a transformers 4.x ``tf_model.h5`` (+ ``config.json`` beside it) into hub-named arrays."""
    with TFH5File(path, config) as f:
        return f.config, dict(iter(f))


# ================================================================================================
# Writer
# ================================================================================================


def write_tf_h5(
    path: str | os.PathLike,
    config: EsmConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    keras_version: str = "2.15.0",
) -> str:
    """Write hub-named tensors (an iterable of ``(name, array)``, consumed one at a time) as a transformers
    4.x ``tf_model.h5`` for ``config.architectures[0]``. Writes ``path`` only (not ``config.json``).

    The tied MLM decoder is written into the ``lm_head`` group as transformers 4.x does; a rotary model
    without the (unused) learned-position table gets a zero table, listed in ``esm_dual_synthesized``.
    bfloat16 cannot be stored (HDF5 has no such type): cast first.
    """
    h5py = _import_h5py()
    path = os.fspath(path)
    arch = (config.architectures or ["EsmForMaskedLM"])[0]
    if arch not in TF_MODELS:
        raise CheckpointError(
            f"{path}: architecture {arch!r} has no transformers 4.x TF class (known: {', '.join(TF_MODELS)})"
        )
    model_name, layers = TF_MODELS[arch]
    weight_names: dict[str, list[str]] = {layer: [] for layer in layers}
    written: set[str] = set()
    word_emb: np.ndarray | None = None
    decoder: np.ndarray | None = None
    synthesized: list[str] = []
    # Through a Python file object: a full disk is then an OSError from write(), where HDF5's own driver
    # crashes the process (issue 19.1).
    with open(path, "wb") as fo, h5py.File(fo, "w") as f:
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = keras_version.encode()

        def put(layer: str, hub: str, arr: np.ndarray) -> None:
            wn, transposed = hub_to_tf_name(hub, model_name)
            if layer == "lm_head" and hub == _DECODER and config.tie_word_embeddings:
                wn, transposed = hub_to_tf_name(_WORD_EMB, model_name)
            arr = np.asarray(arr)
            if arr.dtype.name == "bfloat16" or arr.dtype.kind not in "fiub":
                raise CheckpointError(
                    f"{path}: tensor {hub!r} has dtype {arr.dtype}, which tf_model.h5 cannot hold; "
                    "convert with dtype float32 (exact) or float16"
                )
            data = np.ascontiguousarray(arr.T) if transposed else arr
            f.create_dataset(f"{layer}/{wn}", data=data)
            weight_names[layer].append(wn)

        for name, arr in tensors:
            hub = _task_name(name)
            if hub in written:
                raise CheckpointError(f"{path}: tensor {hub!r} given twice")
            written.add(hub)
            if hub.endswith("position_ids"):
                continue
            if hub == _DECODER:
                decoder = np.asarray(arr)
                continue
            if hub == _WORD_EMB and arch == "EsmForMaskedLM":
                word_emb = np.asarray(arr)
            top = hub.split(".")[0]
            if top not in layers:
                raise CheckpointError(
                    f"{path}: tensor {name!r} does not belong to a {arch} (its layers: {', '.join(layers)})"
                )
            put(top, hub, arr)
        if "esm.embeddings.position_embeddings.weight" not in written:
            if config.position_embedding_type != "rotary":
                raise CheckpointError(f"{path}: missing tensor 'esm.embeddings.position_embeddings.weight'")
            dtype = word_emb.dtype if word_emb is not None else np.float32
            table = np.zeros((config.max_position_embeddings, config.hidden_size), dtype)
            put("esm", "esm.embeddings.position_embeddings.weight", table)
            synthesized.append("esm.embeddings.position_embeddings.weight")
        if arch == "EsmForMaskedLM":
            if not config.tie_word_embeddings:
                # Untied: transformers 4.x's TFEsmLMHead has its own Dense "decoder" (lm_head/decoder/kernel).
                if decoder is None:
                    raise CheckpointError(f"{path}: the config unties the decoder (tie_word_embeddings=False) "
                                          f"but tensor {_DECODER!r} is missing")
                put("lm_head", _DECODER, decoder)
            else:
                if decoder is None and word_emb is None:
                    raise CheckpointError(f"{path}: a masked-LM checkpoint needs {_WORD_EMB!r}")
                put("lm_head", _DECODER, decoder if decoder is not None else word_emb)
        for layer in layers:
            _write_attr_list(f.require_group(layer), "weight_names", weight_names[layer])
        _write_attr_list(f, "layer_names", list(layers))
        if synthesized:
            _write_attr_list(f, SYNTHESIZED_ATTR, synthesized)
    return path


__all__ = [
    "TFH5File",
    "TF_MODELS",
    "TF_WEIGHTS_NAME",
    "find_tf_h5",
    "hub_to_tf_name",
    "is_tf_h5",
    "read_tf_h5",
    "tf_to_hub_name",
    "write_tf_h5",
]
