"""Attention back ends of the PyTorch ESM encoder.

The padded path (``attention_bias`` [B, 1, 1, L], SDPA or eager softmax) lives in ``modeling_esm.py``.
This module holds the packed ("varlen") path: the real tokens of B sequences laid end to end in one
[T, D] stream, sequence b occupying rows ``cu_seqlens[b]:cu_seqlens[b + 1]``; attention never crosses
a sequence boundary and no compute is spent on padding.

Back ends of :func:`varlen_attention`:

- ``flash``: FlashAttention-2 varlen kernels through ``torch.ops.aten._flash_attention_forward`` /
  ``_flash_attention_backward`` (CUDA, fp16/bf16, head dim a multiple of 8 up to 256), wrapped in an
  autograd Function, so training works.
  (cuDNN's ragged SDPA, ``_cudnn_attention_forward`` with cumulative lengths, was measured on an H100
  with torch 2.11: right answers but 73 ms per layer call against flash's 0.44 ms, so it is not offered.
  A Triton kernel doing rotary and varlen attention in one pass was also measured there, on real-length
  32k-token packs: 0.584 vs 0.597 ms (rotary kernel + flash) at head dim 64, 0.377 vs 0.429 ms at 32;
  its attention core ran at ~160 TFLOP/s against flash's ~200, so it was not kept.)
- ``fa4``: FlashAttention-4's varlen kernels (the optional ``flash-attn-4`` package, CuTe DSL, written
  for Hopper's tensor-memory copies and warpgroup MMA), forward and backward, no dropout. "auto" takes
  them on a Hopper GPU where the package is installed (``pip install esm-dual[hopper]``), for head dims
  64 and 128, in training, and in inference on packs of at least ``FA4_MIN_TOKEN_HEADS`` token-heads;
  else ``flash``. If they fail at their first call, "auto" warns and uses ``flash`` from then on.
  ``ESM_DUAL_FA4=0`` turns them off.
- ``dense``: one SDPA call on [1, H, T, K] with a block-diagonal boolean mask (any device and dtype;
  T x T mask, so for small packs: tests, CPU).
- ``loop``: one SDPA call per sequence (any device and dtype, any T).

Rotary embeddings inside a pack restart at position 0 for every sequence (``positions`` [T]). On CUDA
the query/key rotation (with the query's K^-0.5 scale folded in) is one Triton kernel that reads the
projections once and writes [T, H, K] tensors in the layout the flash kernels take; elsewhere it
falls back to ``EsmRotaryEmbedding`` itself (exactly the padded path's arithmetic).
(Tried and not kept: the rotation in the epilogue of a Triton q/k/v GEMM, on an H100 at 32k-token packs,
against cuBLAS + this kernel: 650M 0.55 ms (0.42 + 0.12), 3B 1.86 ms. Right answers, one rounding fewer (1.7e-3
vs 2.0e-3 relative to fp32). With sin/cos evaluated for every output element it took 0.84 and 2.67 ms. With
TMA loads, the weight rows interleaved per call so that each rotation pair sits side by side in one product,
and fp32 cos/sin tables read once per row and dim of a tile: 0.50 ms for the 650M (its GEMM alone 0.47
against cuBLAS's 0.42) and 1.79-1.90 ms for the 3B. But the whole encoder did not move: 650M 381k against
380k tok/s, 3B 103.5k against 104.3k (three alternating passes each, one process). So it was not kept.
Routing torch's GEMMs through cuBLASLt (``preferred_blas_library``) left the encoder unchanged: 650M 379k vs
379-382k tok/s, 3B 104k either way; so did torch's TunableOp (every cuBLAS/cuBLASLt algorithm timed per GEMM
shape): 650M 380k either way, 3B 104.6k vs 105.4k. How far the GEMMs alone could go: ``benchmarks/encoder_gpu.py
--bounds``.)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "fa4", "flash", "dense", "loop")
_DENSE_MAX_TOKENS = 4096  # "auto" off CUDA: block-diagonal mask up to this many tokens, else a loop


@dataclass(frozen=True)
class VarlenInfo:
    """Where the sequences of a pack start and end; travels through the layers in the slot of the
    padded path's ``attention_bias``.

    cu_seqlens [B + 1] int32 on the tokens' device (0, len0, len0 + len1, ..., T); max_seqlen: the
    longest sequence, a Python int (known on the host, so no device sync); backend: one of BACKENDS.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    backend: str = "auto"


# ================================================================================================
# Variable-length attention
# ================================================================================================


def flash_supported(q: torch.Tensor) -> bool:
    """Whether the flash varlen kernels take q [T, H, K]: CUDA, fp16/bf16, K % 8 == 0, K <= 256."""
    K = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and K % 8 == 0 and K <= 256
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


_FA4: dict[str, object] = {}
# Head dims that take FA4 (flash-attn-4 4.0.0b36, checked on an H100 against fp32 attention, outputs and
# gradients, contiguous and strided q/k/v): 64 (ESM-2 650M and 3B, ESM-1b/1v) and 128 (15B). At 64 its
# forward ran 8-25% faster than FlashAttention-2 on real-length packs. At 32 (150M) and 24 (35M) it was
# right but no faster (0.39 vs 0.41 ms on a 32k-token pack) while its host-side cost per call is about
# 0.24 ms against 0.07 ms; at 16 (8M) its query gradients were wrong (1.2 relative error).
FA4_HEAD_DIMS = (64, 128)
# "auto" takes FA4 for a forward-only call (inference) from this many token-heads (T * H) up. Measured on an
# H100 at head dim 64, forward only: 15.8k tokens x 20 heads 0.290 ms vs FlashAttention-2's 0.237; 15.8k x 40
# 0.395 vs 0.526; 32.6k x 20 0.448 vs 0.524; 65.3k x 20 0.960 vs 1.047. Its host-side cost per call (about
# 0.24 ms against 0.07 ms) also shows on small packs: `esm-dual embed` of the 650M at 4,096-token batches
# ran at 56k residues/s with FA4 everywhere against 74k without. With gradients (training) FA4 is taken at
# every size: forward + backward of the 650M ran 6-7% faster with it at 16k- and 32k-token packs.
FA4_MIN_TOKEN_HEADS = 500_000
# Tried and not kept: other forward tiles through flash-attn-4's internal ``_flash_attn_fwd(..., tile_mn)``. At head
# dim 64 it picks 192 x 128; 192 x 96 made one layer's attention 1-14% faster on 32k-65k-token packs and 25-31%
# faster on 8k-16k packs (H100). But the 650M and 3B encoders at 32k and 64k packs moved by 0-0.7%, within the
# run-to-run spread, and taking FA4 from 300k token-heads with them (16k-token packs of the 650M: +4% in
# encoder_gpu.py) made `esm-dual embed` at its 16,384-token default slower end to end: 70-74k against 83-93k
# residues/s, since that loop is partly host-bound and FA4 costs more host time per call. Also tried: sequences
# reordered longest first inside a pack (attention 2-7% faster on large packs, the encoder unchanged within the
# spread), and CUDA graphs (the GPU is already busy 98-100% of a pass: 84.8 vs 85.3 ms per 32k-token pack).


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


def fa4_supported(q: torch.Tensor) -> bool:
    """Whether the FlashAttention-4 kernels (the optional ``flash-attn-4`` package, CuTe DSL) take
    q [T, H, K] here: a Hopper GPU (compute capability 9.x, where they were measured), fp16/bf16,
    K in ``FA4_HEAD_DIMS``, and the package imports. ``ESM_DUAL_FA4=0`` turns them off."""
    K = q.shape[-1]
    if os.environ.get("ESM_DUAL_FA4", "1") in ("", "0") or _FA4.get("broken"):
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


def _segment_ids(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """[T] index of the sequence each token belongs to (no host sync)."""
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(T, device=cu_seqlens.device),
                              right=True)


def _dense_attention(q, k, v, cu_seqlens, dropout_p, scale):
    T = q.shape[0]
    seg = _segment_ids(cu_seqlens, T)
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


def resolve_backend(q: torch.Tensor, backend: str = "auto", dropout_p: float = 0.0) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown varlen attention back end {backend!r}; use one of {BACKENDS}")
    forced = os.environ.get("ESM_DUAL_VARLEN", "auto")  # a process-wide override, for benchmarks
    if backend == "auto" and forced in BACKENDS:
        backend = forced
    if backend == "auto":
        if dropout_p == 0.0 and fa4_supported(q) and _fa4_pays(q):  # the FA4 kernels have no dropout
            return "fa4"
        if flash_supported(q):
            return "flash"
        return "dense" if q.shape[0] <= _DENSE_MAX_TOKENS else "loop"
    if backend == "fa4":
        if not fa4_supported(q):
            why = _FA4.get("broken") or _FA4.get("why") or "off (ESM_DUAL_FA4=0)"
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
) -> torch.Tensor:
    """Attention within each sequence of a pack. q, k, v [T, H, K] -> [T, H, K].

    cu_seqlens [B + 1] int32; max_seqlen: longest sequence (int); scale: applied to q k^T (None: K^-0.5).
    """
    requested = backend
    backend = resolve_backend(q, backend, dropout_p)
    if scale is None and backend in ("fa4", "flash"):
        scale = q.shape[-1] ** -0.5
    if backend == "fa4":
        try:
            return _fa4_attention(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), float(scale))
        except Exception as e:
            if requested == "fa4":
                raise
            # chosen by "auto": fall back to flash for the rest of the process
            _FA4["broken"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"flash-attn-4 failed ({_FA4['broken']}); using the FlashAttention-2 kernels instead",
                          RuntimeWarning, stacklevel=2)
            backend = "flash"
    if backend == "flash":
        return _FlashVarlen.apply(q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), float(dropout_p),
                                  float(scale))
    if backend == "dense":
        return _dense_attention(q, k, v, cu_seqlens, dropout_p, scale)
    return _loop_attention(q, k, v, cu_seqlens, dropout_p, scale)


# ================================================================================================
# Fused rotary (Triton)
# ================================================================================================

_KERNELS: dict[str, object] = {}


def triton_available() -> bool:
    if "ok" not in _KERNELS:
        try:
            import triton  # noqa: F401

            _KERNELS["ok"] = True
        except Exception:  # pragma: no cover - depends on the install
            _KERNELS["ok"] = False
    return bool(_KERNELS["ok"])


def _rotary_kernel():
    if "rotary" in _KERNELS:
        return _KERNELS["rotary"]
    import triton
    import triton.language as tl

    @triton.jit
    def rotary_qkv(QI, KI, VI, QO, KO, VO, POS, INV_FREQ, stride_qi, stride_ki, stride_vi, stride_o,
                   q_scale, H, HALF, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr,
                   COPY_V: tl.constexpr):
        # One program per token: rotate its H query and key heads, copy its value heads.
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        m = (h < H) & (d < HALF)
        pos = tl.load(POS + t).to(tl.float32)
        inv = tl.load(INV_FREQ + d, mask=d < HALF, other=0.0).to(tl.float32)
        f = pos * inv
        c = tl.cos(f)
        s = tl.sin(f)
        if INVERSE:
            s = -s
        col = h * (2 * HALF) + d
        # query: x = [x1, x2] -> [x1 c - x2 s, x2 c + x1 s] * q_scale
        q1 = tl.load(QI + t * stride_qi + col, mask=m, other=0.0).to(tl.float32)
        q2 = tl.load(QI + t * stride_qi + col + HALF, mask=m, other=0.0).to(tl.float32)
        cq = c * q_scale
        sq = s * q_scale
        tl.store(QO + t * stride_o + col, (q1 * cq - q2 * sq).to(QO.dtype.element_ty), mask=m)
        tl.store(QO + t * stride_o + col + HALF, (q2 * cq + q1 * sq).to(QO.dtype.element_ty), mask=m)
        k1 = tl.load(KI + t * stride_ki + col, mask=m, other=0.0).to(tl.float32)
        k2 = tl.load(KI + t * stride_ki + col + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(KO + t * stride_o + col, (k1 * c - k2 * s).to(KO.dtype.element_ty), mask=m)
        tl.store(KO + t * stride_o + col + HALF, (k2 * c + k1 * s).to(KO.dtype.element_ty), mask=m)
        if COPY_V:
            v1 = tl.load(VI + t * stride_vi + col, mask=m, other=0.0)
            v2 = tl.load(VI + t * stride_vi + col + HALF, mask=m, other=0.0)
            tl.store(VO + t * stride_o + col, v1, mask=m)
            tl.store(VO + t * stride_o + col + HALF, v2, mask=m)

    _KERNELS["rotary"] = rotary_qkv
    return rotary_qkv


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch_rotary(qi, ki, vi, qo, ko, vo, positions, inv_freq, q_scale, H, K, inverse, copy_v):
    import triton  # noqa: F401

    T = qi.shape[0]
    if T == 0:
        return
    kernel = _rotary_kernel()
    half = K // 2
    block_h, block_d = _next_pow2(H), _next_pow2(half)
    num_warps = 4 if block_h * block_d >= 512 else 1
    kernel[(T,)](qi, ki, vi if copy_v else qi, qo, ko, vo if copy_v else qo, positions, inv_freq,
                 qi.stride(0), ki.stride(0), vi.stride(0) if copy_v else 0, qo.stride(0), float(q_scale), H, half,
                 BLOCK_H=block_h, BLOCK_D=block_d, INVERSE=inverse, COPY_V=copy_v, num_warps=num_warps)


def _rows_ok(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.stride(1) == 1


class _RotaryQK(torch.autograd.Function):
    """q, k [T, D] (rows may be strided) -> rotated q * scale, k as contiguous [T, H, K]."""

    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, q_scale, H, K):
        T = q.shape[0]
        qo = torch.empty(T, H, K, dtype=q.dtype, device=q.device)
        ko = torch.empty(T, H, K, dtype=k.dtype, device=k.device)
        q = q if _rows_ok(q) else q.contiguous()
        k = k if _rows_ok(k) else k.contiguous()
        _launch_rotary(q, k, None, qo, ko, None, positions, inv_freq, q_scale, H, K, False, False)
        ctx.save_for_backward(positions, inv_freq)
        ctx.q_scale, ctx.H, ctx.K = q_scale, H, K
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        positions, inv_freq = ctx.saved_tensors
        H, K = ctx.H, ctx.K
        T = dq.shape[0]
        # The rotation is orthogonal: its transpose is the rotation by -angle (same scale).
        dqi = torch.empty(T, H * K, dtype=dq.dtype, device=dq.device)
        dki = torch.empty(T, H * K, dtype=dk.dtype, device=dk.device)
        dq = dq.reshape(T, H * K)
        dk = dk.reshape(T, H * K)
        dq = dq if _rows_ok(dq) else dq.contiguous()
        dk = dk if _rows_ok(dk) else dk.contiguous()
        _launch_rotary(dq, dk, None, dqi, dki, None, positions, inv_freq, ctx.q_scale, H, K, True, False)
        return dqi, dki, None, None, None, None, None


def triton_ok(x: torch.Tensor) -> bool:
    """Triton kernels for x: on CUDA (or on the CPU under TRITON_INTERPRET=1), unless ESM_DUAL_NO_TRITON=1."""
    if os.environ.get("ESM_DUAL_NO_TRITON", "0") not in ("", "0"):
        return False
    return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and triton_available()


class _QKVRotary(torch.autograd.Function):
    """The three projections as one GEMM on the concatenated weights, then the rotary kernel.

    x [T, Din] -> rotated q * scale, k, and v, each [T, H, K] (v a view of the fused output). Backward:
    one kernel writes d(qkv) [T, 3D] (inverse rotation of dq, dk; dv copied), then one GEMM each for
    dx and the stacked dW, and one reduction for the biases -- instead of three of each plus two adds.
    """

    @staticmethod
    def forward(ctx, x, wq, wk, wv, bq, bk, bv, positions, inv_freq, q_scale, H):
        D = wq.shape[0]
        T = x.shape[0]
        K = D // H
        w = torch.cat([wq, wk, wv])
        b = torch.cat([bq, bk, bv])
        # [T, 3D]
        qkv = torch.nn.functional.linear(x, w, b)
        qo = torch.empty(T, H, K, dtype=qkv.dtype, device=qkv.device)
        ko = torch.empty(T, H, K, dtype=qkv.dtype, device=qkv.device)
        _launch_rotary(qkv[:, :D], qkv[:, D: 2 * D], None, qo, ko, None, positions, inv_freq, q_scale, H, K, False,
                       False)
        # [T, D] (row stride 3D) -> [T, H, K]
        v = qkv[:, 2 * D:].view(T, H, K)
        ctx.save_for_backward(x, w, positions, inv_freq)
        ctx.q_scale, ctx.H, ctx.K, ctx.D = q_scale, H, K, D
        return qo, ko, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, w, positions, inv_freq = ctx.saved_tensors
        H, K, D = ctx.H, ctx.K, ctx.D
        T = x.shape[0]
        dq, dk, dv = ((torch.zeros(T, H, K, dtype=x.dtype, device=x.device) if g is None else g).reshape(T, D)
                      for g in (dq, dk, dv))
        dq, dk, dv = (g if _rows_ok(g) else g.contiguous() for g in (dq, dk, dv))
        dqkv = torch.empty(T, 3 * D, dtype=dq.dtype, device=dq.device)
        _launch_rotary(dq, dk, dv, dqkv[:, :D], dqkv[:, D: 2 * D], dqkv[:, 2 * D:], positions, inv_freq, ctx.q_scale,
                       H, K, True, True)
        need = ctx.needs_input_grad
        dx = dqkv @ w if need[0] else None
        dw = dqkv.t() @ x if any(need[1:4]) else None
        db = dqkv.sum(0) if any(need[4:7]) else None
        dws = (None, None, None) if dw is None else (dw[:D], dw[D: 2 * D], dw[2 * D:])
        dbs = (None, None, None) if db is None else (db[:D], db[D: 2 * D], db[2 * D:])
        return (dx, *dws, *dbs, None, None, None, None)


def _plain_linear(m) -> bool:
    from torch.nn.modules import module as _module

    return (type(m) is torch.nn.Linear and m.bias is not None and not m._forward_hooks and not m._forward_pre_hooks
            and not _module._global_forward_hooks and not _module._global_forward_pre_hooks)


def fused_qkv_supported(attn, x: torch.Tensor) -> bool:
    """One GEMM + the rotary kernel for the projections: rotary model, Triton, plain Linear modules (no hooks or
    adapters, which then keep their own calls), no autocast, x in the weights' dtype."""
    if attn.rotary_embeddings is None or x.dim() != 2 or not triton_ok(x):
        return False
    if not all(_plain_linear(m) for m in (attn.query, attn.key, attn.value)):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return x.dtype == attn.query.weight.dtype and attn.attention_head_size % 2 == 0


def qkv_rotary_fused(attn, x: torch.Tensor, positions: torch.Tensor, q_scale: float):
    """x [T, D] -> q (rotated, scaled), k (rotated), v, each [T, H, K], through :class:`_QKVRotary`."""
    return _QKVRotary.apply(x, attn.query.weight, attn.key.weight, attn.value.weight, attn.query.bias,
                            attn.key.bias, attn.value.bias, positions.to(torch.int32).contiguous(),
                            attn.rotary_embeddings.inv_freq.to(torch.float32).contiguous(), float(q_scale),
                            attn.num_attention_heads)


def fused_rotary_supported(q: torch.Tensor) -> bool:
    return q.shape[-1] % 2 == 0 and triton_ok(q)


def rotary_qk_fused(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                    q_scale: float, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused half-rotation rotary for packed tokens. q, k [T, D]; positions [T] (int) -> q', k' [T, H, K].

    Same arithmetic as ``EsmRotaryEmbedding`` (angles and products in fp32, query scaled by q_scale).
    """
    T, D = q.shape
    K = D // num_heads
    return _RotaryQK.apply(q, k, positions.to(torch.int32).contiguous(), inv_freq.to(torch.float32).contiguous(),
                           float(q_scale), num_heads, K)


# ================================================================================================
# Fused residual add + LayerNorm (Triton, inference)
# ================================================================================================


def _add_ln_kernel():
    if "add_ln" in _KERNELS:
        return _KERNELS["add_ln"]
    import triton
    import triton.language as tl

    @triton.jit
    def add_layer_norm(X, R, P, W, B, HO, YO, T, D, eps, stride_x, stride_r, stride_h, stride_y, BLOCK: tl.constexpr,
                       ROWS: tl.constexpr, HAS_X: tl.constexpr, HAS_P: tl.constexpr):
        # ROWS rows per program. With HAS_X: h = x + r (rounded to the storage dtype, as a separate add
        # would) is stored to HO; else h = r. With HAS_P, the fp32 vector P (biases not yet added to h)
        # joins h inside the LayerNorm only. y = LayerNorm(h [+ P]) with statistics in fp32.
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS))[:, None].to(tl.int64)
        cols = tl.arange(0, BLOCK)[None, :]
        cm = cols < D
        m = (rows < T) & cm
        r = tl.load(R + rows * stride_r + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_X:
            x = tl.load(X + rows * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            h = (x + r).to(HO.dtype.element_ty)
            tl.store(HO + rows * stride_h + cols, h, mask=m)
            hf = h.to(tl.float32)
        else:
            hf = r
        if HAS_P:
            hf = hf + tl.load(P + cols, mask=cm, other=0.0)
        mean = tl.sum(hf, axis=1)[:, None] / D
        d = tl.where(m, hf - mean, 0.0)
        var = tl.sum(d * d, axis=1)[:, None] / D
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)
        tl.store(YO + rows * stride_y + cols, (d * rstd * w + b).to(YO.dtype.element_ty), mask=m)

    _KERNELS["add_ln"] = add_layer_norm
    return add_layer_norm


def _launch_ln(x, residual, pending, ln, h):
    import triton

    T, D = residual.shape
    y = torch.empty(T, D, dtype=residual.dtype, device=residual.device)
    if T:
        block = _next_pow2(D)
        # Several rows per program up to D = 4096 (H100, 32k rows, LayerNorm of h + pending: D 1280
        # 62 us with 4 rows and 4 warps against 76 us with one row and 8; D 2560 118 vs 128; D 640 35 vs 38).
        rows = 2 if block <= 1024 else (4 if block <= 4096 else 1)
        num_warps = 4 if rows > 1 else 16
        _add_ln_kernel()[(triton.cdiv(T, rows),)](
            x if x is not None else residual, residual, pending if pending is not None else ln.weight, ln.weight,
            ln.bias, h if h is not None else residual, y, T, D, float(ln.eps), x.stride(0) if x is not None else 0,
            residual.stride(0), h.stride(0) if h is not None else 0, y.stride(0), BLOCK=block, ROWS=rows,
            HAS_X=x is not None, HAS_P=pending is not None, num_warps=num_warps)
    return y


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, ln) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, ln(x + residual)) for x, residual [T, D]; one pass over memory (no autograd).

    ``ln`` is an ``nn.LayerNorm`` over D. Falls back to the two torch ops where Triton cannot run.
    """
    if not triton_ok(x) or x.dim() != 2 or x.stride(1) != 1 or residual.stride(1) != 1:
        h = x + residual
        return h, ln(h)
    h = torch.empty_like(x)
    return h, _launch_ln(x, residual, None, ln, h)


def pending_layer_norm(h: torch.Tensor, pending: torch.Tensor | None, ln) -> torch.Tensor:
    """ln(h + pending) for h [T, D] and pending [D] fp32 (or None), without storing h + pending.

    The inference loop keeps the residual stream without its Linear biases (the residual add runs in
    the GEMM's epilogue, which has no room for a bias too); ``pending`` is their running sum."""
    if not triton_ok(h) or h.dim() != 2 or h.stride(1) != 1:
        return ln(h if pending is None else (h.float() + pending).to(h.dtype))
    if pending is not None:
        pending = pending.to(device=h.device, dtype=torch.float32).contiguous()
    return _launch_ln(None, h, pending, ln, None)


def residual_epilogue_enabled() -> bool:
    """ESM_DUAL_RESIDUAL_EPILOGUE=0 turns off the residual add in the GEMM epilogue (inference loop)."""
    return os.environ.get("ESM_DUAL_RESIDUAL_EPILOGUE", "1") not in ("", "0")


def residual_epilogue_supported(denses, h: torch.Tensor) -> bool:
    """The residual add can run in these projections' GEMM epilogue (h += x W^T, in place): plain
    ``nn.Linear`` modules with biases and no hooks, weights in h's dtype, h [T, D] contiguous, no autocast
    (which would hand the in-place product operands of another dtype)."""
    return (residual_epilogue_enabled() and h.dim() == 2 and h.is_contiguous()
            and not torch.is_autocast_enabled(h.device.type)
            and all(_plain_linear(m) and m.weight.dtype == h.dtype and m.weight.device == h.device for m in denses))


# ================================================================================================
# The FFN's first projection with its GELU (inference)
# ================================================================================================


def exact_gelu_forced() -> bool:
    """ESM_DUAL_EXACT_GELU=1 keeps the separate exact-erf GELU pass in half precision too."""
    return os.environ.get("ESM_DUAL_EXACT_GELU", "0") not in ("", "0")


def fused_linear_gelu_supported(dense, x: torch.Tensor) -> bool:
    return (x.is_cuda and x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16)
            and x.dtype == dense.weight.dtype and _plain_linear(dense) and not exact_gelu_forced()
            and not torch.is_autocast_enabled(x.device.type))


def linear_gelu(dense, x: torch.Tensor) -> torch.Tensor:
    """GELU(dense(x)) for x [T, Din], inference.

    On CUDA in fp16/bf16 this is one cuBLASLt GEMM with the bias and the GELU in its epilogue
    (``torch._addmm_activation``), which saves a read and a write of the [T, 4D] activation. That
    epilogue evaluates GELU in its tanh form; its largest deviation from the exact erf form is 4.7e-4
    (at |x| near 2), below half a unit in the last place of bf16 (3.9e-3) and fp16 (4.9e-4) at that
    magnitude, so in half precision the results are those of the exact form up to rounding. fp32 and
    the CPU keep the exact erf GELU; ``ESM_DUAL_EXACT_GELU=1`` keeps it everywhere.
    """
    if fused_linear_gelu_supported(dense, x):
        return torch._addmm_activation(dense.bias, x, dense.weight.t(), use_gelu=True)
    return F.gelu(dense(x), approximate="none")


# ================================================================================================
# The packed self-attention of one layer
# ================================================================================================


def packed_self_attention(attn, hidden_states: torch.Tensor, positions: torch.Tensor | None,
                          info: VarlenInfo) -> torch.Tensor:
    """``EsmSelfAttention`` on a pack. hidden_states [T, D]; positions [T] -> context [T, D].

    With Triton and plain ``nn.Linear`` projections, one GEMM on the concatenated weights and one
    rotary kernel (:class:`_QKVRotary`); otherwise the module's own ``query``/``key``/``value`` calls
    (so hooks and adapters on them keep working). The query is scaled by K^-0.5 before rotary, as in
    the padded path.
    """
    H, K = attn.num_attention_heads, attn.attention_head_size
    T = hidden_states.shape[0]
    scale = K**-0.5
    dropout_p = attn.dropout_prob if attn.training else 0.0
    if fused_qkv_supported(attn, hidden_states):
        q, k, v = qkv_rotary_fused(attn, hidden_states, positions, scale)
        context = varlen_attention(q, k, v, info.cu_seqlens, info.max_seqlen, dropout_p=dropout_p, scale=1.0,
                                   backend=info.backend)
        # [T, H, K] -> [T, D]
        return context.reshape(T, H * K)
    q = attn.query(hidden_states)
    k = attn.key(hidden_states)
    v = attn.value(hidden_states)
    rotary = attn.rotary_embeddings
    if rotary is not None and fused_rotary_supported(q):
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
        if not q.is_contiguous() and resolve_backend(q, info.backend, dropout_p) in ("fa4", "flash"):
            q, k = q.contiguous(), k.contiguous()
    # [T, D] -> [T, H, K]
    v = v.view(T, H, K)
    context = varlen_attention(q, k, v, info.cu_seqlens, info.max_seqlen, dropout_p=dropout_p, scale=attn_scale,
                               backend=info.backend)
    # [T, H, K] -> [T, D]
    return context.reshape(T, H * K)
