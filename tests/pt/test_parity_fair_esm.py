"""esm_dual.pt against fair-esm's own model code, on tiny files in fair-esm's ``.pt`` format."""

from __future__ import annotations

import pytest
import torch

from esm_dual.io.fair_esm import save_fair_esm
from esm_dual.pt import EsmForMaskedLM, EsmModel
from tests.conftest import make_batch, tiny_config
from tests.utils import random_hub_tensors

TOL = 1e-5
FILE_STEM = {"esm2": "esm2_t3_18_tiny", "esm1b": "esm1b_t3_18_tiny", "esm1v": "esm1v_t3_18_tiny_1"}


def _fair_esm_file(tmp_path, flavour):
    # fair-esm's ESM2 hard-codes the FFN width to 4 * hidden.
    cfg = tiny_config(flavour, intermediate_size=72)
    tensors = random_hub_tensors(cfg, "mlm", seed=4)
    path = tmp_path / f"{FILE_STEM[flavour]}.pt"
    save_fair_esm(str(path), cfg, tensors)
    return path


def _fair_esm_model(path):
    import argparse

    import esm

    # fair-esm calls torch.load without weights_only; torch >= 2.6 then refuses argparse.Namespace.
    # These are our own test files, so allow that one class for the reference loader.
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    return model.eval(), alphabet


def test_fair_esm_outputs_match(tmp_path, flavour):
    path = _fair_esm_file(tmp_path, flavour)
    ref, alphabet = _fair_esm_model(path)
    ours = EsmForMaskedLM.from_pretrained(str(path))
    assert alphabet.padding_idx == ours.config.pad_token_id and alphabet.mask_idx == ours.config.mask_token_id
    ids, mask = (torch.tensor(x) for x in make_batch(seed=9))
    n = ours.config.num_hidden_layers
    with torch.no_grad():
        r = ref(ids, repr_layers=list(range(n + 1)), need_head_weights=True,
                return_contacts=flavour != "esm1v")
        a = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    real = mask.bool()
    # fair-esm leaves padded positions of logits/representations unmasked; compare real tokens.
    assert (a.logits - r["logits"])[real].abs().max().item() < TOL
    for i in range(n + 1):
        assert (a.hidden_states[i] - r["representations"][i])[real].abs().max().item() < TOL, i
    attn = torch.stack(a.attentions, dim=1)  # [B, layers, H, L, L]
    m = mask.float()
    attn = attn * m[:, None, None, :, None] * m[:, None, None, None, :]
    ref_attn = r["attentions"] * m[:, None, None, :, None] * m[:, None, None, None, :]
    assert (attn - ref_attn).abs().max().item() < TOL
    if flavour != "esm1v":
        with torch.no_grad():
            c = ours.predict_contacts(ids, mask)
        assert (c - r["contacts"]).abs().max().item() < TOL


def test_fair_esm_file_into_base_model_drops_head(tmp_path, caplog):
    path = _fair_esm_file(tmp_path, "esm2")
    with caplog.at_level("WARNING", logger="esm_dual"):
        model = EsmModel.from_pretrained(str(path))
    assert any("lm_head" in r.getMessage() for r in caplog.records)
    ref, _ = _fair_esm_model(path)
    ids, mask = (torch.tensor(x) for x in make_batch(seed=1))
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state
        r = ref(ids, repr_layers=[model.config.num_hidden_layers])["representations"][model.config.num_hidden_layers]
    assert (a - r)[mask.bool()].abs().max().item() < TOL


@pytest.mark.parametrize("flavour", ["esm1b", "esm1v"])
def test_esm1b_mask_row_zeroed_like_fair_esm(tmp_path, flavour):
    path = _fair_esm_file(tmp_path, flavour)
    model = EsmModel.from_pretrained(str(path))
    assert torch.all(model.embeddings.word_embeddings.weight[32] == 0)


def test_fair_esm_mlm_loss_gradients_match(tmp_path, flavour):
    """Gradients of the same MLM loss w.r.t. every weight, ours vs fair-esm (names mapped)."""
    from esm_dual.io.fair_esm import fair_name_to_hf as _fair_name_to_hf

    path = _fair_esm_file(tmp_path, flavour)
    ref, _ = _fair_esm_model(path)
    ours = EsmForMaskedLM.from_pretrained(str(path))
    ids, mask = (torch.tensor(x) for x in make_batch(seed=12))
    labels = ids.masked_fill(mask == 0, -100)
    loss_ours = ours(ids, attention_mask=mask, labels=labels).loss
    logits_ref = ref(ids)["logits"]
    loss_ref = torch.nn.functional.cross_entropy(logits_ref.reshape(-1, logits_ref.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
    assert abs(loss_ours.item() - loss_ref.item()) < TOL
    loss_ours.backward()
    loss_ref.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    compared = 0
    for name, p in ref.named_parameters():
        hub = _fair_name_to_hf(name)
        if p.grad is None or hub is None or hub not in ours_grads or "contact_head" in hub:
            continue
        assert (ours_grads[hub] - p.grad).abs().max().item() < TOL, name
        compared += 1
    # every encoder weight and the LM head (tied decoder counted once) took part
    assert compared >= len(ours_grads) - 3
