"""esm_dual.tf models: calling conventions, outputs, input errors, hub naming, the Keras-only loading rules and Keras
citizenship (config, .keras / .weights.h5 / SavedModel export, predict, summary). The loading rules both frameworks
share (heads dropped or initialised, missing/unused tensors, untied LM heads, recorded dtype) are written once, for
both, in tests/parity/test_loading_both.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from safetensors.numpy import load_file, save_file  # noqa: E402

from esm_dual.common.outputs import (  # noqa: E402
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from esm_dual.tf import (  # noqa: E402
    TFEsmForMaskedLM,
    TFEsmForSequenceClassification,
    TFEsmForTokenClassification,
    TFEsmModel,
    hub_variable_map,
)
from tests.conftest import make_batch, tiny_config  # noqa: E402
from tests.utils import write_hub_checkpoint  # noqa: E402

CLASSES = {"base": TFEsmModel, "mlm": TFEsmForMaskedLM, "seq": TFEsmForSequenceClassification,
           "tok": TFEsmForTokenClassification}


ROTARY = "attention.self.rotary_embeddings.inv_freq"


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlm")
    write_hub_checkpoint(str(d), tiny_config("esm2"), head="mlm")
    return str(d)


@pytest.fixture(scope="module")
def mlm(mlm_dir):
    return TFEsmForMaskedLM.from_pretrained(mlm_dir)


# ------------------------------------------------------------------------------------------------
# Calling conventions and outputs
# ------------------------------------------------------------------------------------------------


def test_call_styles_and_input_types_agree(mlm):
    ids, mask = make_batch()
    ref = mlm(input_ids=ids, attention_mask=mask).logits.numpy()
    variants = [
        mlm({"input_ids": ids, "attention_mask": mask}),
        mlm(tf.constant(ids, tf.int32), tf.constant(mask, tf.int32)),
        mlm(ids.astype(np.int32), attention_mask=mask.astype(bool)),
        mlm(ids),  # attention_mask defaults to input_ids != pad
        mlm(input_ids=ids, attention_mask=mask, training=False),
    ]
    for out in variants:
        np.testing.assert_array_equal(out.logits.numpy(), ref)
    out = mlm(ids, mask, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    np.testing.assert_array_equal(out[0].numpy(), ref)


def test_output_fields_and_shapes(mlm):
    ids, mask = make_batch()
    B, L = ids.shape
    cfg = mlm.config
    out = mlm(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert isinstance(out, MaskedLMOutput)
    assert out.keys() == ["logits", "hidden_states", "attentions"] and out.loss is None
    assert out["logits"] is out.logits and out[0] is out.logits
    assert tuple(out.logits.shape) == (B, L, cfg.vocab_size)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert all(tuple(h.shape) == (B, L, cfg.hidden_size) for h in out.hidden_states)
    assert len(out.attentions) == cfg.num_hidden_layers
    assert all(tuple(a.shape) == (B, cfg.num_attention_heads, L, L) for a in out.attentions)
    labels = np.where(mask == 1, ids, -100)
    assert mlm({"input_ids": ids, "attention_mask": mask, "labels": labels}).keys() == ["loss", "logits"]
    base = mlm.esm(ids, attention_mask=mask, output_hidden_states=True)
    assert isinstance(base, BaseModelOutputWithPooling) and base.pooler_output is None
    # hidden_states[-1] is after emb_layer_norm_after: it is last_hidden_state
    np.testing.assert_array_equal(base.hidden_states[-1].numpy(), base.last_hidden_state.numpy())


@pytest.mark.parametrize("head", ["base", "mlm", "seq", "tok"])
def test_predict_contacts_shape_range_symmetry(head, flavour):
    model = CLASSES[head](tiny_config(flavour, num_labels=3))
    ids, mask = make_batch(seed=1)
    B, L = ids.shape
    c = model.predict_contacts(ids, mask).numpy()
    assert c.shape == (B, L - 2, L - 2)
    assert np.all((c > 0) & (c < 1))
    np.testing.assert_allclose(c, np.swapaxes(c, 1, 2), atol=1e-6)
    out = model(ids, attention_mask=mask)
    key = {"base": "last_hidden_state", "mlm": "logits", "seq": "logits", "tok": "logits"}[head]
    expected = {"base": (B, L, 18), "mlm": (B, L, 33), "seq": (B, 3), "tok": (B, L, 3)}[head]
    assert tuple(out[key].shape) == expected
    assert isinstance(out, {"base": BaseModelOutputWithPooling, "mlm": MaskedLMOutput,
                            "seq": SequenceClassifierOutput, "tok": TokenClassifierOutput}[head])


def test_dropout_from_config_active_only_in_training():
    model = TFEsmForMaskedLM(tiny_config("esm2", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2))
    ids, mask = make_batch()
    a = model(ids, attention_mask=mask, training=True).logits.numpy()
    b = model(ids, attention_mask=mask, training=True).logits.numpy()
    assert not np.allclose(a, b)
    c = model(ids, attention_mask=mask).logits.numpy()
    d = model(ids, attention_mask=mask, training=False).logits.numpy()
    np.testing.assert_array_equal(c, d)


def test_token_dropout_applies_at_inference_with_observed_ratio():
    cfg = tiny_config("esm2")
    model = TFEsmModel(cfg)
    ids = np.array([[0, 5, 32, 6, 7, 2, 1, 1]])  # 6 real tokens, 1 <mask>, 2 padding
    emb = model.embeddings(tf.constant(ids), tf.constant(ids != 1)).numpy()
    table = model.embeddings.word_embeddings.embeddings.numpy()
    scale = (1 - 0.15 * 0.8) / (1 - 1 / 6)
    np.testing.assert_allclose(emb[0, 1], table[5] * scale, rtol=1e-6)
    assert np.all(emb[0, 2] == 0) and np.all(emb[0, 6:] == 0)


# ------------------------------------------------------------------------------------------------
# Input errors (as the PyTorch twin)
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_are_named(mlm):
    ids, mask = make_batch()
    bad = ids.copy()
    bad[1, 2] = 40
    with pytest.raises(ValueError, match="token id 40 is outside the vocabulary"):
        mlm(bad, attention_mask=mask)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
        mlm(bad, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mlm(ids, attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="empty batch"):
        mlm(np.zeros((0, 5), np.int64))
    with pytest.raises(ValueError, match="empty batch"):
        mlm(np.zeros((2, 0), np.int64))
    with pytest.raises(TypeError, match="integer token ids"):
        mlm(ids.astype(np.float32))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        mlm(ids, inputs_embeds=np.zeros((*ids.shape, 18), np.float32))
    with pytest.raises(ValueError, match="unknown input key"):
        mlm({"input_ids": ids, "token_type_ids": ids})


def test_learned_positions_length_limit():
    model = TFEsmModel(tiny_config("esm1b", max_position_embeddings=12))  # 12 - pad(1) - 1 = 10 tokens
    ok = np.full((1, 10), 5)
    assert tuple(model(ok).last_hidden_state.shape) == (1, 10, 18)
    with pytest.raises(ValueError, match=r"at most 10 tokens .*length 11"):
        model(np.full((1, 11), 5))


# ------------------------------------------------------------------------------------------------
# Hub names and the Keras-only loading rules
# ------------------------------------------------------------------------------------------------


def test_variables_map_mechanically_onto_file_tensors(mlm, mlm_dir):
    tensors = load_file(f"{mlm_dir}/model.safetensors")
    layer0 = mlm.esm.encoder.layer[0]
    np.testing.assert_array_equal(layer0.attention.self.query.kernel.numpy(),
                                  tensors["esm.encoder.layer.0.attention.self.query.weight"].T)
    np.testing.assert_array_equal(layer0.output_layer.dense.bias.numpy(),
                                  tensors["esm.encoder.layer.0.output.dense.bias"])
    np.testing.assert_array_equal(layer0.LayerNorm.gamma.numpy(),
                                  tensors["esm.encoder.layer.0.LayerNorm.weight"])
    np.testing.assert_array_equal(mlm.esm.embeddings.word_embeddings.embeddings.numpy(),
                                  tensors["esm.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(mlm.lm_head.bias.numpy(), tensors["lm_head.bias"])
    hub = hub_variable_map(mlm)
    assert hub["esm.encoder.layer.2.attention.output.dense.weight"] == (
        mlm.esm.encoder.layer[2].attention.output_layer.dense.kernel, True)
    assert hub["esm.contact_head.regression.weight"][1] is True
    assert set(hub) == set(tensors) - {"esm.embeddings.position_embeddings.weight"}  # unused by ESM-2
    # The tied decoder is the word-embedding variable itself.
    assert mlm.lm_head.decoder.embeddings is mlm.esm.embeddings.word_embeddings.embeddings


def test_rotary_inv_freq_loaded_not_recomputed(tmp_path):
    cfg = tiny_config("esm2")
    tensors = write_hub_checkpoint(str(tmp_path), cfg, head="base")
    stored = {k: (v * np.float32(1.01)).astype(np.float16).astype(np.float32)  # fp16-rounded, altered
              for k, v in tensors.items() if k.endswith("inv_freq")}
    save_file({**tensors, **stored}, str(tmp_path / "model.safetensors"))
    model = TFEsmModel.from_pretrained(str(tmp_path))
    for i, layer in enumerate(model.encoder.layer):
        var = layer.attention.self.rotary_embeddings.inv_freq
        assert not var.trainable
        np.testing.assert_array_equal(var.numpy(), stored[f"encoder.layer.{i}.{ROTARY}"])
    fresh = TFEsmModel.from_config(model.get_config())
    fresh.set_weights(model.get_weights())
    for layer in fresh.encoder.layer:  # the computed table instead of the stored one
        layer.attention.self.rotary_embeddings.inv_freq.assign(tensors[f"encoder.layer.0.{ROTARY}"])
    ids, mask = make_batch()
    stored_out = model(ids, mask).last_hidden_state.numpy()
    assert not np.allclose(stored_out, fresh(ids, mask).last_hidden_state.numpy())


# ------------------------------------------------------------------------------------------------
# Keras citizenship
# ------------------------------------------------------------------------------------------------


def test_registered_and_config_round_trip(mlm):
    for cls in CLASSES.values():
        assert keras.saving.get_registered_name(cls) == f"esm_dual>{cls.__name__}"
    cfg = mlm.get_config()
    assert cfg["config"] == mlm.config.to_dict()
    clone = TFEsmForMaskedLM.from_config(json.loads(json.dumps(cfg)))
    assert clone.config == mlm.config and clone.name == mlm.name
    clone.set_weights(mlm.get_weights())
    ids, mask = make_batch()
    np.testing.assert_array_equal(clone(ids, mask).logits.numpy(), mlm(ids, mask).logits.numpy())
    base = TFEsmModel(tiny_config("esm1v"), add_pooling_layer=True)
    assert TFEsmModel.from_config(base.get_config()).pooler is not None


def test_keras_file_and_weights_round_trip(mlm, tmp_path):
    ids, mask = make_batch(seed=2)
    ref = mlm.predict({"input_ids": ids, "attention_mask": mask}, verbose=0)
    assert isinstance(ref, MaskedLMOutput) and isinstance(ref.logits, np.ndarray)
    np.testing.assert_allclose(ref.logits, mlm(ids, mask).logits.numpy(), atol=1e-5)  # graph vs eager
    mlm.save(str(tmp_path / "m.keras"))
    loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    assert type(loaded) is TFEsmForMaskedLM and loaded.config == mlm.config
    again = loaded.predict({"input_ids": ids, "attention_mask": mask}, verbose=0)
    np.testing.assert_array_equal(again.logits, ref.logits)
    mlm.save_weights(str(tmp_path / "w.weights.h5"))
    other = TFEsmForMaskedLM(mlm.config)
    assert not np.allclose(other(ids, mask).logits.numpy(), ref.logits)
    other.load_weights(str(tmp_path / "w.weights.h5"))
    np.testing.assert_array_equal(other(ids, mask).logits.numpy(), mlm(ids, mask).logits.numpy())


def test_export_saved_model_serves_same_logits(tmp_path):
    model = TFEsmForTokenClassification(tiny_config("esm1b", num_labels=3))
    ids, mask = make_batch(seed=3)
    model.export(str(tmp_path / "served"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "served"))
    out = reloaded.serve(tf.constant(ids, tf.int32), tf.constant(mask, tf.int32))
    np.testing.assert_allclose(out["logits"].numpy(), model(ids, mask).logits.numpy(), atol=1e-5)
    c = reloaded.predict_contacts(tf.constant(ids, tf.int32), tf.constant(mask, tf.int32))["contacts"]
    np.testing.assert_allclose(c.numpy(), model.predict_contacts(ids, mask).numpy(), atol=1e-5)


def test_summary_and_parameter_counts(mlm):
    lines = []
    mlm.summary(print_fn=lambda line, *a, **k: lines.append(line))
    text = "\n".join(lines)
    assert "esm (TFEsmModel)" in text and "lm_head (TFEsmLMHead)" in text
    n_hub = sum(int(np.prod(v.shape)) for v, _ in hub_variable_map(mlm).values())
    assert mlm.num_parameters() == n_hub  # the tied decoder is counted once
    assert mlm.num_parameters(only_trainable=True) == n_hub - 3 * 3  # inv_freq buffers (3 layers x K/2)
