"""Loading rules both frameworks share, written once and run for each: heads dropped or initialised, missing and
unused tensors named, untied LM heads, classifier layouts, unknown head tensors, config overrides and the recorded
dtype. ``fw`` is a small adapter (``PT`` / ``TF``) that gives the two APIs one shape: hub-named numpy weights, a
forward pass to numpy, the dropout rates. Framework-only rules stay in tests/pt/test_loading_pt.py and
tests/tf/test_modeling_tf.py.

References: HF transformers (PyTorch) on the same files; tolerances 1e-5 (pt vs reference) and 1e-4 (tf vs the
PyTorch reference), as everywhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from esm_dual.io.schema import LoadingError
from tests.conftest import make_batch, tiny_config
from tests.utils import esm_warnings, hf_model, hf_untied_mlm, write_hub_checkpoint

HEADS = ("base", "mlm", "seq", "tok")


class PT:
    """esm_dual.pt behind the adapter."""

    name = "pt"
    tol = 1e-5  # against HF transformers (PyTorch) on the same weights

    def __init__(self):
        from esm_dual import pt

        self.classes = dict(zip(HEADS, (pt.EsmModel, pt.EsmForMaskedLM, pt.EsmForSequenceClassification,
                                        pt.EsmForTokenClassification)))

    def forward(self, model, ids, mask, key="logits") -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor(ids), attention_mask=torch.tensor(mask))[key].float().numpy()

    def hub_weights(self, model) -> dict[str, np.ndarray]:
        """Hub name -> weight in the hub's orientation (the tied decoder left out, as in hub files)."""
        sd = model.state_dict()
        tied = self.is_tied(model) if "lm_head.decoder.weight" in sd else False
        return {k: v.detach().float().numpy() for k, v in sd.items() if not (tied and k == "lm_head.decoder.weight")}

    def is_tied(self, model) -> bool:
        return model.lm_head.decoder.weight is model.esm.embeddings.word_embeddings.weight

    def dtype(self, model, name: str) -> str:
        return str(model.state_dict()[name].dtype).removeprefix("torch.")

    def encoder_dropout(self, model) -> float:
        return model.esm.encoder.layer[0].output.dropout.p

    def classifier_dropout(self, model) -> float:
        return model.classifier.dropout.p


class TF:
    """esm_dual.tf (Keras 3) behind the adapter."""

    name = "tf"
    tol = 1e-4  # pt <-> tf

    def __init__(self):
        pytest.importorskip("tensorflow")
        from esm_dual import tf

        self.classes = dict(zip(HEADS, (tf.TFEsmModel, tf.TFEsmForMaskedLM, tf.TFEsmForSequenceClassification,
                                        tf.TFEsmForTokenClassification)))
        self.hub_variable_map = tf.hub_variable_map

    def forward(self, model, ids, mask, key="logits") -> np.ndarray:
        return np.asarray(model(ids, attention_mask=mask)[key], dtype=np.float32)

    def hub_weights(self, model) -> dict[str, np.ndarray]:
        out = {}
        for name, (var, transposed) in self.hub_variable_map(model).items():
            a = np.asarray(var.numpy(), dtype=np.float32)
            out[name] = a.T if transposed else a
        return out

    def is_tied(self, model) -> bool:
        return getattr(model.lm_head.decoder, "embeddings", None) is model.esm.embeddings.word_embeddings.embeddings

    def dtype(self, model, name: str) -> str:
        return str(self.hub_variable_map(model)[name][0].dtype)

    def encoder_dropout(self, model) -> float:
        return model.esm.encoder.layer[0].output_layer.dropout.rate

    def classifier_dropout(self, model) -> float:
        return model.classifier.dropout.rate


@pytest.fixture(params=["pt", "tf"], scope="module")
def fw(request):
    return PT() if request.param == "pt" else TF()


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlm")
    write_hub_checkpoint(str(d), tiny_config("esm2"), head="mlm")
    return str(d)


def _edit_tensors(directory, add=None, drop=()) -> None:
    f = f"{directory}/model.safetensors"
    t = load_file(f)
    for k in drop:
        del t[k]
    save_file({**t, **(add or {})}, f, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------
# Heads: dropped, initialised, of the other layout
# ------------------------------------------------------------------------------------------------


def test_mlm_checkpoint_into_base_model_drops_head_in_one_line(fw, mlm_dir, caplog):
    with caplog.at_level("WARNING", logger="esm_dual"):
        model = fw.classes["base"].from_pretrained(mlm_dir)
    msgs = esm_warnings(caplog)
    assert len(msgs) == 1 and "dropping the lm_head" in msgs[0]
    assert model.pooler is None
    ids, mask = make_batch()
    got = fw.forward(model, ids, mask, "last_hidden_state")
    ref = PT().forward(hf_model(mlm_dir, head="mlm").esm, ids, mask, "last_hidden_state")
    assert np.abs(got - ref).max() < fw.tol
    # the very weights of the full model's encoder: same numbers as the MLM's own encoder
    np.testing.assert_allclose(got, fw.forward(fw.classes["mlm"].from_pretrained(mlm_dir).esm, ids, mask,
                                               "last_hidden_state"), atol=1e-6)


def test_mlm_checkpoint_into_classifier_initialises_new_head(fw, mlm_dir, caplog):
    with caplog.at_level("WARNING", logger="esm_dual"):
        model = fw.classes["seq"].from_pretrained(mlm_dir, num_labels=3)
    msgs = esm_warnings(caplog)
    assert sum("dropping the lm_head" in m for m in msgs) == 1
    assert sum("no classifier in the checkpoint" in m for m in msgs) == 1
    assert model.config.num_labels == 3
    w = fw.hub_weights(model)
    assert w["classifier.out_proj.weight"].shape == (3, 18)
    assert np.all(w["classifier.out_proj.bias"] == 0)
    dense = w["classifier.dense.weight"]
    assert np.isfinite(dense).all() and 0 < dense.std() < 0.1  # initializer_range init, not zeros or garbage
    # the encoder is the checkpoint's
    np.testing.assert_array_equal(w["esm.encoder.layer.1.output.dense.weight"],
                                  load_file(f"{mlm_dir}/model.safetensors")["esm.encoder.layer.1.output.dense.weight"])


def test_base_checkpoint_into_token_classifier(fw, tmp_path, caplog):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm1b"), head="base")
    with caplog.at_level("WARNING", logger="esm_dual"):
        model = fw.classes["tok"].from_pretrained(str(tmp_path), num_labels=5)
    assert sum("no classifier" in m for m in esm_warnings(caplog)) == 1
    ids, mask = make_batch()
    assert fw.forward(model, ids, mask).shape == (*ids.shape, 5)
    ref = PT().forward(hf_model(str(tmp_path), head="base"), ids, mask, "last_hidden_state")
    assert np.abs(fw.forward(model.esm, ids, mask, "last_hidden_state") - ref).max() < fw.tol


@pytest.mark.parametrize("src_head,dst_head,new", [("seq", "tok", 2), ("tok", "seq", 4)])
def test_classifier_of_the_other_layout_is_dropped_and_initialised(fw, tmp_path, caplog, src_head, dst_head, new):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2", num_labels=3), head=src_head)
    with caplog.at_level("WARNING", logger="esm_dual"):
        model = fw.classes[dst_head].from_pretrained(str(tmp_path), num_labels=3)
    msgs = esm_warnings(caplog)
    assert sum("dropping the classifier" in m and str(tmp_path) in m for m in msgs) == 1
    assert sum(f"no classifier in the checkpoint; {new} tensors newly initialised" in m for m in msgs) == 1
    biases = [v for k, v in fw.hub_weights(model).items() if k.startswith("classifier") and k.endswith("bias")]
    assert len(biases) == new // 2 and all(np.all(b == 0) for b in biases)
    ids, mask = make_batch()
    assert fw.forward(model, ids, mask).shape[-1] == 3
    ref = PT().forward(hf_model(str(tmp_path), head=src_head).esm, ids, mask, "last_hidden_state")
    assert np.abs(fw.forward(model.esm, ids, mask, "last_hidden_state") - ref).max() < fw.tol


def test_unknown_tensor_in_a_known_head_is_named(fw, tmp_path, caplog):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    _edit_tensors(tmp_path, add={"lm_head.extra.weight": np.zeros(3, np.float32)})
    with caplog.at_level("WARNING", logger="esm_dual"):
        fw.classes["mlm"].from_pretrained(str(tmp_path))
    assert sum("lm_head.extra.weight" in m and str(tmp_path) in m for m in esm_warnings(caplog)) == 1


# ------------------------------------------------------------------------------------------------
# Missing, unused and contradicting tensors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["esm.encoder.layer.1.intermediate.dense.weight",
                                  "esm.encoder.layer.1.intermediate.dense.bias"])
def test_missing_encoder_tensor_is_named(fw, tmp_path, name):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    _edit_tensors(tmp_path, drop=[name])
    with pytest.raises(LoadingError, match=rf"missing 1 tensor\(s\): {name}"):
        fw.classes["mlm"].from_pretrained(str(tmp_path))


@pytest.mark.parametrize("head", ["base", "mlm"])
def test_unused_encoder_tensor_is_named(fw, tmp_path, head):
    tensors = write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    _edit_tensors(tmp_path, add={"esm.encoder.extra_norm.weight": tensors["esm.encoder.emb_layer_norm_after.weight"]})
    with pytest.raises(LoadingError, match=r"unused 1 tensor\(s\): esm.encoder.extra_norm.weight"):
        fw.classes[head].from_pretrained(str(tmp_path))
    # A layer the config does not have is named too (caught by the checkpoint reader's shape check).
    _edit_tensors(tmp_path, drop=["esm.encoder.extra_norm.weight"],
                  add={"esm.encoder.layer.7.output.dense.weight": tensors["esm.encoder.layer.0.output.dense.weight"]})
    with pytest.raises(ValueError, match=r"esm.encoder.layer.7.output.dense.weight"):
        fw.classes[head].from_pretrained(str(tmp_path))


def test_shape_contradicting_config_is_named(fw, tmp_path):
    write_hub_checkpoint(str(tmp_path), tiny_config("esm2"), head="mlm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="intermediate.dense.weight"):
        fw.classes["mlm"].from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Untied LM head
# ------------------------------------------------------------------------------------------------


def test_untied_lm_head_loads_saves_and_matches_transformers(fw, tmp_path):
    import transformers

    src, out = str(tmp_path / "hf"), str(tmp_path / "ours")
    ref = hf_untied_mlm(src)
    assert "lm_head.decoder.weight" in load_file(src + "/model.safetensors")
    model = fw.classes["mlm"].from_pretrained(src)
    assert not fw.is_tied(model)
    decoder = ref.lm_head.decoder.weight.detach().numpy()
    np.testing.assert_array_equal(fw.hub_weights(model)["lm_head.decoder.weight"], decoder)
    ids, mask = make_batch()
    want = PT().forward(ref, ids, mask)
    got = fw.forward(model, ids, mask)
    assert np.abs(got - want).max() < fw.tol
    model.save_pretrained(out)
    np.testing.assert_array_equal(load_file(out + "/model.safetensors")["lm_head.decoder.weight"], decoder)
    with open(out + "/config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is False
    again = fw.classes["mlm"].from_pretrained(out)
    np.testing.assert_array_equal(fw.forward(again, ids, mask), got)
    back = transformers.EsmForMaskedLM.from_pretrained(out).eval()
    assert np.abs(PT().forward(back, ids, mask) - want).max() < 1e-5
    if fw.name == "tf":  # and through Keras' own file format
        import keras

        model.save(str(tmp_path / "m.keras"))
        np.testing.assert_array_equal(fw.forward(keras.saving.load_model(str(tmp_path / "m.keras")), ids, mask), got)


def test_untied_model_built_here_round_trips(fw, tmp_path):
    torch.manual_seed(0)
    model = fw.classes["mlm"](tiny_config("esm2", tie_word_embeddings=False))
    if fw.name == "pt":
        model.eval()
    w = fw.hub_weights(model)
    assert not fw.is_tied(model)
    assert not np.array_equal(w["lm_head.decoder.weight"], w["esm.embeddings.word_embeddings.weight"])
    model.save_pretrained(str(tmp_path))
    again = fw.classes["mlm"].from_pretrained(str(tmp_path))
    assert not fw.is_tied(again)
    np.testing.assert_array_equal(fw.hub_weights(again)["lm_head.decoder.weight"], w["lm_head.decoder.weight"])
    ids, mask = make_batch()
    np.testing.assert_array_equal(fw.forward(again, ids, mask), fw.forward(model, ids, mask))


def test_untied_config_without_decoder_in_file_is_refused(fw, mlm_dir):
    with pytest.raises(LoadingError, match=r"lm_head is incomplete; missing tensors: lm_head.decoder.weight"):
        fw.classes["mlm"].from_pretrained(mlm_dir, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------
# Config overrides and what save_pretrained records
# ------------------------------------------------------------------------------------------------


def test_config_overrides_and_architectures_written(fw, tmp_path, mlm_dir):
    model = fw.classes["seq"].from_pretrained(mlm_dir, num_labels=1, problem_type="regression",
                                              hidden_dropout_prob=0.05)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert model.config.hidden_dropout_prob == 0.05
    assert fw.classifier_dropout(model) == 0.05 and fw.encoder_dropout(model) == 0.05
    assert fw.hub_weights(model)["classifier.out_proj.weight"].shape == (1, 18)
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["EsmForSequenceClassification"]
    again = fw.classes["seq"].from_pretrained(str(tmp_path)).config
    assert again.num_labels == 1 and again.problem_type == "regression" and again.hidden_dropout_prob == 0.05


def test_save_pretrained_records_dtype_as_transformers(fw, tmp_path, mlm_dir):
    import transformers

    from esm_dual.pt import EsmForMaskedLM

    model = fw.classes["mlm"].from_pretrained(mlm_dir, dtype="bfloat16")
    for name in ("esm.embeddings.word_embeddings.weight", "esm.encoder.layer.0.attention.self.query.weight",
                 "lm_head.dense.weight"):  # (Keras keeps LayerNorms in float32 by design)
        assert fw.dtype(model, name) == "bfloat16", name
    out = str(tmp_path / "out")
    model.save_pretrained(out)
    with open(out + "/config.json") as f:
        cfg = json.load(f)
    assert cfg["dtype"] == "bfloat16" and "torch_dtype" not in cfg
    assert EsmForMaskedLM.from_pretrained(out, torch_dtype="auto").dtype == torch.bfloat16
    assert transformers.EsmForMaskedLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
