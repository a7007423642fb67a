"""from_pretrained / save_pretrained rules: heads, missing and unused tensors, dtypes, transformers interop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.numpy import load_file, save_file

from esm_dual.common.loading import LoadingError
from esm_dual.pt import EsmForMaskedLM, EsmForSequenceClassification, EsmForTokenClassification, EsmModel
from tests.conftest import make_batch, tiny_config
from tests.utils import hf_model, write_hub_checkpoint


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "esm_dual"]


def test_mlm_checkpoint_into_base_model_drops_head_in_one_line(tmp_path, caplog):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    with caplog.at_level("WARNING", logger="esm_dual"):
        model = EsmModel.from_pretrained(str(tmp_path))
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "dropping the lm_head" in msgs[0]
    assert model.pooler is None
    ref = hf_model(str(tmp_path), head="mlm").esm
    ids, mask = (torch.tensor(x) for x in make_batch())
    with torch.no_grad():
        d = (model(ids, attention_mask=mask).last_hidden_state
             - ref(ids, attention_mask=mask).last_hidden_state).abs().max().item()
    assert d < 1e-5


def test_mlm_checkpoint_into_classifier_initialises_new_head(tmp_path, caplog):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    with caplog.at_level("WARNING", logger="esm_dual"):
        model = EsmForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3)
    msgs = _warnings(caplog)
    assert any("dropping the lm_head" in m for m in msgs)
    assert any("no classifier in the checkpoint" in m for m in msgs)
    assert model.classifier.out_proj.weight.shape == (3, 18)
    assert torch.all(model.classifier.out_proj.bias == 0)
    assert torch.isfinite(model.classifier.dense.weight).all()
    assert 0 < model.classifier.dense.weight.std().item() < 0.1  # initializer_range init, not garbage


def test_base_checkpoint_into_token_classifier(tmp_path):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm1b"), head="base")
    model = EsmForTokenClassification.from_pretrained(str(tmp_path), num_labels=5)
    ids, mask = (torch.tensor(x) for x in make_batch())
    with torch.no_grad():
        assert model(ids, attention_mask=mask).logits.shape == (*ids.shape, 5)


def test_missing_encoder_tensor_is_named(tmp_path):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    f = tmp_path / "model.safetensors"
    t = load_file(str(f))
    del t["esm.encoder.layer.1.intermediate.dense.weight"]
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(LoadingError, match=r"missing 1 tensor\(s\): esm.encoder.layer.1.intermediate.dense.weight"):
        EsmForMaskedLM.from_pretrained(str(tmp_path))


def test_unused_encoder_tensor_is_named(tmp_path):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    f = tmp_path / "model.safetensors"
    t = load_file(str(f))
    t["esm.encoder.extra_norm.weight"] = t["esm.encoder.emb_layer_norm_after.weight"]
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(LoadingError, match=r"unused 1 tensor\(s\): esm.encoder.extra_norm.weight"):
        EsmModel.from_pretrained(str(tmp_path))
    # A layer the config does not have is named too (caught by the checkpoint reader's shape check).
    del t["esm.encoder.extra_norm.weight"]
    t["esm.encoder.layer.7.output.dense.weight"] = t["esm.encoder.layer.0.output.dense.weight"]
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"esm.encoder.layer.7.output.dense.weight"):
        EsmModel.from_pretrained(str(tmp_path))


def test_shape_contradicting_config_is_named(tmp_path):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="intermediate.dense.weight"):
        EsmForMaskedLM.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("head,cls", [("mlm", EsmForMaskedLM), ("seq", EsmForSequenceClassification),
                                      ("tok", EsmForTokenClassification), ("base", EsmModel)])
def test_save_pretrained_readable_by_transformers_and_us(tmp_path, head, cls):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_hub_checkpoint(str(src), tiny_config("esm2", num_labels=3), head=head)
    model = cls.from_pretrained(str(src))
    model.save_pretrained(str(dst))
    saved = load_file(str(dst / "model.safetensors"))
    assert "lm_head.decoder.weight" not in saved  # tied, as in hub files
    if head == "mlm":
        assert "esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq" in saved
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["architectures"] == [cls.__name__]
    ids, mask = (torch.tensor(x) for x in make_batch())
    again = cls.from_pretrained(str(dst))
    ref = hf_model(str(dst), head=head)
    key = "last_hidden_state" if head == "base" else "logits"
    with torch.no_grad():
        a = model(ids, attention_mask=mask)[key]
        b = again(ids, attention_mask=mask)[key]
        c = ref(ids, attention_mask=mask)[key]
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16"])
def test_torch_dtype(tmp_path, dtype):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    model = EsmForMaskedLM.from_pretrained(str(tmp_path), torch_dtype=dtype)
    want = torch.bfloat16 if dtype == "bfloat16" else dtype
    assert all(p.dtype == want for p in model.parameters())
    assert model.lm_head.decoder.weight is model.esm.embeddings.word_embeddings.weight


def test_pooler_checkpoint_from_hf_esmmodel(tmp_path):
    import transformers

    cfg = tiny_config("esm2")
    hf_cfg = transformers.EsmConfig(**{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
    torch.manual_seed(0)
    ref = transformers.EsmModel(hf_cfg, add_pooling_layer=True).eval()
    ref.save_pretrained(str(tmp_path))
    model = EsmModel.from_pretrained(str(tmp_path))
    assert model.pooler is not None
    ids, mask = (torch.tensor(x) for x in make_batch())
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask), ref(ids, attention_mask=mask)
    assert (a.pooler_output - b.pooler_output).abs().max().item() < 1e-5
    assert (a.last_hidden_state - b.last_hidden_state).abs().max().item() < 1e-5


def test_config_kwargs_override(tmp_path):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    model = EsmForSequenceClassification.from_pretrained(str(tmp_path), num_labels=1,
                                                         problem_type="regression", hidden_dropout_prob=0.1)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert model.classifier.dropout.p == 0.1
