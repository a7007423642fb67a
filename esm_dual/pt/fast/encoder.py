"""The packed encoder: ``EsmModel`` on a pack ([T, D] token rows, no padding; see packing.py).

Per sequence inside a pack: rotary positions restart at 0, the token-dropout ratio (ESM-1b/2) is the
sequence's own share of ``<mask>`` tokens, and learned positions (ESM-1b/1v) count from
``padding_idx + 1``, as ``learned_position_ids`` does.

Two ways through the layers:

- the module path: ``EsmEncoder.forward`` with a :class:`VarlenInfo` in the slot of the attention bias;
  every module is called (on [T, D] rows), and ``EsmSelfAttention`` hands the pack to
  :func:`packed_self_attention`. Training and anything with gradients take it.
- the inference loop (:func:`packed_encoder_inference`): the same arithmetic in fewer passes over memory
  (fused residual adds and LayerNorms, GEMM epilogues). It skips the forwards of the encoder, its layers,
  ``EsmAttention``, ``EsmSelfOutput``, ``EsmIntermediate``, ``EsmOutput``, the LayerNorms and dropouts, so
  it runs only where each of those is exactly the class this package defines, with its own ``forward``
  and no hooks (:func:`bypassed_module`); Linear layers it would use by their weights are checked where
  they are used (a hook or an adapter keeps its module call). ``EsmSelfAttention`` is always called.

Entry points used by ``modeling_esm``: :func:`forward_padded` (``EsmModel.forward``: unpad, run packed,
re-pad; None where the padded path must run), :func:`packed_model_forward` (``EsmModel.forward_packed``)
and :func:`packed_self_attention` (``EsmSelfAttention.forward`` given a :class:`VarlenInfo`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..modeling_esm import (
    MASK_RATIO_TRAIN,
    EsmAttention,
    EsmEmbeddings,
    EsmEncoder,
    EsmIntermediate,
    EsmLayer,
    EsmOutput,
    EsmRotaryEmbedding,
    EsmSelfOutput,
)
from .attention import VarlenInfo, flash_supported, resolve_backend, varlen_attention
from .epilogues import ResidualStream, linear_gelu, residual_epilogue_supported
from .kernels import fused_qkv_supported, fused_rotary_supported, qkv_rotary_fused, rotary_qk_fused, triton_ok
from .options import FastPathOptions, default_options
from .packing import Unpadded, gather_tokens, packed_positions, repad, segment_ids, unpad

# The forwards as this package defines them, taken when the fast path is imported (with esm_dual.pt): a
# class whose forward was replaced later is not the reference any more.
_REFERENCE_FORWARDS = {cls: cls.forward for cls in (
    EsmEmbeddings, EsmRotaryEmbedding, EsmEncoder, EsmLayer, EsmAttention, EsmSelfOutput, EsmIntermediate,
    EsmOutput, nn.LayerNorm, nn.Dropout, nn.Embedding)}


# ================================================================================================
# Which modules may be bypassed
# ================================================================================================


def is_reference(module: nn.Module | None, cls: type) -> bool:
    """module is exactly a ``cls`` (not a subclass, not an adapter), its forward is the one this package
    (or torch) defines (replaced neither on the class nor on the instance), and no hook would see a call."""
    return _no_global_hooks() and _own_reference(module, cls)


def _no_global_hooks() -> bool:
    return not _torch_module._global_forward_hooks and not _torch_module._global_forward_pre_hooks


def _own_reference(module, cls) -> bool:
    """:func:`is_reference` without the global hooks."""
    if type(module) is not cls or cls.forward is not _REFERENCE_FORWARDS[cls]:
        return False
    d = module.__dict__
    return "forward" not in d and not d["_forward_hooks"] and not d["_forward_pre_hooks"]


# What the inference loop skips in each layer: (name, attribute path, the reference class).
_LAYER_BYPASSED = tuple((name, tuple(name.split(".")) if name else (), cls) for name, cls in (
    ("", EsmLayer),
    ("attention", EsmAttention),
    ("attention.LayerNorm", nn.LayerNorm),
    ("attention.output", EsmSelfOutput),
    ("attention.output.dropout", nn.Dropout),
    ("intermediate", EsmIntermediate),
    ("LayerNorm", nn.LayerNorm),
    ("output", EsmOutput),
    ("output.dropout", nn.Dropout),
))


def bypassed_module(encoder: nn.Module) -> str | None:
    """The first module whose forward the inference loop would skip and that is not the reference
    (see :func:`is_reference`), by name (``"layer.3.output"``); None if there is none.

    (Walks the encoder's module dicts directly: this runs once per forward.)"""
    if not _no_global_hooks():
        return "global module hooks"
    if not _own_reference(encoder, EsmEncoder):
        return "encoder"
    modules = encoder._modules
    if not _own_reference(modules.get("emb_layer_norm_after"), nn.LayerNorm):
        return "emb_layer_norm_after"
    for i, layer in enumerate(modules["layer"]._modules.values()):
        for name, parts, cls in _LAYER_BYPASSED:
            module = layer
            for part in parts:
                module = module._modules.get(part) if isinstance(module, nn.Module) else None
            if not _own_reference(module, cls):
                return f"layer.{i}" + (f".{name}" if name else "")
    return None


def embeddings_are_reference(emb: nn.Module) -> bool:
    """:func:`packed_embeddings` may compute ``emb``'s forward itself (it and its parts are the reference)."""
    return (is_reference(emb, EsmEmbeddings) and is_reference(emb.word_embeddings, nn.Embedding)
            and (emb.layer_norm is None or is_reference(emb.layer_norm, nn.LayerNorm))
            and (emb.position_embedding_type != "absolute" or is_reference(emb.position_embeddings, nn.Embedding)))


# ================================================================================================
# The packed self-attention of one layer
# ================================================================================================


def packed_self_attention(attn, hidden_states: torch.Tensor, positions: torch.Tensor | None,
                          info: VarlenInfo) -> torch.Tensor:
    """``EsmSelfAttention`` on a pack. hidden_states [T, D]; positions [T] -> context [T, D].

    With Triton, plain ``nn.Linear`` projections and the reference rotary module, one GEMM on the
    concatenated weights and one rotary kernel (``kernels._QKVRotary``); otherwise the module's own
    ``query``/``key``/``value`` calls (so hooks and adapters on them keep working) and, unless the rotary
    module is the reference, its own call. The query is scaled by K^-0.5 before rotary, as in the padded path.
    """
    options = info.options or default_options()
    H, K = attn.num_attention_heads, attn.attention_head_size
    T = hidden_states.shape[0]
    scale = K**-0.5
    dropout_p = attn.dropout_prob if attn.training else 0.0
    rotary = attn.rotary_embeddings
    kernel_rotary = rotary is not None and is_reference(rotary, EsmRotaryEmbedding)
    if kernel_rotary and fused_qkv_supported(attn, hidden_states, options):
        q, k, v = qkv_rotary_fused(attn, hidden_states, positions, scale)
        context = varlen_attention(q, k, v, info.cu_seqlens, info.max_seqlen, dropout_p=dropout_p, scale=1.0,
                                   backend=info.backend, options=options)
        # [T, H, K] -> [T, D]
        return context.reshape(T, H * K)
    q = attn.query(hidden_states)
    k = attn.key(hidden_states)
    v = attn.value(hidden_states)
    if kernel_rotary and fused_rotary_supported(q, options):
        q, k = rotary_qk_fused(q, k, positions, rotary.inv_freq, scale, H)
        attn_scale = 1.0
    else:
        # [T, D] -> [H, T, K]: the rotary module's [B, H, L, K] layout with positions [L] = [T].
        qh = q.view(T, H, K).transpose(0, 1)
        kh = k.view(T, H, K).transpose(0, 1)
        if rotary is not None:
            qh, kh = rotary(qh, kh, positions, q_scale=scale)
            attn_scale = 1.0
        elif flash_supported(qh):
            attn_scale = scale  # the flash kernel scales the scores: one pass fewer over q
        else:
            qh = qh * scale
            attn_scale = 1.0
        # [H, T, K] -> [T, H, K]
        q, k = qh.transpose(0, 1), kh.transpose(0, 1)
        if not q.is_contiguous() and resolve_backend(q, info.backend, dropout_p, options) in ("fa4", "flash"):
            q, k = q.contiguous(), k.contiguous()
    # [T, D] -> [T, H, K]
    v = v.view(T, H, K)
    context = varlen_attention(q, k, v, info.cu_seqlens, info.max_seqlen, dropout_p=dropout_p, scale=attn_scale,
                               backend=info.backend, options=options)
    # [T, H, K] -> [T, D]
    return context.reshape(T, H * K)


# ================================================================================================
# Embeddings of a pack
# ================================================================================================


def _padded_layout(cu_seqlens: torch.Tensor, seg: torch.Tensor) -> Unpadded:
    """Where the tokens of a pack sit in a right-padded [B, L] batch (L = the longest; one host sync)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    B, L = lengths.shape[0], int(lengths.max())
    T = seg.shape[0]
    cu = cu_seqlens.to(torch.int64)
    # [T] row-major index into [B * L]
    indices = seg * L + (torch.arange(T, device=seg.device) - cu[seg])
    return Unpadded(indices, cu_seqlens, L, B, L)


def packed_embeddings(emb, input_ids: torch.Tensor | None, seg: torch.Tensor, lengths: torch.Tensor,
                      position_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """``EsmEmbeddings.forward`` on a pack: input_ids [T] or inputs_embeds [T, D] -> [T, D].

    seg [T] sequence index per token; lengths [B] tokens per sequence; position_ids [T] (learned
    positions only). The token-dropout ratio is each sequence's own. Where ``emb`` is not the reference
    (:func:`embeddings_are_reference`), the module itself runs on the pack laid out as a padded batch.
    """
    if not embeddings_are_reference(emb):
        cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=seg.device)
        cu[1:] = torch.cumsum(lengths, 0)
        u = _padded_layout(cu, seg)
        # [B, L], 1 at real tokens
        mask = repad(torch.ones_like(seg), u)
        ids = None if input_ids is None else repad(input_ids, u).masked_fill(mask == 0, emb.padding_idx)
        pos = None if position_ids is None else repad(position_ids, u).masked_fill(mask == 0, emb.padding_idx)
        embeds = None if inputs_embeds is None else repad(inputs_embeds, u)
        return gather_tokens(emb(ids, mask, pos, embeds), u)
    if inputs_embeds is None:
        inputs_embeds = emb.word_embeddings(input_ids)
    embeddings = inputs_embeds
    if emb.token_dropout and input_ids is not None:
        is_mask = input_ids == emb.mask_token_id
        embeddings = embeddings.masked_fill(is_mask.unsqueeze(-1), 0.0)
        # [B] <mask> count of every sequence
        n_mask = torch.zeros(lengths.shape[0], dtype=torch.float32, device=is_mask.device)
        n_mask = n_mask.index_add(0, seg, is_mask.to(torch.float32))
        mask_ratio_observed = n_mask / lengths.to(torch.float32)
        scale = (1 - MASK_RATIO_TRAIN) / (1 - mask_ratio_observed)
        embeddings = (embeddings * scale[seg][:, None]).to(inputs_embeds.dtype)
    if emb.position_embedding_type == "absolute":
        embeddings = embeddings + emb.position_embeddings(position_ids)
    if emb.layer_norm is not None:
        embeddings = emb.layer_norm(embeddings)
    return embeddings


# ================================================================================================
# The encoder on a pack
# ================================================================================================


def use_fused_inference(encoder, x: torch.Tensor, options: FastPathOptions | None = None) -> bool:
    """The inference loop is asked for: no gradients, eval mode, and ``options.fused_loop`` "on", or
    "auto" with the Triton kernels available for x. (Whether it may bypass the modules: :func:`bypassed_module`.)"""
    options = options or default_options()
    if torch.is_grad_enabled() or encoder.training or options.fused_loop == "off":
        return False
    return options.fused_loop == "on" or triton_ok(x, options)


def packed_encoder_inference(encoder, hidden_states: torch.Tensor, info: VarlenInfo, positions: torch.Tensor,
                             output_hidden_states: bool = False, checked: bool = False):
    """``EsmEncoder.forward`` on a pack for inference: the same arithmetic as the layer modules in eval
    mode (dropout off), in fewer passes over memory. hidden_states [T, D] -> (last_hidden_state [T, D],
    hidden_states tuple of layers + 1 [T, D] or None).

    - The FFN's first projection runs with its bias and GELU in the GEMM's epilogue on CUDA in half
      precision (:func:`~esm_dual.pt.fast.epilogues.linear_gelu`).
    - Each residual add runs in the epilogue of the projection that makes it, where the projections are
      plain ``nn.Linear`` modules and ``options.residual_epilogue`` is on; the biases then join an fp32
      vector that the next LayerNorm adds (:class:`~esm_dual.pt.fast.epilogues.ResidualStream`).
    - Otherwise each residual add is fused into the LayerNorm that follows it (the next layer's first
      LayerNorm, or ``emb_layer_norm_after`` after the last).

    Where a module it would bypass is not the reference (:func:`bypassed_module`; ``checked``: the caller
    has just found none), the encoder module runs.
    """
    if not checked and bypassed_module(encoder) is not None:
        sequence_output, hidden, _ = encoder(hidden_states, info, positions, output_hidden_states, False)
        return sequence_output, hidden
    options = info.options or default_options()
    layers = list(encoder.layer)
    all_hidden = [] if output_hidden_states else None
    epilogue = residual_epilogue_supported(
        [m for layer in layers for m in (layer.attention.output.dense, layer.output.dense)], hidden_states, options)
    stream = ResidualStream(hidden_states, epilogue, options)
    a = (layers[0].attention.LayerNorm if layers else encoder.emb_layer_norm_after)(hidden_states)
    for i, layer in enumerate(layers):
        if all_hidden is not None:
            all_hidden.append(stream.value())
        attention = layer.attention
        # (temporaries are passed straight on, so none outlives its use: [T, 4D] GELU output included)
        b = stream.add(attention.output.dense, attention.self(a, info, positions)[0], layer.LayerNorm)
        a = None  # the LayerNorm output is spent: free it before the FFN's [T, 4D]
        inter = linear_gelu(layer.intermediate.dense, b, options)  # bias + GELU in the GEMM's epilogue on GPU
        del b
        after = layers[i + 1].attention.LayerNorm if i + 1 < len(layers) else encoder.emb_layer_norm_after
        a = stream.add(layer.output.dense, inter, after)
        del inter
    if all_hidden is not None:
        all_hidden.append(a)
    return a, (tuple(all_hidden) if all_hidden is not None else None)


def _run_encoder(encoder, x: torch.Tensor, info: VarlenInfo, positions: torch.Tensor, output_hidden_states: bool,
                 options: FastPathOptions, checked: bool = False):
    if use_fused_inference(encoder, x, options):
        return packed_encoder_inference(encoder, x, info, positions, output_hidden_states, checked)
    sequence_output, hidden_states, _ = encoder(x, info, positions, output_hidden_states, False)
    return sequence_output, hidden_states


def packed_model_forward(model, input_ids: torch.Tensor | None, cu_seqlens: torch.Tensor, max_seqlen: int | None,
                         position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                         output_hidden_states: bool = False, rotary_positions: torch.Tensor | None = None,
                         backend: str = "auto", options: FastPathOptions | None = None):
    """The encoder on a pack. input_ids [T] (or inputs_embeds [T, D]); cu_seqlens [B + 1].

    Returns (last_hidden_state [T, D], hidden_states tuple of [T, D] or None). rotary_positions [T]
    overrides the per-sequence 0.. positions. options: None takes the model's (``model.fast_path_options``).
    """
    x = input_ids if input_ids is not None else inputs_embeds
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None and input_ids.dim() != 1:
        raise ValueError(f"packed input_ids must be [T], got shape {tuple(input_ids.shape)}")
    if options is None:
        options = model.fast_path_options
    T = x.shape[0]
    device = x.device
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cfg = model.config
    limit = cfg.max_sequence_positions
    if limit is not None and max_seqlen > limit:
        raise ValueError(f"this model uses learned positions and takes at most {limit} tokens per sequence; "
                         f"got a sequence of {max_seqlen}. Truncate the sequences.")
    seg = segment_ids(cu_seqlens, T)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if rotary_positions is None:
        rotary_positions = packed_positions(cu_seqlens, T, seg)
    if cfg.position_embedding_type == "absolute" and position_ids is None:
        position_ids = rotary_positions + cfg.pad_token_id + 1
    embedding_output = packed_embeddings(model.embeddings, input_ids, seg, lengths, position_ids, inputs_embeds)
    positions = rotary_positions if cfg.position_embedding_type == "rotary" else position_ids
    info = VarlenInfo(cu_seqlens, int(max_seqlen), backend, options)
    return _run_encoder(model.encoder, embedding_output, info, positions, output_hidden_states, options)


# ================================================================================================
# EsmModel.forward through the packed encoder
# ================================================================================================


def use_packed_path(model, x: torch.Tensor, output_attentions: bool, options: FastPathOptions | None = None) -> bool:
    """Whether ``EsmModel.forward`` runs packed: ``attn_implementation`` "packed", or "auto" on CUDA with
    fp16/bf16 compute (half weights or autocast) and flash kernels that fit the head size."""
    impl = (options or model.fast_path_options).attn_implementation
    if output_attentions or impl == "sdpa":
        return False
    if impl == "packed":
        return True
    if not x.is_cuda:
        return False
    dtype = model.embeddings.word_embeddings.weight.dtype
    if torch.is_autocast_enabled("cuda") if _autocast_takes_device() else torch.is_autocast_enabled():
        dtype = torch.get_autocast_dtype("cuda") if hasattr(torch, "get_autocast_dtype") else torch.float16
    probe = torch.empty(0, model.config.num_attention_heads, model.config.head_dim, dtype=dtype, device=x.device)
    return flash_supported(probe)


def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cuda")
        return True
    except TypeError:  # pragma: no cover - older torch
        return False


def padded_forward_via_packed(model, input_ids, attention_mask, position_ids, positions, inputs_embeds,
                              output_hidden_states: bool, options: FastPathOptions | None = None,
                              checked: bool = False):
    """``EsmModel.forward`` through the packed encoder: the embeddings module on the padded batch, then
    its real tokens through the packed encoder, re-padded (zeros at padding).

    Token for token the same computation as the padded path (same rotary columns, same learned
    positions, same token-dropout ratio per sequence); outputs at padded positions are zero.
    Returns (last_hidden_state [B, L, D], hidden_states tuple of [B, L, D] or None).
    """
    options = options or model.fast_path_options
    u = unpad(attention_mask)
    # [B, L, D] -> [T, D]
    x = gather_tokens(model.embeddings(input_ids, attention_mask, position_ids, inputs_embeds), u)
    B, L = u.batch, u.length
    if positions.dim() == 1:
        # [L] -> [B, L]
        positions = positions.expand(B, L)
    info = VarlenInfo(u.cu_seqlens, u.max_seqlen, "auto", options)
    seq, hidden = _run_encoder(model.encoder, x, info, gather_tokens(positions, u), output_hidden_states, options,
                               checked)
    seq = repad(seq, u)
    if hidden is not None:
        hidden = tuple(repad(h, u) for h in hidden)
    return seq, hidden


def forward_padded(model, input_ids, attention_mask, position_ids, positions, inputs_embeds,
                   output_hidden_states: bool, output_attentions: bool):
    """``EsmModel.forward``'s fast path: (last_hidden_state [B, L, D], hidden_states or None) through the
    packed encoder, or None where the padded path runs: :func:`use_packed_path` says so, or the inference
    loop would apply and a module it bypasses is not the reference (:func:`bypassed_module`)."""
    options = model.fast_path_options
    x = input_ids if input_ids is not None else inputs_embeds
    if not use_packed_path(model, x, output_attentions, options):
        return None
    checked = use_fused_inference(model.encoder, x, options)
    if checked and bypassed_module(model.encoder) is not None:
        return None
    return padded_forward_via_packed(model, input_ids, attention_mask, position_ids, positions, inputs_embeds,
                                     output_hidden_states, options, checked)
