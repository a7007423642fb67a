"""Keras training of esm_dual.tf models: the model's own losses through compile()/fit(), Keras losses
on the logits, XLA, mixed bfloat16, tf.distribute and head-only fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from esm_dual.tf import (  # noqa: E402
    TFEsmForMaskedLM,
    TFEsmForSequenceClassification,
    TFEsmForTokenClassification,
    hub_variable_map,
)
from tests.conftest import make_batch, tiny_config  # noqa: E402

# esm_dual.tf silences this (contact-head-only) Keras warning at import; pytest resets warning filters.
pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")


@pytest.fixture(autouse=True)
def _seeded():
    """Fresh models draw their weights from Keras' global RNG: seed it so every run is the same."""
    keras.utils.set_random_seed(0)


def _inputs(seed=0):
    ids, mask = make_batch(seed=seed)
    return {"input_ids": ids, "attention_mask": mask}


def _mlm_labels(x, seed=0):
    rng = np.random.default_rng(seed)
    ids = x["input_ids"]
    labels = np.where((rng.random(ids.shape) < 0.4) & (x["attention_mask"] == 1), ids, -100)
    labels[:, 1] = ids[:, 1]
    return labels


def _snapshot(model):
    return {n: v.numpy().copy() for n, (v, _) in hub_variable_map(model).items()}


def _fit(model, x, y=None, epochs=3, **compile_kw):
    """compile + fit on one batch per epoch. Graph mode (tf.function) unless ``run_eagerly=True``: tests
    of loss rules run eagerly to keep the suite fast, tests of the Keras machinery in graph mode."""
    compile_kw.setdefault("optimizer", keras.optimizers.Adam(1e-2))
    compile_kw.setdefault("jit_compile", False)
    model.compile(**compile_kw)
    return model.fit(x, y, epochs=epochs, batch_size=4, verbose=0, shuffle=False).history


def test_mlm_trains_on_its_own_loss_with_labels_as_y():
    model = TFEsmForMaskedLM(tiny_config("esm2"))
    x = _inputs()
    y = _mlm_labels(x)
    start = float(model(**x, labels=y).loss)
    hist = _fit(model, x, y, epochs=4)
    # The first epoch's loss is the model's own loss before the update (one batch per epoch).
    assert abs(hist["loss"][0] - start) < 1e-4
    assert hist["loss"][-1] < hist["loss"][0]
    assert abs(model.evaluate(x, y, verbose=0) - float(model(**x, labels=y).loss)) < 1e-4


def test_labels_in_the_input_dict():
    model = TFEsmForMaskedLM(tiny_config("esm1b"))
    x = _inputs(1)
    y = _mlm_labels(x, 1)
    start = float(model(**x, labels=y).loss)
    hist = _fit(model, {**x, "labels": y}, epochs=3)
    assert abs(hist["loss"][0] - start) < 1e-4 and hist["loss"][-1] < hist["loss"][0]


def _sequence_loss_reference(logits, labels, kind):
    logits = logits.astype(np.float64)
    if kind == "regression":
        return np.mean((logits.squeeze(-1) - labels) ** 2)
    if kind == "single":
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -np.mean(logp[np.arange(len(labels)), labels])
    p = 1 / (1 + np.exp(-logits))
    return -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))


@pytest.mark.parametrize("kind", ["regression", "single", "multi"])
def test_sequence_classification_problem_types(kind):
    rng = np.random.default_rng(0)
    x = _inputs(2)
    B = x["input_ids"].shape[0]
    if kind == "regression":  # num_labels == 1 -> regression, float targets
        cfg, y = tiny_config("esm1v", num_labels=1), rng.normal(size=(B,)).astype(np.float32)
    elif kind == "single":  # integer labels -> single-label cross entropy
        cfg, y = tiny_config("esm1v", num_labels=3), rng.integers(0, 3, (B,))
    else:  # float labels, num_labels > 1 -> multi-label BCE
        cfg, y = tiny_config("esm1v", num_labels=3), (rng.random((B, 3)) > 0.5).astype(np.float32)
    model = TFEsmForSequenceClassification(cfg)
    logits = model(**x).logits.numpy()
    expected = _sequence_loss_reference(logits, y, kind)
    assert abs(float(model(**x, labels=y).loss) - expected) < 1e-5
    hist = _fit(model, x, y, epochs=3, run_eagerly=True)
    assert abs(hist["loss"][0] - expected) < 1e-4
    assert hist["loss"][-1] < hist["loss"][0]


def test_token_classification_ignores_minus_100():
    model = TFEsmForTokenClassification(tiny_config("esm2", num_labels=4))
    x = _inputs(3)
    rng = np.random.default_rng(3)
    y = np.where(x["attention_mask"] == 1, rng.integers(0, 4, x["input_ids"].shape), -100)
    y[:, 0] = -100
    logits = model(**x).logits.numpy().astype(np.float64)
    valid = y != -100
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(logp, np.where(valid, y, 0)[..., None], -1)[..., 0][valid])
    assert abs(float(model(**x, labels=y).loss) - expected) < 1e-5
    hist = _fit(model, x, y, epochs=3, run_eagerly=True)
    assert abs(hist["loss"][0] - expected) < 1e-4 and hist["loss"][-1] < hist["loss"][0]


def test_keras_loss_and_metrics_on_the_logits():
    model = TFEsmForSequenceClassification(tiny_config("esm2", num_labels=3))
    x = _inputs(4)
    y = np.array([0, 2, 1, 2])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = float(loss_fn(y, model(**x).logits))
    hist = _fit(model, x, y, epochs=3, loss=loss_fn, metrics=["sparse_categorical_accuracy"])
    assert abs(hist["loss"][0] - expected) < 1e-4
    assert "sparse_categorical_accuracy" in hist and hist["loss"][-1] < hist["loss"][0]


def test_xla_jit_compile_fit_matches_eager_fit():
    x = _inputs(5)
    y = _mlm_labels(x, 5)
    results, init = [], TFEsmForMaskedLM(tiny_config("esm2")).get_weights()
    for jit in (False, True):
        model = TFEsmForMaskedLM(tiny_config("esm2"))
        model.set_weights(init)
        results.append(_fit(model, x, y, epochs=2, optimizer=keras.optimizers.SGD(0.1), jit_compile=jit,
                            run_eagerly=not jit)["loss"])
    np.testing.assert_allclose(results[1], results[0], atol=1e-4)


@pytest.fixture
def mixed_bfloat16():
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield
    keras.config.set_dtype_policy(old)


def test_mixed_bfloat16_close_to_float32(mixed_bfloat16, tmp_path):
    """Under mixed_bfloat16 the logits, attentions and contacts move from float32 by no more than HF transformers'
    own do under bf16 autocast on the same weights (bf16 rounding, not a bug), and the logits by a few ulps of
    bfloat16 at their scale; LayerNorm and the contact head compute in float32."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.utils import hf_model, maxdiff

    cfg = tiny_config("esm2")
    model = TFEsmForMaskedLM(cfg)
    ref = TFEsmForMaskedLM(cfg, dtype="float32")
    ref.set_weights(model.get_weights())
    assert model.compute_dtype == "bfloat16" and all(v.dtype == "float32" for v in model.weights)
    ln = model.esm.encoder.layer[0].LayerNorm
    assert ln.compute_dtype == "float32" and model.esm.contact_head.compute_dtype == "float32"
    x = _inputs(6)
    out = model(**x, output_attentions=True)
    base = ref(**x, output_attentions=True)
    assert out.logits.dtype == tf.bfloat16
    logits = tf.cast(out.logits, tf.float32).numpy()
    assert np.isfinite(logits).all()
    contacts = model.predict_contacts(x["input_ids"], x["attention_mask"])
    assert contacts.dtype == tf.float32
    ref_contacts = ref.predict_contacts(x["input_ids"], x["attention_mask"]).numpy()
    # The independent yardstick: HF transformers on the same weights, float32 and under CPU bf16 autocast.
    ref.save_pretrained(str(tmp_path / "fp32"))
    hf = hf_model(str(tmp_path / "fp32"), "mlm")
    ids, mask = torch.tensor(x["input_ids"]), torch.tensor(x["attention_mask"])
    with torch.no_grad():
        hf32 = hf(ids, attention_mask=mask, output_attentions=True)
        assert maxdiff(hf32.logits, base.logits) < 1e-4  # the float32 twins agree first
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hf16 = hf(ids, attention_mask=mask, output_attentions=True)
            hf16_contacts = hf.predict_contacts(ids, mask)
        hf32_contacts = hf.predict_contacts(ids, mask)
    ours, theirs = maxdiff(logits, base.logits), maxdiff(hf16.logits, hf32.logits)
    assert 0 < ours <= 3 * theirs, (ours, theirs)  # it really ran in bfloat16, and no worse than HF's autocast
    assert ours < 4 * 2.0**-7 * np.abs(base.logits.numpy()).max()  # 4 ulps of bfloat16 at the logits' scale
    for i, (a, b) in enumerate(zip(out.attentions, base.attentions)):
        # HF's autocast drift, plus the rounding of the returned bfloat16 probabilities (half an ulp, elementwise)
        theirs = maxdiff(hf16.attentions[i], hf32.attentions[i])
        a, b = tf.cast(a, tf.float32).numpy(), b.numpy()
        assert np.all(np.abs(a - b) <= 3 * theirs + 2.0**-8 * np.abs(b) + 1e-6), i
    ours = maxdiff(contacts, ref_contacts)
    assert ours <= 3 * maxdiff(hf16_contacts, hf32_contacts) + 1e-5, ours
    y = _mlm_labels(x, 6)
    hist = _fit(model, x, y, epochs=2)
    assert np.isfinite(hist["loss"]).all() and hist["loss"][-1] < hist["loss"][0]


def test_mirrored_strategy_build_compile_fit():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    x = _inputs(7)
    y = np.array([1, 0, 1, 1])
    with strategy.scope():
        model = TFEsmForSequenceClassification(tiny_config("esm1b"))
        model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    before = _snapshot(model)
    hist = model.fit(x, y, epochs=3, batch_size=4, verbose=0)
    assert np.isfinite(hist.history["loss"]).all() and hist.history["loss"][-1] < hist.history["loss"][0]
    after = _snapshot(model)
    assert not np.array_equal(before["classifier.out_proj.weight"], after["classifier.out_proj.weight"])


def test_frozen_encoder_head_only_finetuning():
    model = TFEsmForSequenceClassification(tiny_config("esm2"))
    model.esm.trainable = False
    x = _inputs(8)
    y = np.array([1, 0, 1, 0])
    before = _snapshot(model)
    hist = _fit(model, x, y, epochs=2, run_eagerly=True)
    assert np.isfinite(hist["loss"]).all()
    after = _snapshot(model)
    for n in before:
        if n.startswith("esm."):
            np.testing.assert_array_equal(before[n], after[n], err_msg=n)
    assert all(not np.array_equal(before[n], after[n]) for n in before if n.startswith("classifier."))
    model.freeze_base_model(False)
    assert all(v.trainable for v in model.esm.trainable_weights) and len(model.esm.trainable_weights) > 30


def test_missing_labels_error_is_clear():
    model = TFEsmForMaskedLM(tiny_config("esm2"))
    model.compile(optimizer="sgd", jit_compile=False)
    with pytest.raises(ValueError, match="no labels"):
        model.fit(_inputs(), epochs=1, verbose=0)


def test_fit_on_the_tf_data_pipeline():
    from esm_dual.tf.data import make_dataset

    rng = np.random.default_rng(9)
    aa = np.array(list("LAGVSERTIDPKQNFYMHWC"))
    seqs = ["".join(rng.choice(aa, size=int(n))) for n in rng.integers(5, 12, size=8)]
    ds = make_dataset(seqs, batch_size=4, mlm=True, mlm_probability=0.3, bucket_boundaries=[16], seed=1)
    model = TFEsmForMaskedLM(tiny_config("esm2"))
    before = _snapshot(model)
    hist = _fit(model, ds, epochs=2)
    assert np.isfinite(hist["loss"]).all()
    after = _snapshot(model)
    assert not np.array_equal(before["lm_head.dense.weight"], after["lm_head.dense.weight"])


def test_regression_labels_of_unknown_rank_do_not_broadcast():
    """[B] logits against [B, 1] labels (or labels whose rank Keras only knows at run time) is the MSE of
    the pairs, never the [B, B] broadcast."""
    model = TFEsmForSequenceClassification(tiny_config("esm2", num_labels=1, problem_type="regression"))
    x = _inputs()
    y = np.random.default_rng(0).normal(size=len(x["input_ids"])).astype("float32")
    model.compile(optimizer="sgd")
    logits = model.predict(x, verbose=0).logits[:, 0]
    want = float(np.mean((logits - y) ** 2))
    assert model.evaluate(x, y, batch_size=8, verbose=0) == pytest.approx(want, rel=1e-5)
    assert model.evaluate(x, y[:, None], batch_size=8, verbose=0) == pytest.approx(want, rel=1e-5)
    spec = ({"input_ids": tf.TensorSpec([None, None], tf.int32), "attention_mask": tf.TensorSpec([None, None],
                                                                                             tf.int32)},
            tf.TensorSpec(None, tf.float32))  # the labels' rank unknown until run time
    ds = tf.data.Dataset.from_generator(lambda: iter([({k: v.astype("int32") for k, v in x.items()}, y[:, None])]),
                                        output_signature=spec)
    assert model.evaluate(ds, verbose=0) == pytest.approx(want, rel=1e-5)


def test_length_and_vocabulary_checked_inside_fit_and_predict():
    model = TFEsmForSequenceClassification(tiny_config("esm1b", num_labels=1, max_position_embeddings=12))
    model.compile(optimizer="sgd")
    spec = {"input_ids": tf.TensorSpec([None, None], tf.int32), "attention_mask": tf.TensorSpec([None, None],
                                                                                            tf.int32)}
    ok = {"input_ids": np.full((2, 6), 5, "int32"), "attention_mask": np.ones((2, 6), "int32")}
    model.predict(tf.data.Dataset.from_generator(lambda: iter([ok]), output_signature=spec), verbose=0)
    # the traced predict function (length unknown when traced) meets a batch longer than the positions
    long = {"input_ids": np.full((2, 14), 5, "int32"), "attention_mask": np.ones((2, 14), "int32")}
    ds = tf.data.Dataset.from_generator(lambda: iter([long]), output_signature=spec)
    with pytest.raises(tf.errors.InvalidArgumentError, match="learned positions and takes at most 10 tokens"):
        model.predict(ds, verbose=0)
    bad = {"input_ids": np.full((2, 6), 40, "int32"), "attention_mask": np.ones((2, 6), "int32")}
    ds = tf.data.Dataset.from_generator(lambda: iter([bad]), output_signature=spec)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the vocabulary"):
        model.predict(ds, verbose=0)


def test_frozen_encoder_survives_keras_save(tmp_path):
    model = TFEsmForSequenceClassification(tiny_config("esm2", num_labels=2))
    model.freeze_base_model()
    x = _inputs()
    _fit(model, x, np.array([0, 1] * (len(x["input_ids"]) // 2)), epochs=1)
    trainable = model.num_parameters(only_trainable=True)
    assert trainable < model.num_parameters()
    model.save(tmp_path / "f.keras")
    loaded = keras.models.load_model(tmp_path / "f.keras")
    assert loaded.num_parameters(only_trainable=True) == trainable and not loaded.esm.trainable
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0).logits, model.predict(x, verbose=0).logits)


def test_metrics_skip_positions_labelled_minus_100():
    model = TFEsmForTokenClassification(tiny_config("esm2", num_labels=3))
    x = _inputs()
    rng = np.random.default_rng(1)
    y = np.where(x["attention_mask"] == 1, rng.integers(0, 3, x["input_ids"].shape), -100)
    y[:, 0] = -100
    model.compile(optimizer="sgd", metrics=["accuracy"])
    _, acc = model.evaluate(x, y, batch_size=8, verbose=0)
    pred = model.predict(x, verbose=0).logits.argmax(-1)
    valid = y != -100
    assert acc == pytest.approx(float(np.mean(pred[valid] == y[valid])), abs=1e-6)
    # per-position sample weights reach weighted metrics at the positions with a target
    w = np.broadcast_to(np.linspace(0.5, 2.0, len(y)).astype("float32")[:, None], y.shape).copy()
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                                                   ignore_class=-100),
                  weighted_metrics=["accuracy"])
    _, wacc = model.evaluate(x, y, sample_weight=w, batch_size=8, verbose=0)
    ww = w[valid]
    assert wacc == pytest.approx(float(np.sum(ww * (pred[valid] == y[valid])) / np.sum(ww)), abs=1e-6)


def test_compile_without_a_loss_returns_to_the_own_loss():
    model = TFEsmForSequenceClassification(tiny_config("esm2", num_labels=2))
    x = _inputs()
    y = np.array([0, 1] * (len(x["input_ids"]) // 2))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, class_weight={0: 1.0, 1: 2.0}, epochs=1, verbose=0)  # a Keras loss takes class weights
    model.compile(optimizer="sgd")
    assert not model._keras_loss_compiled()
    with pytest.raises(ValueError, match="sample weights need a Keras loss"):
        model.fit(x, y, class_weight={0: 1.0, 1: 2.0}, epochs=1, verbose=0)
