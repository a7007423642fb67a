"""Triton kernels of the packed encoder and their torch fallbacks (the fallbacks run wherever Triton
cannot: off CUDA, without the package, or with ``FastPathOptions.triton`` off).

- Rotary for packed tokens: q, k [T, D] (rows may be strided) -> rotated q * scale, k as [T, H, K] in
  the layout the varlen kernels take; one program per token, angles and products in fp32, the same
  arithmetic as ``EsmRotaryEmbedding`` (its fallback). With autograd (the rotation is orthogonal: the
  backward is the rotation by -angle).
- The three q/k/v projections as one GEMM on the concatenated weights + the rotary kernel
  (:class:`_QKVRotary`), where the projections are plain ``nn.Linear`` modules.
- Residual add + LayerNorm in one pass over [T, D] (:func:`add_layer_norm`), and LayerNorm of h plus a
  pending fp32 bias vector (:func:`pending_layer_norm`), statistics in fp32. Inference only.
- LayerNorm of rows with strided leading dims into another dtype (:func:`layer_norm_rows`): ESMFold's fast
  mode reads its fp32 pair state (also transposed, in place) and writes bf16 for the projections. Inference only.

Under Triton's ``TRITON_INTERPRET=1`` the kernels also run on the CPU (slowly: kernel tests).
"""

from __future__ import annotations

import os

import torch

from .options import FastPathOptions, default_options

# ================================================================================================
# Rotary (Triton)
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


def triton_ok(x: torch.Tensor, options: FastPathOptions | None = None) -> bool:
    """Triton kernels for x: on CUDA (or on the CPU under TRITON_INTERPRET=1), unless ``options.triton``
    is off (``ESM_DUAL_NO_TRITON=1``)."""
    if not (options or default_options()).triton:
        return False
    # (Triton's own variable is read only off CUDA: the GPU path reads no environment.)
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


def plain_linear(m) -> bool:
    """m is a ``torch.nn.Linear`` itself (not a subclass or an adapter) with a bias, and no module hooks
    (its own or global) would see a call: code that uses its weights directly skips nothing."""
    from torch.nn.modules import module as _module

    return (type(m) is torch.nn.Linear and m.bias is not None and not m._forward_hooks and not m._forward_pre_hooks
            and not _module._global_forward_hooks and not _module._global_forward_pre_hooks)


def fused_qkv_supported(attn, x: torch.Tensor, options: FastPathOptions | None = None) -> bool:
    """One GEMM + the rotary kernel for the projections: rotary model, Triton, plain Linear modules (no hooks or
    adapters, which then keep their own calls), no autocast, x in the weights' dtype."""
    if attn.rotary_embeddings is None or x.dim() != 2 or not triton_ok(x, options):
        return False
    if not all(plain_linear(m) for m in (attn.query, attn.key, attn.value)):
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


def fused_rotary_supported(q: torch.Tensor, options: FastPathOptions | None = None) -> bool:
    return q.shape[-1] % 2 == 0 and triton_ok(q, options)


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
# Residual add + LayerNorm (Triton, inference)
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
        # Several rows per program up to D = 4096 (measured: docs/performance.md).
        rows = 2 if block <= 1024 else (4 if block <= 4096 else 1)
        num_warps = 4 if rows > 1 else 16
        _add_ln_kernel()[(triton.cdiv(T, rows),)](
            x if x is not None else residual, residual, pending if pending is not None else ln.weight, ln.weight,
            ln.bias, h if h is not None else residual, y, T, D, float(ln.eps), x.stride(0) if x is not None else 0,
            residual.stride(0), h.stride(0) if h is not None else 0, y.stride(0), BLOCK=block, ROWS=rows,
            HAS_X=x is not None, HAS_P=pending is not None, num_warps=num_warps)
    return y


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, ln,
                   options: FastPathOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, ln(x + residual)) for x, residual [T, D]; one pass over memory (no autograd).

    ``ln`` is an ``nn.LayerNorm`` over D. Falls back to the two torch ops where Triton cannot run.
    """
    if not triton_ok(x, options) or x.dim() != 2 or x.stride(1) != 1 or residual.stride(1) != 1:
        h = x + residual
        return h, ln(h)
    h = torch.empty_like(x)
    return h, _launch_ln(x, residual, None, ln, h)


def pending_layer_norm(h: torch.Tensor, pending: torch.Tensor | None, ln,
                       options: FastPathOptions | None = None) -> torch.Tensor:
    """ln(h + pending) for h [T, D] and pending [D] fp32 (or None), without storing h + pending.

    The inference loop keeps the residual stream without its Linear biases (the residual add runs in
    the GEMM's epilogue, which has no room for a bias too); ``pending`` is their running sum."""
    if not triton_ok(h, options) or h.dim() != 2 or h.stride(1) != 1:
        return ln(h if pending is None else (h.float() + pending).to(h.dtype))
    if pending is not None:
        pending = pending.to(device=h.device, dtype=torch.float32).contiguous()
    return _launch_ln(None, h, pending, ln, None)


# ================================================================================================
# LayerNorm of strided rows into another dtype (Triton, inference): ESMFold's pair tensors
# ================================================================================================


def _strided_ln_kernel():
    if "strided_ln" in _KERNELS:
        return _KERNELS["strided_ln"]
    import triton
    import triton.language as tl

    @triton.jit
    def strided_layer_norm(X, W, B, Y, T, D, S1, S2, stride0, stride1, stride2, eps, BLOCK: tl.constexpr,
                           ROWS: tl.constexpr):
        # Row r of the [T = S0 * S1 * S2, D] view is x[r // (S1 S2), (r // S2) % S1, r % S2, :], which sits at
        # that index times (stride0, stride1, stride2); the last dim is contiguous. y [T, D] is contiguous, in
        # Y's dtype; the statistics and the affine map in fp32.
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        offs = (rows // (S1 * S2)) * stride0 + ((rows // S2) % S1) * stride1 + (rows % S2) * stride2
        cols = tl.arange(0, BLOCK)[None, :]
        cm = cols < D
        m = (rows[:, None] < T) & cm
        x = tl.load(X + offs[:, None] + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1)[:, None] / D
        d = tl.where(m, x - mean, 0.0)
        var = tl.sum(d * d, axis=1)[:, None] / D
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)
        tl.store(Y + rows[:, None] * D + cols, (d * rstd * w + b).to(Y.dtype.element_ty), mask=m)

    _KERNELS["strided_ln"] = strided_layer_norm
    return strided_layer_norm


def _three_row_dims(x: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """x's leading dims (all but the last) as at most three (size, stride) pairs, merging dims that are
    contiguous with each other; None if more than three remain."""
    dims: list[list[int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 3:
        return None
    dims = [[1, 0]] * (3 - len(dims)) + dims
    return tuple(d[0] for d in dims), tuple(d[1] for d in dims)


def layer_norm_rows(x: torch.Tensor, ln, out_dtype: torch.dtype,
                    options: FastPathOptions | None = None) -> torch.Tensor:
    """``ln(x).to(out_dtype)`` in one pass over memory (no autograd), as a new contiguous tensor. x's last dim
    is normalised (it must be contiguous); the leading dims may be strided, so a transposed pair tensor
    ([B, J, I, C] view of [B, I, J, C]) is read where it is, without the copy torch's LayerNorm makes. ``ln`` is
    an ``nn.LayerNorm`` over that dim. ESMFold's bf16 trunk feeds its fp32 pair state to LayerNorms whose
    outputs go only to bf16 projections: writing bf16 here saves the fp32 output and every projection's cast.
    Falls back to the torch ops where Triton cannot run, and for a LayerNorm over more than the last dim or
    without weight and bias."""
    dims = _three_row_dims(x) if x.dim() >= 2 and x.stride(-1) == 1 else None
    plain = tuple(ln.normalized_shape) == (x.shape[-1],) and ln.weight is not None and ln.bias is not None
    if not triton_ok(x, options) or dims is None or not plain or x.shape[-1] > 8192:
        return ln(x).to(out_dtype)
    import triton

    (_, s1, s2), strides = dims
    D = x.shape[-1]
    T = x.numel() // D if D else 0
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if T:
        block = _next_pow2(D)
        rows = max(1, min(16, 2048 // block))
        _strided_ln_kernel()[(triton.cdiv(T, rows),)](
            x, ln.weight, ln.bias, y, T, D, s1, s2, *strides, float(ln.eps), BLOCK=block, ROWS=rows,
            num_warps=4 if block * rows >= 1024 else 2)
    return y
