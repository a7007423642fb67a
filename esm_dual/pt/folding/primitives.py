"""Building blocks shared by the folding trunk: gated multi-head attention with additive biases and
row-chunking helpers that bound the memory of pair-representation updates."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..fast.options import default_options


def row_chunks(n: int, chunk_size: int | None) -> Iterator[slice]:
    """Slices covering 0..n-1 in pieces of ``chunk_size`` (one piece when chunk_size is None)."""
    if chunk_size is None or chunk_size >= n:
        yield slice(0, n)
        return
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def chunked_rows(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_size: int | None, dim: int = -3
) -> torch.Tensor:
    """Apply a row-independent ``fn`` to slices of ``x`` along ``dim`` (default: rows of a
    [*, N, N, C] pair tensor) and concatenate; peak memory scales with ``chunk_size`` instead of N."""
    n = x.shape[dim]
    if chunk_size is None or chunk_size >= n:
        return fn(x)
    return torch.cat(
        [fn(x.narrow(dim, s.start, s.stop - s.start)) for s in row_chunks(n, chunk_size)], dim=dim
    )


WHOLE_OP_ELEMENTS = 1 << 26  # 256 MB of fp32: a pair update this small is never split


def wide_op_rows(chunk_size: int | None, n: int, width: int) -> int | None:
    """Rows per chunk for a pair update whose widest per-pair intermediate has ``width`` channels.

    ``chunk_size`` rows, except that an update whose whole working set (N x N x width) is under
    ``WHOLE_OP_ELEMENTS`` takes as many rows as fit in that: a small protein then runs each update
    in one or two pieces instead of many (each piece is a round of kernel launches), while large
    ones keep the memory bound of ``chunk_size``.
    """
    if chunk_size is None:
        return None
    return max(chunk_size, WHOLE_OP_ELEMENTS // max(1, n * width))


def sdpa_bias_ok(x: torch.Tensor, any_dtype: bool = False, enabled: bool | None = None) -> bool:
    """Triangle attention through ``F.scaled_dot_product_attention`` with the biases as its mask:
    fp32 outside autocast, or in any dtype with ``any_dtype`` (the ``"sdpa"`` / ``"cueq"`` kernels;
    the fused kernels never materialise the [*, H, N, N] scores). Off with ``enabled=False``, the
    model's ``FastPathOptions.triangle_sdpa`` (None: the process default, ``ESM_DUAL_TRIANGLE_SDPA``):
    the explicit scores / softmax path, as HF and OpenFold write it."""
    if not (default_options().triangle_sdpa if enabled is None else enabled):
        return False
    if any_dtype:
        return True
    return x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)


def aligned_empty(shape: tuple, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty [..., N] tensor in storage whose rows are padded to a multiple of 16 elements: SDPA's
    memory-efficient kernel wants aligned mask strides and would otherwise copy the (broadcast) mask."""
    n = shape[-1]
    npad = -(-n // 16) * 16
    return like.new_empty(tuple(shape[:-1]) + (npad,), dtype=dtype or like.dtype)[..., :n]


def aligned_bias(t: torch.Tensor) -> torch.Tensor:
    """t's values in :func:`aligned_empty` storage."""
    buf = aligned_empty(t.shape, t)
    buf.copy_(t)
    return buf


def softmax_fp32(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax computed in fp32 (half-precision scores would overflow with the 1e9 mask biases)."""
    return torch.softmax(scores.float(), dim=dim)


class Attention(nn.Module):
    """Gated multi-head attention with additive biases (AlphaFold2 supplement, Algorithm 13 style).

    ``c_hidden`` is the per-head width; the projections have ``c_hidden * no_heads`` channels.
    """

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, gating: bool = True):
        super().__init__()
        self.c_hidden = c_hidden
        self.no_heads = no_heads
        self.linear_q = nn.Linear(c_in, c_hidden * no_heads, bias=False)
        self.linear_k = nn.Linear(c_in, c_hidden * no_heads, bias=False)
        self.linear_v = nn.Linear(c_in, c_hidden * no_heads, bias=False)
        self.linear_o = nn.Linear(c_hidden * no_heads, c_in)
        self.linear_g = nn.Linear(c_in, c_hidden * no_heads) if gating else None

    def forward(self, x: torch.Tensor, biases: list[torch.Tensor]) -> torch.Tensor:
        """x [*, Q, C_in]; biases broadcast to [*, H, Q, Q] -> [*, Q, C_in] (self-attention over Q)."""
        shape = x.shape[:-1] + (self.no_heads, self.c_hidden)
        # [*, Q, H, K] -> [*, H, Q, K]
        q = self.linear_q(x).view(shape).transpose(-2, -3) / math.sqrt(self.c_hidden)
        k = self.linear_k(x).view(shape).transpose(-2, -3)
        v = self.linear_v(x).view(shape).transpose(-2, -3)
        # [*, H, Q, Q]; biases added in place (the scores are the largest tensor of the trunk)
        scores = torch.matmul(q, k.transpose(-1, -2))
        if scores.dtype != torch.float32:
            scores = scores.float()
        for b in biases:
            scores += b
        probs = torch.softmax(scores, dim=-1)
        del scores
        probs = probs.to(v.dtype)
        # [*, H, Q, K] -> [*, Q, H, K]
        o = torch.matmul(probs, v).transpose(-2, -3)
        if self.linear_g is not None:
            # [*, Q, H, K]
            o = o * torch.sigmoid(self.linear_g(x)).view(shape)
        # [*, Q, H * K]
        o = o.reshape(o.shape[:-2] + (-1,))
        return self.linear_o(o)

    def forward_rows(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The same attention for x [B, R, Q, C_in] (R rows attending independently) with one bias
        per batch entry shared by all rows, bias [B, H, Q, Q] or [B, R, H, Q, Q], as SDPA's mask:
        the scores are never materialised. -> [B, R, Q, C_in]."""
        B, R, Q, _ = x.shape
        shape = (B, R, Q, self.no_heads, self.c_hidden)
        # [B, R, Q, H, K] -> [B, R, H, Q, K]
        q = self.linear_q(x).view(shape).transpose(-2, -3)
        k = self.linear_k(x).view(shape).transpose(-2, -3)
        v = self.linear_v(x).view(shape).transpose(-2, -3)
        outs = []
        if bias.dtype != q.dtype:  # (SDPA wants the mask in the query's dtype)
            bias = aligned_empty(bias.shape, bias, q.dtype).copy_(bias)
        for b in range(B):
            mask = bias[b] if bias.dim() == 5 else bias[b].unsqueeze(0).expand(R, -1, -1, -1)
            # [R, H, Q, K]
            outs.append(F.scaled_dot_product_attention(q[b], k[b], v[b], attn_mask=mask,
                                                       scale=1.0 / math.sqrt(self.c_hidden)))
        # [B, R, H, Q, K] -> [B, R, Q, H, K]
        o = torch.stack(outs).transpose(-2, -3)
        if self.linear_g is not None:
            o = o * torch.sigmoid(self.linear_g(x)).view(shape)
        return self.linear_o(o.reshape(B, R, Q, -1))
