"""keras-hub's ``ESMBackbone`` with hub-layout ESM weights copied in: the peer model of the Keras benchmarks
(``keras_gpu.py``, ``tf_cpu_inference.py``). The mapping is keras-hub's own HF converter's; token dropout,
which keras-hub lacks, can be folded into the embedding table (``embedding_scale``: 0.88 is exact without
``<mask>`` tokens)."""

from __future__ import annotations

import numpy as np


def token_dropout_scale(cfg) -> float:
    """The embedding scale that emulates ESM's token dropout at inference (no ``<mask>`` in the input)."""
    return (1.0 - 0.15 * 0.8) if cfg.token_dropout else 1.0


def build_keras_hub(cfg, tensors: dict[str, np.ndarray], embedding_scale: float = 1.0, dtype=None):
    """keras-hub ESMBackbone in the shape of ``cfg`` (an ``EsmConfig``) holding ``tensors`` (hub names); every
    tensor is used except the rotary tables (keras-hub recomputes them) and the contact head."""
    import keras_hub

    kh = keras_hub.models.ESMBackbone(
        vocabulary_size=cfg.vocab_size, num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
        hidden_dim=cfg.hidden_size, intermediate_dim=cfg.intermediate_size, dropout=0.0,
        max_sequence_length=cfg.max_position_embeddings, max_wavelength=cfg.rope_theta,
        layer_norm_eps=cfg.layer_norm_eps, use_pre_layer_norm=cfg.emb_layer_norm_before,
        position_embedding_type=cfg.position_embedding_type, pad_token_id=cfg.pad_token_id, dtype=dtype)
    used = set()

    def put(var, name, transpose=False, scale=1.0):
        arr = tensors[name].astype(np.float32) * np.float32(scale)
        arr = arr.T if transpose else arr
        if tuple(var.shape) != arr.shape:
            raise ValueError(f"{name}: shape {arr.shape}, keras-hub's variable has {tuple(var.shape)}")
        var.assign(arr)
        used.add(name)

    put(kh.get_layer("token_embedding").embeddings, "embeddings.word_embeddings.weight", scale=embedding_scale)
    put(kh.output_layer_norm.gamma, "encoder.emb_layer_norm_after.weight")
    put(kh.output_layer_norm.beta, "encoder.emb_layer_norm_after.bias")
    for i in range(cfg.num_hidden_layers):
        block = kh.get_layer(f"transformer_layer_{i}")
        attn = block.attention_layer
        p = f"encoder.layer.{i}."
        for dense, hub in ((attn.q_dense, "attention.self.query"), (attn.k_dense, "attention.self.key"),
                           (attn.v_dense, "attention.self.value"), (attn.o_dense, "attention.output.dense"),
                           (block.feedforward_intermediate_dense, "intermediate.dense"),
                           (block.feedforward_output_dense, "output.dense")):
            put(dense.kernel, p + hub + ".weight", transpose=True)
            put(dense.bias, p + hub + ".bias")
        for norm, hub in ((block.attention_norm, "attention.LayerNorm"), (block.feedforward_norm, "LayerNorm")):
            put(norm.gamma, p + hub + ".weight")
            put(norm.beta, p + hub + ".bias")
    left = sorted(set(tensors) - used)
    if not all(n.endswith("inv_freq") or n.startswith("contact_head.") for n in left):
        raise ValueError(f"keras-hub has no place for {left}")
    return kh
