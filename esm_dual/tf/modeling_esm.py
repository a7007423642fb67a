"""ESM-1b / ESM-1v / ESM-2 in TensorFlow + Keras 3: TFEsmModel and its task heads.

Twin of ``esm_dual/pt/modeling_esm.py``: same classes (``TF`` prefix), same argument order, same
statement order. Layers carry the hub's names through ``name=`` and one generic walk
(:func:`hub_variable_map`) maps every Keras variable onto its hub tensor name, so both backends read and
write the same ``config.json`` + ``model.safetensors``.

Outputs are the shared dataclasses of ``esm_dual.common.outputs`` (HF field names; attribute, key and
index access). This module registers them as nested structures for ``tf.nest`` (``__tf_flatten__``:
tf.function, tf.distribute, SavedModel tracing) and for Keras' tree (optree, namespace "keras":
``predict()`` concatenation, symbolic building), with the fields that are not None as children. So the
Keras call path returns the same objects as eager calls, and ``predict()`` returns one of them holding
numpy arrays.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ..common.config import EsmConfig, with_recorded_dtype  # noqa: E402
from ..common.outputs import (  # noqa: E402
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    ModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from ..io.dtypes import weights_dtype  # noqa: E402
from ..io.schema import (  # noqa: E402
    LoadingError,
    check_finite,
    checkpoint_has_pooler,
    match_state,
    rotary_inv_freq,
)

if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    raise ImportError(f"esm_dual.tf needs the Keras TensorFlow backend; KERAS_BACKEND is "
                      f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before importing keras.")

logger = logging.getLogger("esm_dual")

MASK_RATIO_TRAIN = 0.15 * 0.8  # the masking ratio of every ESM training run (token dropout)
_serializable = keras.saving.register_keras_serializable(package="esm_dual")
# No task loss reaches the contact head (as in PyTorch, where its .grad stays None); Keras would warn
# about exactly these two variables on every fit. Other variables without gradients are still reported.
warnings.filterwarnings(
    "ignore", category=UserWarning,
    message=r"Gradients do not exist for variables \['[^']*contact_head/regression/kernel', "
            r"'[^']*contact_head/regression/bias'\] ")


# ================================================================================================
# Helpers (same names in the PyTorch twin)
# ================================================================================================


def gelu(x: tf.Tensor) -> tf.Tensor:
    """Exact erf GELU, as in the original ESM code (x * 0.5 * (1 + erf(x / sqrt(2)))); written out, it
    runs about twice as fast as tf.nn.gelu on the CPU."""
    return x * 0.5 * (1.0 + tf.math.erf(x / math.sqrt(2.0)))


def apply_rotary(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor) -> tf.Tensor:
    """Half-rotation rotary: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].

    x [B, H, L, K]; cos, sin [*, L, K/2]. Same result as ``x * cat(cos, cos) + rotate_half(x) *
    cat(sin, sin)`` without materialising the rotated copy.
    """
    x1, x2 = tf.split(x, 2, axis=-1)
    return tf.concat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


def symmetrize(x: tf.Tensor) -> tf.Tensor:
    """Make the last two dimensions symmetric (contact prediction)."""
    return x + tf.linalg.matrix_transpose(x)


def average_product_correct(x: tf.Tensor) -> tf.Tensor:
    """Average product correction (APC) over the last two dimensions (contact prediction)."""
    a1 = tf.reduce_sum(x, -1, keepdims=True)
    a2 = tf.reduce_sum(x, -2, keepdims=True)
    a12 = tf.reduce_sum(x, (-1, -2), keepdims=True)
    # (a1 / a12) * a2: one full-size temporary fewer than a1 * a2 / a12
    return x - (a1 / a12) * a2


def symmetric_apc_regression(x: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """Contact logits ``sum_c w_c * APC(symmetrize(x_c)) + b`` without building either full-size map.

    x [B, C, N, N]; weight [C]; bias [] -> [B, N, N]. With s = x + x^T: rowsum(s) = colsum(s) = u =
    rowsum(x) + colsum(x) and sum(s) = 2 sum(x), so sum_c w_c APC(s_c) = Y + Y^T - sum_c w_c u_c u_c^T /
    (2 sum(x_c)) with Y = sum_c w_c x_c: one pass over x instead of five.
    """
    # [B, N, N]
    y = tf.einsum("bcnm,c->bnm", x, weight)
    # [B, C, N]
    u = tf.reduce_sum(x, -1) + tf.reduce_sum(x, -2)
    # [B, C]
    scale = weight / (2 * tf.reduce_sum(x, (-1, -2)))
    # [B, N, N]
    corr = tf.einsum("bcn,bcm->bnm", u * scale[..., None], u)
    return y + tf.linalg.matrix_transpose(y) - corr + bias


def masked_fill(x: tf.Tensor, mask: tf.Tensor, value: float) -> tf.Tensor:
    """``x`` with ``value`` where the (broadcast) boolean ``mask`` is True (torch's ``masked_fill``)."""
    return tf.where(mask, tf.cast(value, x.dtype), x)


def softmax_fp32(x: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Softmax over the last axis computed in float32, returned in ``dtype`` (mixed precision)."""
    return tf.cast(tf.nn.softmax(tf.cast(x, tf.float32), axis=-1), dtype)


def scaled_dot_product_attention(q, k, v, attention_bias, dropout: keras.layers.Dropout,
                                 training) -> tf.Tensor:
    """Attention without returning the probabilities: q, k, v [B, H, L, K] (q already scaled),
    attention_bias [B, 1, 1, L] -> context [B, H, L, K].

    TensorFlow has no fused attention kernel (Keras' ``dot_product_attention`` is this same math on
    this backend); under XLA the scores, fp32 softmax and value product fuse, and the [B, H, L, L]
    probabilities are neither returned nor kept past the backward pass. Same numerics as the
    ``output_attentions`` path.
    """
    # [B, H, L, L]
    scores = tf.matmul(q, k, transpose_b=True) + tf.cast(attention_bias, q.dtype)
    return tf.matmul(dropout(softmax_fp32(scores, q.dtype), training=training), v)


def _fp32_policy(policy: keras.DTypePolicy) -> keras.DTypePolicy | str:
    """LayerNorm and the contact head keep float32 under (mixed) half precision."""
    return "float32" if policy.compute_dtype in ("float16", "bfloat16") else policy


def _dtype_min(dtype: str | tf.DType) -> float:
    return float(tf.as_dtype(dtype).min)


def _dims(x: tf.Tensor) -> list:
    """Shape of ``x``: static sizes where known, dynamic ones elsewhere (fewer ops, XLA-friendly)."""
    static, dynamic = x.shape.as_list(), tf.shape(x)
    return [dynamic[i] if s is None else s for i, s in enumerate(static)]


# Fresh initialisation (as ``_init_weights`` in the PyTorch twin). ``from_pretrained`` builds with zeros
# (cheap) and then loads or initialises every tensor, as the PyTorch twin builds on the meta device.
_SKIP_INIT = False


@contextmanager
def _no_init():
    global _SKIP_INIT
    old, _SKIP_INIT = _SKIP_INIT, True
    try:
        yield
    finally:
        _SKIP_INIT = old


def _normal(config: EsmConfig):
    return "zeros" if _SKIP_INIT else keras.initializers.RandomNormal(0.0, config.initializer_range)


def _dense(units: int, config: EsmConfig, name: str, parent: keras.layers.Layer) -> keras.layers.Dense:
    return keras.layers.Dense(units, kernel_initializer=_normal(config), bias_initializer="zeros",
                              name=name, dtype=parent.dtype_policy)


def _layer_norm(config: EsmConfig, name: str, parent: keras.layers.Layer) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, name=name,
                                           dtype=_fp32_policy(parent.dtype_policy))


def _embedding(num: int, config: EsmConfig, name: str, parent: keras.layers.Layer) -> keras.layers.Embedding:
    return keras.layers.Embedding(num, config.hidden_size, embeddings_initializer=_normal(config), name=name,
                                  dtype=parent.dtype_policy)


def _dropout(rate: float, parent: keras.layers.Layer, name: str = "dropout") -> keras.layers.Dropout:
    return keras.layers.Dropout(rate, name=name, dtype=parent.dtype_policy)


# ================================================================================================
# Embeddings and positions
# ================================================================================================


@_serializable
class TFEsmEmbeddings(keras.layers.Layer):
    """Token embeddings, token dropout, learned positions (ESM-1b/1v) and the optional LayerNorm."""

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.word_embeddings = _embedding(config.vocab_size, config, "word_embeddings", self)
        if config.emb_layer_norm_before:
            self.layer_norm = _layer_norm(config, "layer_norm", self)
        else:
            self.layer_norm = None
        self.position_embedding_type = config.position_embedding_type
        if self.position_embedding_type == "absolute":
            self.position_embeddings = _embedding(config.max_position_embeddings, config,
                                                  "position_embeddings", self)
        self.padding_idx = config.pad_token_id
        self.token_dropout = config.token_dropout
        self.mask_token_id = config.mask_token_id

    def build(self, input_shape=None):
        self.word_embeddings.build()
        if self.layer_norm is not None:
            self.layer_norm.build([None, None, self.config.hidden_size])
        if self.position_embedding_type == "absolute":
            self.position_embeddings.build()

    def call(self, input_ids, attention_mask, position_ids=None, inputs_embeds=None, training=False):
        """input_ids [B, L], attention_mask [B, L] (1 = real token) -> embeddings [B, L, D]."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds
        if self.token_dropout and input_ids is not None:
            # <mask> embeddings are zeroed and the rest rescaled as if by input dropout at the
            # training ratio; the observed ratio counts real (unpadded) tokens only.
            is_mask = tf.equal(input_ids, tf.cast(self.mask_token_id, input_ids.dtype))[..., None]
            embeddings = masked_fill(embeddings, is_mask, 0.0)
            src_lengths = tf.reduce_sum(tf.cast(attention_mask, tf.float32), -1)
            mask_ratio_observed = tf.reduce_sum(tf.cast(is_mask[..., 0], tf.float32), -1) / src_lengths
            scale = (1 - MASK_RATIO_TRAIN) / (1 - mask_ratio_observed)
            embeddings = tf.cast(tf.cast(embeddings, tf.float32) * scale[:, None, None], inputs_embeds.dtype)
        if self.position_embedding_type == "absolute":
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        embeddings = embeddings * tf.cast(attention_mask, embeddings.dtype)[..., None]
        return embeddings


def learned_position_ids(input_ids: tf.Tensor, padding_idx: int) -> tf.Tensor:
    """ESM-1b/1v positions: cumsum(mask) * mask + padding_idx, so padding keeps padding_idx."""
    mask = tf.cast(tf.not_equal(input_ids, tf.cast(padding_idx, input_ids.dtype)), tf.int32)
    return tf.cast(tf.cumsum(mask, axis=1) * mask, tf.int64) + padding_idx


@_serializable
class TFEsmRotaryEmbedding(keras.layers.Layer):
    """Rotary embeddings, half-rotation convention. ``inv_freq`` is a non-trainable variable loaded from
    the checkpoint (ESM-2 files store fp16-rounded values), never recomputed when present."""

    def __init__(self, dim: int, base: float = 10000.0, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.base = base

    def build(self, input_shape=None):
        self.inv_freq = self.add_weight(
            name="inv_freq", shape=(self.dim // 2,), dtype="float32", trainable=False, autocast=False,
            initializer=keras.initializers.Constant(rotary_inv_freq(self.dim, self.base)))

    def call(self, q: tf.Tensor, k: tf.Tensor, positions: tf.Tensor, q_scale: float = 1.0):
        """q, k [B, H, L, K]; positions [B, L] or [L] -> rotated q (times q_scale), k; computed in fp32."""
        # [B, L, K/2] or [L, K/2]
        freqs = tf.cast(positions, tf.float32)[..., None] * tf.cast(self.inv_freq, tf.float32)
        if freqs.shape.rank == 3:
            # [B, 1, L, K/2]
            freqs = freqs[:, None]
        cos, sin = tf.cos(freqs), tf.sin(freqs)
        q_out = apply_rotary(tf.cast(q, tf.float32), cos * q_scale, sin * q_scale)
        k_out = apply_rotary(tf.cast(k, tf.float32), cos, sin)
        return tf.cast(q_out, q.dtype), tf.cast(k_out, k.dtype)


# ================================================================================================
# Transformer layer
# ================================================================================================


@_serializable
class TFEsmSelfAttention(keras.layers.Layer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = _dense(config.hidden_size, config, "query", self)
        self.key = _dense(config.hidden_size, config, "key", self)
        self.value = _dense(config.hidden_size, config, "value", self)
        self.dropout = _dropout(config.attention_probs_dropout_prob, self)
        self.rotary_embeddings = (
            TFEsmRotaryEmbedding(self.attention_head_size, config.rope_theta, name="rotary_embeddings",
                                 dtype=self.dtype_policy)
            if config.use_rotary else None
        )

    def build(self, input_shape=None):
        for dense in (self.query, self.key, self.value):
            dense.build([None, None, self.config.hidden_size])
        if self.rotary_embeddings is not None:
            self.rotary_embeddings.build()

    def _heads(self, x: tf.Tensor) -> tf.Tensor:
        B, L, _ = _dims(x)
        # [B, L, H, K] -> [B, H, L, K]
        x = tf.reshape(x, (B, L, self.num_attention_heads, self.attention_head_size))
        return tf.transpose(x, (0, 2, 1, 3))

    def call(self, hidden_states, attention_bias, positions, output_attentions=False, training=False):
        """hidden_states [B, L, D]; attention_bias [B, 1, 1, L] additive (0 or -inf-like)."""
        # The query is scaled by K^-0.5 before rotary, as in the original ESM code (with rotary the
        # scale is folded into the query's cos/sin tables: the same product, one pass fewer).
        scale = self.attention_head_size**-0.5
        q = self._heads(self.query(hidden_states))
        k = self._heads(self.key(hidden_states))
        v = self._heads(self.value(hidden_states))
        if self.rotary_embeddings is not None:
            q, k = self.rotary_embeddings(q, k, positions, q_scale=scale)
        else:
            q = q * scale
        if output_attentions:
            # [B, H, L, L]
            scores = tf.matmul(q, k, transpose_b=True) + tf.cast(attention_bias, q.dtype)
            probs = softmax_fp32(scores, q.dtype)
            context = tf.matmul(self.dropout(probs, training=training), v)
        else:
            probs = None
            # [B, H, L, K]; scale=1 because the query is already scaled.
            context = scaled_dot_product_attention(q, k, v, attention_bias, self.dropout, training)
        B, H, L, K = _dims(context)
        # [B, H, L, K] -> [B, L, D]
        context = tf.reshape(tf.transpose(context, (0, 2, 1, 3)), (B, L, H * K))
        return context, probs


@_serializable
class TFEsmSelfOutput(keras.layers.Layer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(config.hidden_size, config, "dense", self)
        self.dropout = _dropout(config.hidden_dropout_prob, self)

    def build(self, input_shape=None):
        self.dense.build([None, None, self.config.hidden_size])

    def call(self, hidden_states, input_tensor, training=False):
        return self.dropout(self.dense(hidden_states), training=training) + input_tensor


@_serializable
class TFEsmAttention(keras.layers.Layer):
    """Pre-LN self-attention block: x + dropout(out(attn(LN(x))))."""

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.self = TFEsmSelfAttention(config, name="self", dtype=self.dtype_policy)
        # ``output`` is a read-only Keras property: the attribute differs, the hub name does not.
        self.output_layer = TFEsmSelfOutput(config, name="output", dtype=self.dtype_policy)
        self.LayerNorm = _layer_norm(config, "LayerNorm", self)

    def build(self, input_shape=None):
        self.self.build()
        self.output_layer.build()
        self.LayerNorm.build([None, None, self.config.hidden_size])

    def call(self, hidden_states, attention_bias, positions, output_attentions=False, training=False):
        context, probs = self.self(self.LayerNorm(hidden_states), attention_bias, positions,
                                   output_attentions=output_attentions, training=training)
        return self.output_layer(context, hidden_states, training=training), probs


@_serializable
class TFEsmIntermediate(keras.layers.Layer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(config.intermediate_size, config, "dense", self)

    def build(self, input_shape=None):
        self.dense.build([None, None, self.config.hidden_size])

    def call(self, hidden_states):
        return gelu(self.dense(hidden_states))


@_serializable
class TFEsmOutput(keras.layers.Layer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(config.hidden_size, config, "dense", self)
        self.dropout = _dropout(config.hidden_dropout_prob, self)

    def build(self, input_shape=None):
        self.dense.build([None, None, self.config.intermediate_size])

    def call(self, hidden_states, input_tensor, training=False):
        return self.dropout(self.dense(hidden_states), training=training) + input_tensor


@_serializable
class TFEsmLayer(keras.layers.Layer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.attention = TFEsmAttention(config, name="attention", dtype=self.dtype_policy)
        self.intermediate = TFEsmIntermediate(config, name="intermediate", dtype=self.dtype_policy)
        self.output_layer = TFEsmOutput(config, name="output", dtype=self.dtype_policy)
        self.LayerNorm = _layer_norm(config, "LayerNorm", self)

    def build(self, input_shape=None):
        self.attention.build()
        self.intermediate.build()
        self.output_layer.build()
        self.LayerNorm.build([None, None, self.config.hidden_size])

    def call(self, hidden_states, attention_bias, positions, output_attentions=False, training=False):
        attention_output, probs = self.attention(hidden_states, attention_bias, positions,
                                                 output_attentions=output_attentions, training=training)
        layer_output = self.output_layer(self.intermediate(self.LayerNorm(attention_output)),
                                         attention_output, training=training)
        return layer_output, probs


@_serializable
class TFEsmEncoder(keras.layers.Layer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.layer = [TFEsmLayer(config, name=f"layer_{i}", dtype=self.dtype_policy)
                      for i in range(config.num_hidden_layers)]
        self.emb_layer_norm_after = _layer_norm(config, "emb_layer_norm_after", self)

    def build(self, input_shape=None):
        for layer in self.layer:
            layer.build()
        self.emb_layer_norm_after.build([None, None, self.config.hidden_size])

    def call(self, hidden_states, attention_bias, positions, output_hidden_states=False,
             output_attentions=False, training=False):
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for layer in self.layer:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, probs = layer(hidden_states, attention_bias, positions,
                                         output_attentions=output_attentions, training=training)
            if all_attn is not None:
                all_attn.append(probs)
        hidden_states = self.emb_layer_norm_after(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return (hidden_states, tuple(all_hidden) if all_hidden is not None else None,
                tuple(all_attn) if all_attn is not None else None)


@_serializable
class TFEsmPooler(keras.layers.Layer):
    """HF's pooler (dense + tanh on the <cls> state); present only when a checkpoint has one."""

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(config.hidden_size, config, "dense", self)

    def build(self, input_shape=None):
        self.dense.build([None, self.config.hidden_size])

    def call(self, hidden_states):
        return tf.tanh(self.dense(hidden_states[:, 0]))


@_serializable
class TFEsmContactPredictionHead(keras.layers.Layer):
    """Logistic regression over symmetrized, APC-corrected attention maps of all layers."""

    def __init__(self, in_features: int, eos_idx: int = 2, initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.in_features = in_features
        self.eos_idx = eos_idx
        init = "zeros" if _SKIP_INIT else keras.initializers.RandomNormal(0.0, initializer_range)
        self.regression = keras.layers.Dense(1, kernel_initializer=init, name="regression",
                                             dtype=self.dtype_policy)

    def build(self, input_shape=None):
        self.regression.build([None, None, None, self.in_features])

    def call(self, tokens, attentions):
        """tokens [B, L]; attentions [B, layers, H, L, L] with padding zeroed -> contacts [B, N, N]."""
        eos_mask = tf.cast(tf.not_equal(tokens, tf.cast(self.eos_idx, tokens.dtype)), attentions.dtype)
        # [B, L, L]
        eos_mask = eos_mask[:, None, :] * eos_mask[:, :, None]
        attentions = attentions * eos_mask[:, None, None, :, :]
        # Drop the last position (EOS or padding) and BOS: [B, layers, H, N, N].
        attentions = attentions[..., :-1, :-1][..., 1:, 1:]
        B, layers, H, N, _ = _dims(attentions)
        # [B, layers * H, N, N]
        attentions = tf.cast(tf.reshape(attentions, (B, layers * H, N, N)), self.compute_dtype)
        # symmetrize -> APC -> logistic regression over the layers * H channels, in one pass.
        kernel = tf.cast(self.regression.kernel, self.compute_dtype)
        bias = tf.cast(self.regression.bias, self.compute_dtype)
        logits = symmetric_apc_regression(attentions, kernel[:, 0], bias[0])
        return tf.sigmoid(logits)


# ================================================================================================
# Hub names: one generic walk + a short exception table
# ================================================================================================

# Keras layer class -> {variable name: (hub leaf name, transposed)}; Dense kernels are [in, out] in
# Keras and [out, in] (``Linear.weight``) in the hub files.
_GENERIC_NAMES: dict[type, dict[str, tuple[str, bool]]] = {
    keras.layers.Dense: {"kernel": ("weight", True), "bias": ("bias", False)},
    keras.layers.LayerNormalization: {"gamma": ("weight", False), "beta": ("bias", False)},
    keras.layers.Embedding: {"embeddings": ("weight", False)},
}
# Variables our own layers create directly (filled in below the classes that own them).
_EXCEPTION_NAMES: dict[type, dict[str, tuple[str, bool]]] = {
    TFEsmRotaryEmbedding: {"inv_freq": ("inv_freq", False)},
}
_LIST_ITEM = re.compile(r"^(.*)_(\d+)$")


def _hub_component(layer_name: str) -> str:
    """A layer's name as a hub path component: list items ``layer_3`` are ``layer.3``."""
    m = _LIST_ITEM.match(layer_name)
    return f"{m.group(1)}.{m.group(2)}" if m else layer_name


def _child_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Direct sub-layers held in public attributes (and lists of them), in assignment order."""
    out, seen = [], set()
    for attr, value in vars(layer).items():
        if attr.startswith("_"):
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, keras.layers.Layer) and id(item) not in seen:
                seen.add(id(item))
                out.append(item)
    return out


def hub_variable_map(model: keras.layers.Layer) -> dict[str, tuple[keras.Variable, bool]]:
    """Hub tensor name -> (Keras variable, transposed) for every weight of ``model``.

    One generic walk: the path is the chain of layer names below ``model`` (the hub's attribute names;
    ``layer_3`` -> ``layer.3``), the leaf comes from ``_GENERIC_NAMES`` by Keras layer class, or from
    ``_EXCEPTION_NAMES`` for variables our own layers create. A variable reached twice (the LM decoder
    tied to the word embeddings) keeps its first name, so the tied decoder is left out as in hub files.
    """
    out: dict[str, tuple[keras.Variable, bool]] = {}
    seen: set[int] = set()

    def visit(layer: keras.layers.Layer, prefix: str) -> None:
        children = _child_layers(layer)
        below = {id(w) for c in children for w in c.weights}
        table = next((t for cls, t in {**_GENERIC_NAMES, **_EXCEPTION_NAMES}.items()
                      if type(layer) is cls), {})
        for var in layer.weights:
            if id(var) in below or id(var) in seen:
                continue
            seen.add(id(var))
            if var.name not in table:
                raise KeyError(f"no hub name for variable {var.path!r} of {type(layer).__name__}")
            leaf, transposed = table[var.name]
            out[prefix + leaf] = (var, transposed)
        for child in children:
            visit(child, prefix + _hub_component(child.name) + ".")

    visit(model, "")
    return out


# ================================================================================================
# Base class: init, loading, saving, Keras training and serialization
# ================================================================================================


def _as_tensor(x: Any) -> Any:
    return x if x is None or hasattr(x, "dtype") else tf.convert_to_tensor(x)


def _unpack_inputs(input_ids: Any, **named: Any) -> dict[str, Any]:
    """Keras-style dict input (``model({"input_ids": ..., "attention_mask": ...})``) -> named arguments;
    Python lists become tensors (Keras itself converts numpy arrays)."""
    if not isinstance(input_ids, Mapping):
        return {k: _as_tensor(v) for k, v in {"input_ids": input_ids, **named}.items()}
    unknown = sorted(set(input_ids) - set(named) - {"input_ids"})
    if unknown:
        raise ValueError(f"unknown input key(s) {unknown}; expected some of {['input_ids', *named]}")
    out = {"input_ids": input_ids.get("input_ids"), **named}
    for key, value in input_ids.items():
        if key != "input_ids" and named.get(key) is not None:
            raise ValueError(f"{key} given both in the input dict and as an argument")
        if value is not None:
            out[key] = value
    return {k: _as_tensor(v) for k, v in out.items()}


def _labels_from(x: Any, y: Any) -> Any:
    if y is not None:
        return y
    return x.get("labels") if isinstance(x, Mapping) else None


class TFEsmPreTrainedModel(keras.Model):
    config_class = EsmConfig
    base_model_prefix = "esm"

    def __init__(self, config: EsmConfig, **kwargs):
        if not isinstance(config, EsmConfig):
            raise TypeError(f"{type(self).__name__} takes an EsmConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set")
        super().__init__(**kwargs)
        self.config = config

    # ---- init ----------------------------------------------------------------------------------
    def _init_variable(self, name: str, var: keras.Variable) -> None:
        """Fresh value of one variable, as ``_init_weights`` of the PyTorch twin."""
        if name.endswith("rotary_embeddings.inv_freq"):
            value = rotary_inv_freq(self.config.head_dim, self.config.rope_theta)
        elif var.name in ("kernel", "embeddings"):
            value = keras.initializers.RandomNormal(0.0, self.config.initializer_range)(var.shape)
        elif var.name == "gamma":
            value = np.ones(var.shape, np.float32)
        else:
            value = np.zeros(var.shape, np.float32)
        var.assign(tf.cast(value, var.dtype))

    def post_init(self) -> None:
        """Create every variable now (the model is built at construction) and zero the padding rows."""
        self.build()
        if not _SKIP_INIT:
            embeddings = self.get_base_model().embeddings
            for layer in (embeddings.word_embeddings, getattr(embeddings, "position_embeddings", None)):
                if layer is not None:
                    w = layer.embeddings
                    w.assign(tf.tensor_scatter_nd_update(w, [[self.config.pad_token_id]],
                                                         tf.zeros((1, w.shape[1]), w.dtype)))

    def build(self, input_shape=None):
        for layer in _child_layers(self):
            if not layer.built:
                layer.build(None)

    # ---- training conveniences -----------------------------------------------------------------
    # A method, not the PyTorch twin's ``base_model`` property: Keras' saving walks every attribute,
    # and an attribute that leads back to the model itself would be a cycle.
    def get_base_model(self) -> TFEsmModel:
        return self if isinstance(self, TFEsmModel) else getattr(self, self.base_model_prefix)

    def freeze_base_model(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the encoder for head-only fine-tuning (compile again afterwards)."""
        self.get_base_model().trainable = not frozen

    def num_parameters(self, only_trainable: bool = False) -> int:
        weights = self.trainable_weights if only_trainable else self.weights
        return int(sum(np.prod(w.shape) for w in weights))

    # ---- names ----------------------------------------------------------------------------------
    def _hub_state(self) -> dict[str, tuple[keras.Variable, bool]]:
        """Hub name -> (variable, transposed); the tied decoder is left out (as the hub files do)."""
        return hub_variable_map(self)

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        config: EsmConfig | None = None,
        dtype: str | keras.DTypePolicy | None = None,
        **kwargs: Any,
    ):
        """Load from a hub-layout directory, a hub id, a fair-esm ``.pt`` file or a preset name.

        A checkpoint's head that this class lacks is dropped; a head this class has and the file
        lacks is initialised fresh; both are said in one log line. Config fields may be overridden
        (``num_labels=3``, ``problem_type="regression"``, dropout probabilities ...). ``dtype`` is a
        Keras dtype policy ("float32", "mixed_bfloat16", ...).

        transformers' loading arguments are honoured as in ``esm_dual.pt``: ``revision``, ``cache_dir``,
        ``token``, ``local_files_only``, ``force_download``, ``subfolder``, ``proxies`` (through
        huggingface_hub), ``device_map`` (a device such as "cpu" or "/GPU:0", built under ``tf.device``; "auto"
        keeps Keras' placement) and ``attn_implementation`` ("auto", "sdpa" or "eager": the one attention path
        here). Any other argument that is not a config field is an error naming it; none reaches the config.
        """
        from ..common.hf_hub import split_pretrained_kwargs
        from ..io.hub import load_checkpoint
        from ..io.resolve import resolve_checkpoint

        where = f"{cls.__name__}.from_pretrained"
        # add_pooling_layer (the encoder alone) is from_checkpoint's, as in transformers' EsmModel.
        fields = EsmConfig._field_names() + (["add_pooling_layer"] if issubclass(cls, TFEsmModel) else [])
        hub_kwargs, framework, config_overrides = split_pretrained_kwargs(kwargs, fields, where)
        attn = framework.get("attn_implementation")
        if attn is not None and attn not in ("auto", "sdpa", "eager"):
            raise ValueError(f"attn_implementation={attn!r} is not supported by the Keras models; choose one of "
                             "'auto', 'sdpa', 'eager' (all run the same attention)")
        device_map = framework.get("device_map")
        if isinstance(device_map, dict):
            devices = {str(v) for v in device_map.values()}
            if len(devices) != 1:
                raise ValueError(f"device_map={device_map!r} splits the model over {sorted(devices)}; esm-dual "
                                 "places a model on one device")
            device_map = next(iter(device_map.values()))
        if device_map is not None and not isinstance(device_map, str):
            raise ValueError(f"device_map={device_map!r}: the Keras models take a device name ('cpu', 'gpu:0') "
                             "or 'auto'")
        device = device_map if device_map not in (None, "auto") else None
        ckpt = load_checkpoint(resolve_checkpoint(pretrained, **hub_kwargs))
        model = cls.from_checkpoint(ckpt, dtype=dtype, device=device, config=config, **config_overrides)
        model.name_or_path = os.fspath(pretrained)
        return model

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Any,
        *,
        dtype: str | keras.DTypePolicy | None = None,
        device: str | None = None,
        config: EsmConfig | None = None,
        **overrides: Any,
    ):
        """Build this model from a loaded checkpoint (``esm_dual.io.base.Checkpoint``: config + hub-named numpy
        tensors): the one place a Keras model is made from tensors (``from_pretrained``, the CLI and conversion
        call it).

        ``dtype``: a Keras dtype policy (``"float32"``, ``"mixed_bfloat16"``, ...); ``device``: a TensorFlow
        device (``"/GPU:0"``) to build under; ``config`` replaces the checkpoint's; ``overrides`` are config
        fields and, for ``TFEsmModel``, ``add_pooling_layer`` (default: whether the checkpoint has a pooler).
        NaN or infinite weights are refused by name.
        """
        add_pooling_layer = overrides.pop("add_pooling_layer", None)
        cfg = config if config is not None else ckpt.config
        if overrides:
            cfg = EsmConfig.from_dict(cfg.to_dict(), **overrides)
        check_finite(ckpt.tensors, str(ckpt.source))
        kwargs: dict[str, Any] = {}
        if cls is TFEsmModel:
            kwargs["add_pooling_layer"] = (checkpoint_has_pooler(ckpt.tensors) if add_pooling_layer is None
                                           else add_pooling_layer)
        if dtype is not None:
            kwargs["dtype"] = dtype
        # Build without random initialisation: every tensor is then either loaded or initialised.
        with tf.device(device) if device is not None else contextlib.nullcontext():
            with _no_init():
                model = cls(cfg, **kwargs)
            model.load_hub_tensors(ckpt.tensors, source=str(ckpt.source))
        return model

    def load_hub_tensors(self, tensors: dict[str, np.ndarray], source: str = "checkpoint") -> list[str]:
        """Copy hub-named numpy tensors into this model (names matched by ``match_state``)."""
        own = self._hub_state()
        result = match_state(tensors, own.keys(), base_model=isinstance(self, TFEsmModel),
                             num_layers=self.config.num_hidden_layers, source=source)
        for msg in result.messages:
            logger.warning(msg)
        for name, arr in result.tensors.items():
            var, transposed = own[name]
            arr = np.asarray(arr)
            expected = tuple(var.shape)[::-1] if transposed else tuple(var.shape)
            if tuple(arr.shape) != expected:
                raise LoadingError(f"{source}: tensor {name} has shape {tuple(arr.shape)}, "
                                   f"the model expects {expected}")
            var.assign((arr.T if transposed else arr).astype(var.dtype))
        for name in result.initialised:
            self._init_variable(name, own[name][0])
        return result.messages

    # ---- saving ---------------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "5GB") -> Any:
        """Upload the model (``config.json`` + safetensors, as ``save_pretrained`` writes them) to the HF hub
        through ``huggingface_hub``, creating the repo if needed; returns the commit info."""
        from ..common.hf_hub import push_folder_to_hub

        return push_folder_to_hub(lambda d: self.save_pretrained(d, max_shard_size=max_shard_size), repo_id,
                                  commit_message=commit_message, private=private, token=token, revision=revision,
                                  create_pr=create_pr)

    def save_pretrained(self, directory: str | os.PathLike, *,
                        max_shard_size: int | str | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` in the hub layout (readable by transformers,
        fair-esm converters and ``esm_dual.pt``)."""
        from ..io.hub import save_checkpoint

        cfg = self.config.copy(architectures=[type(self).__name__[2:]])
        tensors = {}
        for name, (var, transposed) in self._hub_state().items():
            arr = keras.ops.convert_to_numpy(var)
            tensors[name] = np.ascontiguousarray(arr.T if transposed else arr)
        dtype = weights_dtype(tensors)  # recorded as transformers 5 records it
        if dtype is not None:
            cfg = with_recorded_dtype(cfg, dtype)
        save_checkpoint(directory, cfg, tensors, max_shard_size=max_shard_size)

    # ---- input checks ---------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, inputs_embeds) -> list:
        """Static checks always; value checks (token ids in the vocabulary, the length where it is not known
        when traced) eagerly, or as assertions inside a tf.function, returned for the caller to make the
        inputs depend on (so they fail before an out-of-range lookup would)."""
        checks = []
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = input_ids if input_ids is not None else inputs_embeds
        shape = x.shape
        if shape.rank is not None and shape.rank < 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(shape)}")
        B, L = (shape[0], shape[1]) if shape.rank is not None else (None, None)
        if B == 0 or L == 0:
            raise ValueError(f"empty batch: input shape {tuple(shape)}")
        if input_ids is not None:
            if not input_ids.dtype.is_integer:
                raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype.name}")
            if tf.executing_eagerly() and not keras.backend.is_keras_tensor(input_ids):
                ids = input_ids.numpy()
                bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
                if bad.size:
                    raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                                     f"(0..{self.config.vocab_size - 1})")
            elif not keras.backend.is_keras_tensor(input_ids):  # in a tf.function (fit, evaluate, predict)
                msg = f"a token id is outside the vocabulary (0..{self.config.vocab_size - 1})"
                checks.append(tf.debugging.assert_non_negative(input_ids, message=msg))
                checks.append(tf.debugging.assert_less(input_ids, tf.cast(self.config.vocab_size, input_ids.dtype),
                                                       message=msg))
        if attention_mask is not None and attention_mask.shape.rank is not None:
            ms = tuple(attention_mask.shape)
            if len(ms) != 2 or any(a is not None and b is not None and a != b for a, b in zip(ms, (B, L))):
                raise ValueError(f"attention_mask has shape {ms}, input_ids {(B, L)}")
        limit = self.config.max_sequence_positions
        too_long = (f"this model uses learned positions and takes at most {limit} tokens ({limit - 2 if limit else 0} "
                    "residues + BOS/EOS); got a longer batch. Truncate the sequences.")
        if limit is not None and L is not None and L > limit:
            raise ValueError(too_long.replace("a longer batch", f"a batch of length {L}"))
        if limit is not None and L is None and not keras.backend.is_keras_tensor(x):  # length known at run time
            checks.append(tf.debugging.assert_less_equal(tf.shape(x)[1], limit, message=too_long))
        return [c for c in checks if c is not None]

    # ---- Keras training -------------------------------------------------------------------------
    def hf_compute_loss(self, labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no loss of its own; compile with a loss")

    @staticmethod
    def _prediction(y_pred: Any) -> Any:
        """The tensor Keras losses and metrics see: the logits (last_hidden_state for TFEsmModel)."""
        if isinstance(y_pred, ModelOutput):
            return y_pred.logits if hasattr(y_pred, "logits") else y_pred.last_hidden_state
        return y_pred

    def _keras_loss_compiled(self) -> bool:
        """Whether the latest ``compile`` was given a loss. (Keras keeps ``self.loss`` from an earlier
        ``compile`` when a later one has none; its recorded compile config says what the latest one had.)"""
        cfg = getattr(self, "_compile_config", None)
        if cfg is not None and isinstance(getattr(cfg, "config", None), dict):
            return cfg.config.get("loss") is not None
        return self.loss is not None

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Compiled without a loss: the model's own loss (as in the PyTorch twin), labels from ``y`` or
        from a "labels" key of ``x``. Compiled with a Keras loss: that loss on the logits."""
        if self._keras_loss_compiled():
            return super().compute_loss(x, _labels_from(x, y), self._prediction(y_pred), sample_weight,
                                        training)
        if sample_weight is not None:
            raise ValueError("sample weights need a Keras loss: compile(loss=...)")
        if y is None and isinstance(y_pred, ModelOutput) and y_pred.get("loss") is not None:
            loss = y_pred.loss  # labels came in the input dict; the model computed its loss in call
        else:
            labels = _labels_from(x, y)
            if labels is None:
                raise ValueError("no labels: pass y to fit() or a 'labels' key in the inputs, "
                                 "or compile with a Keras loss")
            loss = self.hf_compute_loss(labels, self._prediction(y_pred))
        for extra in self.losses:
            loss = loss + tf.cast(tf.reduce_sum(extra), loss.dtype)
        # Per-replica mean; gradients are summed over replicas.
        return loss / tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, loss.dtype)

    # Heads whose labels mark positions without a target by -100 (token classification, MLM).
    _labels_ignore_index = False

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Compiled metrics on the logits. For token classification and MLM, only the positions with a target
        count (labels other than -100: not padding, BOS/EOS or unmasked residues), as in the model's own loss:
        metrics see those positions' labels [N] and logits [N, C] (and sample weights, per sequence [B] or per
        position [B, L], at those positions)."""
        labels = _labels_from(x, y)
        logits = self._prediction(y_pred)
        if self._labels_ignore_index and labels is not None and getattr(self, "_compile_metrics", None) is not None:
            valid = tf.not_equal(labels, tf.cast(-100, labels.dtype))
            if sample_weight is not None:
                sw = tf.cast(sample_weight, "float32")
                # [B] -> [B, 1] ... -> the labels' shape
                sw = tf.reshape(sw, tf.concat([tf.shape(sw), tf.ones([tf.rank(labels) - tf.rank(sw)], tf.int32)], 0))
                sample_weight = tf.boolean_mask(tf.broadcast_to(sw, tf.shape(labels)), valid)
            labels, logits = tf.boolean_mask(labels, valid), tf.boolean_mask(logits, valid)
        return super().compute_metrics(x, labels, logits, sample_weight)

    # ---- Keras serialization and export --------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        base = super().get_config()
        out = {**base, "config": self.config.to_dict()}
        if self.get_base_model() is not self and not self.get_base_model().trainable:
            out["base_model_frozen"] = True  # freeze_base_model: .keras files keep it (and the optimizer's slots)
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        config = dict(config)
        frozen = config.pop("base_model_frozen", False)
        model = cls(EsmConfig.from_dict(config.pop("config")), **config)
        if frozen:
            model.freeze_base_model()
        return model

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """A SavedModel for serving with endpoints ``serve(input_ids, attention_mask)`` -> dict of the
        output fields (``logits``, or ``last_hidden_state`` / ``pooler_output``) and
        ``predict_contacts(input_ids, attention_mask)`` -> ``{"contacts": [B, N, N]}``; int32 [B, L]."""
        if format != "tf_saved_model":
            return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature,
                                  **kwargs)
        archive = keras.export.ExportArchive()
        archive.track(self)
        spec = input_signature or [tf.TensorSpec([None, None], tf.int32, name="input_ids"),
                                   tf.TensorSpec([None, None], tf.int32, name="attention_mask")]

        def serve(input_ids, attention_mask):
            return self(input_ids=input_ids, attention_mask=attention_mask, training=False).to_dict()

        def contacts(input_ids, attention_mask):
            return {"contacts": self.predict_contacts(input_ids, attention_mask)}

        archive.add_endpoint("serve", serve, input_signature=spec)
        archive.add_endpoint("predict_contacts", contacts, input_signature=spec)
        archive.write_out(filepath, verbose=True if verbose is None else verbose)


# ================================================================================================
# Output structures for tf.nest and Keras' tree
# ================================================================================================


def _flatten_output(out: ModelOutput):
    keys = tuple(out.keys())
    return tuple(getattr(out, k) for k in keys), keys


def _tf_flatten(self):
    children, keys = _flatten_output(self)
    return keys, children


def _tf_unflatten(cls, keys, children):
    return cls(**dict(zip(keys, children)))


def _register_outputs() -> None:
    import optree

    for cls in (BaseModelOutputWithPooling, MaskedLMOutput, SequenceClassifierOutput, TokenClassifierOutput):
        if "__tf_flatten__" in vars(cls):
            continue
        cls.__tf_flatten__ = _tf_flatten
        cls.__tf_unflatten__ = classmethod(_tf_unflatten)
        optree.register_pytree_node(cls, _flatten_output,
                                    lambda keys, children, cls=cls: cls(**dict(zip(keys, children))),
                                    namespace="keras")


_register_outputs()


# ================================================================================================
# Models
# ================================================================================================


@_serializable
class TFEsmModel(TFEsmPreTrainedModel):
    """The ESM encoder. ``call`` returns ``last_hidden_state`` [B, L, D] (after the final LayerNorm)."""

    def __init__(self, config: EsmConfig, add_pooling_layer: bool = False, **kwargs):
        super().__init__(config, **kwargs)
        self.add_pooling_layer = add_pooling_layer
        self.embeddings = TFEsmEmbeddings(config, name="embeddings", dtype=self.dtype_policy)
        self.encoder = TFEsmEncoder(config, name="encoder", dtype=self.dtype_policy)
        self.pooler = (TFEsmPooler(config, name="pooler", dtype=self.dtype_policy)
                       if add_pooling_layer else None)
        self.contact_head = TFEsmContactPredictionHead(
            config.num_hidden_layers * config.num_attention_heads, eos_idx=config.eos_token_id or 2,
            initializer_range=config.initializer_range, name="contact_head",
            dtype=_fp32_policy(self.dtype_policy))
        self.post_init()

    def get_input_embeddings(self) -> keras.layers.Embedding:
        return self.embeddings.word_embeddings

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "add_pooling_layer": self.add_pooling_layer}

    def call(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        output_hidden_states=False,
        output_attentions=False,
        return_dict=True,
        training=False,
    ) -> BaseModelOutputWithPooling:
        """input_ids [B, L]; attention_mask [B, L] (1 real, 0 padding; default: input_ids != pad).
        ``input_ids`` may also be a dict with these keys."""
        inputs = _unpack_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        position_ids, inputs_embeds = inputs["position_ids"], inputs["inputs_embeds"]
        checks = self._check_inputs(input_ids, attention_mask, inputs_embeds)
        if checks:  # inside a tf.function: the lookups wait for the checks
            with tf.control_dependencies(checks):
                if input_ids is not None:
                    input_ids = tf.identity(input_ids)
                else:
                    inputs_embeds = tf.identity(inputs_embeds)
        x = input_ids if input_ids is not None else inputs_embeds
        B, L = _dims(x)[:2]
        if attention_mask is None:
            if input_ids is not None:
                attention_mask = tf.not_equal(input_ids, tf.cast(self.config.pad_token_id, input_ids.dtype))
            else:
                attention_mask = tf.ones((B, L), tf.int32)
        if position_ids is None and self.config.position_embedding_type == "absolute":
            if input_ids is not None:
                position_ids = learned_position_ids(input_ids, self.config.pad_token_id)
            else:
                # [B, L]
                position_ids = tf.broadcast_to(tf.range(L), (B, L)) + self.config.pad_token_id + 1
        if position_ids is None:
            # Rotary positions: 0..L-1 ([L], broadcast over the batch).
            positions = tf.range(L)
        else:
            positions = position_ids
        embedding_output = self.embeddings(input_ids, attention_mask, position_ids, inputs_embeds,
                                           training=training)
        # [B, 1, 1, L] additive bias: 0 for real keys, the dtype's minimum for padding.
        neg = _dtype_min(self.compute_dtype)
        attention_bias = (1.0 - tf.cast(attention_mask[:, None, None, :], self.compute_dtype)) * neg
        sequence_output, hidden_states, attentions = self.encoder(
            embedding_output, attention_bias, positions, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, training=training)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(sequence_output, pooled, hidden_states, attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None) -> tf.Tensor:
        """Contact probabilities [B, N, N] over residues (BOS/EOS dropped; N = L - 2)."""
        input_ids = tf.convert_to_tensor(input_ids)
        if attention_mask is None:
            attention_mask = tf.not_equal(input_ids, tf.cast(self.config.pad_token_id, input_ids.dtype))
        attns = self(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        # [B, layers, H, L, L]
        attns = tf.stack(attns, axis=1)
        m = tf.cast(attention_mask, attns.dtype)
        # Attention to and from padding is zeroed, as in the original model: [B, 1, 1, L, L], one pass.
        attns = attns * (m[:, :, None] * m[:, None, :])[:, None, None]
        return self.contact_head(input_ids, attns)


@_serializable
class TFEsmLMHead(keras.layers.Layer):
    """dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings unless the config says
    ``tie_word_embeddings=False``, as in transformers) + bias."""

    def __init__(self, config: EsmConfig, word_embeddings: keras.layers.Embedding, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(config.hidden_size, config, "dense", self)
        self.layer_norm = _layer_norm(config, "layer_norm", self)
        if config.tie_word_embeddings:
            # Tied: the word-embedding layer itself, used transposed (its variable keeps its encoder name).
            self.decoder = word_embeddings
        else:
            # Untied (tie_word_embeddings=False): a Dense without bias, hub name lm_head.decoder.weight.
            self.decoder = keras.layers.Dense(config.vocab_size, use_bias=False, kernel_initializer=_normal(config),
                                              name="decoder", dtype=self.dtype_policy)

    def build(self, input_shape=None):
        self.dense.build([None, None, self.config.hidden_size])
        self.layer_norm.build([None, None, self.config.hidden_size])
        if not self.config.tie_word_embeddings:
            self.decoder.build([None, None, self.config.hidden_size])
        self.bias = self.add_weight(name="bias", shape=(self.config.vocab_size,), initializer="zeros")

    def call(self, features):
        x = self.layer_norm(gelu(self.dense(features)))
        x = tf.cast(x, self.compute_dtype)
        if not self.config.tie_word_embeddings:
            return self.decoder(x) + tf.cast(self.bias, self.compute_dtype)
        # [B, L, V]
        logits = tf.einsum("bld,vd->blv", x, tf.cast(self.decoder.embeddings, self.compute_dtype))
        return logits + tf.cast(self.bias, self.compute_dtype)


_EXCEPTION_NAMES[TFEsmLMHead] = {"bias": ("bias", False)}


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor, ignore_index: int = -100) -> tf.Tensor:
    """Mean cross entropy over the labels that are not ``ignore_index`` (torch's ``F.cross_entropy``);
    logits [*, C], labels [*]; computed in float32."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_index)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.where(valid, labels, 0), logits=logits)
    weights = tf.cast(valid, tf.float32)
    return tf.reduce_sum(losses * weights) / tf.reduce_sum(weights)


def mse_loss(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.square(tf.cast(x, tf.float32) - tf.cast(y, tf.float32)))


def binary_cross_entropy_with_logits(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32),
                                                                   logits=tf.cast(logits, tf.float32)))


def _squeeze_last(x: tf.Tensor) -> tf.Tensor:
    """torch's ``squeeze(-1)``: drops the last axis only when it is (statically) 1."""
    return tf.squeeze(x, -1) if x.shape.rank and x.shape[-1] == 1 else x


@_serializable
class TFEsmForMaskedLM(TFEsmPreTrainedModel):
    _labels_ignore_index = True

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.esm = TFEsmModel(config, name="esm", dtype=self.dtype_policy)
        self.lm_head = TFEsmLMHead(config, self.esm.embeddings.word_embeddings, name="lm_head",
                                   dtype=self.dtype_policy)
        self.post_init()

    def hf_compute_loss(self, labels, logits):
        return cross_entropy(tf.reshape(logits, (-1, self.config.vocab_size)), tf.reshape(labels, (-1,)))

    def call(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
             output_hidden_states=False, output_attentions=False, return_dict=True, training=False
             ) -> MaskedLMOutput:
        """labels [B, L] with -100 where no loss is taken. ``input_ids`` may be a dict of the inputs."""
        inputs = _unpack_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, labels=labels)
        labels = inputs.pop("labels")
        outputs = self.esm(**inputs, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, training=training)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.hf_compute_loss(labels, logits)
        out = MaskedLMOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        return self.esm.predict_contacts(input_ids, attention_mask)


@_serializable
class TFEsmClassificationHead(keras.layers.Layer):
    """<cls> state -> dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(config.hidden_size, config, "dense", self)
        self.dropout = _dropout(config.hidden_dropout_prob, self)
        self.out_proj = _dense(config.num_labels, config, "out_proj", self)

    def build(self, input_shape=None):
        self.dense.build([None, self.config.hidden_size])
        self.out_proj.build([None, self.config.hidden_size])

    def call(self, features, training=False):
        x = self.dropout(features[:, 0, :], training=training)
        x = self.dropout(tf.tanh(self.dense(x)), training=training)
        return self.out_proj(x)


def sequence_classification_loss(config: EsmConfig, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """HF's rule: regression (num_labels 1), single-label (integer labels) or multi-label (float)."""
    problem_type = config.problem_type
    if problem_type is None:
        if config.num_labels == 1:
            problem_type = "regression"
        elif labels.dtype.is_integer:
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        # Labels take the logits' shape ([B] for one label, [B, k]), checked at run time: [B] against [B, 1]
        # must not broadcast to [B, B] when Keras hands labels of unknown rank (a mismatch fails instead).
        logits = _squeeze_last(logits) if config.num_labels == 1 else logits
        return mse_loss(logits, tf.reshape(labels, tf.shape(logits)))
    if problem_type == "single_label_classification":
        return cross_entropy(tf.reshape(logits, (-1, config.num_labels)), tf.reshape(labels, (-1,)))
    return binary_cross_entropy_with_logits(logits, labels)


@_serializable
class TFEsmForSequenceClassification(TFEsmPreTrainedModel):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.num_labels = config.num_labels
        self.esm = TFEsmModel(config, name="esm", dtype=self.dtype_policy)
        self.classifier = TFEsmClassificationHead(config, name="classifier", dtype=self.dtype_policy)
        self.post_init()

    def hf_compute_loss(self, labels, logits):
        return sequence_classification_loss(self.config, logits, labels)

    def call(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
             output_hidden_states=False, output_attentions=False, return_dict=True, training=False
             ) -> SequenceClassifierOutput:
        """labels [B] (class ids or regression targets) or [B, num_labels] (multi-label / regression)."""
        inputs = _unpack_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, labels=labels)
        labels = inputs.pop("labels")
        outputs = self.esm(**inputs, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, training=training)
        logits = self.classifier(outputs.last_hidden_state, training=training)
        loss = self.hf_compute_loss(labels, logits) if labels is not None else None
        out = SequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        return self.esm.predict_contacts(input_ids, attention_mask)


@_serializable
class TFEsmForTokenClassification(TFEsmPreTrainedModel):
    _labels_ignore_index = True

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.num_labels = config.num_labels
        self.esm = TFEsmModel(config, name="esm", dtype=self.dtype_policy)
        self.dropout = _dropout(config.hidden_dropout_prob, self)
        self.classifier = _dense(config.num_labels, config, "classifier", self)
        self.post_init()

    def build(self, input_shape=None):
        self.classifier.build([None, None, self.config.hidden_size])
        super().build(input_shape)

    def hf_compute_loss(self, labels, logits):
        return cross_entropy(tf.reshape(logits, (-1, self.num_labels)), tf.reshape(labels, (-1,)))

    def call(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
             output_hidden_states=False, output_attentions=False, return_dict=True, training=False
             ) -> TokenClassifierOutput:
        """labels [B, L] with -100 where no loss is taken (BOS/EOS/padding)."""
        inputs = _unpack_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, labels=labels)
        labels = inputs.pop("labels")
        outputs = self.esm(**inputs, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, training=training)
        logits = self.classifier(self.dropout(outputs.last_hidden_state, training=training))
        loss = None
        if labels is not None:
            loss = self.hf_compute_loss(labels, logits)
        out = TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        return self.esm.predict_contacts(input_ids, attention_mask)
