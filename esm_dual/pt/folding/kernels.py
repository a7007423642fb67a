"""Optional fused GPU kernels for the folding trunk, and the switch that picks them.

Kernels (the model's ``FastPathOptions.fold_kernels``: ``EsmForProteinFolding.set_kernels`` /
``set_fast``, ``ESM_DUAL_FOLD_KERNELS``; ``FoldingTrunk.configure`` hands them to the triangle modules):

- ``"torch"``: today's path. Triangle attention through ``F.scaled_dot_product_attention`` with the
  biases as its mask in fp32 (explicit scores under autocast), the triangle multiplication as batched
  matmuls. Runs everywhere; the parity tests against HF transformers run it.
- ``"sdpa"``: the same, but triangle attention goes through SDPA in any dtype (under bf16 autocast the
  biases are built in bf16, so the [rows, H, N, N] scores are never stored).
- ``"cueq"``: NVIDIA cuEquivariance (``cuequivariance_torch``, with its prebuilt
  ``cuequivariance-ops-torch-cu12/-cu13`` kernels; the ``fold-gpu`` extra): its fused
  ``triangle_multiplicative_update`` and ``triangle_attention`` kernels on CUDA. Where the package
  is missing, or on the CPU, the ``"sdpa"`` path runs instead.
"""

from __future__ import annotations

import functools
import math

import torch

from ..fast.kernels import layer_norm_rows
from ..fast.options import FastPathOptions

KERNELS = ("torch", "sdpa", "cueq")


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    return kernels


@functools.lru_cache(maxsize=1)
def cueq_import_error() -> str | None:
    """Why cuEquivariance's triangle kernels do not import (``"ModuleNotFoundError: ..."``), or None if they do
    (``pip install esm-dual[fold-gpu]``)."""
    try:
        import cuequivariance_ops_torch  # noqa: F401
        from cuequivariance_torch import triangle_attention, triangle_multiplicative_update  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means: not available, and this is why
        return f"{type(e).__name__}: {e}"
    return None


def cueq_available() -> bool:
    """True if cuEquivariance's triangle kernels import (``pip install esm-dual[fold-gpu]``)."""
    return cueq_import_error() is None


def use_cueq(kernels: str, x: torch.Tensor) -> bool:
    return kernels == "cueq" and x.is_cuda and cueq_available()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's where it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def pair_layer_norm(ln, x: torch.Tensor, options: FastPathOptions | None) -> torch.Tensor:
    """``ln(x)`` where x feeds only projections. With ``options`` (the fast mode's: set by
    ``FoldingTrunk.configure``), under autocast and without gradients, the output is written once in the
    autocast dtype by a Triton kernel that also reads a transposed x in place (``fast.kernels.layer_norm_rows``):
    the projections would cast it anyway, so the numbers are the same, and the fp32 output, the per-projection
    casts and the ending-node transpose copy are saved. Otherwise torch's LayerNorm."""
    dev = x.device.type
    if options is None or torch.is_grad_enabled() or not torch.is_autocast_enabled(dev):
        return ln(x)
    return layer_norm_rows(x, ln, torch.get_autocast_dtype(dev), options)


def cueq_triangle_multiplication(module, z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The update of ``triangular.TriangleMultiplicativeUpdate`` through cuEquivariance's fused kernel.
    z [B, N, N, C]; mask [B, N, N] or None -> [B, N, N, C]. The projections' weights are concatenated
    as the kernel wants them: p_in = [a_p; b_p], g_in = [a_g; b_g]."""
    from cuequivariance_torch import triangle_multiplicative_update

    m = module
    return triangle_multiplicative_update(
        z,
        direction="outgoing" if m.outgoing else "incoming",
        mask=mask,
        norm_in_weight=m.layer_norm_in.weight,
        norm_in_bias=m.layer_norm_in.bias,
        p_in_weight=torch.cat([m.linear_a_p.weight, m.linear_b_p.weight]),
        p_in_bias=torch.cat([m.linear_a_p.bias, m.linear_b_p.bias]),
        g_in_weight=torch.cat([m.linear_a_g.weight, m.linear_b_g.weight]),
        g_in_bias=torch.cat([m.linear_a_g.bias, m.linear_b_g.bias]),
        norm_out_weight=m.layer_norm_out.weight,
        norm_out_bias=m.layer_norm_out.bias,
        p_out_weight=m.linear_z.weight,
        p_out_bias=m.linear_z.bias,
        g_out_weight=m.linear_g.weight,
        g_out_bias=m.linear_g.bias,
        eps=m.layer_norm_in.eps,
    )


def cueq_triangle_attention(mha, x: torch.Tensor, triangle_bias: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """``primitives.Attention`` over the rows of x through cuEquivariance's triangle attention kernel.
    x [B, I, J, C] (LayerNormed, starting-node orientation); triangle_bias [B, H, J, J]; mask [B, I, J]
    (1 = valid) or None -> [B, I, J, C]."""
    from cuequivariance_torch import triangle_attention

    B, I, J, _ = x.shape
    shape = (B, I, J, mha.no_heads, mha.c_hidden)
    # [B, I, J, H, K] -> [B, I, H, J, K]
    q = mha.linear_q(x).view(shape).transpose(-2, -3)
    k = mha.linear_k(x).view(shape).transpose(-2, -3)
    v = mha.linear_v(x).view(shape).transpose(-2, -3)
    dt = q.dtype
    # [B, 1, H, J, J]; [B, I, 1, 1, J]
    bias = triangle_bias.float().unsqueeze(1)
    m = None if mask is None else mask.bool()[:, :, None, None, :]
    o = triangle_attention(q.contiguous(), k.contiguous(), v.to(dt).contiguous(), bias, m,
                           1.0 / math.sqrt(mha.c_hidden))
    # [B, I, H, J, K] -> [B, I, J, H, K]
    o = o.transpose(-2, -3)
    o = o * torch.sigmoid(mha.linear_g(x)).view(shape)
    return mha.linear_o(o.reshape(B, I, J, -1))
