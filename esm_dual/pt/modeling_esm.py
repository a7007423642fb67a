"""ESM-1b / ESM-1v / ESM-2 in PyTorch: EsmModel and its task heads.

Module and attribute names follow the HF hub checkpoints, so a hub ``model.safetensors`` loads 1:1.
``esm_dual/tf/modeling_esm.py`` is the twin of this file: same classes, same statement order;
``tests/tf/test_twins.py`` checks the classes, methods and attribute names.

Around the twin, in their own modules: framework idioms and input checks (``ops``), the integration surface
that transformers' Trainer, PEFT and pipelines call and the helpers of hub loading and saving (``integration``:
``PreTrainedMixin``, a base of ``EsmPreTrainedModel``), the GPU fast path (``fast``) and the pytree
registration of the outputs (``pytree``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..common.config import EsmConfig, with_recorded_dtype
from ..common.outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from ..io.dtypes import torch_to_numpy
from ..io.schema import check_finite, checkpoint_has_pooler, match_state, rotary_inv_freq
from . import pytree  # noqa: F401  (registers the output dataclasses as torch pytree nodes)
from .integration import (
    PreTrainedMixin,
    attn_backend,
    auto_dtype,
    copy_numpy_into,
    device_from_map,
    split_save_kwargs,
    str_to_torch_dtype,
)
from .ops import as_tensor_input, check_attention_rows, is_compiling

logger = logging.getLogger("esm_dual")

MASK_RATIO_TRAIN = 0.15 * 0.8  # the masking ratio of every ESM training run (token dropout)


# ================================================================================================
# Helpers (same names in the TF twin)
# ================================================================================================


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact erf GELU, as in the original ESM code (x * 0.5 * (1 + erf(x / sqrt(2)))), one fused op."""
    return F.gelu(x, approximate="none")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-rotation rotary: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].

    x [B, H, L, K]; cos, sin [*, L, K/2]. Same result as ``x * cat(cos, cos) + rotate_half(x) *
    cat(sin, sin)`` without materialising the rotated copy.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def symmetrize(x: torch.Tensor) -> torch.Tensor:
    """Make the last two dimensions symmetric (contact prediction)."""
    return x + x.transpose(-1, -2)


def average_product_correct(x: torch.Tensor) -> torch.Tensor:
    """Average product correction (APC) over the last two dimensions (contact prediction)."""
    a1 = x.sum(-1, keepdim=True)
    a2 = x.sum(-2, keepdim=True)
    a12 = x.sum((-1, -2), keepdim=True)
    # (a1 / a12) * a2: one full-size temporary fewer than a1 * a2 / a12
    return x - (a1 / a12) * a2


def symmetric_apc_regression(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Contact logits ``sum_c w_c * APC(symmetrize(x_c)) + b`` without building either full-size map.

    x [B, C, N, N]; weight [C]; bias [] -> [B, N, N]. With s = x + x^T: rowsum(s) = colsum(s) = u =
    rowsum(x) + colsum(x) and sum(s) = 2 sum(x), so sum_c w_c APC(s_c) = Y + Y^T - sum_c w_c u_c u_c^T /
    (2 sum(x_c)) with Y = sum_c w_c x_c: one pass over x instead of five.
    """
    # [B, N, N]
    y = torch.einsum("bcnm,c->bnm", x, weight)
    # [B, C, N]
    u = x.sum(-1) + x.sum(-2)
    # [B, C]
    scale = weight / (2 * x.sum((-1, -2)))
    # [B, N, N]
    corr = torch.einsum("bcn,bcm->bnm", u * scale[..., None], u)
    return y + y.transpose(-1, -2) - corr + bias


# ================================================================================================
# Embeddings and positions
# ================================================================================================


class EsmEmbeddings(nn.Module):
    """Token embeddings, token dropout, learned positions (ESM-1b/1v) and the optional LayerNorm."""

    def __init__(self, config: EsmConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        if config.emb_layer_norm_before:
            self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.layer_norm = None
        self.position_embedding_type = config.position_embedding_type
        if self.position_embedding_type == "absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                    padding_idx=config.pad_token_id)
        self.padding_idx = config.pad_token_id
        self.token_dropout = config.token_dropout
        self.mask_token_id = config.mask_token_id

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, L], attention_mask [B, L] (1 = real token) -> embeddings [B, L, D]."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds
        if self.token_dropout and input_ids is not None:
            # <mask> embeddings are zeroed and the rest rescaled as if by input dropout at the
            # training ratio; the observed ratio counts real (unpadded) tokens only.
            is_mask = (input_ids == self.mask_token_id).unsqueeze(-1)
            embeddings = embeddings.masked_fill(is_mask, 0.0)
            src_lengths = attention_mask.sum(-1).to(torch.float32)
            mask_ratio_observed = is_mask.squeeze(-1).sum(-1).to(torch.float32) / src_lengths
            scale = (1 - MASK_RATIO_TRAIN) / (1 - mask_ratio_observed)
            embeddings = (embeddings * scale[:, None, None]).to(inputs_embeds.dtype)
        if self.position_embedding_type == "absolute":
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        embeddings = embeddings * attention_mask.unsqueeze(-1).to(embeddings.dtype)
        return embeddings


def learned_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """ESM-1b/1v positions: cumsum(mask) * mask + padding_idx, so padding keeps padding_idx."""
    mask = input_ids.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1) * mask).long() + padding_idx


class EsmRotaryEmbedding(nn.Module):
    """Rotary embeddings, half-rotation convention. ``inv_freq`` is loaded from the checkpoint
    (ESM-2 files store fp16-rounded values), never recomputed when present."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = torch.from_numpy(rotary_inv_freq(dim, base))
        self.register_buffer("inv_freq", inv_freq)

    def _apply(self, fn, recurse=True):
        # The table stays fp32 when the model is cast to fp16/bf16 (as HF keeps it): bf16 would round
        # the frequencies by up to 2^-9, a phase error of ~0.2 rad at position 1000.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if inv_freq.dtype == torch.float32 and self.inv_freq.dtype != torch.float32 and not inv_freq.is_meta:
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, q_scale: float = 1.0):
        """q, k [B, H, L, K]; positions [B, L] or [L] -> rotated q (times q_scale), k; computed in fp32."""
        # [B, L, K/2] or [L, K/2]
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(torch.float32)
        if freqs.dim() == 3:
            # [B, 1, L, K/2]
            freqs = freqs[:, None]
        cos, sin = freqs.cos(), freqs.sin()
        q_out = apply_rotary(q.to(torch.float32), cos * q_scale, sin * q_scale)
        k_out = apply_rotary(k.to(torch.float32), cos, sin)
        return q_out.to(q.dtype), k_out.to(k.dtype)


# ================================================================================================
# Transformer layer
# ================================================================================================


class EsmSelfAttention(nn.Module):
    def __init__(self, config: EsmConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob
        self.rotary_embeddings = (
            EsmRotaryEmbedding(self.attention_head_size, config.rope_theta) if config.use_rotary else None
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        # [B, L, H, K] -> [B, H, L, K]
        return x.view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor,
        positions: torch.Tensor | None,
        output_attentions: bool = False,
    ):
        """hidden_states [B, L, D]; attention_bias [B, 1, 1, L] additive (0 or -inf-like).

        Packed back end (``fast``): attention_bias is a ``fast.VarlenInfo`` (cu_seqlens, max_seqlen),
        hidden_states [T, D] and positions [T]; returns context [T, D] and no probabilities.
        """
        if not isinstance(attention_bias, torch.Tensor):
            from . import fast

            return fast.packed_self_attention(self, hidden_states, positions, attention_bias), None
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
        dropout_p = self.dropout_prob if self.training else 0.0
        if output_attentions:
            # [B, H, L, L]
            scores = torch.matmul(q, k.transpose(-1, -2)) + attention_bias
            probs = torch.softmax(scores.to(torch.float32), dim=-1).to(q.dtype)
            context = torch.matmul(F.dropout(probs, dropout_p, self.training), v)
        else:
            probs = None
            # [B, H, L, K]; scale=1 because the query is already scaled.
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias.to(q.dtype),
                                                     dropout_p=dropout_p, scale=1.0)
        B, H, L, K = context.shape
        # [B, H, L, K] -> [B, L, D]
        context = context.transpose(1, 2).reshape(B, L, H * K)
        return context, probs


class EsmSelfOutput(nn.Module):
    def __init__(self, config: EsmConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states)) + input_tensor


class EsmAttention(nn.Module):
    """Pre-LN self-attention block: x + dropout(out(attn(LN(x))))."""

    def __init__(self, config: EsmConfig):
        super().__init__()
        self.self = EsmSelfAttention(config)
        self.output = EsmSelfOutput(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, attention_bias, positions, output_attentions=False):
        context, probs = self.self(self.LayerNorm(hidden_states), attention_bias, positions, output_attentions)
        return self.output(context, hidden_states), probs


class EsmIntermediate(nn.Module):
    def __init__(self, config: EsmConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gelu(self.dense(hidden_states))


class EsmOutput(nn.Module):
    def __init__(self, config: EsmConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states)) + input_tensor


class EsmLayer(nn.Module):
    def __init__(self, config: EsmConfig):
        super().__init__()
        self.attention = EsmAttention(config)
        self.intermediate = EsmIntermediate(config)
        self.output = EsmOutput(config)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, attention_bias, positions, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, attention_bias, positions, output_attentions)
        layer_output = self.output(self.intermediate(self.LayerNorm(attention_output)), attention_output)
        return layer_output, probs


class EsmEncoder(nn.Module):
    def __init__(self, config: EsmConfig):
        super().__init__()
        self.layer = nn.ModuleList([EsmLayer(config) for _ in range(config.num_hidden_layers)])
        self.emb_layer_norm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        # Set by activation_checkpointing_enable: torch.utils.checkpoint keyword arguments, every n-th layer,
        # activations offloaded to CPU.
        self.checkpoint_kwargs: dict[str, Any] = {"use_reentrant": False}
        self.checkpoint_every_n_layers = 1
        self.checkpoint_offload = False

    def forward(self, hidden_states, attention_bias, positions, output_hidden_states=False,
                output_attentions=False):
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for i, layer in enumerate(self.layer):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                    and i % self.checkpoint_every_n_layers == 0):
                if self.checkpoint_offload:
                    with torch.autograd.graph.save_on_cpu():
                        hidden_states, probs = _checkpoint(layer, hidden_states, attention_bias, positions,
                                                           output_attentions, **self.checkpoint_kwargs)
                else:
                    hidden_states, probs = _checkpoint(layer, hidden_states, attention_bias, positions,
                                                       output_attentions, **self.checkpoint_kwargs)
            else:
                hidden_states, probs = layer(hidden_states, attention_bias, positions, output_attentions)
            if all_attn is not None:
                all_attn.append(probs)
        hidden_states = self.emb_layer_norm_after(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return (hidden_states, tuple(all_hidden) if all_hidden is not None else None,
                tuple(all_attn) if all_attn is not None else None)


class EsmPooler(nn.Module):
    """HF's pooler (dense + tanh on the <cls> state); present only when a checkpoint has one."""

    def __init__(self, config: EsmConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class EsmContactPredictionHead(nn.Module):
    """Logistic regression over symmetrized, APC-corrected attention maps of all layers."""

    def __init__(self, in_features: int, eos_idx: int = 2):
        super().__init__()
        self.eos_idx = eos_idx
        self.regression = nn.Linear(in_features, 1)

    def forward(self, tokens: torch.Tensor, attentions: torch.Tensor) -> torch.Tensor:
        """tokens [B, L]; attentions [B, layers, H, L, L] with padding zeroed -> contacts [B, N, N]."""
        eos_mask = tokens.ne(self.eos_idx).to(attentions.dtype)
        # [B, L, L]
        eos_mask = eos_mask.unsqueeze(1) * eos_mask.unsqueeze(2)
        attentions = attentions * eos_mask[:, None, None, :, :]
        # Drop the last position (EOS or padding) and BOS: [B, layers, H, N, N].
        attentions = attentions[..., :-1, :-1][..., 1:, 1:]
        B, layers, H, N, _ = attentions.shape
        # [B, layers * H, N, N]
        attentions = attentions.reshape(B, layers * H, N, N).to(self.regression.weight.dtype)
        # symmetrize -> APC -> logistic regression over the layers * H channels, in one pass.
        logits = symmetric_apc_regression(attentions, self.regression.weight[0], self.regression.bias[0])
        return torch.sigmoid(logits)


# ================================================================================================
# Base class: init, loading, saving
# ================================================================================================


class EsmPreTrainedModel(PreTrainedMixin, nn.Module):
    config_class = EsmConfig
    base_model_prefix = "esm"
    main_input_name = "input_ids"
    _tied = ("lm_head.decoder.weight",)  # state-dict names of the decoder tied to the word embeddings

    def __init__(self, config: EsmConfig):
        if not isinstance(config, EsmConfig):
            raise TypeError(f"{type(self).__name__} takes an EsmConfig, got {type(config).__name__}")
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set")
        super().__init__()  # PreTrainedMixin: nn.Module's __init__ and the tied decoder's state-dict hooks
        self.config = config
        self.name_or_path = ""

    # ---- init ----------------------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, EsmLMHead):
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        pass

    # ---- training conveniences -----------------------------------------------------------------
    @property
    def base_model(self) -> EsmModel:
        return self if isinstance(self, EsmModel) else getattr(self, self.base_model_prefix)

    def freeze_base_model(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the encoder for head-only fine-tuning."""
        for p in self.base_model.parameters():
            p.requires_grad_(not frozen)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count as transformers counts it: shared (tied) tensors once; ``exclude_embeddings``
        leaves out every ``nn.Embedding`` table; ``only_trainable`` counts those that require grad."""
        embedding_names = {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for name, p in self.named_parameters()
                   if (not exclude_embeddings or name not in embedding_names)
                   and (p.requires_grad or not only_trainable))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embeddings.word_embeddings

    # ---- names ----------------------------------------------------------------------------------
    def _hub_state(self) -> dict[str, torch.Tensor]:
        """State dict in hub naming, tied decoder left out (as the hub files do); an untied decoder
        (``tie_word_embeddings=False``) is kept, as transformers saves it."""
        tied = self._tied if self.config.tie_word_embeddings else ()
        return {k: v for k, v in self.state_dict().items() if k not in tied}

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *model_args: Any,
        config: EsmConfig | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ):
        """Load from a hub-layout directory, a hub id, a fair-esm ``.pt`` file or a preset name.

        A checkpoint's head that this class lacks is dropped; a head this class has and the file
        lacks is initialised fresh; both are said in one log line. Config fields may be overridden
        (``num_labels=3``, ``problem_type="regression"``, dropout probabilities ...).

        transformers' loading arguments are honoured: ``revision``, ``cache_dir``, ``token``,
        ``local_files_only``, ``force_download``, ``subfolder``, ``proxies`` (through huggingface_hub),
        ``device_map`` (a device, or "auto": the GPU if there is one, else the CPU), ``attn_implementation``
        ("sdpa"/"eager": padded attention; "flash_attention_2"/"packed": the packed varlen path; "auto").
        Any other argument that is not a config field is an error naming it; none is written into the config.
        """
        from ..common.hf_hub import split_pretrained_kwargs
        from ..io.hub import load_checkpoint
        from ..io.resolve import resolve_checkpoint

        where = f"{cls.__name__}.from_pretrained"
        if model_args:
            raise TypeError(f"{where}: unexpected positional arguments {model_args!r}; pass config fields by name")
        # add_pooling_layer (the encoder alone) is from_checkpoint's, as in transformers' EsmModel.
        fields = EsmConfig._field_names() + (["add_pooling_layer"] if issubclass(cls, EsmModel) else [])
        hub_kwargs, framework, config_overrides = split_pretrained_kwargs(kwargs, fields, where)
        attn = attn_backend(framework.get("attn_implementation"))
        if "device_map" in framework:
            if device is not None:
                raise ValueError(f"{where}: pass device= or device_map=, not both")
            device = device_from_map(framework["device_map"])
        ckpt = load_checkpoint(resolve_checkpoint(pretrained, **hub_kwargs))
        model = cls.from_checkpoint(ckpt, dtype=torch_dtype if torch_dtype is not None else dtype, device=device,
                                    config=config, **config_overrides)
        model.name_or_path = os.fspath(pretrained)
        if attn is not None:
            model.base_model.attn_implementation = attn
        return model

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Any,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        config: EsmConfig | None = None,
        **overrides: Any,
    ):
        """Build this model from a loaded checkpoint (``esm_dual.io.base.Checkpoint``: config + hub-named numpy
        tensors): the one place a PyTorch model is made from tensors (``from_pretrained``, the CLI, conversion's
        verification and ESMFold call it).

        ``dtype``: a torch dtype, ``"float32"``/``"fp16"``/``"bf16"``/..., or ``"auto"`` (the dtype the config
        records, else that of the weights); ``device``: where the weights are allocated (built on the meta
        device first: nothing is initialised twice); ``config`` replaces the checkpoint's; ``overrides`` are
        config fields (``num_labels=3`` ...) and, for ``EsmModel``, ``add_pooling_layer`` (default: whether the
        checkpoint has a pooler). NaN or infinite weights are refused by name.
        """
        add_pooling_layer = overrides.pop("add_pooling_layer", None)
        cfg = config if config is not None else ckpt.config
        if overrides:
            cfg = EsmConfig.from_dict(cfg.to_dict(), **overrides)
        check_finite(ckpt.tensors, str(ckpt.source))
        if dtype == "auto":
            dtype = auto_dtype(ckpt.config, ckpt.tensors)
        if isinstance(dtype, str):
            dtype = str_to_torch_dtype(dtype)
        kwargs = {}
        if cls is EsmModel:
            kwargs["add_pooling_layer"] = (checkpoint_has_pooler(ckpt.tensors) if add_pooling_layer is None
                                           else add_pooling_layer)
        # Build without allocating or initialising: every tensor is then either loaded or initialised.
        with torch.device("meta"):
            model = cls(cfg, **kwargs)
        model = model.to_empty(device=device or "cpu")
        if dtype is not None:
            model = model.to(dtype)
        model._before_loading(torch.device(device or "cpu"))
        model.load_hub_tensors(ckpt.tensors, source=str(ckpt.source))
        return model.eval()

    def load_hub_tensors(self, tensors: dict[str, np.ndarray], source: str = "checkpoint") -> list[str]:
        """Copy hub-named numpy tensors into this model (names matched by ``match_state``)."""
        own = self._hub_state()
        result = match_state(tensors, own.keys(), base_model=isinstance(self, EsmModel),
                             num_layers=self.config.num_hidden_layers, source=source)
        for msg in result.messages:
            logger.warning(msg)
        copy_numpy_into(own, result.tensors, source)
        with torch.no_grad():
            for module_name in sorted({n.rsplit(".", 1)[0] for n in result.initialised}):
                module = self.get_submodule(module_name)
                if isinstance(module, EsmRotaryEmbedding):
                    inv_freq = rotary_inv_freq(self.config.head_dim, self.config.rope_theta)
                    module.inv_freq.copy_(torch.from_numpy(inv_freq))
                else:
                    self._init_weights(module)
        self.tie_weights()
        return result.messages

    # ---- saving ---------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        save_function: Any = None,
        push_to_hub: bool = False,
        max_shard_size: int | str | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json`` + ``model.safetensors`` in the hub layout (readable by transformers,
        fair-esm converters and ``esm_dual.tf``), with transformers' arguments: ``is_main_process`` (False:
        write nothing, for the other ranks), ``state_dict`` (these tensors instead of the model's own, e.g. a
        gathered or merged one; module names), ``max_shard_size`` (sharded files + index),
        ``safe_serialization=False`` (``pytorch_model.bin``), ``push_to_hub`` (then ``repo_id``,
        ``commit_message``, ``private``, ``token``, ``revision``, ``create_pr`` as for ``push_to_hub``)."""
        from ..io.hub import save_checkpoint

        push_args = split_save_kwargs(kwargs, save_function, variant, push_to_hub)
        if not is_main_process:
            return
        cfg = with_recorded_dtype(self.config.copy(architectures=[type(self).__name__]),
                                  str(self.dtype).split(".")[-1])
        if state_dict is None:
            state = self._hub_state()
        else:
            tied = set(self._tied_keys())
            state = {k: v for k, v in state_dict.items() if k not in tied}
        # Shared storage (a tied tensor passed in state_dict) is written once per name, as its own copy.
        tensors = {k: torch_to_numpy(v).copy() if state_dict is not None else torch_to_numpy(v)
                   for k, v in state.items()}
        if safe_serialization:
            save_checkpoint(save_directory, cfg, tensors, max_shard_size=max_shard_size)
        else:
            if max_shard_size is not None:
                raise ValueError("save_pretrained: max_shard_size needs safe_serialization=True")
            os.makedirs(save_directory, exist_ok=True)
            torch.save({k: v.detach().cpu().clone() for k, v in state.items()},
                       os.path.join(save_directory, "pytorch_model.bin"))
            cfg.save_pretrained(save_directory)
        if push_to_hub:
            repo_id = push_args.pop("repo_id", None) or os.path.basename(os.path.abspath(os.fspath(save_directory)))
            self.push_to_hub(repo_id, token=token, max_shard_size=max_shard_size,
                             safe_serialization=safe_serialization, **push_args)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "5GB",
        safe_serialization: bool = True,
    ) -> Any:
        """Upload the model (``config.json`` + safetensors, as ``save_pretrained`` writes them) to the HF hub
        through ``huggingface_hub``, creating the repo if needed; returns the commit info."""
        from ..common.hf_hub import push_folder_to_hub

        return push_folder_to_hub(
            lambda d: self.save_pretrained(d, max_shard_size=max_shard_size, safe_serialization=safe_serialization),
            repo_id, commit_message=commit_message, private=private, token=token, revision=revision,
            create_pr=create_pr)

    # ---- input checks ---------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, inputs_embeds) -> None:
        if is_compiling():
            return
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = input_ids if input_ids is not None else inputs_embeds
        if x.dim() < 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(x.shape)}")
        B, L = x.shape[0], x.shape[1]
        if B == 0 or L == 0:
            raise ValueError(f"empty batch: input shape {tuple(x.shape)}")
        if input_ids is not None:
            if input_ids.dtype.is_floating_point:
                raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
                raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {(B, L)}")
        limit = self.config.max_sequence_positions
        if limit is not None and L > limit:
            raise ValueError(
                f"this model uses learned positions and takes at most {limit} tokens "
                f"({limit - 2} residues + BOS/EOS); got a batch of length {L}. Truncate the sequences.")


# ================================================================================================
# Models
# ================================================================================================


class EsmModel(EsmPreTrainedModel):
    """The ESM encoder. ``forward`` returns ``last_hidden_state`` [B, L, D] (after the final LayerNorm)."""

    def __init__(self, config: EsmConfig, add_pooling_layer: bool = False):
        super().__init__(config)
        self.embeddings = EsmEmbeddings(config)
        self.encoder = EsmEncoder(config)
        self.pooler = EsmPooler(config) if add_pooling_layer else None
        self.contact_head = EsmContactPredictionHead(
            config.num_hidden_layers * config.num_attention_heads, eos_idx=config.eos_token_id or 2)
        self._fast_path = None  # this model's FastPathOptions (None: the process default); see set_fast_path
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling:
        """input_ids [B, L]; attention_mask [B, L] (1 real, 0 padding; default: input_ids != pad). Numpy arrays
        are taken as well as tensors."""
        dev = self.embeddings.word_embeddings.weight.device
        input_ids = as_tensor_input(input_ids, "input_ids", dev)
        attention_mask = as_tensor_input(attention_mask, "attention_mask", dev)
        position_ids = as_tensor_input(position_ids, "position_ids", dev)
        self._check_inputs(input_ids, attention_mask, inputs_embeds)
        mask_name = "attention_mask" if attention_mask is not None else "input_ids (no attention_mask given)"
        x = input_ids if input_ids is not None else inputs_embeds
        B, L = x.shape[0], x.shape[1]
        if attention_mask is None:
            if input_ids is not None:
                attention_mask = input_ids.ne(self.config.pad_token_id)
            else:
                attention_mask = torch.ones(B, L, dtype=torch.long, device=x.device)
        if not is_compiling():
            check_attention_rows(attention_mask, mask_name)
        if position_ids is None and self.config.position_embedding_type == "absolute":
            if input_ids is not None:
                position_ids = learned_position_ids(input_ids, self.config.pad_token_id)
            else:
                # [B, L]
                position_ids = torch.arange(L, device=x.device).expand(B, L) + self.config.pad_token_id + 1
        if position_ids is None:
            # Rotary positions: 0..L-1 ([L], broadcast over the batch).
            positions = torch.arange(L, device=x.device)
        else:
            positions = position_ids
        from . import fast

        # Fast path (None where the padded path runs): unpad, run the packed encoder, re-pad (zeros at padding).
        packed = fast.forward_padded(self, input_ids, attention_mask, position_ids, positions, inputs_embeds,
                                     output_hidden_states, output_attentions)
        if packed is not None:
            sequence_output, hidden_states = packed
            pooled = self.pooler(sequence_output) if self.pooler is not None else None
            out = BaseModelOutputWithPooling(sequence_output, pooled, hidden_states, None)
            return out if return_dict else out.to_tuple()
        embedding_output = self.embeddings(input_ids, attention_mask, position_ids, inputs_embeds)
        # [B, 1, 1, L] additive bias: 0 for real keys, the dtype's minimum for padding.
        neg = torch.finfo(embedding_output.dtype).min
        attention_bias = (1.0 - attention_mask[:, None, None, :].to(embedding_output.dtype)) * neg
        sequence_output, hidden_states, attentions = self.encoder(
            embedding_output, attention_bias, positions, output_hidden_states, output_attentions)
        pooled = self.pooler(sequence_output) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(sequence_output, pooled, hidden_states, attentions)
        return out if return_dict else out.to_tuple()

    def forward_packed(
        self,
        input_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling:
        """Packed sequences, no padding: input_ids [T] (the sequences end to end, each with BOS/EOS),
        cu_seqlens [B + 1] int32 (sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]), max_seqlen the
        longest (int; computed with a device sync if None) -> last_hidden_state [T, D]; pooler_output [B, D]."""
        if cu_seqlens is None:
            raise ValueError("forward_packed needs cu_seqlens")
        from . import fast

        sequence_output, hidden_states = fast.packed_model_forward(
            self, input_ids, cu_seqlens, max_seqlen, position_ids, inputs_embeds, output_hidden_states)
        pooled = None
        if self.pooler is not None:
            # [B, 1, D]: the <cls> row of every sequence
            pooled = self.pooler(sequence_output[cu_seqlens[:-1].to(sequence_output.device).long()][:, None])
        out = BaseModelOutputWithPooling(sequence_output, pooled, hidden_states, None)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Contact probabilities [B, N, N] over residues (BOS/EOS dropped; N = L - 2)."""
        if attention_mask is None:
            attention_mask = input_ids.ne(self.config.pad_token_id)
        attns = self(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        # [B, layers, H, L, L]
        attns = torch.stack(attns, dim=1)
        m = attention_mask.to(attns.dtype)
        # Attention to and from padding is zeroed, as in the original model: [B, 1, 1, L, L], one pass.
        attns = attns * (m[:, :, None] * m[:, None, :])[:, None, None]
        return self.contact_head(input_ids, attns)


class EsmLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings unless the config says
    ``tie_word_embeddings=False``, as in transformers) + bias."""

    def __init__(self, config: EsmConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(gelu(self.dense(features)))
        return self.decoder(x) + self.bias


class EsmForMaskedLM(EsmPreTrainedModel):
    def __init__(self, config: EsmConfig):
        super().__init__(config)
        self.esm = EsmModel(config)
        self.lm_head = EsmLMHead(config)
        self.post_init()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.decoder.weight = self.esm.embeddings.word_embeddings.weight
            self.lm_head.decoder.out_features = self.lm_head.decoder.weight.shape[0]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_hidden_states=False, output_attentions=False, return_dict=True) -> MaskedLMOutput:
        """labels [B, L] with -100 where no loss is taken."""
        outputs = self.esm(input_ids, attention_mask, position_ids, inputs_embeds,
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        labels = as_tensor_input(labels, "labels")
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.config.vocab_size).float(),
                                   labels.reshape(-1).to(logits.device), ignore_index=-100)
        out = MaskedLMOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def forward_packed(self, input_ids=None, cu_seqlens=None, max_seqlen=None, position_ids=None, inputs_embeds=None,
                       labels=None, output_hidden_states=False, return_dict=True) -> MaskedLMOutput:
        """Packed sequences (see ``EsmModel.forward_packed``) -> logits [T, V]; labels [T] with -100
        where no loss is taken."""
        outputs = self.esm.forward_packed(input_ids, cu_seqlens, max_seqlen, position_ids, inputs_embeds,
                                          output_hidden_states=output_hidden_states)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.reshape(-1).to(logits.device), ignore_index=-100)
        out = MaskedLMOutput(loss, logits, outputs.hidden_states, None)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        return self.esm.predict_contacts(input_ids, attention_mask)


class EsmClassificationHead(nn.Module):
    """<cls> state -> dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, config: EsmConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features[:, 0, :])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


def sequence_classification_loss(config: EsmConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's rule: regression (num_labels 1), single-label (integer labels) or multi-label (float)."""
    problem_type = config.problem_type
    if problem_type is None:
        if config.num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if problem_type == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
        return F.mse_loss(logits.float(), labels.float())
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, config.num_labels).float(), labels.reshape(-1).long())
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class EsmForSequenceClassification(EsmPreTrainedModel):
    def __init__(self, config: EsmConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.esm = EsmModel(config)
        self.classifier = EsmClassificationHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_hidden_states=False, output_attentions=False, return_dict=True) -> SequenceClassifierOutput:
        """labels [B] (class ids or regression targets) or [B, num_labels] (multi-label / regression)."""
        outputs = self.esm(input_ids, attention_mask, position_ids, inputs_embeds,
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        logits = self.classifier(outputs.last_hidden_state)
        labels = as_tensor_input(labels, "labels")
        loss = sequence_classification_loss(self.config, logits, labels) if labels is not None else None
        out = SequenceClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        return self.esm.predict_contacts(input_ids, attention_mask)


class EsmForTokenClassification(EsmPreTrainedModel):
    def __init__(self, config: EsmConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.esm = EsmModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_hidden_states=False, output_attentions=False, return_dict=True) -> TokenClassifierOutput:
        """labels [B, L] with -100 where no loss is taken (BOS/EOS/padding)."""
        outputs = self.esm(input_ids, attention_mask, position_ids, inputs_embeds,
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        labels = as_tensor_input(labels, "labels")
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels).float(),
                                   labels.reshape(-1).to(logits.device).long(), ignore_index=-100)
        out = TokenClassifierOutput(loss, logits, outputs.hidden_states, outputs.attentions)
        return out if return_dict else out.to_tuple()

    def predict_contacts(self, input_ids, attention_mask=None):
        return self.esm.predict_contacts(input_ids, attention_mask)
