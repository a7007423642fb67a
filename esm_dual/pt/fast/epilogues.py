"""GEMM epilogues of the packed inference loop: the FFN's bias + GELU, and the residual adds.

- :func:`linear_gelu`: GELU(dense(x)) for x [T, Din]; on CUDA in fp16/bf16 one cuBLASLt GEMM with the bias
  and the GELU in its epilogue.
- :class:`ResidualStream`: the residual stream h [T, D] of the loop. Each ``h + dense(x)`` runs either in
  the epilogue of the projection that makes it (``h += x W^T`` in place, cuBLAS's beta = 1; the bias,
  for which that epilogue has no room, joins an fp32 vector that the next LayerNorm adds), or as one
  add + LayerNorm pass (:func:`~esm_dual.pt.fast.kernels.add_layer_norm`).

Inference only (no autograd through the in-place adds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import add_layer_norm, pending_layer_norm, plain_linear
from .options import FastPathOptions, default_options


def residual_epilogue_supported(denses, h: torch.Tensor, options: FastPathOptions | None = None) -> bool:
    """The residual add can run in these projections' GEMM epilogue (h += x W^T, in place): switched on
    (``options.residual_epilogue``), plain ``nn.Linear`` modules with biases and no hooks, weights in h's
    dtype, h [T, D] contiguous, no autocast (which would hand the in-place product operands of another
    dtype)."""
    return ((options or default_options()).residual_epilogue and h.dim() == 2 and h.is_contiguous()
            and not torch.is_autocast_enabled(h.device.type)
            and all(plain_linear(m) and m.weight.dtype == h.dtype and m.weight.device == h.device for m in denses))


class ResidualStream:
    """The residual stream h [T, D] of the inference loop.

    ``add(dense, x, ln)`` makes h <- h + dense(x) and returns ln(h): with ``epilogue``, the product is
    added in place in the GEMM's epilogue and dense's bias joins ``pending`` (fp32 [D], the biases not
    yet in h), which :func:`pending_layer_norm` adds inside the LayerNorm; otherwise dense is called and
    the add is fused into the LayerNorm (:func:`add_layer_norm`). The caller's h is never written.
    """

    def __init__(self, h: torch.Tensor, epilogue: bool, options: FastPathOptions | None = None):
        self.h = h
        self.epilogue = epilogue
        self.options = options
        self.pending: torch.Tensor | None = None  # fp32 [D]
        self._owned = False  # h is still the caller's tensor until the first add writes a new one

    def add(self, dense, x: torch.Tensor, ln) -> torch.Tensor:
        if not self.epilogue:
            self.h, y = add_layer_norm(dense(x), self.h, ln, self.options)
            return y
        if self._owned:
            self.h.addmm_(x, dense.weight.t())
        else:
            self.h = torch.addmm(self.h, x, dense.weight.t())
            self._owned = True
        bias = dense.bias.float()
        self.pending = bias if self.pending is None else self.pending + bias
        return pending_layer_norm(self.h, self.pending, ln, self.options)

    def value(self) -> torch.Tensor:
        """h with the pending biases added: what the layer modules would hold. [T, D]"""
        if self.pending is None:
            return self.h
        return (self.h.float() + self.pending).to(self.h.dtype)


# ================================================================================================
# The FFN's first projection with its GELU (inference)
# ================================================================================================


def fused_linear_gelu_supported(dense, x: torch.Tensor, options: FastPathOptions | None = None) -> bool:
    """The bias + GELU epilogue applies: CUDA, x [T, Din] fp16/bf16 in dense's dtype, a plain ``nn.Linear``,
    no autocast, and ``options.exact_gelu`` off."""
    return (x.is_cuda and x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16)
            and x.dtype == dense.weight.dtype and plain_linear(dense) and not (options or default_options()).exact_gelu
            and not torch.is_autocast_enabled(x.device.type))


def linear_gelu(dense, x: torch.Tensor, options: FastPathOptions | None = None) -> torch.Tensor:
    """GELU(dense(x)) for x [T, Din] -> [T, F], inference.

    On CUDA in fp16/bf16 this is one cuBLASLt GEMM with the bias and the GELU in its epilogue
    (``torch._addmm_activation``), which saves a read and a write of the [T, 4D] activation. That
    epilogue evaluates GELU in its tanh form; its largest deviation from the exact erf form is 4.7e-4
    (at |x| near 2), below half a unit in the last place of bf16 (3.9e-3) and fp16 (4.9e-4) at that
    magnitude, so in half precision the results are those of the exact form up to rounding. fp32 and
    the CPU keep the exact erf GELU; ``options.exact_gelu`` (``ESM_DUAL_EXACT_GELU=1``) keeps it everywhere.
    """
    if fused_linear_gelu_supported(dense, x, options):
        return torch._addmm_activation(dense.bias, x, dense.weight.t(), use_gelu=True)
    return F.gelu(dense(x), approximate="none")
