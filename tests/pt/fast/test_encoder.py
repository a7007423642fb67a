"""The packed encoder against the padded path, the layer modules and HF transformers.

CPU, fp32: packed and padded agree within 1e-5 (hidden states, logits, gradients), with rotary
positions restarting and the token-dropout ratio computed per sequence inside a pack; the inference
loop (forced on through its torch fallbacks) equals the layer modules and HF's EsmModel; an override of
any module the loop would bypass is honoured. GPU (marked ``gpu``): flash varlen + the Triton kernels
against the padded SDPA path in bf16 on real-length batches.
"""

from __future__ import annotations

import pytest
import torch

from esm_dual.pt import EsmModel
from esm_dual.pt.fast.attention import VarlenInfo
from esm_dual.pt.fast.encoder import packed_embeddings, packed_model_forward
from esm_dual.pt.fast.options import FastPathOptions
from esm_dual.pt.fast.packing import pack_sequences, packed_positions, repad, segment_ids, unpad
from tests.conftest import make_batch, tiny_config
from tests.pt.fast.common import (
    CUDA,
    TOL,
    fa4_here,
    gpu_model,
    lognormal_batch,
    padded_sdpa,
    rel,
    rows_of,
    tiny_model,
)
from tests.utils import maxdiff


@pytest.mark.parametrize("backend", ["dense", "loop"])
def test_packed_matches_padded_all_flavours(tmp_path, flavour, backend):
    model = padded_sdpa(tiny_model(tmp_path, flavour))
    ids, mask = (torch.tensor(x) for x in make_batch(seed=1))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
        pack = pack_sequences(rows_of(ids, mask))
        seq, hidden = packed_model_forward(model.esm, pack.input_ids, pack.cu_seqlens, pack.max_seqlen,
                                           output_hidden_states=True, backend=backend)
        logits = model.lm_head(seq)
    u = unpad(mask)
    assert maxdiff(repad(logits, u)[mask.bool()], ref.logits[mask.bool()]) < TOL
    assert len(hidden) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for h, r in zip(hidden, ref.hidden_states):
        assert maxdiff(repad(h, u)[mask.bool()], r[mask.bool()]) < TOL


def test_forward_packed_api(tmp_path):
    model = padded_sdpa(tiny_model(tmp_path, "esm2"))
    ids, mask = (torch.tensor(x) for x in make_batch(seed=2, lengths=(30, 1, 17, 9, 22)))
    pack = pack_sequences(rows_of(ids, mask))
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
    assert maxdiff(out.logits, ref.logits[mask.bool()]) < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    assert base.last_hidden_state.shape == (T, model.config.hidden_size)
    assert torch.equal(base.last_hidden_state, out.hidden_states[-1])


def test_forward_switch_packed_equals_padded(tmp_path, flavour):
    """EsmModel.forward with attn_implementation='packed' unpads, runs packed and re-pads (zeros at padding)."""
    model = tiny_model(tmp_path, flavour, head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=4))
    with torch.no_grad():
        model.attn_implementation = "sdpa"
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
        model.attn_implementation = "packed"
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    m = mask.bool()
    assert maxdiff(out.last_hidden_state[m], ref.last_hidden_state[m]) < TOL
    assert torch.count_nonzero(out.last_hidden_state[~m]) == 0
    for h, r in zip(out.hidden_states, ref.hidden_states):
        assert maxdiff(h[m], r[m]) < TOL
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
    model = tiny_model(tmp_path, "esm2", head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=5))
    ids_l = torch.stack([torch.roll(ids[b], int((mask[b] == 0).sum())) for b in range(ids.shape[0])])
    mask_l = torch.stack([torch.roll(mask[b], int((mask[b] == 0).sum())) for b in range(ids.shape[0])])
    with torch.no_grad():
        model.attn_implementation = "sdpa"
        ref = model(ids_l, attention_mask=mask_l)
        model.attn_implementation = "packed"
        out = model(ids_l, attention_mask=mask_l)
    m = mask_l.bool()
    assert maxdiff(out.last_hidden_state[m], ref.last_hidden_state[m]) < TOL


def test_rotary_restarts_and_no_cross_talk(tmp_path):
    """A sequence's output inside a pack equals its output alone, whatever its neighbours are."""
    model = tiny_model(tmp_path, "esm2", head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=6, lengths=(13, 8, 20)))
    rows = rows_of(ids, mask)
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
        assert maxdiff(packed[cu[b]:cu[b + 1]], a) < TOL
    assert maxdiff(packed2[cu[1]:], packed[cu[1]:]) < TOL
    assert maxdiff(packed2[: cu[1]], packed[: cu[1]]) > 1e-3
    # Same sequence at two offsets of a pack gives the same output (positions restart at 0).
    pack3 = pack_sequences([rows[2], rows[2]])
    with torch.no_grad():
        h = model.forward_packed(pack3.input_ids, pack3.cu_seqlens, pack3.max_seqlen).last_hidden_state
    n = rows[2].numel()
    assert maxdiff(h[:n], h[n:]) < TOL


def test_token_dropout_ratio_per_sequence(tmp_path):
    model = tiny_model(tmp_path, "esm2", head="base")
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
    assert maxdiff(out[:7], ea) < 1e-7 and maxdiff(out[7:], eb) < 1e-7
    # explicit ratios: (1 - 0.12) / (1 - 3/7) on a's unmasked rows, (1 - 0.12) / 1 on b's
    assert torch.allclose(out[4], words[4] * (0.88 / (1 - 3 / 7)), atol=1e-6)
    assert torch.allclose(out[8], words[8] * 0.88, atol=1e-6)
    assert torch.count_nonzero(out[1:4]) == 0


def test_gradients_equal(tmp_path):
    model = padded_sdpa(tiny_model(tmp_path, "esm2"))
    model.train()
    ids, mask = (torch.tensor(x) for x in make_batch(seed=7))
    g = torch.Generator().manual_seed(1)
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.4) & (mask == 1), ids, torch.full_like(ids, -100))
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(ref) > 20
    model.zero_grad()
    pack = pack_sequences(rows_of(ids, mask))
    model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen, labels=labels[mask.bool()]).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in ref), n
        if n in ref:
            assert maxdiff(p.grad, ref[n]) < TOL * max(1.0, ref[n].abs().max().item()), n
    # and through the padded API with the packed switch (unpad -> packed -> repad)
    model.zero_grad()
    model.esm.attn_implementation = "packed"
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    for n, g in ref.items():
        assert maxdiff(model.get_parameter(n).grad, g) < TOL * max(1.0, g.abs().max().item()), n


def test_gradient_checkpointing_packed(tmp_path):
    model = tiny_model(tmp_path, "esm2")
    model.train()
    pack = pack_sequences(rows_of(*(torch.tensor(x) for x in make_batch(seed=8))))
    labels = pack.input_ids.clone()
    calls = []  # layer 0 starts to run (a pre-hook: recomputation stops early, before forward hooks)
    model.esm.encoder.layer[0].register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen, labels=labels).loss.backward()
    assert len(calls) == 1
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen, labels=labels).loss.backward()
    assert len(calls) == 3, calls  # forward + recomputation in backward: the packed path did checkpoint
    assert set(ref) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in ref.items():
        assert maxdiff(model.get_parameter(n).grad, g) < 1e-6 * max(1.0, g.abs().max().item()), n


def test_varlen_info_is_what_the_layers_get(tmp_path):
    model = tiny_model(tmp_path, "esm2", head="base")
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


def test_forward_packed_pooler_and_inputs_embeds():
    torch.manual_seed(0)
    model = EsmModel(tiny_config("esm2"), add_pooling_layer=True).eval()
    model.attn_implementation = "sdpa"
    ids, mask = (torch.tensor(x) for x in make_batch(seed=11))
    pack = pack_sequences(rows_of(ids, mask))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        out = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen)
        emb = model.forward_packed(inputs_embeds=model.embeddings.word_embeddings(pack.input_ids),
                                   cu_seqlens=pack.cu_seqlens)
        ref_emb = model(inputs_embeds=model.embeddings.word_embeddings(ids), attention_mask=mask)
    assert out.pooler_output.shape == (ids.shape[0], model.config.hidden_size)
    assert maxdiff(out.pooler_output, ref.pooler_output) < TOL
    # no input_ids: no token dropout, on both paths
    assert maxdiff(emb.last_hidden_state, ref_emb.last_hidden_state[mask.bool()]) < TOL
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.forward_packed(pack.input_ids)


@pytest.mark.parametrize("epilogue", ["1", "0", "hook"])
def test_fused_inference_loop_matches_layer_modules(tmp_path, epilogue):
    """The inference loop equals the layer modules: with the residual add in the projections' epilogue
    (biases pending into the next LayerNorm), with it off (add fused into the LayerNorm), and with a
    hook on a projection (which turns the epilogue off, so the hook runs). On the CPU (forced on, the
    kernels' torch fallbacks), on a GPU with the Triton kernels."""
    from esm_dual.pt.fast.encoder import packed_encoder_inference, use_fused_inference
    from esm_dual.pt.fast.epilogues import residual_epilogue_supported
    from esm_dual.pt.fast.kernels import add_layer_norm, pending_layer_norm

    device = "cuda" if CUDA else "cpu"
    model = tiny_model(tmp_path, "esm2", head="base").to(device)
    ids, mask = (torch.tensor(x) for x in make_batch(seed=9))
    pack = pack_sequences(rows_of(ids, mask), device=device)
    T = pack.input_ids.shape[0]
    x = model.embeddings.word_embeddings(pack.input_ids).detach()
    x_before = x.clone()
    positions = packed_positions(pack.cu_seqlens, T, segment_ids(pack.cu_seqlens, T))
    # ESM_DUAL_RESIDUAL_EPILOGUE=0 for "0"; the loop forced on where Triton is missing (CPU)
    options = FastPathOptions(residual_epilogue=epilogue != "0", fused_loop="on")
    info = VarlenInfo(pack.cu_seqlens, pack.max_seqlen, options=options)
    calls = []
    if epilogue == "hook":
        model.encoder.layer[1].output.dense.register_forward_hook(lambda m, i, o: calls.append(1))
    dense = [m for layer in model.encoder.layer for m in (layer.attention.output.dense, layer.output.dense)]
    assert residual_epilogue_supported(dense, x, options) == (epilogue == "1")
    with torch.no_grad():
        assert use_fused_inference(model.encoder, x, options)
        fused, fused_hidden = packed_encoder_inference(model.encoder, x, info, positions, True)
        assert calls == ([1] if epilogue == "hook" else [])
        ref, ref_hidden, _ = model.encoder(x, info, positions, True, False)
        r = torch.randn_like(x)
        h, y = add_layer_norm(x, r, model.encoder.emb_layer_norm_after, options)
        p = torch.randn(x.shape[1], device=device)
        yp = pending_layer_norm(x, p, model.encoder.emb_layer_norm_after, options)
    assert torch.equal(x, x_before)  # the caller's embeddings are never written
    assert maxdiff(fused, ref) < TOL
    assert len(fused_hidden) == len(ref_hidden)
    for a, b in zip(fused_hidden, ref_hidden):
        assert maxdiff(a, b) < TOL
    assert torch.equal(h, x + r)
    assert maxdiff(y, model.encoder.emb_layer_norm_after(x + r)) < TOL
    assert maxdiff(yp, model.encoder.emb_layer_norm_after(x + p)) < TOL
    model.train()
    assert not use_fused_inference(model.encoder, x, options)


def test_fused_inference_loop_under_autocast(tmp_path):
    """fp32 weights under bf16 autocast: the inference loop (which then keeps the residual add out of the
    GEMM epilogue) runs and gives the layer modules' answer."""
    from esm_dual.pt.fast.encoder import packed_encoder_inference, use_fused_inference
    from esm_dual.pt.fast.epilogues import residual_epilogue_supported

    device = "cuda" if CUDA else "cpu"
    model = tiny_model(tmp_path, "esm2", head="base").to(device)
    pack = pack_sequences(rows_of(*(torch.tensor(x) for x in make_batch(seed=12))), device=device)
    T = pack.input_ids.shape[0]
    x = model.embeddings.word_embeddings(pack.input_ids).detach()
    positions = packed_positions(pack.cu_seqlens, T, segment_ids(pack.cu_seqlens, T))
    options = FastPathOptions(fused_loop="on")
    info = VarlenInfo(pack.cu_seqlens, pack.max_seqlen, options=options)
    dense = [model.encoder.layer[0].output.dense]
    assert residual_epilogue_supported(dense, x, options)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        assert not residual_epilogue_supported(dense, x, options)
        assert use_fused_inference(model.encoder, x, options)
        fused, _ = packed_encoder_inference(model.encoder, x, info, positions)
        ref, _, _ = model.encoder(x, info, positions, False, False)
    assert fused.shape == ref.shape and rel(fused, ref) < 1e-2


@pytest.mark.parametrize("heads", [20, 5])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_packed_bf16_matches_padded(tmp_path, heads):
    model = gpu_model(tmp_path, num_attention_heads=heads).cuda()
    ids, mask, rows = lognormal_batch(12, seed=0)
    ids, mask = ids.cuda(), mask.cuda()
    m = mask.bool()
    with torch.no_grad():
        ref32 = padded_sdpa(model)(ids, attention_mask=mask).logits[m]
        model.bfloat16()
        padded = model(ids, attention_mask=mask).logits[m]
        model.esm.attn_implementation = "auto"  # CUDA + bf16: packed
        auto = model(ids, attention_mask=mask).logits
        pack = pack_sequences(rows, device="cuda")
        packed = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen).logits
    assert rel(auto[m], packed) < 1e-2  # the LM head's GEMM sees [B*L, D] vs [T, D]: last-bit differences
    with torch.no_grad():
        hidden = model.esm(ids, attention_mask=mask).last_hidden_state
        hidden_packed = model.esm.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen).last_hidden_state
    assert torch.count_nonzero(hidden[~m]) == 0
    assert torch.equal(hidden[m], hidden_packed)
    e_padded, e_packed = rel(padded, ref32), rel(packed, ref32)
    assert e_packed < 2e-2, (e_packed, e_padded)
    assert e_packed < 1.5 * e_padded + 1e-3, (e_packed, e_padded)
    assert rel(packed, padded) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("heads", [20, 5])  # head dim 16 (flash) and 64 (flash-attn-4 where installed)
def test_gpu_packed_bf16_gradients(tmp_path, heads):
    model = gpu_model(tmp_path, num_attention_heads=heads).cuda()
    model.train()
    ids, mask, rows = lognormal_batch(6, seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    padded_sdpa(model)(ids, attention_mask=mask, labels=labels).loss.backward()
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
        assert rel(p.grad, g) < tol, (n, rel(p.grad, g))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_model_with_fa4(tmp_path, dtype):
    """The whole packed encoder in inference with flash-attn-4 against FlashAttention-2 and the fp32 padded
    reference, head dim 64, real-length sequences; fp16 too, as ``esm-dual embed`` runs."""
    if not fa4_here():
        pytest.skip("flash-attn-4 is not installed or this is not a Hopper GPU")
    model = gpu_model(tmp_path, hidden_size=1280, intermediate_size=1280).cuda()  # 20 heads of 64
    ids, mask, rows = lognormal_batch(16, seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    pack = pack_sequences(rows, device="cuda")
    with torch.no_grad():
        ref32 = padded_sdpa(model)(ids, attention_mask=mask).logits[mask.bool()]
        model.to(dtype)
        out = {b: model.lm_head(packed_model_forward(model.esm, pack.input_ids, pack.cu_seqlens, pack.max_seqlen,
                                                     backend=b)[0]) for b in ("fa4", "flash")}
    e4, e2 = rel(out["fa4"], ref32), rel(out["flash"], ref32)
    assert e4 < 2e-2 and e4 < 1.2 * e2 + 1e-3, (e4, e2)


# ---- the inference loop on the CPU (its torch fallbacks), against the modules and HF ---------------

FUSED = dict(attn_implementation="packed", fused_loop="on")  # the GPU default loop, forced on the CPU


@pytest.mark.parametrize("epilogue", [True, False])
def test_fused_loop_on_cpu_matches_padded_and_hf(tmp_path, flavour, epilogue):
    """EsmModel.forward through the packed inference loop (forced on: rotary, add + LayerNorm and the
    residual epilogue run through their torch fallbacks) equals the padded module path and HF's EsmModel
    on the same weights, fp32, within 1e-5 (hidden states included); forward_packed too."""
    from esm_dual.pt.fast import encoder as E
    from tests.utils import hf_model

    model = tiny_model(tmp_path, flavour, head="base")
    hf = hf_model(str(tmp_path), head="base", attn="sdpa")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=13, lengths=(30, 1, 17, 9, 22)))
    m = mask.bool()
    loop_calls = []
    real_loop = E.packed_encoder_inference

    def spy(*args, **kwargs):
        loop_calls.append(1)
        return real_loop(*args, **kwargs)

    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_hidden_states=True)
        padded = padded_sdpa(model)(ids, attention_mask=mask, output_hidden_states=True)
        model.set_fast_path(residual_epilogue=epilogue, **FUSED)
        E.packed_encoder_inference = spy
        try:
            fused = model(ids, attention_mask=mask, output_hidden_states=True)
            pack = pack_sequences(rows_of(ids, mask))
            fused_packed = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen,
                                                output_hidden_states=True)
        finally:
            E.packed_encoder_inference = real_loop
    assert loop_calls == [1, 1]  # both calls ran the inference loop, not the layer modules
    assert E.bypassed_module(model.encoder) is None
    assert maxdiff(fused.last_hidden_state[m], ref.last_hidden_state[m]) < TOL
    assert maxdiff(fused.last_hidden_state[m], padded.last_hidden_state[m]) < TOL
    assert maxdiff(fused_packed.last_hidden_state, ref.last_hidden_state[m]) < TOL
    assert len(fused.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for a, b, c in zip(fused.hidden_states, ref.hidden_states, fused_packed.hidden_states):
        assert maxdiff(a[m], b[m]) < TOL and maxdiff(c, b[m]) < TOL


def test_fused_loop_on_cpu_under_bf16_autocast(tmp_path):
    """fp32 weights under CPU bf16 autocast: the forced inference loop against the padded module path under
    the same autocast. Both round every GEMM input to bf16 (8 bits of mantissa, 3.9e-3 relative), and they
    round different sums (the packed GEMMs see [T, D], the padded [B, L, D]; the loop adds residuals in its
    own order), so they agree to a few bf16 ulps of the output: 1e-2 relative, the GPU bf16 tests' bound."""
    model = tiny_model(tmp_path, "esm2", head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=14))
    m = mask.bool()
    with torch.no_grad():
        ref32 = padded_sdpa(model)(ids, attention_mask=mask).last_hidden_state[m]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            padded = model(ids, attention_mask=mask).last_hidden_state[m]
            model.set_fast_path(**FUSED)
            fused = model(ids, attention_mask=mask).last_hidden_state[m]
    assert rel(fused, padded) < 1e-2
    assert rel(fused, ref32) < 1.5 * rel(padded, ref32) + 1e-3


# ---- overrides of the modules the inference loop bypasses -------------------------------------------


def _override_cases():
    """(name, the module the loop would skip (or None where a module call honours it), install(model))."""
    from esm_dual.pt import modeling_esm as M

    class HalfSelfOutput(M.EsmSelfOutput):
        def forward(self, hidden_states, input_tensor):
            return 0.5 * self.dropout(self.dense(hidden_states)) + input_tensor

    class ScaledOutput(M.EsmOutput):
        def forward(self, hidden_states, input_tensor):
            return self.dropout(self.dense(hidden_states)) * 1.5 + input_tensor

    class ScaledLayer(M.EsmLayer):
        def forward(self, hidden_states, attention_bias, positions, output_attentions=False):
            out, probs = super().forward(hidden_states, attention_bias, positions, output_attentions)
            return out * 1.1, probs

    class ReluIntermediate(M.EsmIntermediate):
        def forward(self, hidden_states):
            return torch.relu(self.dense(hidden_states))

    class WeightedAttention(M.EsmAttention):
        def forward(self, hidden_states, attention_bias, positions, output_attentions=False):
            out, probs = super().forward(hidden_states, attention_bias, positions, output_attentions)
            return out * torch.linspace(0.5, 1.5, out.shape[-1]), probs

    class RmsLikeNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2.0

    class LeakyDropout(torch.nn.Dropout):
        def forward(self, x):
            return x * 0.9

    def swap(path, cls):
        def install(model):
            module = model.get_submodule(path)
            module.__class__ = cls
        return install

    def instance_forward(model):
        out = model.encoder.layer[1].output
        out.forward = lambda hidden_states, input_tensor: out.dense(hidden_states) * 0.7 + input_tensor

    def hook(model):
        model.encoder.layer[0].attention.output.register_forward_hook(lambda mod, args, out: out * 0.8)

    def pre_hook(model):
        model.encoder.layer[2].LayerNorm.register_forward_pre_hook(
            lambda mod, args: (args[0] + torch.linspace(-1.0, 1.0, args[0].shape[-1]),))

    return [
        ("EsmSelfOutput subclass", "layer.1.attention.output", swap("encoder.layer.1.attention.output",
                                                                    HalfSelfOutput)),
        ("EsmOutput subclass", "layer.2.output", swap("encoder.layer.2.output", ScaledOutput)),
        ("EsmLayer.forward", "layer.0", swap("encoder.layer.0", ScaledLayer)),
        ("EsmIntermediate subclass", "layer.1.intermediate", swap("encoder.layer.1.intermediate", ReluIntermediate)),
        ("EsmAttention subclass", "layer.1.attention", swap("encoder.layer.1.attention", WeightedAttention)),
        ("LayerNorm subclass", "emb_layer_norm_after", swap("encoder.emb_layer_norm_after", RmsLikeNorm)),
        ("Dropout subclass", "layer.0.output.dropout", swap("encoder.layer.0.output.dropout", LeakyDropout)),
        ("forward set on the instance", "layer.1.output", instance_forward),
        ("forward hook", "layer.0.attention.output", hook),
        ("forward pre-hook on a LayerNorm", "layer.2.LayerNorm", pre_hook),
    ]


@pytest.mark.parametrize("case", range(len(_override_cases())), ids=[c[0] for c in _override_cases()])
def test_override_of_a_bypassed_module_is_honoured(tmp_path, case):
    """Each module the inference loop skips, overridden (subclass, forward on the instance, hooks): the
    loop is not taken (bypassed_module names the module), EsmModel.forward falls back to the padded module
    path and forward_packed to the packed module path, and both give the override's result."""
    from esm_dual.pt.fast import encoder as E

    name, skipped, install = _override_cases()[case]
    model = tiny_model(tmp_path, "esm2", head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=15))
    m = mask.bool()
    pack = pack_sequences(rows_of(ids, mask))
    with torch.no_grad():
        plain = padded_sdpa(model)(ids, attention_mask=mask).last_hidden_state[m]
        install(model)
        assert E.bypassed_module(model.encoder) == skipped, name
        ref = model(ids, attention_mask=mask).last_hidden_state[m]  # padded module path, the override in it
        assert maxdiff(ref, plain) > 1e-3, "the override changes nothing: the test would prove nothing"
        model.set_fast_path(**FUSED)
        x = model.embeddings.word_embeddings(ids)
        assert E.use_fused_inference(model.encoder, x, model.fast_path_options)
        assert E.forward_padded(model, ids, mask, None, torch.arange(ids.shape[1]), None, False, False) is None
        out = model(ids, attention_mask=mask).last_hidden_state[m]
        packed = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen).last_hidden_state
    assert maxdiff(out, ref) < TOL, name
    assert maxdiff(packed, ref) < TOL, name


@pytest.mark.parametrize("targets", [["output.dense"], ["intermediate.dense"], ["query", "value"]])
def test_peft_lora_adapters_are_honoured(tmp_path, targets):
    """PEFT's LoRA (the real library) replacing Linear layers: the inference loop keeps their module calls
    (the residual epilogue and the fused q/k/v GEMM need plain nn.Linear), so the adapters' result comes
    out: equal to the padded module path with the same adapters."""
    peft = pytest.importorskip("peft")
    from esm_dual.pt.fast import encoder as E

    model = tiny_model(tmp_path, "esm2", head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=16))
    m = mask.bool()
    with torch.no_grad():
        plain = padded_sdpa(model)(ids, attention_mask=mask).last_hidden_state[m]
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = peft.inject_adapter_in_model(config, model).eval()
    adapted = [n for n, mod in model.named_modules() if type(mod).__module__.startswith("peft")]
    assert adapted, "no LoRA layer was injected"
    calls = []
    real_loop = E.packed_encoder_inference
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state[m]
        assert maxdiff(ref, plain) > 1e-3
        model.set_fast_path(**FUSED)
        E.packed_encoder_inference = lambda *a, **k: calls.append(1) or real_loop(*a, **k)
        try:
            out = model(ids, attention_mask=mask).last_hidden_state[m]
        finally:
            E.packed_encoder_inference = real_loop
    assert calls == [1]  # the loop itself ran (Linear adapters are called by it, not bypassed)
    assert maxdiff(out, ref) < TOL


def test_embeddings_override_in_forward_packed(tmp_path):
    """forward_packed computes the embeddings itself only for the reference module; a subclass runs as
    a module on the pack laid out as a padded batch (EsmModel.forward always calls the module)."""
    from esm_dual.pt import modeling_esm as M

    class LoudEmbeddings(M.EsmEmbeddings):
        def forward(self, input_ids, attention_mask, position_ids=None, inputs_embeds=None):
            return super().forward(input_ids, attention_mask, position_ids, inputs_embeds) * 2.0

    model = tiny_model(tmp_path, "esm2", head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=17))
    m = mask.bool()
    pack = pack_sequences(rows_of(ids, mask))
    model.embeddings.__class__ = LoudEmbeddings
    with torch.no_grad():
        ref = padded_sdpa(model)(ids, attention_mask=mask).last_hidden_state[m]
        model.set_fast_path(**FUSED)
        out = model(ids, attention_mask=mask).last_hidden_state[m]
        packed = model.forward_packed(pack.input_ids, pack.cu_seqlens, pack.max_seqlen).last_hidden_state
        model.embeddings.__class__ = M.EsmEmbeddings
        plain = model(ids, attention_mask=mask).last_hidden_state[m]
    assert maxdiff(ref, plain) > 1e-3
    assert maxdiff(out, ref) < TOL and maxdiff(packed, ref) < TOL


def test_rotary_override_is_called_by_the_packed_attention(tmp_path):
    """The rotary kernels stand in for EsmRotaryEmbedding only where it is the reference; a subclass is
    called (its result comes out of the packed path, the loop forced on)."""
    from esm_dual.pt import modeling_esm as M

    class SlowerRotary(M.EsmRotaryEmbedding):
        def forward(self, q, k, positions, q_scale=1.0):
            return super().forward(q, k, positions * 0.5, q_scale)

    model = tiny_model(tmp_path, "esm2", head="base")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=18))
    m = mask.bool()
    with torch.no_grad():
        plain = padded_sdpa(model)(ids, attention_mask=mask).last_hidden_state[m]
        for layer in model.encoder.layer:
            layer.attention.self.rotary_embeddings.__class__ = SlowerRotary
        ref = model(ids, attention_mask=mask).last_hidden_state[m]
        model.set_fast_path(**FUSED)
        out = model(ids, attention_mask=mask).last_hidden_state[m]
    assert maxdiff(ref, plain) > 1e-3
    assert maxdiff(out, ref) < TOL
