"""The packed (unpadded, varlen-attention) path against the padded path.

CPU, fp32: packed and padded agree within 1e-5 (hidden states, logits, gradients), with rotary
positions restarting and the token-dropout ratio computed per sequence inside a pack. GPU (marked
``gpu``): flash varlen + the Triton rotary kernel against the padded SDPA path in bf16 on
real-length batches, and the kernels against their references.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from esm_dual.pt import EsmForMaskedLM, EsmModel
from esm_dual.pt.attention import VarlenInfo, rotary_qk_fused, triton_available, varlen_attention
from esm_dual.pt.packing import (
    pack_by_token_budget,
    pack_sequences,
    packed_embeddings,
    packed_model_forward,
    packed_positions,
    repad,
    segment_ids,
    unpad,
)
from tests.conftest import make_batch, tiny_config
from tests.utils import write_hub_checkpoint

TOL = 1e-5
CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def _maxdiff(a, b) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _model(tmp_path, flavour="esm2", head="mlm", **changes):
    cfg = tiny_config(flavour, **changes)
    write_hub_checkpoint(str(tmp_path), cfg, head=head)
    cls = EsmForMaskedLM if head == "mlm" else EsmModel
    return cls.from_pretrained(str(tmp_path))


def _rows(ids, mask):
    """Padded [B, L] -> list of the real-token rows."""
    return [ids[b][mask[b] != 0] for b in range(ids.shape[0])]


def _sdpa(model):
    base = model if isinstance(model, EsmModel) else model.esm
    base.attn_implementation = "sdpa"
    return model


# ---- bookkeeping ---------------------------------------------------------------------------------


def test_pack_sequences_and_positions():
    pack = pack_sequences([[0, 5, 6, 2], [0, 7, 2], np.array([0, 9, 9, 9, 9, 2])])
    assert pack.input_ids.tolist() == [0, 5, 6, 2, 0, 7, 2, 0, 9, 9, 9, 9, 2]
    assert pack.cu_seqlens.dtype == torch.int32
    assert pack.cu_seqlens.tolist() == [0, 4, 7, 13]
    assert pack.max_seqlen == 6
    assert pack.lengths.tolist() == [4, 3, 6]
    T = pack.input_ids.shape[0]
    assert segment_ids(pack.cu_seqlens, T).tolist() == [0] * 4 + [1] * 3 + [2] * 6
    assert packed_positions(pack.cu_seqlens, T).tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="empty sequence"):
        pack_sequences([[0, 2], []])


def test_pack_by_token_budget():
    packs = pack_by_token_budget([5, 5, 5, 12, 3], max_tokens=10)
    assert packs == [[0, 1], [2], [3], [4]]
    assert sum(packs, []) == list(range(5))


def test_unpad_repad_roundtrip_any_padding_side():
    ids, mask = (torch.tensor(x) for x in make_batch())
    # left-pad the second row, holes in the fourth: the real tokens keep their order.
    mask2 = mask.clone()
    mask2[1] = torch.flip(mask[1], [0])
    mask2[3, 1] = 0
    for m in (mask, mask2):
        u = unpad(m)
        assert u.cu_seqlens.tolist() == [0, *np.cumsum(m.sum(-1).tolist()).tolist()]
        assert u.max_seqlen == int(m.sum(-1).max())
        x = torch.randn(*ids.shape, 5)
        packed = x.reshape(-1, 5)[u.indices]
        back = repad(packed, u)
        assert torch.equal(back, x * m[..., None])


# ---- packed == padded on CPU (fp32) --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["dense", "loop"])
def test_packed_matches_padded_all_flavours(tmp_path, flavour, backend):
    model = _sdpa(_model(tmp_path, flavour))
    ids, mask = (torch.tensor(x) for x in make_batch(seed=1))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
        pack = pack_sequences(_rows(ids, mask))
        seq, hidden = packed_model_forward(model.esm, pack.input_ids, pack.cu_seqlens, pack.max_seqlen,
                                           output_hidden_states=True, backend=backend)
        logits = model.lm_head(seq)
    u = unpad(mask)
    assert _maxdiff(repad(logits, u)[mask.bool()], ref.logits[mask.bool()]) < TOL
    assert len(hidden) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for h, r in zip(hidden, ref.hidden_states):
        assert _maxdiff(repad(h, u)[mask.bool()], r[mask.bool()]) < TOL


def test_forward_packed_api(tmp_path):
    model = _sdpa(_model(tmp_path, "esm2"))
    ids, mask = (torch.tensor(x) for x in make_batch(seed=2, lengths=(30, 1, 17, 9, 22)))
    pack = pack_sequences(_rows(ids, mask))
    labels = torch.where(torch.rand(pack.input_ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3,
                         pack.input_ids, torch.full_like(pack.input_ids, -100))
    with torch.no_grad():
        out = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen, labels=labels,
                                   output_hidden_states=True)
        ref = model(ids, attention_mask=mask, labels=repad(labels[:, None], unpad(mask))[..., 0].masked_fill(
            mask == 0, -100))
        base = model.esm.forward_packed(pack.input_ids, pack.cu_seqlens)  # max_seqlen computed
    T = int(mask.sum())
    assert out.logits.shape == (T, model.config.vocab_size)
    assert out.attentions is None and len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert _maxdiff(out.logits, ref.logits[mask.bool()]) < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    assert base.last_hidden_state.shape == (T, model.config.hidden_size)
    assert torch.equal(base.last_hidden_state, out.hidden_states[-1])


def test_forward_switch_packed_equals_padded(tmp_path, flavour):
    """EsmModel.forward with attn_implementation='packed' unpads, runs packed and re-pads (zeros at padding)."""
    model = _model(tmp_path, flavour, head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=4))
    with torch.no_grad():
        model.attn_implementation = "sdpa"
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
        model.attn_implementation = "packed"
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    m = mask.bool()
    assert _maxdiff(out.last_hidden_state[m], ref.last_hidden_state[m]) < TOL
    assert torch.count_nonzero(out.last_hidden_state[~m]) == 0
    for h, r in zip(out.hidden_states, ref.hidden_states):
        assert _maxdiff(h[m], r[m]) < TOL
    # CPU default stays the padded path: padded positions are not zeroed there.
    model.attn_implementation = "auto"
    with torch.no_grad():
        auto = model(ids, attention_mask=mask)
    assert torch.equal(auto.last_hidden_state, ref.last_hidden_state)
    # output_attentions always takes the padded (eager) path
    model.attn_implementation = "packed"
    with torch.no_grad():
        att = model(ids, attention_mask=mask, output_attentions=True)
    assert len(att.attentions) == model.config.num_hidden_layers


def test_left_padding_keeps_padded_semantics(tmp_path):
    """With left padding the padded path's rotary columns are kept by the unpadded path."""
    model = _model(tmp_path, "esm2", head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=5))
    ids_l = torch.stack([torch.roll(ids[b], int((mask[b] == 0).sum())) for b in range(ids.shape[0])])
    mask_l = torch.stack([torch.roll(mask[b], int((mask[b] == 0).sum())) for b in range(ids.shape[0])])
    with torch.no_grad():
        model.attn_implementation = "sdpa"
        ref = model(ids_l, attention_mask=mask_l)
        model.attn_implementation = "packed"
        out = model(ids_l, attention_mask=mask_l)
    m = mask_l.bool()
    assert _maxdiff(out.last_hidden_state[m], ref.last_hidden_state[m]) < TOL


def test_rotary_restarts_and_no_cross_talk(tmp_path):
    """A sequence's output inside a pack equals its output alone, whatever its neighbours are."""
    model = _model(tmp_path, "esm2", head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=6, lengths=(13, 8, 20)))
    rows = _rows(ids, mask)
    with torch.no_grad():
        alone = [model.forward_packed(r, torch.tensor([0, r.numel()], dtype=torch.int32)).last_hidden_state
                 for r in rows]
        pack = pack_sequences(rows)
        packed = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen).last_hidden_state
        other = [rows[0].flip(0), rows[1], rows[2]]  # change the first sequence only
        pack2 = pack_sequences(other)
        packed2 = model.forward_packed(pack2.input_ids, pack2.cu_seqlens, pack2.max_seqlen).last_hidden_state
    cu = pack.cu_seqlens.tolist()
    for b, a in enumerate(alone):
        assert _maxdiff(packed[cu[b]:cu[b + 1]], a) < TOL
    assert _maxdiff(packed2[cu[1]:], packed[cu[1]:]) < TOL
    assert _maxdiff(packed2[: cu[1]], packed[: cu[1]]) > 1e-3
    # Same sequence at two offsets of a pack gives the same output (positions restart at 0).
    pack3 = pack_sequences([rows[2], rows[2]])
    with torch.no_grad():
        h = model.forward_packed(pack3.input_ids, pack3.cu_seqlens, pack3.max_seqlen).last_hidden_state
    n = rows[2].numel()
    assert _maxdiff(h[:n], h[n:]) < TOL


def test_token_dropout_ratio_per_sequence(tmp_path):
    model = _model(tmp_path, "esm2", head="base")
    emb = model.embeddings
    a = torch.tensor([0, 32, 32, 32, 5, 6, 2])  # 3 masks of 7
    b = torch.tensor([0, 7, 8, 9, 2])  # none
    pack = pack_sequences([a, b])
    T = pack.input_ids.shape[0]
    seg = segment_ids(pack.cu_seqlens, T)
    with torch.no_grad():
        out = packed_embeddings(emb, pack.input_ids, seg, pack.lengths, None, None)
        ea = emb(a[None], torch.ones(1, 7, dtype=torch.long))[0]
        eb = emb(b[None], torch.ones(1, 5, dtype=torch.long))[0]
        words = emb.word_embeddings(pack.input_ids)
    assert _maxdiff(out[:7], ea) < 1e-7 and _maxdiff(out[7:], eb) < 1e-7
    # explicit ratios: (1 - 0.12) / (1 - 3/7) on a's unmasked rows, (1 - 0.12) / 1 on b's
    assert torch.allclose(out[4], words[4] * (0.88 / (1 - 3 / 7)), atol=1e-6)
    assert torch.allclose(out[8], words[8] * 0.88, atol=1e-6)
    assert torch.count_nonzero(out[1:4]) == 0


def test_gradients_equal(tmp_path):
    model = _sdpa(_model(tmp_path, "esm2"))
    model.train()
    ids, mask = (torch.tensor(x) for x in make_batch(seed=7))
    g = torch.Generator().manual_seed(1)
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.4) & (mask == 1), ids, torch.full_like(ids, -100))
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(ref) > 20
    model.zero_grad()
    pack = pack_sequences(_rows(ids, mask))
    model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen, labels=labels[mask.bool()]).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in ref), n
        if n in ref:
            assert _maxdiff(p.grad, ref[n]) < TOL * max(1.0, ref[n].abs().max().item()), n
    # and through the padded API with the packed switch (unpad -> packed -> repad)
    model.zero_grad()
    model.esm.attn_implementation = "packed"
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    for n, g in ref.items():
        assert _maxdiff(model.get_parameter(n).grad, g) < TOL * max(1.0, g.abs().max().item()), n


def test_gradient_checkpointing_packed(tmp_path):
    model = _model(tmp_path, "esm2")
    model.train()
    pack = pack_sequences(_rows(*(torch.tensor(x) for x in make_batch(seed=8))))
    labels = pack.input_ids.clone()
    model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen, labels=labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen, labels=labels).loss.backward()
    for n, g in ref.items():
        assert _maxdiff(model.get_parameter(n).grad, g) < 1e-6 * max(1.0, g.abs().max().item()), n


def test_varlen_backends_agree_with_per_sequence_sdpa():
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
        assert _maxdiff(o, ref) < 1e-6, b
    gd = torch.autograd.grad(outs["dense"].sum(), (q, k, v))
    gl = torch.autograd.grad(outs["loop"].sum(), (q, k, v))
    for a, b in zip(gd, gl):
        assert _maxdiff(a, b) < 1e-6
    with pytest.raises(ValueError, match="back end"):
        varlen_attention(q, k, v, cu, 9, backend="nope")
    if not CUDA:
        with pytest.raises(ValueError, match="flash"):
            varlen_attention(q, k, v, cu, 9, backend="flash")


def test_varlen_info_is_what_the_layers_get(tmp_path):
    model = _model(tmp_path, "esm2", head="base")
    seen = []
    layer0 = model.encoder.layer[0].attention.self
    orig = layer0.forward

    def spy(hidden_states, attention_bias, positions, output_attentions=False):
        seen.append((hidden_states.shape, attention_bias, positions.clone()))
        return orig(hidden_states, attention_bias, positions, output_attentions)

    layer0.forward = spy
    pack = pack_sequences([[0, 5, 2], [0, 6, 7, 8, 2]])
    with torch.no_grad():
        model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen)
    (shape, info, pos), = seen
    assert shape == (8, model.config.hidden_size)
    assert isinstance(info, VarlenInfo) and info.max_seqlen == 5 and info.cu_seqlens.tolist() == [0, 3, 8]
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


# ---- kernels --------------------------------------------------------------------------------------

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
    assert _maxdiff(qo, qr) < tol and _maxdiff(ko, kr) < tol
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    (g1,) = torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), qkv)
    (g2,) = torch.autograd.grad((qr * gq).sum() + (kr * gk).sum(), qkv)
    assert _maxdiff(g1, g2) < tol * 3


# ---- GPU: bf16 fast path on real-length batches -----------------------------------------------------


def _lognormal_batch(n, seed, max_len=1022, median=270):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.75, size=n).astype(int), 8, max_len)
    rows = []
    for n_res in lengths:
        res = rng.integers(4, 24, size=n_res)
        res[rng.random(n_res) < 0.1] = 32
        rows.append(np.concatenate([[0], res, [2]]))
    L = max(len(r) for r in rows)
    ids = np.full((n, L), 1, dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    return torch.tensor(ids), torch.tensor(ids != 1).long(), rows


def _gpu_model(tmp_path, **changes):
    cfg = dict(hidden_size=320, num_attention_heads=20, num_hidden_layers=4, intermediate_size=1280)
    cfg.update(changes)
    model = _model(tmp_path, "esm2", **cfg)
    with torch.no_grad():
        for p in model.parameters():  # checkpoint weights are N(0, 0.2): scale matrices to a trained net's size
            if p.dim() == 2:
                p.mul_(0.25)
    return model


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("heads", [20, 5])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_packed_bf16_matches_padded(tmp_path, heads):
    model = _gpu_model(tmp_path, num_attention_heads=heads).cuda()
    ids, mask, rows = _lognormal_batch(12, seed=0)
    ids, mask = ids.cuda(), mask.cuda()
    m = mask.bool()
    with torch.no_grad():
        ref32 = _sdpa(model)(ids, attention_mask=mask).logits[m]
        model.bfloat16()
        padded = model(ids, attention_mask=mask).logits[m]
        model.esm.attn_implementation = "auto"  # CUDA + bf16: packed
        auto = model(ids, attention_mask=mask).logits
        pack = pack_sequences(rows, device="cuda")
        packed = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen).logits
    assert _rel(auto[m], packed) < 1e-2  # the LM head's GEMM sees [B*L, D] vs [T, D]: last-bit differences
    with torch.no_grad():
        hidden = model.esm(ids, attention_mask=mask).last_hidden_state
        hidden_packed = model.esm.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen).last_hidden_state
    assert torch.count_nonzero(hidden[~m]) == 0
    assert torch.equal(hidden[m], hidden_packed)
    e_padded, e_packed = _rel(padded, ref32), _rel(packed, ref32)
    assert e_packed < 2e-2, (e_packed, e_padded)
    assert e_packed < 1.5 * e_padded + 1e-3, (e_packed, e_padded)
    assert _rel(packed, padded) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("heads", [20, 5])  # head dim 16 (flash) and 64 (flash-attn-4 where installed)
def test_gpu_packed_bf16_gradients(tmp_path, heads):
    model = _gpu_model(tmp_path, num_attention_heads=heads).cuda()
    model.train()
    ids, mask, rows = _lognormal_batch(6, seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    _sdpa(model)(ids, attention_mask=mask, labels=labels).loss.backward()
    ref = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.bfloat16()
    pack = pack_sequences(rows, device="cuda")
    out = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen, labels=labels[mask.bool()])
    out.loss.backward()
    for n, g in ref.items():
        p = model.get_parameter(n)
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        # The key bias's gradient nearly cancels (a bias on every key of a query shifts all its scores
        # alike, which softmax ignores; only rotary's position dependence leaves a small remainder), so
        # its relative error is taken against a small norm: measured on an H100 at head dim 64, 0.044
        # with FlashAttention-2 and 0.051 with flash-attn-4, while every other gradient stays under 0.03.
        tol = 8e-2 if n.endswith("key.bias") else 5e-2
        assert _rel(p.grad, g) < tol, (n, _rel(p.grad, g))


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
    assert _rel(out_f, out_l) < 1e-2
    g = torch.randn_like(out_f)
    gf = torch.autograd.grad((out_f * g).sum(), (q, k, v))
    gl = torch.autograd.grad((out_l * g.float()).sum(), (q, k, v))
    for a, b in zip(gf, gl):
        assert _rel(a, b) < 2e-2


def _fa4_here():
    from esm_dual.pt.attention import fa4_supported

    return CUDA and fa4_supported(torch.empty(0, 1, 64, device="cuda", dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("K", [128, 64])
@pytest.mark.parametrize("strided", [False, True])
def test_gpu_fa4_matches_flash_backend(K, strided):
    """flash-attn-4's varlen kernels (where installed on a Hopper GPU) against FlashAttention-2's:
    outputs and gradients on real-length sequences; "auto" picks FA4 there and flash under dropout."""
    if not _fa4_here():
        pytest.skip("flash-attn-4 is not installed or this is not a Hopper GPU")
    from esm_dual.pt.attention import resolve_backend

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
    assert _rel(out4, ref) < 1e-2 and _rel(out4, ref) < 1.5 * _rel(out2, ref) + 1e-3
    g = torch.randn_like(out4)
    g4 = torch.autograd.grad((out4 * g).sum(), (q, k, v))
    gr = torch.autograd.grad((ref * g.float()).sum(), (q, k, v))
    for a, b in zip(g4, gr):
        assert _rel(a, b) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA or _INTERPRET) or not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("epilogue", ["1", "0", "hook"])
def test_fused_inference_loop_matches_layer_modules(tmp_path, epilogue, monkeypatch):
    """The inference loop equals the layer modules: with the residual add in the projections' epilogue
    (biases pending into the next LayerNorm), with it off (add fused into the LayerNorm), and with a
    hook on a projection (which turns the epilogue off, so the hook runs)."""
    from esm_dual.pt.attention import add_layer_norm, pending_layer_norm, residual_epilogue_supported
    from esm_dual.pt.packing import packed_encoder_inference, segment_ids, use_fused_inference

    device = "cuda" if CUDA else "cpu"
    model = _model(tmp_path, "esm2", head="base").to(device)
    ids, mask = (torch.tensor(x) for x in make_batch(seed=9))
    pack = pack_sequences(_rows(ids, mask), device=device)
    T = pack.input_ids.shape[0]
    x = model.embeddings.word_embeddings(pack.input_ids).detach()
    x_before = x.clone()
    positions = packed_positions(pack.cu_seqlens, T, segment_ids(pack.cu_seqlens, T))
    info = VarlenInfo(pack.cu_seqlens, pack.max_seqlen)
    monkeypatch.setenv("ESM_DUAL_RESIDUAL_EPILOGUE", "0" if epilogue == "0" else "1")
    calls = []
    if epilogue == "hook":
        model.encoder.layer[1].output.dense.register_forward_hook(lambda m, i, o: calls.append(1))
    dense = [m for layer in model.encoder.layer for m in (layer.attention.output.dense, layer.output.dense)]
    assert residual_epilogue_supported(dense, x) == (epilogue == "1")
    with torch.no_grad():
        assert use_fused_inference(model.encoder, x)
        fused, fused_hidden = packed_encoder_inference(model.encoder, x, info, positions, True)
        assert calls == ([1] if epilogue == "hook" else [])
        ref, ref_hidden, _ = model.encoder(x, info, positions, True, False)
        r = torch.randn_like(x)
        h, y = add_layer_norm(x, r, model.encoder.emb_layer_norm_after)
        p = torch.randn(x.shape[1], device=device)
        yp = pending_layer_norm(x, p, model.encoder.emb_layer_norm_after)
    assert torch.equal(x, x_before)  # the caller's embeddings are never written
    assert _maxdiff(fused, ref) < TOL
    assert len(fused_hidden) == len(ref_hidden)
    for a, b in zip(fused_hidden, ref_hidden):
        assert _maxdiff(a, b) < TOL
    assert torch.equal(h, x + r)
    assert _maxdiff(y, model.encoder.emb_layer_norm_after(x + r)) < TOL
    assert _maxdiff(yp, model.encoder.emb_layer_norm_after(x + p)) < TOL
    model.train()
    assert not use_fused_inference(model.encoder, x)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA or _INTERPRET) or not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_fused_inference_loop_under_autocast(tmp_path):
    """fp32 weights under bf16 autocast: the inference loop (which then keeps the residual add out of the
    GEMM epilogue) runs and gives the layer modules' answer."""
    from esm_dual.pt.attention import residual_epilogue_supported
    from esm_dual.pt.packing import packed_encoder_inference, segment_ids

    device = "cuda" if CUDA else "cpu"
    model = _model(tmp_path, "esm2", head="base").to(device)
    pack = pack_sequences(_rows(*(torch.tensor(x) for x in make_batch(seed=12))), device=device)
    T = pack.input_ids.shape[0]
    x = model.embeddings.word_embeddings(pack.input_ids).detach()
    positions = packed_positions(pack.cu_seqlens, T, segment_ids(pack.cu_seqlens, T))
    info = VarlenInfo(pack.cu_seqlens, pack.max_seqlen)
    dense = [model.encoder.layer[0].output.dense]
    assert residual_epilogue_supported(dense, x)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        assert not residual_epilogue_supported(dense, x)
        fused, _ = packed_encoder_inference(model.encoder, x, info, positions)
        ref, _, _ = model.encoder(x, info, positions, False, False)
    assert fused.shape == ref.shape and _rel(fused, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA or _INTERPRET) or not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_fused_qkv_projection_matches_module_calls(tmp_path):
    """One GEMM on the stacked q/k/v weights + the rotary kernel == the three Linear calls (values and
    gradients); a hook on a projection sends that layer back to the module calls."""
    from esm_dual.pt.attention import fused_qkv_supported, packed_self_attention

    device = "cuda" if CUDA else "cpu"
    model = _model(tmp_path, "esm2", head="base").to(device)
    attn = model.encoder.layer[1].attention.self
    pack = pack_sequences(_rows(*(torch.tensor(x) for x in make_batch(seed=10))), device=device)
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
    assert _maxdiff(fused, ref) < TOL
    for a, b in zip(g_fused, g_ref):
        assert _maxdiff(a, b) < TOL * max(1.0, b.abs().max().item())


def test_forward_packed_pooler_and_inputs_embeds():
    torch.manual_seed(0)
    model = EsmModel(tiny_config("esm2"), add_pooling_layer=True).eval()
    model.attn_implementation = "sdpa"
    ids, mask = (torch.tensor(x) for x in make_batch(seed=11))
    pack = pack_sequences(_rows(ids, mask))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        out = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen)
        emb = model.forward_packed(inputs_embeds=model.embeddings.word_embeddings(pack.input_ids),
                                   cu_seqlens=pack.cu_seqlens)
        ref_emb = model(inputs_embeds=model.embeddings.word_embeddings(ids), attention_mask=mask)
    assert out.pooler_output.shape == (ids.shape[0], model.config.hidden_size)
    assert _maxdiff(out.pooler_output, ref.pooler_output) < TOL
    # no input_ids: no token dropout, on both paths
    assert _maxdiff(emb.last_hidden_state, ref_emb.last_hidden_state[mask.bool()]) < TOL
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.forward_packed(pack.input_ids)


# ---- FFN projection + GELU -------------------------------------------------------------------------


def test_linear_gelu_is_exact_off_gpu():
    from esm_dual.pt.attention import fused_linear_gelu_supported, linear_gelu

    torch.manual_seed(0)
    dense = torch.nn.Linear(24, 96)
    x = torch.randn(17, 24) * 3
    assert not fused_linear_gelu_supported(dense, x)
    assert torch.equal(linear_gelu(dense, x), torch.nn.functional.gelu(dense(x)))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_gelu_epilogue_matches_exact_gelu(dtype, monkeypatch):
    from esm_dual.pt.attention import fused_linear_gelu_supported, linear_gelu

    torch.manual_seed(0)
    dense = torch.nn.Linear(1280, 5120).to("cuda", dtype)
    x = torch.randn(3000, 1280, device="cuda", dtype=dtype)
    assert fused_linear_gelu_supported(dense, x)
    fused = linear_gelu(dense, x).float()
    exact = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), dense.weight.float(), dense.bias.float()))
    monkeypatch.setenv("ESM_DUAL_EXACT_GELU", "1")
    assert not fused_linear_gelu_supported(dense, x)
    separate = linear_gelu(dense, x).float()
    # The epilogue's GELU differs from erf-GELU by < 5e-4 absolute: it is no further from the fp32
    # answer than the separate half-precision passes are (both are dominated by the GEMM's rounding).
    err_fused = (fused - exact).abs().max().item()
    err_sep = (separate - exact).abs().max().item()
    assert err_fused < 1.5 * err_sep + 1e-3, (err_fused, err_sep)


# ---- flash-attn-4 selection ------------------------------------------------------------------------


def test_fa4_backend_choice_and_fallback(monkeypatch):
    """"auto" never picks FA4 off a Hopper GPU, naming it there is a clear error; where "auto" picked it
    and it fails, a warning says so and FlashAttention-2 takes over for the rest of the process."""
    from esm_dual.pt import attention as A

    q = torch.randn(10, 2, 64)
    assert not A.fa4_supported(q) and A.resolve_backend(q) == "dense"
    with pytest.raises(ValueError, match="flash-attn-4 .* Hopper GPU"):
        A.resolve_backend(q, "fa4")
    # pretend to be on a Hopper GPU with flash-attn-4 installed, whose kernels then fail
    calls = []
    monkeypatch.setattr(A, "fa4_supported", lambda q: not A._FA4.get("broken"))
    monkeypatch.setattr(A, "flash_supported", lambda q: True)
    monkeypatch.setattr(A, "_fa4_attention", lambda *a: (_ for _ in ()).throw(RuntimeError("no CTK flavor")))
    monkeypatch.setattr(A._FlashVarlen, "apply", lambda *a: calls.append(a[4]) or a[0])
    monkeypatch.setitem(A._FA4, "broken", None)
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


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_model_with_fa4(tmp_path, dtype):
    """The whole packed encoder in inference with flash-attn-4 against FlashAttention-2 and the fp32 padded
    reference, head dim 64, real-length sequences; fp16 too, as ``esm-dual embed`` runs."""
    if not _fa4_here():
        pytest.skip("flash-attn-4 is not installed or this is not a Hopper GPU")
    model = _gpu_model(tmp_path, hidden_size=1280, intermediate_size=1280).cuda()  # 20 heads of 64
    ids, mask, rows = _lognormal_batch(16, seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    pack = pack_sequences(rows, device="cuda")
    with torch.no_grad():
        ref32 = _sdpa(model)(ids, attention_mask=mask).logits[mask.bool()]
        model.to(dtype)
        out = {b: model.lm_head(packed_model_forward(model.esm, pack.input_ids, pack.cu_seqlens, pack.max_seqlen,
                                                     backend=b)[0]) for b in ("fa4", "flash")}
    e4, e2 = _rel(out["fa4"], ref32), _rel(out["flash"], ref32)
    assert e4 < 2e-2 and e4 < 1.2 * e2 + 1e-3, (e4, e2)
