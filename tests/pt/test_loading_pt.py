"""from_pretrained / save_pretrained rules: heads, missing and unused tensors, dtypes, transformers interop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.numpy import load_file, save_file

from esm_dual.io.schema import LoadingError
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


# ------------------------------------------------------------------------------------------------
# Untied LM head, dtype "auto", classifier layouts, unknown head tensors, integer weights
# ------------------------------------------------------------------------------------------------


def _hf_untied_mlm(directory: str):
    """transformers' own EsmForMaskedLM with tie_word_embeddings=False, random weights, saved by it."""
    import transformers

    cfg = tiny_config("esm2", tie_word_embeddings=False, architectures=["EsmForMaskedLM"])
    hf_cfg = transformers.EsmConfig(**{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
    torch.manual_seed(0)
    ref = transformers.EsmForMaskedLM(hf_cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    ref.save_pretrained(directory)
    return ref


def test_untied_lm_head_loads_saves_and_matches_transformers(tmp_path):
    import transformers

    src, out = str(tmp_path / "hf"), str(tmp_path / "ours")
    ref = _hf_untied_mlm(src)
    assert "lm_head.decoder.weight" in load_file(src + "/model.safetensors")
    model = EsmForMaskedLM.from_pretrained(src)
    assert model.lm_head.decoder.weight is not model.esm.embeddings.word_embeddings.weight
    ids, mask = (torch.tensor(x) for x in make_batch())
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        assert (model(ids, attention_mask=mask).logits - want).abs().max().item() < 1e-5
    model.save_pretrained(out)
    saved = load_file(out + "/model.safetensors")
    assert torch.equal(torch.from_numpy(saved["lm_head.decoder.weight"]), ref.lm_head.decoder.weight)
    with open(out + "/config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is False
    again = EsmForMaskedLM.from_pretrained(out)
    back = transformers.EsmForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
        assert (back(ids, attention_mask=mask).logits - want).abs().max().item() < 1e-5


def test_untied_model_built_here_round_trips(tmp_path):
    torch.manual_seed(0)
    model = EsmForMaskedLM(tiny_config("esm2", tie_word_embeddings=False)).eval()
    model.save_pretrained(str(tmp_path))
    again = EsmForMaskedLM.from_pretrained(str(tmp_path))
    assert torch.equal(again.lm_head.decoder.weight, model.lm_head.decoder.weight)
    ids, mask = (torch.tensor(x) for x in make_batch())
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_untied_config_without_decoder_in_file_is_refused(tmp_path):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    with pytest.raises(LoadingError, match=r"lm_head is incomplete; missing tensors: lm_head.decoder.weight"):
        EsmForMaskedLM.from_pretrained(str(tmp_path), tie_word_embeddings=False)


@pytest.mark.parametrize("flavour", ["esm2", "esm1b"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_dtype_auto_uses_the_weights_dtype(tmp_path, flavour, dtype):
    from esm_dual.io.dtypes import cast_tensors
    from esm_dual.io.hub import load_checkpoint, save_checkpoint

    src, low = str(tmp_path / "fp32"), str(tmp_path / dtype)
    write_hub_checkpoint(src, tiny_config(flavour), head="mlm")
    ckpt = load_checkpoint(src)
    save_checkpoint(low, ckpt.config, cast_tensors(ckpt.tensors, dtype))  # fp32 inv_freq kept (ESM-2)
    model = EsmForMaskedLM.from_pretrained(low, torch_dtype="auto")
    assert model.dtype == getattr(torch, dtype)
    # a dtype the config records wins, as in transformers
    with open(low + "/config.json") as f:
        cfg = json.load(f)
    with open(low + "/config.json", "w") as f:
        json.dump({**cfg, "torch_dtype": "float32"}, f)
    assert EsmForMaskedLM.from_pretrained(low, torch_dtype="auto").dtype == torch.float32
    assert EsmForMaskedLM.from_pretrained(src, torch_dtype="auto").dtype == torch.float32


def test_save_pretrained_records_dtype_as_transformers(tmp_path):
    import transformers

    write_hub_checkpoint(str(tmp_path / "src"), tiny_config("esm2"), head="mlm")
    model = EsmForMaskedLM.from_pretrained(str(tmp_path / "src"), torch_dtype=torch.bfloat16)
    out = str(tmp_path / "out")
    model.save_pretrained(out)
    with open(out + "/config.json") as f:
        cfg = json.load(f)
    assert cfg["dtype"] == "bfloat16" and "torch_dtype" not in cfg
    assert EsmForMaskedLM.from_pretrained(out, torch_dtype="auto").dtype == torch.bfloat16
    assert transformers.EsmForMaskedLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


@pytest.mark.parametrize("src_head,cls,new", [("seq", EsmForTokenClassification, 2),
                                              ("tok", EsmForSequenceClassification, 4)])
def test_classifier_of_the_other_layout_is_dropped_and_initialised(tmp_path, caplog, src_head, cls, new):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2", num_labels=3), head=src_head)
    with caplog.at_level("WARNING", logger="esm_dual"):
        model = cls.from_pretrained(str(tmp_path), num_labels=3)
    msgs = _warnings(caplog)
    assert sum("dropping the classifier" in m and str(tmp_path) in m for m in msgs) == 1
    assert sum(f"no classifier in the checkpoint; {new} tensors newly initialised" in m for m in msgs) == 1
    biases = [p for n, p in model.named_parameters() if n.startswith("classifier") and n.endswith("bias")]
    assert biases and all(torch.all(b == 0) for b in biases)
    ref = hf_model(str(tmp_path), head=src_head).esm
    ids, mask = (torch.tensor(x) for x in make_batch())
    with torch.no_grad():
        d = (model.esm(ids, attention_mask=mask).last_hidden_state
             - ref(ids, attention_mask=mask).last_hidden_state).abs().max().item()
    assert d < 1e-5


def test_unknown_tensor_in_a_known_head_is_named(tmp_path, caplog):
    import numpy as np

    tensors = write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    save_file({**tensors, "lm_head.extra.weight": np.zeros(3, np.float32)}, str(tmp_path / "model.safetensors"))
    with caplog.at_level("WARNING", logger="esm_dual"):
        EsmForMaskedLM.from_pretrained(str(tmp_path))
    assert any("lm_head.extra.weight" in m and str(tmp_path) in m for m in _warnings(caplog))


def test_integer_weight_is_refused_naming_the_tensor(tmp_path):
    import numpy as np

    from esm_dual.io.base import CheckpointError

    tensors = write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    name = "esm.encoder.layer.0.attention.self.query.weight"
    save_file({**tensors, name: tensors[name].astype(np.int32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name}: stored as int32"):
        EsmForMaskedLM.from_pretrained(str(tmp_path))
    model = EsmForMaskedLM(tiny_config("esm2"))
    with pytest.raises(LoadingError, match=rf"{name} \(int32\)"):
        model.load_hub_tensors({**tensors, name: tensors[name].astype(np.int32)})


def test_from_checkpoint_builds_what_from_pretrained_builds(tmp_path):
    """from_pretrained = read + from_checkpoint: the factory gives the same weights from the loaded tensors, and
    takes a dtype, config overrides and add_pooling_layer."""
    from esm_dual.io.hub import load_checkpoint

    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    ck = load_checkpoint(str(tmp_path))
    a, b = EsmForMaskedLM.from_pretrained(str(tmp_path)), EsmForMaskedLM.from_checkpoint(ck)
    assert not b.training and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    c = EsmForSequenceClassification.from_checkpoint(ck, dtype="bf16", num_labels=3)
    assert c.dtype == torch.bfloat16 and c.config.num_labels == 3 and c.classifier.out_proj.out_features == 3
    assert torch.equal(c.esm.encoder.layer[1].output.dense.weight,
                       a.esm.encoder.layer[1].output.dense.weight.to(torch.bfloat16))
    assert EsmModel.from_checkpoint(ck).pooler is None
    assert EsmModel.from_checkpoint(ck, add_pooling_layer=True).pooler is not None
    assert "add_pooling_layer" not in EsmForMaskedLM.from_checkpoint(ck, add_pooling_layer=False).config.extra
