"""esm_dual.io.fair_esm: fair-esm .pt files read and written (checked against fair-esm and transformers), configs
validated by name, contact-regression files kept in step."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest

from esm_dual.io.base import CheckpointError
from esm_dual.io.fair_esm import read_fair_esm, save_fair_esm
from esm_dual.io.hub import (
    iter_checkpoint_tensors,
    load_checkpoint,
    save_checkpoint,
)
from tests.conftest import tiny_config
from tests.io.helpers import assert_same, fair_config
from tests.utils import hf_model, random_hub_tensors

torch = pytest.importorskip("torch")


EMB = "esm.embeddings.word_embeddings.weight"


FAIR_STEMS = {"esm2": "esm2_t3_tiny", "esm1b": "esm1b_t3_tiny", "esm1v": "esm1v_t3_tiny_1"}


def _fair_esm_load(path):
    esm = pytest.importorskip("esm")
    # fair-esm calls torch.load without weights_only; torch >= 2.6 then needs Namespace allowlisted
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    return model.eval(), alphabet


@pytest.mark.filterwarnings("ignore:Regression weights not found")
def test_fair_esm_roundtrip_matches_fair_esm_and_transformers(tmp_path, flavour, batch):
    cfg = fair_config(flavour)
    tensors = random_hub_tensors(cfg)
    path = tmp_path / f"{FAIR_STEMS[flavour]}.pt"
    assert save_fair_esm(str(path), cfg, tensors) == str(path)
    assert (tmp_path / f"{FAIR_STEMS[flavour]}-contact-regression.pt").is_file()

    # fair-esm's own loader reads it (strict load: every name mapped) ...
    model, alphabet = _fair_esm_load(path)
    assert alphabet.mask_idx == 32 and alphabet.padding_idx == 1
    ids, mask = batch
    with torch.no_grad():
        out = model(torch.tensor(ids), return_contacts=flavour != "esm1v")
    fair_logits = out["logits"].numpy()
    assert fair_logits.std() > 0.1

    # ... and read_fair_esm gives back the original tensors (fair-esm's <mask> row zeroing for 1b/1v)
    ck = read_fair_esm(str(path))
    assert ck.layout == "fair-esm" and ck.source == str(path)
    expected = {k: v.copy() for k, v in tensors.items()}
    if flavour == "esm2":
        del expected["esm.embeddings.position_embeddings.weight"]  # HF's unused table; fair-esm has none
    else:
        expected[EMB][32] = 0.0
        assert np.abs(tensors[EMB][32]).sum() > 0
    assert_same(ck.tensors, expected)
    c = ck.config
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "position_embedding_type", "emb_layer_norm_before", "token_dropout", "vocab_size",
                  "pad_token_id", "mask_token_id", "layer_norm_eps", "max_position_embeddings"):
        assert getattr(c, field) == getattr(cfg, field), field
    assert c.hidden_dropout_prob == 0.0 and c.attention_probs_dropout_prob == 0.0

    # transformers on the same weights gives the same logits (and contacts): the mapping is right both ways
    save_checkpoint(str(tmp_path / "hf"), ck.config, ck.tensors)
    hf = hf_model(str(tmp_path / "hf"))
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        hf_logits = hf(input_ids=t_ids, attention_mask=t_mask).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits[real], fair_logits[real], atol=1e-5, rtol=0)
    if flavour != "esm1v":
        with torch.no_grad():
            hf_contacts = hf.predict_contacts(t_ids, t_mask).numpy()
        fair_contacts = out["contacts"].numpy()
        for b, n in enumerate(mask.sum(1) - 2):
            np.testing.assert_allclose(hf_contacts[b, :n, :n], fair_contacts[b, :n, :n], atol=1e-5, rtol=0)

    # and the file written back from what was read is read identically
    path2 = tmp_path / "again" / path.name
    save_fair_esm(str(path2), ck.config, ck.tensors)
    assert_same(read_fair_esm(str(path2)).tensors, ck.tensors)
    assert_same(dict(iter_checkpoint_tensors(str(path2))), ck.tensors)
    assert load_checkpoint(str(path2)).config == ck.config


def test_fair_esm_file_layout(tmp_path):
    """What save_fair_esm writes is shaped like the released files (as fair-esm's loader expects)."""
    cfg = fair_config("esm2")
    path = tmp_path / "esm2_t3_tiny.pt"
    save_fair_esm(str(path), cfg, random_hub_tensors(cfg))
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(str(path), weights_only=True)
        reg = torch.load(str(tmp_path / "esm2_t3_tiny-contact-regression.pt"), weights_only=True)
    ns = data["cfg"]["model"]
    assert isinstance(ns, argparse.Namespace)
    assert (ns.encoder_layers, ns.encoder_embed_dim, ns.encoder_attention_heads, ns.token_dropout) == (3, 18, 3, True)
    sd = data["model"]
    assert "encoder.sentence_encoder.layers.0.self_attn.rot_emb.inv_freq" in sd
    assert "encoder.sentence_encoder.emb_layer_norm_after.weight" in sd
    assert "encoder.lm_head.dense.weight" in sd
    # tied decoder: the very same storage, as in released files
    assert sd["encoder.lm_head.weight"].data_ptr() == sd["encoder.sentence_encoder.embed_tokens.weight"].data_ptr()
    assert not any("embed_positions" in k or "contact_head" in k for k in sd)
    assert set(reg["model"]) == {"contact_head.regression.weight", "contact_head.regression.bias"}

    cfg1 = fair_config("esm1b")
    p1 = tmp_path / "esm1b_t3_tiny.pt"
    save_fair_esm(str(p1), cfg1, random_hub_tensors(cfg1))
    with torch.serialization.safe_globals([argparse.Namespace]):
        d1 = torch.load(str(p1), weights_only=True)
    assert d1["args"].arch == "roberta_large" and d1["args"].max_positions == 1024
    assert "encoder.sentence_encoder.embed_positions.weight" in d1["model"]
    assert "encoder.sentence_encoder.emb_layer_norm_before.weight" in d1["model"]


def test_fair_esm_untied_decoder_kept(tmp_path):
    cfg = fair_config("esm1b")
    tensors = random_hub_tensors(cfg)
    path = tmp_path / "esm1b_t3_tiny.pt"
    save_fair_esm(str(path), cfg, tensors)
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(str(path), weights_only=True)
    untied = data["model"]["encoder.sentence_encoder.embed_tokens.weight"].clone() + 1.0
    data["model"]["encoder.lm_head.weight"] = untied
    torch.save(data, str(path))
    ck = read_fair_esm(str(path))
    np.testing.assert_array_equal(ck.tensors["lm_head.decoder.weight"], untied.numpy())
    assert ck.tensors[EMB][32].sum() == 0
    with pytest.raises(CheckpointError, match="lm_head.decoder.weight"):
        save_fair_esm(str(tmp_path / "esm1b_t3_b.pt"), ck.config, ck.tensors)


def test_save_fair_esm_refuses_what_fair_esm_cannot_load(tmp_path):
    cfg = fair_config("esm2")
    tensors = random_hub_tensors(cfg)
    with pytest.raises(CheckpointError, match="start with 'esm2'"):
        save_fair_esm(str(tmp_path / "model.pt"), cfg, tensors)
    cfg1 = fair_config("esm1b")
    with pytest.raises(CheckpointError, match="not start with 'esm2'"):
        save_fair_esm(str(tmp_path / "esm2_fake.pt"), cfg1, random_hub_tensors(cfg1))
    cfg37 = tiny_config("esm2")  # FFN 37 != 4 * 18
    with pytest.raises(CheckpointError, match="intermediate_size"):
        save_fair_esm(str(tmp_path / "esm2_x.pt"), cfg37, random_hub_tensors(cfg37))
    base = random_hub_tensors(cfg, head="base")  # EsmModel: a pooler, no LM head
    with pytest.raises(CheckpointError, match="no fair-esm equivalent: pooler.dense.bias, pooler.dense.weight"):
        save_fair_esm(str(tmp_path / "esm2_y.pt"), cfg, base)
    no_pooler = {k: v for k, v in base.items() if not k.startswith("pooler.")}
    with pytest.raises(CheckpointError, match="lm_head"):
        save_fair_esm(str(tmp_path / "esm2_y.pt"), cfg, no_pooler)
    seq = random_hub_tensors(cfg, head="seq")
    with pytest.raises(CheckpointError, match="classifier"):
        save_fair_esm(str(tmp_path / "esm2_z.pt"), cfg, seq)
    assert sorted(os.listdir(tmp_path)) == []  # nothing half-written


def test_fair_esm_without_regression_file(tmp_path):
    cfg = fair_config("esm2")
    tensors = {k: v for k, v in random_hub_tensors(cfg).items() if "contact_head" not in k}
    path = tmp_path / "esm2_t3_tiny.pt"
    with pytest.warns(UserWarning, match="contact-regression"):
        save_fair_esm(str(path), cfg, tensors)
    ck = read_fair_esm(str(path))
    assert not any("contact_head" in k for k in ck.tensors)


def test_fair_esm_esm1v_regression_not_needed(tmp_path, recwarn):
    cfg = fair_config("esm1v")
    tensors = {k: v for k, v in random_hub_tensors(cfg).items() if "contact_head" not in k}
    save_fair_esm(str(tmp_path / "esm1v_t3_tiny_1.pt"), cfg, tensors)
    assert not [w for w in recwarn if "contact-regression" in str(w.message)]
    assert not (tmp_path / "esm1v_t3_tiny_1-contact-regression.pt").exists()
    model, _ = _fair_esm_load(tmp_path / "esm1v_t3_tiny_1.pt")  # fair-esm skips regression for esm1v
    assert model.args.arch == "roberta_large"


def test_read_fair_esm_errors(tmp_path):
    p = tmp_path / "esm2_t3_bad.pt"
    torch.save({"weights": {}}, str(p))
    with pytest.raises(CheckpointError, match="not a fair-esm checkpoint"):
        read_fair_esm(str(p))
    torch.save({"model": {}, "args": argparse.Namespace(arch="protein_bert_base")}, str(p))
    with pytest.raises(CheckpointError, match="protein_bert_base"):
        read_fair_esm(str(p))
    torch.save({"model": {"encoder.foo.weight": torch.zeros(2)},
                "cfg": {"model": argparse.Namespace(encoder_layers=1, encoder_embed_dim=2,
                                                    encoder_attention_heads=1, token_dropout=True)}}, str(p))
    with pytest.raises(CheckpointError, match="foo.weight"):
        read_fair_esm(str(p))
    p.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError) as e:
        read_fair_esm(str(p))
    assert str(p) in str(e.value)
    with pytest.raises(CheckpointError, match="no such file"):
        read_fair_esm(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("field,value", [("encoder_attention_heads", "x"), ("encoder_layers", None),
                                         ("encoder_embed_dim", 17.5), ("encoder_layers", -1)])
def test_fair_esm_config_value_that_is_not_a_number_is_named(tmp_path, field, value):
    cfg = tiny_config("esm2", intermediate_size=72)
    path = tmp_path / "esm2_t3_tiny.pt"
    save_fair_esm(str(path), cfg, random_hub_tensors(cfg))
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(str(path), weights_only=True)
    setattr(data["cfg"]["model"], field, value)
    torch.save(data, str(path))
    with pytest.raises(CheckpointError, match=rf"{field}.*must be a positive integer, got {value!r}") as e:
        read_fair_esm(str(path))
    assert str(path) in str(e.value)


def test_fair_esm_config_with_indivisible_heads_is_named(tmp_path):
    cfg = tiny_config("esm2", intermediate_size=72)
    path = tmp_path / "esm2_t3_tiny.pt"
    save_fair_esm(str(path), cfg, random_hub_tensors(cfg))
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(str(path), weights_only=True)
    data["cfg"]["model"].encoder_attention_heads = 4
    torch.save(data, str(path))
    with pytest.raises(CheckpointError, match="num_attention_heads") as e:
        read_fair_esm(str(path))
    assert str(path) in str(e.value)


def test_save_fair_esm_without_contact_head_removes_a_stale_one(tmp_path):
    cfg = tiny_config("esm2", intermediate_size=72)
    tensors = random_hub_tensors(cfg)
    path = tmp_path / "esm2_t3_tiny.pt"
    save_fair_esm(str(path), cfg, tensors)
    assert (tmp_path / "esm2_t3_tiny-contact-regression.pt").exists()
    with pytest.warns(UserWarning, match="contact-regression"):
        save_fair_esm(str(path), cfg, {k: v for k, v in tensors.items() if "contact_head" not in k})
    assert sorted(os.listdir(tmp_path)) == ["esm2_t3_tiny.pt"]
    assert not any("contact_head" in k for k in read_fair_esm(str(path)).tensors)
