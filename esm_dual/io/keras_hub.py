"""keras-hub's ESM backbone presets (a directory with ``config.json`` + ``model.weights.h5``), read through
keras-hub itself into hub names (``EsmModel`` layout, PyTorch orientation).

keras-hub's ``ESMBackbone`` has no token dropout and reads learned positions one row early
(``PositionEmbedding(start_index=pad_token_id)``); the config built here records ``token_dropout`` as ESM-1b/2
were trained (the converter notes the difference, and its verification emulates keras-hub).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np

from ..common.config import CONFIG_NAME, ConfigError, EsmConfig
from .base import Checkpoint, CheckpointError, one_line


def is_keras_hub_config(path: str) -> bool:
    """Whether ``path`` (a ``config.json``) is a keras-hub preset's config (a Keras object, not an HF config)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and ("registered_name" in d or "class_name" in d) and "config" in d and \
        "model_type" not in d


def read_keras_hub_config(path: str) -> tuple[EsmConfig, dict[str, Any]]:
    """(EsmConfig, the preset's config.json) of keras-hub preset directory ``path``."""
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


def load_keras_hub_backbone(path: str) -> Any:
    try:
        import keras_hub
    except ImportError:
        raise CheckpointError(f"{path}: reading a keras-hub preset needs keras-hub (pip install keras-hub)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return keras_hub.models.Backbone.from_preset(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the keras-hub preset ({type(e).__name__}: {one_line(e)})") \
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


def read_keras_hub(path: str) -> Checkpoint:
    """A keras-hub ESM preset directory as a checkpoint (``EsmModel`` hub names)."""
    config, _ = read_keras_hub_config(path)
    return Checkpoint(config=config, tensors=keras_hub_tensors(load_keras_hub_backbone(path)), source=path,
                      layout="keras-hub")


__all__ = ["is_keras_hub_config", "keras_hub_tensors", "load_keras_hub_backbone", "read_keras_hub",
           "read_keras_hub_config"]
