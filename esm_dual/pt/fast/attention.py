"""Variable-length ("varlen") attention: the real tokens of B sequences laid end to end in one stream.

q, k, v are [T, H, K]; sequence b occupies rows ``cu_seqlens[b]:cu_seqlens[b + 1]``; attention never
crosses a sequence boundary and no compute is spent on padding. The padded path (``attention_bias``
[B, 1, 1, L], SDPA or eager softmax) lives in ``modeling_esm.py``.

Back ends of :func:`varlen_attention`:

- ``flash``: FlashAttention-2 varlen kernels through ``torch.ops.aten._flash_attention_forward`` /
  ``_flash_attention_backward`` (CUDA, fp16/bf16, head dim a multiple of 8 up to 256), wrapped in an
  autograd Function, so training works.
- ``fa4``: FlashAttention-4's varlen kernels (the optional ``flash-attn-4`` package, CuTe DSL, written
  for Hopper), forward and backward, no dropout. "auto" takes them on a Hopper GPU where the package is
  installed (``pip install esm-dual[hopper]``), for head dims in ``FA4_HEAD_DIMS``, in training, and in
  inference on packs of at least ``FA4_MIN_TOKEN_HEADS`` token-heads; else ``flash``. If they fail at
  their first call, "auto" warns and counts them as unavailable from then on (:func:`fa4_status`).
  ``FastPathOptions.fa4`` (``ESM_DUAL_FA4=0``) turns them off.
- ``dense``: one SDPA call on [1, H, T, K] with a block-diagonal boolean mask (any device and dtype;
  T x T mask, so for small packs: tests, CPU).
- ``loop``: one SDPA call per sequence (any device and dtype, any T).

Why these back ends and thresholds (measurements, what was tried): docs/performance.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .options import VARLEN_BACKENDS, FastPathOptions, default_options
from .packing import segment_ids

BACKENDS = VARLEN_BACKENDS
_DENSE_MAX_TOKENS = 4096  # "auto" off CUDA: block-diagonal mask up to this many tokens, else a loop


@dataclass(frozen=True)
class VarlenInfo:
    """Where the sequences of a pack start and end; travels through the layers in the slot of the
    padded path's ``attention_bias``.

    cu_seqlens [B + 1] int32 on the tokens' device (0, len0, len0 + len1, ..., T); max_seqlen: the
    longest sequence, a Python int (known on the host, so no device sync); backend: one of BACKENDS;
    options: the model's :class:`FastPathOptions` (None: the process default).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    backend: str = "auto"
    options: FastPathOptions | None = None


# ================================================================================================
# Variable-length attention
# ================================================================================================


def flash_supported(q: torch.Tensor) -> bool:
    """Whether the flash varlen kernels take q [T, H, K]: CUDA, fp16/bf16, K % 8 == 0, K <= 256."""
    K = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and K % 8 == 0 and K <= 256
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


_FA4: dict[str, object] = {}  # the availability probe: "fn" (None: unavailable) and "why"
# Head dims that take FA4 (checked on an H100 against fp32 attention; docs/performance.md): 64 (ESM-2 650M and
# 3B, ESM-1b/1v) and 128 (15B). At 32 and 24 it was right but no faster; at 16 its query gradients were wrong.
FA4_HEAD_DIMS = (64, 128)
# "auto" takes FA4 for a forward-only call (inference) from this many token-heads (T * H) up; with gradients
# (training) at every size (docs/performance.md).
FA4_MIN_TOKEN_HEADS = 500_000


def _fa4_function():
    """flash-attn-4's varlen function (``flash_attn.cute``), or None where it is not installed."""
    if "fn" not in _FA4:
        try:
            from flash_attn.cute import flash_attn_varlen_func

            _FA4["fn"] = flash_attn_varlen_func
        except Exception as e:  # not installed, or its CUDA libraries don't load
            _FA4["fn"] = None
            _FA4["why"] = f"{type(e).__name__}: {e}"
    return _FA4["fn"]


def fa4_status() -> tuple[bool, str | None]:
    """(whether flash-attn-4's kernels are available in this process, why not). They are not where the
    package does not import, or after they failed at a call that "auto" had chosen them for."""
    available = _fa4_function() is not None
    return available, None if available else str(_FA4.get("why"))


def _mark_fa4_unavailable(why: str) -> None:
    _FA4["fn"] = None
    _FA4["why"] = why


def fa4_supported(q: torch.Tensor, options: FastPathOptions | None = None) -> bool:
    """Whether the FlashAttention-4 kernels (the optional ``flash-attn-4`` package, CuTe DSL) take
    q [T, H, K] here: a Hopper GPU (compute capability 9.x, where they were measured), fp16/bf16,
    K in ``FA4_HEAD_DIMS``, and the package available. ``options.fa4`` off turns them off."""
    K = q.shape[-1]
    if not (options or default_options()).fa4:
        return False
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and K in FA4_HEAD_DIMS):
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    return _fa4_function() is not None


def _fa4_pays(q: torch.Tensor) -> bool:
    """Whether "auto" should take FA4 for q [T, H, K]: with gradients always, else on large packs."""
    return (torch.is_grad_enabled() and q.requires_grad) or q.shape[0] * q.shape[1] >= FA4_MIN_TOKEN_HEADS


def _fa4_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    out, _ = _fa4_function()(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                             max_seqlen_k=max_seqlen, softmax_scale=scale)
    return out


class _FlashVarlen(torch.autograd.Function):
    """FlashAttention-2 varlen forward/backward (the kernels behind SDPA's flash back end)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, dropout_p, scale):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_seqlen, ctx.dropout_p, ctx.scale = max_seqlen, dropout_p, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
            ctx.dropout_p, False, seed, offset, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


def _dense_attention(q, k, v, cu_seqlens, dropout_p, scale):
    T = q.shape[0]
    seg = segment_ids(cu_seqlens, T)
    # [T, T]: True where query and key are in the same sequence.
    allowed = seg[:, None] == seg[None, :]
    # [T, H, K] -> [1, H, T, K]
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
    # [1, H, T, K] -> [T, H, K]
    return out.squeeze(0).transpose(0, 1)


def _loop_attention(q, k, v, cu_seqlens, dropout_p, scale):
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        # [n, H, K] -> [1, H, n, K]
        qh, kh, vh = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p, scale=scale)
        # [1, H, n, K] -> [n, H, K]
        outs.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(outs, 0)


def resolve_backend(q: torch.Tensor, backend: str = "auto", dropout_p: float = 0.0,
                    options: FastPathOptions | None = None) -> str:
    """The back end for q [T, H, K]: ``backend``, or where it is "auto" ``options.varlen_backend``, or
    where that is "auto" too the fastest that takes q. A named back end that cannot run is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown varlen attention back end {backend!r}; use one of {BACKENDS}")
    options = options or default_options()
    if backend == "auto":
        backend = options.varlen_backend
    if backend == "auto":
        if dropout_p == 0.0 and fa4_supported(q, options) and _fa4_pays(q):  # the FA4 kernels have no dropout
            return "fa4"
        if flash_supported(q):
            return "flash"
        return "dense" if q.shape[0] <= _DENSE_MAX_TOKENS else "loop"
    if backend == "fa4":
        if not fa4_supported(q, options):
            why = "off (FastPathOptions.fa4, ESM_DUAL_FA4=0)" if not options.fa4 else _FA4.get("why")
            raise ValueError(f"flash-attn-4 varlen attention needs a Hopper GPU, fp16/bf16, a head dim in "
                             f"{FA4_HEAD_DIMS} and the flash-attn-4 package; got device {q.device}, "
                             f"{q.dtype}, head dim {q.shape[-1]}"
                             + (f" ({why})" if q.is_cuda else ""))
        if dropout_p:
            raise ValueError("flash-attn-4 varlen attention has no dropout; use backend 'flash'")
    if backend == "flash" and not flash_supported(q):
        raise ValueError(f"flash varlen attention needs CUDA, fp16/bf16 and a head dim that is a multiple of 8 "
                         f"up to 256; got device {q.device}, {q.dtype}, head dim {q.shape[-1]}")
    return backend


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    options: FastPathOptions | None = None,
) -> torch.Tensor:
    """Attention within each sequence of a pack. q, k, v [T, H, K] -> [T, H, K].

    cu_seqlens [B + 1] int32; max_seqlen: longest sequence (int); scale: applied to q k^T (None: K^-0.5);
    options: the switches (None: the process default).
    """
    requested = backend
    backend = resolve_backend(q, backend, dropout_p, options)
    if scale is None and backend in ("fa4", "flash"):
        scale = q.shape[-1] ** -0.5
    if backend == "fa4":
        try:
            return _fa4_attention(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), float(scale))
        except Exception as e:
            if requested == "fa4":
                raise
            # chosen by "auto": FA4 counts as unavailable from now on; flash takes over
            why = f"{type(e).__name__}: {e}"
            _mark_fa4_unavailable(f"failed at its first call ({why})")
            warnings.warn(f"flash-attn-4 failed ({why}); using the FlashAttention-2 kernels instead",
                          RuntimeWarning, stacklevel=2)
            backend = "flash"
    if backend == "flash":
        return _FlashVarlen.apply(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), float(dropout_p),
                                  float(scale))
    if backend == "dense":
        return _dense_attention(q, k, v, cu_seqlens, dropout_p, scale)
    return _loop_attention(q, k, v, cu_seqlens, dropout_p, scale)


