"""Training behaviour users of PyTorch expect, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

from esm_dual.pt import EsmForMaskedLM, EsmForSequenceClassification, EsmModel
from tests.conftest import make_batch, tiny_config


def _model(cls=EsmForMaskedLM, flavour="esm2", seed=0, **changes):
    torch.manual_seed(seed)
    return cls(tiny_config(flavour, **changes))


def _batch(seed=0):
    ids, mask = make_batch(seed=seed)
    return torch.tensor(ids), torch.tensor(mask)


def test_dropout_from_config_active_only_in_training():
    model = _model(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    ids, mask = _batch()
    model.train()
    a = model(ids, attention_mask=mask).logits
    b = model(ids, attention_mask=mask).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        c = model(ids, attention_mask=mask).logits
        d = model(ids, attention_mask=mask).logits
    assert torch.equal(c, d)


def test_gradient_checkpointing_gives_same_gradients():
    ids, mask = _batch(1)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for ckpt in (False, True):
        model = _model(seed=3)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable()
            assert model.esm.encoder.gradient_checkpointing
        starts = []  # a pre-hook: the recomputation in backward stops early, before any forward hook
        for layer in model.esm.encoder.layer:
            layer.register_forward_pre_hook(lambda *a, starts=starts: starts.append(1))
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        n = len(model.esm.encoder.layer)
        assert len(starts) == (2 * n if ckpt else n), starts  # checkpointed: every layer runs again in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    # Every parameter but the contact head (unused by the MLM loss) gets a gradient.
    assert set(grads[0]) == {n for n, _ in model.named_parameters() if "contact_head" not in n}
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_and_stays_close(dtype):
    """Under CPU autocast the logits move from fp32 by no more than HF transformers' own do on the same
    weights (autocast rounding, not a bug), and by a few ulps of the dtype at the logits' scale."""
    transformers = pytest.importorskip("transformers")
    model = _model().eval()
    hf = transformers.EsmForMaskedLM(
        transformers.EsmConfig(**{k: v for k, v in model.config.to_dict().items() if k != "model_type"})).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    ids, mask = _batch(2)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        assert (hf(ids, attention_mask=mask).logits - ref).abs().max().item() < 1e-5
        with torch.autocast("cpu", dtype=dtype):
            out = model(ids, attention_mask=mask).logits
            hf_out = hf(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    ours, theirs = (out.float() - ref).abs().max().item(), (hf_out.float() - ref).abs().max().item()
    assert ours > 0  # autocast did run in the lower precision
    assert ours <= 1.5 * theirs + 1e-6, (ours, theirs)
    assert ours < 4 * torch.finfo(dtype).eps * ref.abs().max().item()


def test_half_precision_weights_run_on_cpu():
    model = _model().eval().to(torch.bfloat16)
    ids, mask = _batch(2)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
        c = model.predict_contacts(ids, mask)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert torch.isfinite(c.float()).all()


def test_torch_compile_fullgraph_same_output():
    model = _model(EsmModel).eval()
    ids, mask = _batch(4)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(ids, attention_mask=mask).last_hidden_state
    assert (out - ref).abs().max().item() < 1e-5


def test_freeze_encoder_head_only_finetuning():
    model = _model(EsmForSequenceClassification, num_labels=2)
    model.freeze_base_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, mask = _batch()
    labels = torch.tensor([0, 1, 1, 0])
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == n.startswith("classifier."), n


def test_training_loop_reduces_mlm_loss():
    model = _model(seed=1)
    ids, mask = _batch(6)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_tied_decoder_stays_tied_in_training():
    """After optimizer steps (Adam, MLM loss) the decoder is still the word embeddings: one tensor that
    both uses' gradients moved, not two copies that drifted apart."""
    model = _model()
    emb = model.esm.embeddings.word_embeddings.weight
    assert model.lm_head.decoder.weight is emb
    before = emb.detach().clone()
    ids, mask = _batch(1)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    assert sum(p is emb for p in model.parameters()) == 1  # listed (and stepped) once
    assert model.lm_head.decoder.weight is model.esm.embeddings.word_embeddings.weight
    assert not torch.equal(before, emb.detach())
    # the decoder's use contributes: logits equal hidden @ emb.T + bias with the trained tensor
    model.eval()
    with torch.no_grad():
        h = model.esm(ids, attention_mask=mask).last_hidden_state
        x = model.lm_head.layer_norm(torch.nn.functional.gelu(model.lm_head.dense(h)))
        expect = x @ emb.T + model.lm_head.bias
        assert torch.allclose(model(ids, attention_mask=mask).logits, expect, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------


def test_token_ids_outside_vocab():
    model = _model(EsmModel).eval()
    with pytest.raises(ValueError, match="token id 40 is outside the vocabulary"):
        model(torch.tensor([[0, 5, 40, 2]]))
    with pytest.raises(ValueError, match="token id -1 is outside"):
        model(torch.tensor([[0, -1, 2]]))


def test_mask_shape_mismatch():
    model = _model(EsmModel).eval()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\)"):
        model(torch.tensor([[0, 5, 6, 2]]), attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_empty_batch():
    model = _model(EsmModel).eval()
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_float_ids_and_both_inputs():
    model = _model(EsmModel).eval()
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(torch.zeros(1, 4, dtype=torch.long), inputs_embeds=torch.zeros(1, 4, 18))


def test_inputs_embeds_path_matches_ids_without_token_dropout():
    model = _model(EsmModel, token_dropout=False).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with torch.no_grad():
        a = model(ids).last_hidden_state
        b = model(inputs_embeds=model.embeddings.word_embeddings(ids)).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6)


def test_output_key_and_index_access():
    model = _model().eval()
    ids, mask = _batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert out["logits"] is out.logits
    assert out[0] is out.logits
    assert "loss" not in out and "hidden_states" in out
    assert list(out.keys()) == ["logits", "hidden_states"]
    assert model(ids, attention_mask=mask, return_dict=False)[0].shape == out.logits.shape
