"""The Triton kernels against the modules they replace (GPU, or the CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from esm_dual.pt.fast.attention import VarlenInfo
from esm_dual.pt.fast.kernels import rotary_qk_fused, triton_available
from esm_dual.pt.fast.packing import pack_sequences, packed_positions
from tests.conftest import make_batch
from tests.pt.fast.common import CUDA, TOL, rows_of, tiny_model
from tests.utils import maxdiff

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _rotary_reference(q, k, positions, inv_freq, scale, H):
    from esm_dual.pt.modeling_esm import EsmRotaryEmbedding

    T, D = q.shape
    K = D // H
    rot = EsmRotaryEmbedding(K).to(q.device)
    rot.inv_freq.copy_(inv_freq)
    # [T, D] -> [H, T, K]
    qh, kh = (x.view(T, H, K).transpose(0, 1) for x in (q, k))
    qo, ko = rot(qh, kh, positions, q_scale=scale)
    return qo.transpose(0, 1), ko.transpose(0, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA or _INTERPRET) or not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("H,K", [(20, 64), (3, 6), (5, 32)])
def test_rotary_kernel_matches_module(H, K):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    torch.manual_seed(0)
    T = 37
    qkv = torch.randn(T, 3 * H * K, device=device, dtype=dtype, requires_grad=True)
    q, k = qkv[:, : H * K], qkv[:, H * K: 2 * H * K]  # strided rows, as a fused projection gives
    pack_cu = torch.tensor([0, 10, 11, 37], device=device, dtype=torch.int32)
    positions = packed_positions(pack_cu, T)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, K, 2, dtype=torch.float32) / K))).half().float().to(device)
    scale = K**-0.5
    qo, ko = rotary_qk_fused(q, k, positions, inv_freq, scale, H)
    qr, kr = _rotary_reference(q, k, positions, inv_freq, scale, H)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert qo.shape == (T, H, K) and qo.is_contiguous()
    assert maxdiff(qo, qr) < tol and maxdiff(ko, kr) < tol
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    (g1,) = torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), qkv)
    (g2,) = torch.autograd.grad((qr * gq).sum() + (kr * gk).sum(), qkv)
    assert maxdiff(g1, g2) < tol * 3


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA or _INTERPRET) or not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_fused_qkv_projection_matches_module_calls(tmp_path):
    """One GEMM on the stacked q/k/v weights + the rotary kernel == the three Linear calls (values and
    gradients); a hook on a projection sends that layer back to the module calls."""
    from esm_dual.pt.fast.encoder import packed_self_attention
    from esm_dual.pt.fast.kernels import fused_qkv_supported

    device = "cuda" if CUDA else "cpu"
    model = tiny_model(tmp_path, "esm2", head="base").to(device)
    attn = model.encoder.layer[1].attention.self
    pack = pack_sequences(rows_of(*(torch.tensor(x) for x in make_batch(seed=10))), device=device)
    T = pack.input_ids.shape[0]
    positions = packed_positions(pack.cu_seqlens, T)
    info = VarlenInfo(pack.cu_seqlens, pack.max_seqlen)
    x = torch.randn(T, model.config.hidden_size, device=device, requires_grad=True)
    assert fused_qkv_supported(attn, x)
    fused = packed_self_attention(attn, x, positions, info)
    g_fused = torch.autograd.grad(fused.square().sum(), (x, attn.query.weight, attn.key.bias, attn.value.weight))
    calls = []
    handle = attn.query.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        assert not fused_qkv_supported(attn, x)
        ref = packed_self_attention(attn, x, positions, info)
        g_ref = torch.autograd.grad(ref.square().sum(), (x, attn.query.weight, attn.key.bias, attn.value.weight))
    finally:
        handle.remove()
    assert calls == [1]
    assert maxdiff(fused, ref) < TOL
    for a, b in zip(g_fused, g_ref):
        assert maxdiff(a, b) < TOL * max(1.0, b.abs().max().item())


def _pair_views(device):
    """A [2, 24, 24, C] pair tensor as ESMFold's trunk reads it: whole, transposed (the ending-node
    orientation), row blocks of both, one batch row; and a [T, C] matrix."""
    torch.manual_seed(0)
    z = torch.randn(2, 24, 24, 128, device=device) * 3 + 1
    zt = z.transpose(1, 2)
    return {"whole": z, "transposed": zt, "rows": z[:, 3:9], "transposed_rows": zt[:, 5:11], "one": z[0],
            "matrix": z.reshape(-1, 128), "narrow": z[..., :100].contiguous()}


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA or _INTERPRET) or not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_strided_layer_norm_matches_module(out_dtype):
    from esm_dual.pt.fast.kernels import layer_norm_rows

    device = "cuda" if CUDA else "cpu"
    for name, x in _pair_views(device).items():
        ln = torch.nn.LayerNorm(x.shape[-1]).to(device)
        with torch.no_grad():
            ln.weight.normal_()
            ln.bias.normal_()
            y, ref = layer_norm_rows(x, ln, out_dtype), ln(x)
        assert y.dtype == out_dtype and y.shape == x.shape and y.is_contiguous(), name
        # fp32: the module's value; bf16: the module's value rounded (within one bf16 step)
        tol = ref.abs() * 2**-7 + 1e-5 if out_dtype == torch.bfloat16 else 1e-5
        assert bool(((y.float() - ref).abs() <= tol).all()), (name, float((y.float() - ref).abs().max()))


def test_strided_layer_norm_falls_back_to_the_module():
    """Where Triton cannot run (the CPU without the interpreter, Triton switched off, a last dim that is not
    contiguous), layer_norm_rows is the module followed by the cast."""
    from esm_dual.pt.fast.kernels import layer_norm_rows
    from esm_dual.pt.fast.options import FastPathOptions

    views = _pair_views("cuda" if CUDA else "cpu")
    views["channels_strided"] = views["whole"].transpose(-1, -2)[..., :24]
    views["no_affine"] = views["whole"]
    views["last_two_dims"] = views["whole"]
    off = FastPathOptions(triton=False)
    for name, x in views.items():
        shape = x.shape[-2:] if name == "last_two_dims" else x.shape[-1]
        ln = torch.nn.LayerNorm(shape, elementwise_affine=name != "no_affine").to(x.device)
        with torch.no_grad():
            y = layer_norm_rows(x, ln, torch.bfloat16, off)
            assert torch.equal(y, ln(x).to(torch.bfloat16)), name
            if not (CUDA or _INTERPRET) or name in ("channels_strided", "no_affine", "last_two_dims"):
                assert torch.equal(layer_norm_rows(x, ln, torch.bfloat16), y), name
