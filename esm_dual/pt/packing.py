"""Packed ("unpadded") execution of the ESM encoder: sequences end to end in one [T, D] token stream.

Padding costs no compute here: the B sequences of a batch are laid end to end (each with its own
BOS/EOS), ``cu_seqlens`` [B + 1] marks where each starts, and every layer works on [T, D] rows;
attention stays within each sequence (``attention.varlen_attention``). Per sequence inside a pack:

- rotary positions restart at 0 (``positions`` [T]);
- the token-dropout ratio (ESM-1b/2) is the sequence's own share of ``<mask>`` tokens;
- learned positions (ESM-1b/1v) count from ``padding_idx + 1``, as ``learned_position_ids`` does.

Entry points: :func:`pack_sequences` (lists of token ids -> a pack), :func:`unpad` / :func:`repad`
(padded [B, L] <-> packed [T]), :func:`packed_model_forward` (``EsmModel.forward_packed``) and
:func:`padded_forward_via_packed` (what ``EsmModel.forward`` runs on CUDA: unpad, run packed, re-pad).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .attention import (
    VarlenInfo,
    add_layer_norm,
    flash_supported,
    linear_gelu,
    pending_layer_norm,
    residual_epilogue_supported,
    triton_ok,
)

MASK_RATIO_TRAIN = 0.15 * 0.8  # as in modeling_esm (token dropout)


@dataclass
class Pack:
    """A pack of sequences. input_ids [T]; cu_seqlens [B + 1] int32; max_seqlen int (host)."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device) -> Pack:
        return Pack(self.input_ids.to(device, non_blocking=True), self.cu_seqlens.to(device, non_blocking=True),
                    self.max_seqlen)


def pack_sequences(sequences: Sequence, device=None) -> Pack:
    """Token-id sequences (lists / numpy / tensors, each with BOS/EOS already) -> a :class:`Pack`.

    cu_seqlens and max_seqlen are computed on the host, so nothing waits on the device.
    """
    arrays = [np.asarray(s.cpu() if isinstance(s, torch.Tensor) else s, dtype=np.int64).reshape(-1)
              for s in sequences]
    if not arrays:
        raise ValueError("pack_sequences needs at least one sequence")
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("pack_sequences: empty sequence at position(s) "
                         f"{np.flatnonzero(lengths == 0).tolist()}")
    cu = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = torch.from_numpy(np.concatenate(arrays))
    pack = Pack(ids, torch.from_numpy(cu), int(lengths.max()))
    return pack.to(device) if device is not None else pack


def pack_by_token_budget(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy packs (in the given order) of at most ``max_tokens`` tokens; a longer sequence goes alone."""
    packs: list[list[int]] = []
    cur: list[int] = []
    n = 0
    for i, length in enumerate(lengths):
        if cur and n + length > max_tokens:
            packs.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += int(length)
    if cur:
        packs.append(cur)
    return packs


def segment_ids(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """[T] sequence index of every token of a pack (no host sync)."""
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(T, device=cu_seqlens.device),
                              right=True)


def packed_positions(cu_seqlens: torch.Tensor, T: int, seg: torch.Tensor | None = None) -> torch.Tensor:
    """[T] position of every token within its own sequence (0 at each BOS)."""
    if seg is None:
        seg = segment_ids(cu_seqlens, T)
    return torch.arange(T, device=cu_seqlens.device) - cu_seqlens.to(torch.int64)[seg]


# ================================================================================================
# padded <-> packed
# ================================================================================================


@dataclass
class Unpadded:
    """indices [T] into the flattened [B * L]; cu_seqlens [B + 1] int32; max_seqlen int; B, L."""

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    length: int


def unpad(attention_mask: torch.Tensor) -> Unpadded:
    """Where the real tokens of a padded batch are. attention_mask [B, L] (nonzero = real token).

    One host sync (the lengths); the real tokens of each row keep their order, wherever the padding is.
    """
    B, L = attention_mask.shape
    mask = attention_mask.reshape(B, L) != 0
    lengths = mask.sum(-1, dtype=torch.int32)
    lengths_host = lengths.cpu()
    T = int(lengths_host.sum())
    max_seqlen = int(lengths_host.max()) if B else 0
    cu = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum(lengths, 0, dtype=torch.int32)
    flat = mask.reshape(-1)
    if hasattr(torch, "nonzero_static"):
        indices = torch.nonzero_static(flat, size=T).reshape(-1)
    else:  # pragma: no cover - torch < 2.3
        indices = flat.nonzero().reshape(-1)
    return Unpadded(indices, cu, max_seqlen, B, L)


def gather_tokens(x: torch.Tensor, u: Unpadded) -> torch.Tensor:
    """[B, L, ...] -> [T, ...] (the real tokens)."""
    return x.reshape(u.batch * u.length, *x.shape[2:]).index_select(0, u.indices)


def repad(x: torch.Tensor, u: Unpadded) -> torch.Tensor:
    """[T, ...] -> [B, L, ...], zeros at padded positions (differentiable)."""
    out = x.new_zeros(u.batch * u.length, *x.shape[1:])
    out = out.index_copy(0, u.indices, x)
    return out.view(u.batch, u.length, *x.shape[1:])


# ================================================================================================
# The packed model
# ================================================================================================


def packed_embeddings(emb, input_ids: torch.Tensor | None, seg: torch.Tensor, lengths: torch.Tensor,
                      position_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """``EsmEmbeddings.forward`` on a pack: input_ids [T] or inputs_embeds [T, D] -> [T, D].

    seg [T] sequence index per token; lengths [B] tokens per sequence; position_ids [T] (learned
    positions only). The token-dropout ratio is each sequence's own.
    """
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


def packed_model_forward(model, input_ids: torch.Tensor | None, cu_seqlens: torch.Tensor, max_seqlen: int | None,
                         position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                         output_hidden_states: bool = False, rotary_positions: torch.Tensor | None = None,
                         backend: str = "auto"):
    """The encoder on a pack. input_ids [T] (or inputs_embeds [T, D]); cu_seqlens [B + 1].

    Returns (last_hidden_state [T, D], hidden_states tuple of [T, D] or None). rotary_positions [T]
    overrides the per-sequence 0.. positions (the padded path passes its own columns).
    """
    x = input_ids if input_ids is not None else inputs_embeds
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None and input_ids.dim() != 1:
        raise ValueError(f"packed input_ids must be [T], got shape {tuple(input_ids.shape)}")
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
    info = VarlenInfo(cu_seqlens, int(max_seqlen), backend)
    if use_fused_inference(model.encoder, embedding_output):
        return packed_encoder_inference(model.encoder, embedding_output, info, positions, output_hidden_states)
    sequence_output, hidden_states, _ = model.encoder(embedding_output, info, positions, output_hidden_states, False)
    return sequence_output, hidden_states


def use_fused_inference(encoder, x: torch.Tensor) -> bool:
    """The fused inference loop applies: no gradients, eval mode, Triton kernels available for x."""
    return not torch.is_grad_enabled() and not encoder.training and triton_ok(x)


def packed_encoder_inference(encoder, hidden_states: torch.Tensor, info: VarlenInfo, positions: torch.Tensor,
                             output_hidden_states: bool = False):
    """``EsmEncoder.forward`` on a pack for inference: the same arithmetic as the layer modules in eval
    mode (dropout off), in fewer passes over memory. Returns (last_hidden_state [T, D], hidden_states
    tuple or None).

    - The FFN's first projection runs with its bias and GELU in the GEMM's epilogue on CUDA in half
      precision (:func:`~esm_dual.pt.attention.linear_gelu`).
    - Each residual add runs in the epilogue of the projection that makes it (``h += x W^T`` in
      place, cuBLAS's beta = 1), where the projections are plain ``nn.Linear`` modules. That epilogue
      has no room for the bias too, so the biases are summed into an fp32 vector that the next
      LayerNorm adds (``pending_layer_norm``): the residual stream stays one tensor, read and written
      once per add. ``ESM_DUAL_RESIDUAL_EPILOGUE=0`` turns this off.
    - Otherwise each residual add is fused into the LayerNorm that follows it (the next layer's first
      LayerNorm, or ``emb_layer_norm_after`` after the last).
    """

    layers = list(encoder.layer)
    all_hidden = [] if output_hidden_states else None
    h = hidden_states
    if not layers:
        out = encoder.emb_layer_norm_after(h)
        return out, ((h, out) if all_hidden is not None else None)
    epilogue = residual_epilogue_supported(
        [m for layer in layers for m in (layer.attention.output.dense, layer.output.dense)], h)
    if not epilogue:
        return _fused_add_ln_loop(encoder, layers, h, info, positions, all_hidden)
    pending = None  # fp32 [D]: the biases not yet in h
    owned = False  # h may be the caller's tensor until the first add writes a new one

    def add_projection(h, owned, dense, x):
        if owned:
            h.addmm_(x, dense.weight.t())
        else:
            h = torch.addmm(h, x, dense.weight.t())
        return h, True

    def plus(pending, bias):
        return bias.float() if pending is None else pending + bias.float()

    a = layers[0].attention.LayerNorm(h)
    for i, layer in enumerate(layers):
        if all_hidden is not None:
            all_hidden.append(h if pending is None else (h.float() + pending).to(h.dtype))
        attention = layer.attention
        # (temporaries are passed straight on, so none outlives its use: [T, 4D] GELU output included)
        h, owned = add_projection(h, owned, attention.output.dense, attention.self(a, info, positions)[0])
        pending = plus(pending, attention.output.dense.bias)
        a = None  # the LayerNorm output is spent: free it before the FFN's [T, 4D]
        inter = _intermediate(layer, pending_layer_norm(h, pending, layer.LayerNorm))
        h, owned = add_projection(h, owned, layer.output.dense, inter)
        del inter
        pending = plus(pending, layer.output.dense.bias)
        after = layers[i + 1].attention.LayerNorm if i + 1 < len(layers) else encoder.emb_layer_norm_after
        a = pending_layer_norm(h, pending, after)
    if all_hidden is not None:
        all_hidden.append(a)
    return a, (tuple(all_hidden) if all_hidden is not None else None)


def _intermediate(layer, b):
    """The layer's FFN up-projection + GELU on b (through the module itself if it is not the plain one)."""
    from .modeling_esm import EsmIntermediate

    inter = layer.intermediate
    if type(inter).forward is EsmIntermediate.forward and not inter._forward_hooks and not inter._forward_pre_hooks:
        return linear_gelu(inter.dense, b)  # bias + GELU in the GEMM's epilogue on GPU
    return inter(b)


def _fused_add_ln_loop(encoder, layers, h, info, positions, all_hidden):
    a = layers[0].attention.LayerNorm(h)
    for i, layer in enumerate(layers):
        if all_hidden is not None:
            all_hidden.append(h)
        attention = layer.attention
        context, _ = attention.self(a, info, positions)
        # h + out(context), then the layer's second LayerNorm
        h, b = add_layer_norm(attention.output.dense(context), h, layer.LayerNorm)
        ffn = layer.output.dense(_intermediate(layer, b))
        after = layers[i + 1].attention.LayerNorm if i + 1 < len(layers) else encoder.emb_layer_norm_after
        # h + ffn, then the next layer's first LayerNorm (or the final one)
        h, a = add_layer_norm(ffn, h, after)
    if all_hidden is not None:
        all_hidden.append(a)
    return a, (tuple(all_hidden) if all_hidden is not None else None)


def use_packed_path(model, x: torch.Tensor, output_attentions: bool) -> bool:
    """Whether ``EsmModel.forward`` runs packed: attn_implementation 'packed', or 'auto' on CUDA with
    fp16/bf16 compute (half weights or autocast) and flash kernels that fit the head size."""
    impl = getattr(model, "attn_implementation", "auto")
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
                              output_hidden_states: bool):
    """``EsmModel.forward`` through the packed path: unpad, run packed, re-pad (zeros at padding).

    Token for token the same computation as the padded path (same rotary columns, same learned
    positions, same token-dropout ratio per sequence); outputs at padded positions are zero.
    Returns (last_hidden_state [B, L, D], hidden_states tuple of [B, L, D] or None).
    """
    u = unpad(attention_mask)
    ids = gather_tokens(input_ids, u) if input_ids is not None else None
    embeds = gather_tokens(inputs_embeds, u) if inputs_embeds is not None else None
    B, L = u.batch, u.length
    if positions.dim() == 1:
        # [L] -> [B, L]
        positions = positions.expand(B, L)
    rotary_positions = gather_tokens(positions, u)
    pos_ids = gather_tokens(position_ids, u) if position_ids is not None else None
    seq, hidden = packed_model_forward(model, ids, u.cu_seqlens, u.max_seqlen, position_ids=pos_ids,
                                       inputs_embeds=embeds, output_hidden_states=output_hidden_states,
                                       rotary_positions=rotary_positions)
    seq = repad(seq, u)
    if hidden is not None:
        hidden = tuple(repad(h, u) for h in hidden)
    return seq, hidden
