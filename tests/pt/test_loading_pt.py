"""PyTorch-only from_pretrained / save_pretrained rules: torch dtypes, transformers interop of every head, the pooler,
integer weights, from_checkpoint. The rules both frameworks share (heads dropped or initialised, missing/unused
tensors, untied LM heads, recorded dtype) are written once, for both, in tests/parity/test_loading_both.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.numpy import load_file, save_file

from esm_dual.io.schema import LoadingError
from esm_dual.pt import EsmForMaskedLM, EsmForSequenceClassification, EsmForTokenClassification, EsmModel
from tests.conftest import make_batch, tiny_config
from tests.utils import hf_model, write_hub_checkpoint


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


# ------------------------------------------------------------------------------------------------
# dtype "auto", integer weights, the factory
# ------------------------------------------------------------------------------------------------


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
