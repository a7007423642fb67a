"""esm_dual.pt against HF transformers on the same tiny random hub-layout checkpoints (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esm_dual.pt import EsmForMaskedLM, EsmForSequenceClassification, EsmForTokenClassification, EsmModel
from tests.conftest import make_batch, tiny_config
from tests.utils import hf_model, maxdiff, write_hub_checkpoint

TOL = 1e-5
OURS = {"base": EsmModel, "mlm": EsmForMaskedLM, "seq": EsmForSequenceClassification,
        "tok": EsmForTokenClassification}


def _pair(tmp_path, flavour, head, **cfg_changes):
    cfg = tiny_config(flavour, **cfg_changes)
    write_hub_checkpoint(str(tmp_path), cfg, head=head)
    ours = OURS[head].from_pretrained(str(tmp_path))
    ref = hf_model(str(tmp_path), head=head)
    return ours, ref


def _labels(head, ids, mask, num_labels, problem_type=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = ids.shape
    if head == "mlm":
        labels = torch.where(torch.rand(B, L, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        labels[:, 1] = ids[:, 1]
        return labels
    if head == "tok":
        labels = torch.randint(0, num_labels, (B, L), generator=g)
        return labels.masked_fill(mask == 0, -100)
    if head == "seq":
        if problem_type == "regression":
            return torch.randn(B, num_labels, generator=g).squeeze(-1) if num_labels == 1 else \
                torch.randn(B, num_labels, generator=g)
        if problem_type == "multi_label_classification":
            return (torch.rand(B, num_labels, generator=g) > 0.5).float()
        return torch.randint(0, num_labels, (B,), generator=g)
    return None


@pytest.mark.parametrize("head", ["base", "mlm", "seq", "tok"])
def test_forward_outputs_match_hf(tmp_path, flavour, head):
    ours, ref = _pair(tmp_path, flavour, head)
    ids, mask = (torch.tensor(x) for x in make_batch())
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        b = ref(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    key = "last_hidden_state" if head == "base" else "logits"
    assert a[key].shape == b[key].shape
    assert maxdiff(a[key], b[key]) < TOL
    assert len(a.hidden_states) == len(b.hidden_states) == ours.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert maxdiff(x, y) < TOL
    assert len(a.attentions) == len(b.attentions) == ours.config.num_hidden_layers
    for x, y in zip(a.attentions, b.attentions):
        assert maxdiff(x, y) < TOL
    # hidden_states[-1] is after emb_layer_norm_after and equals last_hidden_state (base) / feeds the head
    if head == "base":
        assert torch.equal(a.hidden_states[-1], a.last_hidden_state)


def test_contacts_match_hf(tmp_path, flavour):
    ours, ref = _pair(tmp_path, flavour, "mlm")
    ids, mask = (torch.tensor(x) for x in make_batch(seed=3))
    with torch.no_grad():
        c = ours.predict_contacts(ids, mask)
        r = ref.esm.predict_contacts(ids, mask)
    B, L = ids.shape
    assert c.shape == (B, L - 2, L - 2)
    assert maxdiff(c, r) < TOL
    assert torch.allclose(c, c.transpose(-1, -2), atol=1e-6)  # symmetric


@pytest.mark.parametrize(
    "head,num_labels,problem_type",
    [("mlm", None, None), ("tok", 4, None), ("seq", 1, "regression"), ("seq", 3, "regression"),
     ("seq", 3, "single_label_classification"), ("seq", 3, "multi_label_classification"),
     ("seq", 3, None)],
)
def test_loss_and_gradients_match_hf(tmp_path, head, num_labels, problem_type):
    changes = {}
    if num_labels is not None:
        changes["num_labels"] = num_labels
    if problem_type is not None:
        changes["problem_type"] = problem_type
    cfg = tiny_config("esm2", **changes)
    write_hub_checkpoint(str(tmp_path), cfg, head=head)
    ours = OURS[head].from_pretrained(str(tmp_path))
    ref = hf_model(str(tmp_path), head=head)
    ids, mask = (torch.tensor(x) for x in make_batch(seed=5))
    labels = _labels(head, ids, mask, cfg.num_labels, problem_type)
    la = ours(ids, attention_mask=mask, labels=labels).loss
    lb = ref(ids, attention_mask=mask, labels=labels).loss
    assert abs(la.item() - lb.item()) < TOL
    la.backward()
    lb.backward()
    ga = {n: p.grad for n, p in ours.named_parameters()}
    gb = {n: p.grad for n, p in ref.named_parameters()}
    assert set(ga) == set(gb)
    for n in ga:
        if "contact_head" in n:  # not part of any task loss
            assert ga[n] is None and gb[n] is None
            continue
        assert ga[n] is not None, n
        assert maxdiff(ga[n], gb[n]) < TOL, n


def test_padded_and_unpadded_agree(tmp_path, flavour):
    cfg = tiny_config(flavour)
    write_hub_checkpoint(str(tmp_path), cfg, head="mlm")
    model = EsmForMaskedLM.from_pretrained(str(tmp_path))
    ids, mask = (torch.tensor(x) for x in make_batch(seed=7))
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, output_hidden_states=True)
        contacts = model.predict_contacts(ids, mask)
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            single = model(ids[b : b + 1, :n], output_hidden_states=True)
            assert maxdiff(single.logits[0], batched.logits[b, :n]) < TOL
            for x, y in zip(single.hidden_states, batched.hidden_states):
                assert maxdiff(x[0], y[b, :n]) < TOL
            c1 = model.predict_contacts(ids[b : b + 1, :n])
            assert maxdiff(c1[0], contacts[b, : n - 2, : n - 2]) < TOL


def test_sdpa_and_eager_paths_agree(tmp_path, flavour):
    cfg = tiny_config(flavour)
    write_hub_checkpoint(str(tmp_path), cfg, head="mlm")
    model = EsmForMaskedLM.from_pretrained(str(tmp_path))
    ids, mask = (torch.tensor(x) for x in make_batch(seed=2))
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, output_hidden_states=True)
        eager = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert fast.attentions is None
    assert maxdiff(fast.logits, eager.logits) < TOL
    for x, y in zip(fast.hidden_states, eager.hidden_states):
        assert maxdiff(x, y) < TOL


def test_token_dropout_scaling_explicit():
    """Embedding output = word_emb * (1 - 0.12) / (1 - observed ratio over real tokens); <mask> rows zero."""
    cfg = tiny_config("esm2")
    model = EsmModel(cfg).eval()
    ids, mask = (torch.tensor(x) for x in make_batch(seed=11))
    with torch.no_grad():
        emb = model.embeddings(ids, mask)
        w = model.embeddings.word_embeddings(ids)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        ratio = float((ids[b, :n] == 32).sum()) / n
        expected = w[b, :n] * (1 - 0.15 * 0.8) / (1 - ratio)
        expected[ids[b, :n] == 32] = 0
        assert torch.allclose(emb[b, :n], expected, atol=1e-6)
        assert torch.all(emb[b, n:] == 0)


def test_learned_positions_and_limit():
    from esm_dual.pt.modeling_esm import learned_position_ids

    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 5, 6, 7, 8, 2]])
    pos = learned_position_ids(ids, 1)
    assert pos.tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]]
    model = EsmModel(tiny_config("esm1b")).eval()
    too_long = torch.full((1, 1025), 5)
    with pytest.raises(ValueError, match="at most 1024 tokens.*1025"):
        model(too_long)
    # exactly 1024 is fine
    with torch.no_grad():
        assert model(torch.full((1, 1024), 5)).last_hidden_state.shape == (1, 1024, 18)


def test_inv_freq_loaded_not_recomputed(tmp_path):
    """Per-layer rotary tables come from the file (ESM-2 files hold fp16-rounded values)."""
    from safetensors.numpy import load_file, save_file

    cfg = tiny_config("esm2")
    write_hub_checkpoint(str(tmp_path), cfg, head="mlm")
    f = tmp_path / "model.safetensors"
    t = load_file(str(f))
    for k in t:
        if k.endswith("inv_freq"):
            t[k] = t[k].astype(np.float16).astype(np.float32)
    save_file(t, str(f), metadata={"format": "pt"})
    model = EsmForMaskedLM.from_pretrained(str(tmp_path))
    inv = model.esm.encoder.layer[0].attention.self.rotary_embeddings.inv_freq
    exact = 1.0 / (10000 ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
    assert np.array_equal(inv.numpy(), exact.astype(np.float16).astype(np.float32))
    assert not np.array_equal(inv.numpy(), exact.astype(np.float32))
