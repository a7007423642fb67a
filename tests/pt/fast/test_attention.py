"""Varlen attention: the back ends against per-sequence attention, and the choice among them (FA4 included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esm_dual.pt.fast.attention import varlen_attention
from tests.pt.fast.common import CUDA, fa4_here, rel
from tests.utils import maxdiff


def test_varlen_backends_agree_with_per_sequencepadded_sdpa():
    torch.manual_seed(0)
    lengths = [5, 1, 9, 4]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    T, H, K = sum(lengths), 3, 8
    q, k, v = (torch.randn(T, H, K, requires_grad=True) for _ in range(3))
    outs = {b: varlen_attention(q, k, v, cu, max(lengths), scale=0.3, backend=b) for b in ("dense", "loop", "auto")}
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
        ref.append((torch.softmax(qs @ ks.transpose(-1, -2) * 0.3, -1) @ vs).transpose(0, 1))
    ref = torch.cat(ref)
    for b, o in outs.items():
        assert o.shape == (T, H, K)
        assert maxdiff(o, ref) < 1e-6, b
    gd = torch.autograd.grad(outs["dense"].sum(), (q, k, v))
    gl = torch.autograd.grad(outs["loop"].sum(), (q, k, v))
    for a, b in zip(gd, gl):
        assert maxdiff(a, b) < 1e-6
    with pytest.raises(ValueError, match="back end"):
        varlen_attention(q, k, v, cu, 9, backend="nope")
    if not CUDA:
        with pytest.raises(ValueError, match="flash"):
            varlen_attention(q, k, v, cu, 9, backend="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_flash_matches_dense_backend():
    torch.manual_seed(0)
    lengths = [300, 1, 77, 1022, 64]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
    T, H, K = sum(lengths), 20, 64
    q, k, v = (torch.randn(T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out_f = varlen_attention(q, k, v, cu, max(lengths), scale=K**-0.5, backend="flash")
    out_l = varlen_attention(*(x.float() for x in (q, k, v)), cu, max(lengths), scale=K**-0.5, backend="loop")
    assert rel(out_f, out_l) < 1e-2
    g = torch.randn_like(out_f)
    gf = torch.autograd.grad((out_f * g).sum(), (q, k, v))
    gl = torch.autograd.grad((out_l * g.float()).sum(), (q, k, v))
    for a, b in zip(gf, gl):
        assert rel(a, b) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("K", [128, 64])
@pytest.mark.parametrize("strided", [False, True])
def test_gpu_fa4_matches_flash_backend(K, strided):
    """flash-attn-4's varlen kernels (where installed on a Hopper GPU) against FlashAttention-2's:
    outputs and gradients on real-length sequences; "auto" picks FA4 there and flash under dropout."""
    if not fa4_here():
        pytest.skip("flash-attn-4 is not installed or this is not a Hopper GPU")
    from esm_dual.pt.fast.attention import resolve_backend

    torch.manual_seed(0)
    lengths = [300, 1, 77, 1022, 64, 511]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
    T, H = sum(lengths), 20
    if strided:  # views of one [T, 3 H K] buffer, as the fused projection makes them
        qkv = torch.randn(T, 3 * H * K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q, k, v = (qkv[:, i * H * K:(i + 1) * H * K].view(T, H, K) for i in range(3))
    else:
        q, k, v = (torch.randn(T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    assert resolve_backend(q) == "fa4" and resolve_backend(q, dropout_p=0.1) == "flash"  # with gradients
    with torch.no_grad():  # forward only: FA4 from FA4_MIN_TOKEN_HEADS token-heads up
        assert resolve_backend(q) == "flash"
        assert resolve_backend(torch.empty(25_000, H, K, device="cuda", dtype=torch.bfloat16)) == "fa4"
    out4 = varlen_attention(q, k, v, cu, max(lengths), scale=K**-0.5, backend="fa4")
    out2 = varlen_attention(q, k, v, cu, max(lengths), scale=K**-0.5, backend="flash")
    ref = varlen_attention(*(x.float() for x in (q, k, v)), cu, max(lengths), scale=K**-0.5, backend="loop")
    assert rel(out4, ref) < 1e-2 and rel(out4, ref) < 1.5 * rel(out2, ref) + 1e-3
    g = torch.randn_like(out4)
    g4 = torch.autograd.grad((out4 * g).sum(), (q, k, v))
    gr = torch.autograd.grad((ref * g.float()).sum(), (q, k, v))
    for a, b in zip(g4, gr):
        assert rel(a, b) < 2e-2


def test_fa4_backend_choice_and_fallback(monkeypatch):
    """"auto" never picks FA4 off a Hopper GPU, naming it there is a clear error; where "auto" picked it
    and it fails, a warning says so and FlashAttention-2 takes over for the rest of the process."""
    from esm_dual.pt.fast import attention as A

    q = torch.randn(10, 2, 64)
    assert not A.fa4_supported(q) and A.resolve_backend(q) == "dense"
    with pytest.raises(ValueError, match="flash-attn-4 .* Hopper GPU"):
        A.resolve_backend(q, "fa4")
    # pretend to be on a Hopper GPU with flash-attn-4 installed, whose kernels then fail
    calls = []
    monkeypatch.setattr(A, "fa4_supported", lambda q, options=None: A.fa4_status()[0])
    monkeypatch.setattr(A, "flash_supported", lambda q: True)
    monkeypatch.setattr(A, "_fa4_attention", lambda *a: (_ for _ in ()).throw(RuntimeError("no CTK flavor")))
    monkeypatch.setattr(A._FlashVarlen, "apply", lambda *a: calls.append(a[4]) or a[0])
    monkeypatch.setitem(A._FA4, "fn", lambda *a, **k: None)  # installed (its calls are _fa4_attention, below)
    monkeypatch.setitem(A._FA4, "why", None)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    assert A.resolve_backend(q, "auto") == "flash"  # forward only, a small pack
    monkeypatch.setattr(A, "FA4_MIN_TOKEN_HEADS", 20)
    assert A.resolve_backend(q) == "fa4" and A.resolve_backend(q, dropout_p=0.1) == "flash"
    with pytest.raises(ValueError, match="no dropout"):
        A.resolve_backend(q, "fa4", dropout_p=0.1)
    with pytest.raises(RuntimeError, match="no CTK flavor"):  # named explicitly: the error itself
        A.varlen_attention(q, q, q, cu, 6, backend="fa4")
    with pytest.warns(RuntimeWarning, match="flash-attn-4 failed .*no CTK flavor.*FlashAttention-2"):
        out = A.varlen_attention(q, q, q, cu, 6)
    assert out is q and calls == [6]
    assert A.resolve_backend(q) == "flash"
    available, why = A.fa4_status()  # the failure is where the availability is, with its reason
    assert not available and "no CTK flavor" in why
