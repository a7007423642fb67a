"""GEMM epilogues: the FFN's bias + GELU."""

from __future__ import annotations

import pytest
import torch

from esm_dual.pt.fast.epilogues import fused_linear_gelu_supported, linear_gelu
from esm_dual.pt.fast.options import FastPathOptions
from tests.pt.fast.common import CUDA


def test_linear_gelu_is_exact_off_gpu():
    torch.manual_seed(0)
    dense = torch.nn.Linear(24, 96)
    x = torch.randn(17, 24) * 3
    assert not fused_linear_gelu_supported(dense, x)
    assert torch.equal(linear_gelu(dense, x), torch.nn.functional.gelu(dense(x)))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_gelu_epilogue_matches_exact_gelu(dtype):
    torch.manual_seed(0)
    dense = torch.nn.Linear(1280, 5120).to("cuda", dtype)
    x = torch.randn(3000, 1280, device="cuda", dtype=dtype)
    assert fused_linear_gelu_supported(dense, x)
    fused = linear_gelu(dense, x).float()
    exact = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), dense.weight.float(), dense.bias.float()))
    exact_gelu = FastPathOptions(exact_gelu=True)  # ESM_DUAL_EXACT_GELU=1
    assert not fused_linear_gelu_supported(dense, x, exact_gelu)
    separate = linear_gelu(dense, x, exact_gelu).float()
    # The epilogue's GELU differs from erf-GELU by < 5e-4 absolute: it is no further from the fp32
    # answer than the separate half-precision passes are (both are dominated by the GEMM's rounding).
    err_fused = (fused - exact).abs().max().item()
    err_sep = (separate - exact).abs().max().item()
    assert err_fused < 1.5 * err_sep + 1e-3, (err_fused, err_sep)
