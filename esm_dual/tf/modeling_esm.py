"""ESM-1b / ESM-1v / ESM-2 in Keras 3 (TensorFlow, JAX and PyTorch backends): TFEsmModel and its task heads.

Twin of ``esm_dual/pt/modeling_esm.py``: same classes (``TF`` prefix), same argument order, same
statement order; ``tests/tf/test_twins.py`` checks the classes, methods and attribute names. Written in
``keras.ops``, so the same classes run on every Keras backend. Layers carry the hub's names through
``name=`` and one generic walk (``hub_names.hub_variable_map``) maps every Keras variable onto its hub
tensor name, so both frameworks read and write the same ``config.json`` + ``model.safetensors``.

Around the twin, in their own modules: layer factories and the serializable base (``layers``), framework
idioms and value checks (``ops``), hub naming (``hub_names``), losses (``losses``), output registration
(``outputs``) and the Keras integration (``keras_integration``: ``fit`` with the model's own loss, metrics,
serialization, SavedModel export).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import keras
import numpy as np
from keras import ops

from ..common.config import EsmConfig, with_recorded_dtype
from ..io.dtypes import weights_dtype
from ..io.schema import LoadingError, check_finite, checkpoint_has_pooler, match_state, rotary_inv_freq
from .hub_names import child_layers, hub_names, hub_variable_map
from .keras_integration import KerasModelMixin, unpack_inputs
from .layers import (
    ConfigLayer,
    dense,
    dropout,
    embedding,
    fp32_policy,
    init_skipped,
    layer_norm,
    normal_initializer,
    serializable,
    skip_init,
)
from .losses import binary_cross_entropy_with_logits, cross_entropy, mse_loss, squeeze_last
from .ops import (
    attention_probs,
    concrete_numpy,
    device_scope,
    dims,
    dtype_min,
    id_error,
    is_integer,
    mask_error,
    masked_fill,
    poison_rows,
    safe_ids,
    scaled_dot_product_attention,
    traced_value_checks,
)
from .outputs import (
    TFBaseModelOutputWithPooling,
    TFMaskedLMOutput,
    TFSequenceClassifierOutput,
    TFTokenClassifierOutput,
    register_outputs,
)

logger = logging.getLogger("esm_dual")

MASK_RATIO_TRAIN = 0.15 * 0.8  # the masking ratio of every ESM training run (token dropout)


# ================================================================================================
# Helpers (same names in the PyTorch twin)
# ================================================================================================


def gelu(x):
    """Exact erf GELU, as in the original ESM code (x * 0.5 * (1 + erf(x / sqrt(2)))); written out, it
    runs about twice as fast as the fused op of TensorFlow on the CPU."""
    return x * 0.5 * (1.0 + ops.erf(x / math.sqrt(2.0)))


def apply_rotary(x, cos, sin):
    """Half-rotation rotary: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].

    x [B, L, H, K]; cos, sin [*, L, 1, K/2]. Same result as ``x * cat(cos, cos) + rotate_half(x) *
    cat(sin, sin)`` without materialising the rotated copy.
    """
    x1, x2 = ops.split(x, 2, axis=-1)
    return ops.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


def symmetrize(x):
    """Make the last two dimensions symmetric (contact prediction)."""
    return x + ops.swapaxes(x, -1, -2)


def average_product_correct(x):
    """Average product correction (APC) over the last two dimensions (contact prediction)."""
    a1 = ops.sum(x, -1, keepdims=True)
    a2 = ops.sum(x, -2, keepdims=True)
    a12 = ops.sum(x, (-1, -2), keepdims=True)
    # (a1 / a12) * a2: one full-size temporary fewer than a1 * a2 / a12
    return x - (a1 / a12) * a2


def symmetric_apc_regression(x, weight, bias):
    """Contact logits ``sum_c w_c * APC(symmetrize(x_c)) + b`` without building either full-size map.

    x [B, C, N, N]; weight [C]; bias [] -> [B, N, N]. With s = x + x^T: rowsum(s) = colsum(s) = u =
    rowsum(x) + colsum(x) and sum(s) = 2 sum(x), so sum_c w_c APC(s_c) = Y + Y^T - sum_c w_c u_c u_c^T /
    (2 sum(x_c)) with Y = sum_c w_c x_c: one pass over x instead of five.
    """
    # [B, N, N]
    y = ops.einsum("bcnm,c->bnm", x, weight)
    # [B, C, N]
    u = ops.sum(x, -1) + ops.sum(x, -2)
    # [B, C]
    scale = weight / (2 * ops.sum(x, (-1, -2)))
    # [B, N, N]
    corr = ops.einsum("bcn,bcm->bnm", u * scale[..., None], u)
    return y + ops.swapaxes(y, -1, -2) - corr + bias


# ================================================================================================
# Embeddings and positions
# ================================================================================================


@serializable
class TFEsmEmbeddings(ConfigLayer):
    """Token embeddings, token dropout, learned positions (ESM-1b/1v) and the optional LayerNorm."""

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.word_embeddings = embedding(config.vocab_size, config, "word_embeddings", self)
        if config.emb_layer_norm_before:
            self.layer_norm = layer_norm(config, "layer_norm", self)
        else:
            self.layer_norm = None
        self.position_embedding_type = config.position_embedding_type
        if self.position_embedding_type == "absolute":
            self.position_embeddings = embedding(config.max_position_embeddings, config, "position_embeddings",
                                                 self)
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
            is_mask = ops.expand_dims(ops.equal(input_ids, self.mask_token_id), -1)
            embeddings = masked_fill(embeddings, is_mask, 0.0)
            src_lengths = ops.sum(ops.cast(attention_mask, "float32"), -1)
            mask_ratio_observed = ops.sum(ops.cast(is_mask[..., 0], "float32"), -1) / src_lengths
            scale = (1 - MASK_RATIO_TRAIN) / (1 - mask_ratio_observed)
            embeddings = ops.cast(ops.cast(embeddings, "float32") * scale[:, None, None], inputs_embeds.dtype)
        if self.position_embedding_type == "absolute":
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        embeddings = embeddings * ops.expand_dims(ops.cast(attention_mask, embeddings.dtype), -1)
        return embeddings


def learned_position_ids(input_ids, padding_idx: int):
    """ESM-1b/1v positions: cumsum(mask) * mask + padding_idx, so padding keeps padding_idx."""
    mask = ops.cast(ops.not_equal(input_ids, padding_idx), "int32")
    return ops.cumsum(mask, axis=1) * mask + padding_idx


@serializable
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

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dim": self.dim, "base": self.base}

    def call(self, q, k, positions, q_scale: float = 1.0):
        """q, k [B, L, H, K]; positions [B, L] or [L] -> rotated q (times q_scale), k; computed in fp32."""
        # [B, L, K/2] or [L, K/2]
        freqs = ops.cast(positions, "float32")[..., None] * ops.cast(self.inv_freq, "float32")
        # [B, L, 1, K/2] or [L, 1, K/2]: broadcast over the heads
        freqs = ops.expand_dims(freqs, -2)
        cos, sin = ops.cos(freqs), ops.sin(freqs)
        q_out = apply_rotary(ops.cast(q, "float32"), cos * q_scale, sin * q_scale)
        k_out = apply_rotary(ops.cast(k, "float32"), cos, sin)
        return ops.cast(q_out, q.dtype), ops.cast(k_out, k.dtype)


hub_names(TFEsmRotaryEmbedding, {"inv_freq": ("inv_freq", False)})


# ================================================================================================
# Transformer layer
# ================================================================================================


@serializable
class TFEsmSelfAttention(ConfigLayer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = dense(config.hidden_size, config, "query", self)
        self.key = dense(config.hidden_size, config, "key", self)
        self.value = dense(config.hidden_size, config, "value", self)
        self.dropout_prob = config.attention_probs_dropout_prob
        self.dropout = dropout(config.attention_probs_dropout_prob, self)
        self.rotary_embeddings = (
            TFEsmRotaryEmbedding(self.attention_head_size, config.rope_theta, name="rotary_embeddings",
                                 dtype=self.dtype_policy)
            if config.use_rotary else None
        )

    def build(self, input_shape=None):
        for layer in (self.query, self.key, self.value):
            layer.build([None, None, self.config.hidden_size])
        if self.rotary_embeddings is not None:
            self.rotary_embeddings.build()

    def _heads(self, x):
        B, L, _ = dims(x)
        # [B, L, D] -> [B, L, H, K]: Keras' attention layout (the PyTorch twin transposes to [B, H, L, K])
        return ops.reshape(x, (B, L, self.num_attention_heads, self.attention_head_size))

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
            probs = attention_probs(q, k, attention_bias)
            # [B, L, H, K]
            context = ops.einsum("bhlm,bmhk->blhk", self.dropout(probs, training=training), v)
        else:
            probs = None
            # [B, L, H, K]; scale=1 because the query is already scaled.
            context = scaled_dot_product_attention(q, k, v, attention_bias, self.dropout, training)
        B, L, H, K = dims(context)
        # [B, L, H, K] -> [B, L, D]
        context = ops.reshape(context, (B, L, H * K))
        return context, probs


@serializable
class TFEsmSelfOutput(ConfigLayer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.dense = dense(config.hidden_size, config, "dense", self)
        self.dropout = dropout(config.hidden_dropout_prob, self)

    def build(self, input_shape=None):
        self.dense.build([None, None, self.config.hidden_size])

    def call(self, hidden_states, input_tensor, training=False):
        return self.dropout(self.dense(hidden_states), training=training) + input_tensor


@serializable
class TFEsmAttention(ConfigLayer):
    """Pre-LN self-attention block: x + dropout(out(attn(LN(x))))."""

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.self = TFEsmSelfAttention(config, name="self", dtype=self.dtype_policy)
        # ``output`` is a read-only Keras property: the attribute differs, the hub name does not.
        self.output_layer = TFEsmSelfOutput(config, name="output", dtype=self.dtype_policy)
        self.LayerNorm = layer_norm(config, "LayerNorm", self)

    def build(self, input_shape=None):
        self.self.build()
        self.output_layer.build()
        self.LayerNorm.build([None, None, self.config.hidden_size])

    def call(self, hidden_states, attention_bias, positions, output_attentions=False, training=False):
        context, probs = self.self(self.LayerNorm(hidden_states), attention_bias, positions,
                                   output_attentions=output_attentions, training=training)
        return self.output_layer(context, hidden_states, training=training), probs


@serializable
class TFEsmIntermediate(ConfigLayer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.dense = dense(config.intermediate_size, config, "dense", self)

    def build(self, input_shape=None):
        self.dense.build([None, None, self.config.hidden_size])

    def call(self, hidden_states):
        return gelu(self.dense(hidden_states))


@serializable
class TFEsmOutput(ConfigLayer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.dense = dense(config.hidden_size, config, "dense", self)
        self.dropout = dropout(config.hidden_dropout_prob, self)

    def build(self, input_shape=None):
        self.dense.build([None, None, self.config.intermediate_size])

    def call(self, hidden_states, input_tensor, training=False):
        return self.dropout(self.dense(hidden_states), training=training) + input_tensor


@serializable
class TFEsmLayer(ConfigLayer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.attention = TFEsmAttention(config, name="attention", dtype=self.dtype_policy)
        self.intermediate = TFEsmIntermediate(config, name="intermediate", dtype=self.dtype_policy)
        self.output_layer = TFEsmOutput(config, name="output", dtype=self.dtype_policy)
        self.LayerNorm = layer_norm(config, "LayerNorm", self)

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


@serializable
class TFEsmEncoder(ConfigLayer):
    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.layer = [TFEsmLayer(config, name=f"layer_{i}", dtype=self.dtype_policy)
                      for i in range(config.num_hidden_layers)]
        self.emb_layer_norm_after = layer_norm(config, "emb_layer_norm_after", self)

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


@serializable
class TFEsmPooler(ConfigLayer):
    """HF's pooler (dense + tanh on the <cls> state); present only when a checkpoint has one."""

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.dense = dense(config.hidden_size, config, "dense", self)

    def build(self, input_shape=None):
        self.dense.build([None, self.config.hidden_size])

    def call(self, hidden_states):
        return ops.tanh(self.dense(hidden_states[:, 0]))


@serializable
class TFEsmContactPredictionHead(keras.layers.Layer):
    """Logistic regression over symmetrized, APC-corrected attention maps of all layers."""

    def __init__(self, in_features: int, eos_idx: int = 2, initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.in_features = in_features
        self.initializer_range = initializer_range
        self.eos_idx = eos_idx
        self.regression = keras.layers.Dense(1, kernel_initializer=normal_initializer(initializer_range),
                                             name="regression", dtype=self.dtype_policy)

    def build(self, input_shape=None):
        self.regression.build([None, None, None, self.in_features])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "in_features": self.in_features, "eos_idx": self.eos_idx,
                "initializer_range": self.initializer_range}

    def call(self, tokens, attentions):
        """tokens [B, L]; attentions [B, layers, H, L, L] with padding zeroed -> contacts [B, N, N]."""
        eos_mask = ops.cast(ops.not_equal(tokens, self.eos_idx), attentions.dtype)
        # [B, L, L]
        eos_mask = eos_mask[:, None, :] * eos_mask[:, :, None]
        attentions = attentions * eos_mask[:, None, None, :, :]
        # Drop the last position (EOS or padding) and BOS: [B, layers, H, N, N].
        attentions = attentions[..., :-1, :-1][..., 1:, 1:]
        B, layers, H, N, _ = dims(attentions)
        # [B, layers * H, N, N]
        attentions = ops.cast(ops.reshape(attentions, (B, layers * H, N, N)), self.compute_dtype)
        # symmetrize -> APC -> logistic regression over the layers * H channels, in one pass.
        kernel = ops.cast(self.regression.kernel, self.compute_dtype)
        bias = ops.cast(self.regression.bias, self.compute_dtype)
        logits = symmetric_apc_regression(attentions, kernel[:, 0], bias[0])
        return ops.sigmoid(logits)


# ================================================================================================
# Base class: init, loading, saving
# ================================================================================================


class TFEsmPreTrainedModel(KerasModelMixin, keras.Model):
    config_class = EsmConfig
    base_model_prefix = "esm"
    main_input_name = "input_ids"

    def __init__(self, config: EsmConfig, **kwargs):
        if not isinstance(config, EsmConfig):
            raise TypeError(f"{type(self).__name__} takes an EsmConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set")
        register_outputs()
        super().__init__(**kwargs)
        self.config = config
        self.name_or_path = ""

    # ---- init ----------------------------------------------------------------------------------
    def _init_weights(self, name: str, var: keras.Variable) -> None:
        """Fresh value of one variable (hub name ``name``), as ``_init_weights`` of the PyTorch twin."""
        if name.endswith("rotary_embeddings.inv_freq"):
            value = rotary_inv_freq(self.config.head_dim, self.config.rope_theta)
        elif var.name in ("kernel", "embeddings"):
            value = keras.initializers.RandomNormal(0.0, self.config.initializer_range)(var.shape)
        elif var.name == "gamma":
            value = np.ones(var.shape, np.float32)
        else:
            value = np.zeros(var.shape, np.float32)
        var.assign(ops.cast(value, var.dtype))

    def post_init(self) -> None:
        """Create every variable now (the model is built at construction) and zero the padding rows."""
        self.build()
        if not init_skipped():
            embeddings = self.get_base_model().embeddings
            for layer in (embeddings.word_embeddings, getattr(embeddings, "position_embeddings", None)):
                if layer is not None:
                    w = np.array(ops.convert_to_numpy(layer.embeddings))
                    w[self.config.pad_token_id] = 0
                    layer.embeddings.assign(w)

    def build(self, input_shape=None):
        for layer in child_layers(self):
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

    def get_input_embeddings(self) -> keras.layers.Embedding:
        return self.get_base_model().embeddings.word_embeddings

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
        huggingface_hub), ``device_map`` (a device such as "cpu" or "gpu:0", built under ``keras.device``;
        "auto" keeps Keras' placement) and ``attn_implementation`` ("auto", "sdpa" or "eager": the one attention
        path here). Any other argument that is not a config field is an error naming it; none reaches the config.
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

        ``dtype``: a Keras dtype policy (``"float32"``, ``"mixed_bfloat16"``, ...); ``device``: a device to build
        under (``keras.device``: "cpu:0", "gpu:0"; TensorFlow names such as "/GPU:0" too); ``config`` replaces the
        checkpoint's; ``overrides`` are config fields and, for ``TFEsmModel``, ``add_pooling_layer`` (default:
        whether the checkpoint has a pooler). NaN or infinite weights are refused by name.
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
        with device_scope(device), skip_init():
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
            self._init_weights(name, own[name][0])
        return result.messages

    # ---- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int | str | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` in the hub layout (readable by transformers,
        fair-esm converters and ``esm_dual.pt``)."""
        from ..io.hub import save_checkpoint

        cfg = self.config.copy(architectures=[type(self).__name__[2:]])
        tensors = {}
        for name, (var, transposed) in self._hub_state().items():
            arr = ops.convert_to_numpy(var)
            tensors[name] = np.ascontiguousarray(arr.T if transposed else arr)
        dtype = weights_dtype(tensors)  # recorded as transformers 5 records it
        if dtype is not None:
            cfg = with_recorded_dtype(cfg, dtype)
        save_checkpoint(directory, cfg, tensors, max_shard_size=max_shard_size)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "5GB") -> Any:
        """Upload the model (``config.json`` + safetensors, as ``save_pretrained`` writes them) to the HF hub
        through ``huggingface_hub``, creating the repo if needed; returns the commit info."""
        from ..common.hf_hub import push_folder_to_hub

        return push_folder_to_hub(lambda d: self.save_pretrained(d, max_shard_size=max_shard_size), repo_id,
                                  commit_message=commit_message, private=private, token=token, revision=revision,
                                  create_pr=create_pr)

    # ---- input checks ---------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, inputs_embeds):
        """Static checks always; value checks (token ids in the vocabulary, a row of ``attention_mask`` with
        no attended token) at once on concrete values, or in the traced graph (``ops.traced_value_checks``).
        Returns ``(input_ids, bad_rows)``: ids clipped for the lookups where traced and the rows to poison
        (None when the values were checked here)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = input_ids if input_ids is not None else inputs_embeds
        shape = tuple(x.shape)
        if len(shape) < 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {shape}")
        B, L = shape[0], shape[1]
        if B == 0 or L == 0:
            raise ValueError(f"empty batch: input shape {shape}")
        if input_ids is not None and not is_integer(input_ids):
            dtype = keras.backend.standardize_dtype(input_ids.dtype)
            raise TypeError(f"input_ids must be integer token ids, got {dtype}")
        if attention_mask is not None:
            ms = tuple(attention_mask.shape)
            if len(ms) != 2 or any(a is not None and b is not None and a != b for a, b in zip(ms, (B, L))):
                raise ValueError(f"attention_mask has shape {ms}, input_ids {(B, L)}")
        limit = self.config.max_sequence_positions
        too_long = (f"this model uses learned positions and takes at most {limit} tokens ({limit - 2 if limit else 0} "
                    "residues + BOS/EOS); got a longer batch. Truncate the sequences.")
        if limit is not None and L is not None and L > limit:
            raise ValueError(too_long.replace("a longer batch", f"a batch of length {L}"))
        if keras.backend.is_keras_tensor(x):  # symbolic build: no values
            return input_ids, None
        ids = concrete_numpy(input_ids)
        mask = concrete_numpy(attention_mask)
        if ids is not None or input_ids is None:
            if ids is not None and (err := id_error(ids, self.config.vocab_size)):
                raise ValueError(err)
            if mask is not None or attention_mask is None:
                if mask is not None and (err := mask_error(mask)):
                    raise ValueError(err)
                return input_ids, None
        input_ids, bad_rows = traced_value_checks(input_ids, attention_mask, self.config.vocab_size, True,
                                                  max_length=limit, length_message=too_long)
        if input_ids is not None:
            input_ids = safe_ids(input_ids, self.config.vocab_size)
        return input_ids, bad_rows


# ================================================================================================
# Models
# ================================================================================================


@serializable
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
            dtype=fp32_policy(self.dtype_policy))
        self.post_init()

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
    ) -> TFBaseModelOutputWithPooling:
        """input_ids [B, L]; attention_mask [B, L] (1 real, 0 padding; default: input_ids != pad).
        ``input_ids`` may also be a dict with these keys."""
        inputs = unpack_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        position_ids, inputs_embeds = inputs["position_ids"], inputs["inputs_embeds"]
        x = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None and input_ids is not None:
            attention_mask = ops.not_equal(input_ids, self.config.pad_token_id)
        input_ids, bad_rows = self._check_inputs(input_ids, attention_mask, inputs_embeds)
        B, L = dims(x)[:2]
        if attention_mask is None:
            attention_mask = ops.ones((B, L), "int32")
        if position_ids is None and self.config.position_embedding_type == "absolute":
            if input_ids is not None:
                position_ids = learned_position_ids(input_ids, self.config.pad_token_id)
            else:
                # [B, L]
                position_ids = ops.broadcast_to(ops.arange(L), (B, L)) + self.config.pad_token_id + 1
        if position_ids is None:
            # Rotary positions: 0..L-1 ([L], broadcast over the batch).
            positions = ops.arange(L)
        else:
            positions = position_ids
        embedding_output = self.embeddings(input_ids, attention_mask, position_ids, inputs_embeds,
                                           training=training)
        # Traced inputs that failed a check where no op can raise (XLA): NaN rows, never silent numbers.
        embedding_output = poison_rows(embedding_output, bad_rows)
        # [B, 1, 1, L] additive bias: 0 for real keys, the dtype's minimum for padding.
        neg = dtype_min(self.compute_dtype)
        attention_bias = (1.0 - ops.cast(attention_mask[:, None, None, :], self.compute_dtype)) * neg
        sequence_output, hidden_states, attentions = self.encoder(
            embedding_output, attention_bias, positions, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, training=training)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        out = TFBaseModelOutputWithPooling(sequence_output, pooled, hidden_states, attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        """Contact probabilities [B, N, N] over residues (BOS/EOS dropped; N = L - 2)."""
        input_ids = ops.convert_to_tensor(input_ids)
        if attention_mask is None:
            attention_mask = ops.not_equal(input_ids, self.config.pad_token_id)
        attns = self(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        # [B, layers, H, L, L]
        attns = ops.stack(attns, axis=1)
        m = ops.cast(attention_mask, attns.dtype)
        # Attention to and from padding is zeroed, as in the original model: [B, 1, 1, L, L], one pass.
        attns = attns * (m[:, :, None] * m[:, None, :])[:, None, None]
        return self.contact_head(input_ids, attns)


@serializable
class TFEsmLMHead(ConfigLayer):
    """dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings unless the config says
    ``tie_word_embeddings=False``, as in transformers) + bias."""

    def __init__(self, config: EsmConfig, word_embeddings: keras.layers.Embedding | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.dense = dense(config.hidden_size, config, "dense", self)
        self.layer_norm = layer_norm(config, "layer_norm", self)
        if not config.tie_word_embeddings:
            # Untied (tie_word_embeddings=False): a Dense without bias, hub name lm_head.decoder.weight.
            self.decoder = dense(config.vocab_size, config, "decoder", self, use_bias=False)
        elif word_embeddings is not None:
            # Tied: the word-embedding layer itself, used transposed (its variable keeps its encoder name).
            self.decoder = word_embeddings
        else:
            # Tied, built alone (``from_config`` of the head by itself): an embedding table of its own.
            self.decoder = embedding(config.vocab_size, config, "decoder", self)

    def build(self, input_shape=None):
        self.dense.build([None, None, self.config.hidden_size])
        self.layer_norm.build([None, None, self.config.hidden_size])
        if not self.decoder.built:
            self.decoder.build([None, None, self.config.hidden_size] if not self.config.tie_word_embeddings
                               else None)
        self.bias = self.add_weight(name="bias", shape=(self.config.vocab_size,), initializer="zeros")

    def call(self, features):
        x = self.layer_norm(gelu(self.dense(features)))
        x = ops.cast(x, self.compute_dtype)
        if not self.config.tie_word_embeddings:
            return self.decoder(x) + ops.cast(self.bias, self.compute_dtype)
        # [B, L, V]
        logits = ops.einsum("bld,vd->blv", x, ops.cast(self.decoder.embeddings, self.compute_dtype))
        return logits + ops.cast(self.bias, self.compute_dtype)


hub_names(TFEsmLMHead, {"bias": ("bias", False)})


@serializable
class TFEsmForMaskedLM(TFEsmPreTrainedModel):
    _labels_ignore_index = True

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.esm = TFEsmModel(config, name="esm", dtype=self.dtype_policy)
        self.lm_head = TFEsmLMHead(config, self.esm.embeddings.word_embeddings, name="lm_head",
                                   dtype=self.dtype_policy)
        self.post_init()

    def hf_compute_loss(self, labels, logits):
        return cross_entropy(ops.reshape(logits, (-1, self.config.vocab_size)), ops.reshape(labels, (-1,)))

    def call(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
             output_hidden_states=False, output_attentions=False, return_dict=True, training=False
             ) -> TFMaskedLMOutput:
        """labels [B, L] with -100 where no loss is taken. ``input_ids`` may be a dict of the inputs."""
        inputs = unpack_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels)
        labels = inputs.pop("labels")
        outputs = self.esm(**inputs, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, training=training)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.hf_compute_loss(labels, logits)
        out = TFMaskedLMOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        return self.esm.predict_contacts(input_ids, attention_mask)


@serializable
class TFEsmClassificationHead(ConfigLayer):
    """<cls> state -> dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.dense = dense(config.hidden_size, config, "dense", self)
        self.dropout = dropout(config.hidden_dropout_prob, self)
        self.out_proj = dense(config.num_labels, config, "out_proj", self)

    def build(self, input_shape=None):
        self.dense.build([None, self.config.hidden_size])
        self.out_proj.build([None, self.config.hidden_size])

    def call(self, features, training=False):
        x = self.dropout(features[:, 0, :], training=training)
        x = self.dropout(ops.tanh(self.dense(x)), training=training)
        return self.out_proj(x)


def sequence_classification_loss(config: EsmConfig, logits, labels):
    """HF's rule: regression (num_labels 1), single-label (integer labels) or multi-label (float)."""
    problem_type = config.problem_type
    if problem_type is None:
        if config.num_labels == 1:
            problem_type = "regression"
        elif is_integer(labels):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        # Labels take the logits' shape ([B] for one label, [B, k]), checked at run time: [B] against [B, 1]
        # must not broadcast to [B, B] when Keras hands labels of unknown rank (a mismatch fails instead).
        logits = squeeze_last(logits) if config.num_labels == 1 else logits
        return mse_loss(logits, ops.reshape(labels, ops.shape(logits)))
    if problem_type == "single_label_classification":
        return cross_entropy(ops.reshape(logits, (-1, config.num_labels)), ops.reshape(labels, (-1,)))
    return binary_cross_entropy_with_logits(logits, labels)


@serializable
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
             ) -> TFSequenceClassifierOutput:
        """labels [B] (class ids or regression targets) or [B, num_labels] (multi-label / regression)."""
        inputs = unpack_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels)
        labels = inputs.pop("labels")
        outputs = self.esm(**inputs, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, training=training)
        logits = self.classifier(outputs.last_hidden_state, training=training)
        loss = self.hf_compute_loss(labels, logits) if labels is not None else None
        out = TFSequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        return self.esm.predict_contacts(input_ids, attention_mask)


@serializable
class TFEsmForTokenClassification(TFEsmPreTrainedModel):
    _labels_ignore_index = True

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(config, **kwargs)
        self.num_labels = config.num_labels
        self.esm = TFEsmModel(config, name="esm", dtype=self.dtype_policy)
        self.dropout = dropout(config.hidden_dropout_prob, self)
        self.classifier = dense(config.num_labels, config, "classifier", self)
        self.post_init()

    def build(self, input_shape=None):
        self.classifier.build([None, None, self.config.hidden_size])
        super().build(input_shape)

    def hf_compute_loss(self, labels, logits):
        return cross_entropy(ops.reshape(logits, (-1, self.num_labels)), ops.reshape(labels, (-1,)))

    def call(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
             output_hidden_states=False, output_attentions=False, return_dict=True, training=False
             ) -> TFTokenClassifierOutput:
        """labels [B, L] with -100 where no loss is taken (BOS/EOS/padding)."""
        inputs = unpack_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels)
        labels = inputs.pop("labels")
        outputs = self.esm(**inputs, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions, training=training)
        logits = self.classifier(self.dropout(outputs.last_hidden_state, training=training))
        loss = None
        if labels is not None:
            loss = self.hf_compute_loss(labels, logits)
        out = TFTokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        return self.esm.predict_contacts(input_ids, attention_mask)
