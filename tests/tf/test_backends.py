"""The Keras models on the Keras backend of this process (TensorFlow, JAX or PyTorch) against esm_dual.pt on
the same tiny hub-layout checkpoints (fp32 CPU, 1e-4): every head's outputs, hidden states, attentions,
contacts, losses and the gradient of every weight; ``fit`` with the model's own loss (one SGD step equals
the PyTorch gradient step), ``.keras`` save/load (also across backends, in a subprocess),
``save_pretrained``/``from_pretrained``, ``mixed_bfloat16`` and ``jit_compile`` (JAX), and value checks
under XLA (ids outside the vocabulary, an all-zero attention mask).

The Keras backend is fixed per process: CI runs this module once per backend
(``KERAS_BACKEND=jax python -m pytest tests/tf/test_backends.py``, torch likewise). On TensorFlow the full
TensorFlow suite (tests/tf, tests/parity) covers parity in more depth; this module runs there too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

import esm_dual.pt as P  # noqa: E402
import esm_dual.tf as T  # noqa: E402
from esm_dual.tf import hub_variable_map  # noqa: E402
from tests.conftest import make_batch  # noqa: E402
from tests.utils import ROOT, maxdiff, random_labels  # noqa: E402

BACKEND = keras.backend.backend()
TOL = 1e-4
PT = {"base": P.EsmModel, "mlm": P.EsmForMaskedLM, "seq": P.EsmForSequenceClassification,
      "tok": P.EsmForTokenClassification}
KM = {"base": T.TFEsmModel, "mlm": T.TFEsmForMaskedLM, "seq": T.TFEsmForSequenceClassification,
      "tok": T.TFEsmForTokenClassification}
FLAVOURS = ("esm2", "esm1b")


def np_(x) -> np.ndarray:
    if isinstance(x, torch.Tensor) and not isinstance(x, keras.Variable):
        return x.detach().float().cpu().numpy()
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float32)


def keras_gradients(model, loss_fn) -> tuple[float, dict[str, np.ndarray | None]]:
    """Loss and its gradient for every trainable weight, by hub name (PyTorch orientation)."""
    hub = hub_variable_map(model)
    names = sorted(n for n, (v, _) in hub.items() if v.trainable)
    variables = [hub[n][0] for n in names]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(model)
        grads = tape.gradient(loss, variables)
    elif BACKEND == "jax":
        import jax

        trainable, non_trainable = model.trainable_variables, model.non_trainable_variables

        def f(values):
            out, _ = model.stateless_call(values, [v.value for v in non_trainable], **loss_fn.inputs,
                                          training=True)
            return out.loss

        loss, g = jax.value_and_grad(f)([v.value for v in trainable])
        by_id = {id(v): gi for v, gi in zip(trainable, g)}
        grads = [by_id[id(v)] for v in variables]
    else:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        grads = [v.value.grad for v in variables]
    out = {}
    for n, g in zip(names, grads):
        if g is None:
            out[n] = None
            continue
        g = np_(g)
        out[n] = g.T if hub[n][1] else g
    return float(np_(loss)), out


def pt_gradients(pt_model, ids, mask, labels) -> tuple[float, dict]:
    pt_model.zero_grad()
    loss = pt_model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in pt_model.named_parameters()}


# ------------------------------------------------------------------------------------------------
# Forward and gradients against PyTorch
# ------------------------------------------------------------------------------------------------


# tests/parity/test_pt_tf.py covers these on TensorFlow in more depth (every flavour and problem type).
covered_on_tensorflow = pytest.mark.skipif(BACKEND == "tensorflow", reason="tests/parity/test_pt_tf.py")


@covered_on_tensorflow
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("head", ["base", "mlm", "seq", "tok"])
def test_forward_parity(hub_dir, flavour, head):
    d = hub_dir(flavour, head)
    pt_model, k_model = PT[head].from_pretrained(d), KM[head].from_pretrained(d)
    ids, mask = make_batch(seed=1)
    labels = random_labels(head, ids, mask)
    kw = {} if labels is None else {"labels": labels}
    with torch.no_grad():
        a = pt_model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                     output_attentions=True, **{k: torch.tensor(v) for k, v in kw.items()})
        ca = pt_model.predict_contacts(torch.tensor(ids), torch.tensor(mask))
    b = k_model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True, **kw)
    assert list(b.keys()) == list(a.keys())
    key = "last_hidden_state" if head == "base" else "logits"
    assert maxdiff(a[key], b[key]) < TOL
    assert len(b.hidden_states) == len(a.hidden_states) == 4
    assert max(maxdiff(x, y) for x, y in zip(a.hidden_states, b.hidden_states)) < TOL
    assert len(b.attentions) == 3
    assert max(maxdiff(x, y) for x, y in zip(a.attentions, b.attentions)) < TOL
    assert maxdiff(ca, k_model.predict_contacts(ids, mask)) < TOL
    if labels is not None:
        assert abs(a.loss.item() - float(np_(b.loss))) < TOL
    # Without output_attentions the attention runs through Keras' dot_product_attention on JAX/PyTorch.
    assert maxdiff(a[key], k_model(ids, attention_mask=mask)[key]) < TOL


@covered_on_tensorflow
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("head", ["mlm", "seq", "tok"])
def test_gradients_match_every_weight(hub_dir, flavour, head):
    d = hub_dir(flavour, head)
    pt_model, k_model = PT[head].from_pretrained(d), KM[head].from_pretrained(d)
    ids, mask = make_batch(seed=5)
    labels = random_labels(head, ids, mask)
    pt_loss, pt_grads = pt_gradients(pt_model, ids, mask, labels)

    def loss_fn(m):
        return m(ids, attention_mask=mask, labels=labels, training=True).loss

    loss_fn.inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    k_loss, k_grads = keras_gradients(k_model, loss_fn)
    assert abs(pt_loss - k_loss) < TOL
    assert set(k_grads) == set(pt_grads)  # every weight, no more, no less
    for n, g in k_grads.items():
        ref = pt_grads[n]
        if ref is None:  # not part of the loss (the contact head)
            assert g is None or float(np.abs(g).max()) == 0.0, n
            continue
        assert g is not None, n
        assert maxdiff(ref, g) < TOL, n


# ------------------------------------------------------------------------------------------------
# Training, saving, loading
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")  # contact head
@pytest.mark.parametrize("head", ["mlm", "seq"])
def test_fit_step_is_the_pytorch_gradient_step(hub_dir, head):
    """One ``fit`` step (SGD, the model's own loss, graph or jit mode of the backend) equals w - lr * grad of
    the PyTorch twin."""
    d = hub_dir("esm2", head)
    pt_model, k_model = PT[head].from_pretrained(d), KM[head].from_pretrained(d)
    ids, mask = make_batch(seed=6)
    labels = random_labels(head, ids, mask)
    _, pt_grads = pt_gradients(pt_model, ids, mask, labels)
    before = {n: np_(v).copy() for n, (v, _) in hub_variable_map(k_model).items()}
    lr = 0.5
    k_model.compile(optimizer=keras.optimizers.SGD(lr))
    hist = k_model.fit({"input_ids": ids, "attention_mask": mask}, labels, batch_size=len(ids), epochs=1,
                       shuffle=False, verbose=0)
    assert np.isfinite(hist.history["loss"][0])
    for n, (v, transposed) in hub_variable_map(k_model).items():
        g = pt_grads.get(n)
        g = np.zeros_like(before[n]) if g is None else (np_(g).T if transposed else np_(g))
        assert np.abs(np_(v) - (before[n] - lr * g)).max() < TOL, n


def test_keras_file_round_trip(hub_dir, tmp_path):
    model = T.TFEsmForSequenceClassification.from_pretrained(hub_dir("esm1b", "seq"))
    model.freeze_base_model()
    ids, mask = make_batch(seed=7)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is T.TFEsmForSequenceClassification and not loaded.esm.trainable
    assert maxdiff(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits) == 0.0


def test_save_pretrained_loads_in_pytorch_and_back(hub_dir, tmp_path):
    k_model = T.TFEsmForMaskedLM.from_pretrained(hub_dir("esm2", "mlm"))
    k_model.save_pretrained(str(tmp_path / "k"))
    pt_model = P.EsmForMaskedLM.from_pretrained(str(tmp_path / "k"))
    ids, mask = make_batch(seed=8)
    with torch.no_grad():
        a = pt_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert maxdiff(a, k_model(ids, attention_mask=mask).logits) < TOL
    again = T.TFEsmForMaskedLM.from_pretrained(str(tmp_path / "k"))
    for n, (v, _) in hub_variable_map(k_model).items():
        assert np.array_equal(np_(v), np_(hub_variable_map(again)[n][0])), n


_LOAD_SCRIPT = """
import json, sys, numpy as np, keras
import esm_dual.tf
model = keras.saving.load_model(sys.argv[1])
ids, mask = np.load(sys.argv[2]), np.load(sys.argv[3])
out = model(ids, attention_mask=mask, output_hidden_states=True)
np.save(sys.argv[4], keras.ops.convert_to_numpy(out.logits))
np.save(sys.argv[5], keras.ops.convert_to_numpy(out.hidden_states[1]))
print(json.dumps({"backend": keras.backend.backend(), "cls": type(model).__name__}))
"""
OTHER_BACKENDS = {"tensorflow": ["jax", "torch"], "jax": ["tensorflow"], "torch": ["jax"]}


@pytest.mark.parametrize("other", OTHER_BACKENDS[BACKEND])
def test_keras_file_loads_on_another_backend(hub_dir, tmp_path, other):
    pytest.importorskip({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[other])
    model = T.TFEsmForMaskedLM.from_pretrained(hub_dir("esm1b", "mlm"))
    ids, mask = make_batch(seed=9)
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    files = [str(tmp_path / f) for f in ("m.keras", "ids.npy", "mask.npy", "logits.npy", "h1.npy")]
    model.save(files[0])
    np.save(files[1], ids)
    np.save(files[2], mask)
    env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, *files], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"backend": other, "cls": "TFEsmForMaskedLM"}
    assert maxdiff(out.logits, np.load(files[3])) < TOL
    assert maxdiff(out.hidden_states[1], np.load(files[4])) < TOL


# ------------------------------------------------------------------------------------------------
# JAX: jit, mixed precision
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(BACKEND != "jax", reason="jit_compile and mixed_bfloat16 are checked on JAX")
def test_jax_jit_and_predict_match_eager(hub_dir):
    import jax

    model = T.TFEsmForMaskedLM.from_pretrained(hub_dir("esm2", "mlm"))
    ids, mask = make_batch(seed=10)
    eager = np_(model(ids, attention_mask=mask).logits)

    @jax.jit
    def run(tv, ntv, ids, mask):
        out, _ = model.stateless_call(tv, ntv, ids, attention_mask=mask)
        return out.logits

    jitted = run([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                 ids, mask)
    assert maxdiff(eager, jitted) < 1e-5
    model.compile(jit_compile=True)
    assert model.jit_compile
    pred = model.predict({"input_ids": ids, "attention_mask": mask}, batch_size=2, verbose=0)
    assert maxdiff(eager, pred.logits) < 1e-5


@pytest.mark.skipif(BACKEND != "jax", reason="jit_compile and mixed_bfloat16 are checked on JAX")
def test_jax_mixed_bfloat16_inference_and_fit(hub_dir):
    d = hub_dir("esm2", "mlm")
    ref = T.TFEsmForMaskedLM.from_pretrained(d)
    model = T.TFEsmForMaskedLM.from_pretrained(d, dtype="mixed_bfloat16")
    assert model.esm.encoder.layer[0].attention.self.query.compute_dtype == "bfloat16"
    assert model.esm.encoder.layer[0].attention.self.query.kernel.dtype == "float32"
    assert model.esm.encoder.layer[0].LayerNorm.compute_dtype == "float32"
    ids, mask = make_batch(seed=11)
    a, b = np_(ref(ids, attention_mask=mask).logits), np_(model(ids, attention_mask=mask).logits)
    assert np.isfinite(b).all()
    # bf16 keeps 8 bits of mantissa: the logits agree to about 1% of their range
    assert np.abs(a - b).max() < 0.03 * np.abs(a).max()
    assert np.abs(a - b).max() > 0  # and it really ran in bfloat16
    labels = random_labels("mlm", ids, mask)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    hist = model.fit({"input_ids": ids, "attention_mask": mask}, labels, batch_size=4, epochs=2, verbose=0)
    assert all(np.isfinite(hist.history["loss"]))


def test_key_lengths_tell_right_padding():
    from esm_dual.tf.ops import key_lengths

    def check(mask):
        m = np.asarray(mask, np.float32)
        lengths, ok = key_lengths(((1.0 - m) * -3.0e38)[:, None, None, :])
        return np_(lengths).astype(int).tolist(), bool(np_(ok))

    assert check([[1, 1, 1, 0], [1, 1, 0, 0]]) == ([3, 2], True)
    assert check([[1, 1, 1, 1], [1, 0, 0, 0]]) == ([4, 1], True)
    assert check([[0, 1, 1, 1], [1, 1, 0, 0]])[1] is False   # left padding
    assert check([[1, 0, 1, 0], [1, 1, 0, 0]])[1] is False   # a hole
    assert check([[0, 0, 0, 0], [1, 1, 0, 0]])[1] is False   # an empty row


@pytest.mark.skipif(BACKEND != "jax", reason="cuDNN attention is the JAX backend's")
def test_cudnn_attention_decision(monkeypatch):
    """On by default on a JAX GPU for half precision and head sizes cuDNN takes; off on the CPU, in fp32, for
    other head sizes, and with ESM_DUAL_KERAS_CUDNN_ATTENTION=0."""
    import jax

    from esm_dual.tf.ops import use_cudnn_attention

    def q(head, dtype="bfloat16"):
        return keras.ops.zeros((1, 4, 2, head), dtype)

    monkeypatch.delenv("ESM_DUAL_KERAS_CUDNN_ATTENTION", raising=False)
    assert jax.default_backend() != "gpu" or use_cudnn_attention(q(64))
    if jax.default_backend() != "gpu":
        assert not use_cudnn_attention(q(64))  # the CPU: XLA's attention
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert use_cudnn_attention(q(64)) and use_cudnn_attention(q(16, "float16")) and use_cudnn_attention(q(128))
    assert not use_cudnn_attention(q(64, "float32"))
    assert not use_cudnn_attention(q(6)) and not use_cudnn_attention(q(136))
    monkeypatch.setenv("ESM_DUAL_KERAS_CUDNN_ATTENTION", "0")
    assert not use_cudnn_attention(q(64))


@pytest.mark.gpu
@pytest.mark.skipif(BACKEND != "jax", reason="cuDNN attention is the JAX backend's")
def test_jax_cudnn_attention_matches_xla_on_gpu(hub_dir, monkeypatch):
    """bf16 on a GPU: cuDNN's flash attention (key lengths) against XLA's attention with the bias, on a
    right-padded batch (cuDNN) and a left-padded one (the run-time fallback), outputs and gradients."""
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("no JAX GPU")
    from esm_dual.tf.ops import use_cudnn_attention

    # head size 16: cuDNN takes multiples of 8 (the tiny models' 6 takes XLA's attention)
    model = T.TFEsmForMaskedLM.from_pretrained(hub_dir("esm2", "mlm", hidden_size=48), dtype="mixed_bfloat16")
    ids, mask = make_batch(seed=13)
    monkeypatch.delenv("ESM_DUAL_KERAS_CUDNN_ATTENTION", raising=False)  # the default: on
    assert use_cudnn_attention(keras.ops.zeros((1, 4, 2, model.config.head_dim), "bfloat16"))
    assert not use_cudnn_attention(keras.ops.zeros((1, 4, 2, 6), "bfloat16"))
    labels = random_labels("mlm", ids, mask)
    shift = [int((m == 0).sum()) for m in mask]
    left = [np.stack([np.roll(r, k) for r, k in zip(x, shift)]) for x in (ids, mask, labels)]
    assert (left[1] != mask).any()

    def run(i, m, lab):
        tv, ntv = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]

        def f(tv):
            out, _ = model.stateless_call(tv, ntv, i, attention_mask=m, labels=lab)
            return out.loss, out.logits

        step = jax.jit(jax.value_and_grad(f, has_aux=True))
        (loss, logits), g = step(tv)
        return np_(logits), [np_(x) for x in g], "cudnn" in step.lower(tv).as_text().lower()

    for i, m, lab in ((ids, mask, labels), left):
        lab = np.where(m > 0, lab, -100)
        monkeypatch.setenv("ESM_DUAL_KERAS_CUDNN_ATTENTION", "1")
        fused, gf, has_cudnn = run(i, m, lab)
        assert has_cudnn  # cuDNN was traced (not the silent fallback of a refused trace)
        monkeypatch.setenv("ESM_DUAL_KERAS_CUDNN_ATTENTION", "0")
        plain, gp, has_cudnn = run(i, m, lab)
        assert not has_cudnn
        assert np.isfinite(fused).all()
        real = m > 0
        assert np.abs(fused - plain)[real].max() < 0.03 * np.abs(plain).max()
        for a, b in zip(gf, gp):
            assert np.isfinite(a).all() and np.abs(a - b).max() <= 0.05 * np.abs(b).max() + 1e-6


# ------------------------------------------------------------------------------------------------
# Value checks in eager, graph and XLA modes (issue 19: items 6 and 13)
# ------------------------------------------------------------------------------------------------


def _bad_batches():
    ids, mask = make_batch(seed=12)
    for bad in (40, 1000, -1):
        b = ids.copy()
        b[1, 3] = bad
        yield f"token id {bad}", b, mask, "outside the vocabulary"
    m = mask.copy()
    m[2] = 0
    yield "all-zero attention_mask row", ids, m, "attention_mask"


@pytest.mark.parametrize("case", [c[0] for c in _bad_batches()])
def test_bad_values_raise_eagerly(hub_dir, case):
    model = T.TFEsmForMaskedLM.from_pretrained(hub_dir("esm2", "mlm"))
    _, ids, mask, message = next(c for c in _bad_batches() if c[0] == case)
    with pytest.raises(ValueError, match=message):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("case", [c[0] for c in _bad_batches()])
def test_bad_values_raise_or_poison_under_xla(hub_dir, case):
    """``fit``/``predict`` check the batches before the compiled step (JAX, TensorFlow XLA); inside ``jax.jit``
    a host callback raises; TensorFlow XLA cannot raise inside a step: a direct ``tf.function(jit_compile=True)``
    call gives NaN for the bad row (never finite numbers); PyTorch runs eagerly."""
    model = T.TFEsmForMaskedLM.from_pretrained(hub_dir("esm2", "mlm"))
    _, ids, mask, message = next(c for c in _bad_batches() if c[0] == case)
    x = {"input_ids": ids, "attention_mask": mask}
    if BACKEND == "torch":
        model.compile()
        with pytest.raises(ValueError, match=message):
            model.predict(x, batch_size=4, verbose=0)
        return
    model.compile(jit_compile=True)
    assert model.jit_compile
    if BACKEND == "jax":
        import jax

        good_ids, good_mask = make_batch(seed=12)
        before = np_(model(good_ids, attention_mask=good_mask).logits)
        # Batches are checked on the host before Keras' jitted step, which owns the weights while it runs.
        with pytest.raises(ValueError, match=message):
            model.predict(x, batch_size=4, verbose=0)
        with pytest.raises(ValueError, match=message):
            model.fit(x, np.where(mask == 1, ids, -100), batch_size=4, verbose=0)
        assert maxdiff(before, model(good_ids, attention_mask=good_mask).logits) == 0.0  # the model is intact

        @jax.jit
        def run(tv, ntv, ids, mask):
            out, _ = model.stateless_call(tv, ntv, ids, attention_mask=mask)
            return out.logits

        with pytest.raises(Exception, match=message):
            np_(run([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
                    ids, mask))
        return
    import tensorflow as tf

    with pytest.raises(ValueError, match=message):
        model.predict(x, batch_size=4, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices(x).batch(4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        model.predict(ds, verbose=0)
    run = tf.function(lambda ids, mask: model(ids, attention_mask=mask).logits, jit_compile=True)
    logits = np_(run(tf.constant(ids), tf.constant(mask)))
    bad_row = 1 if "token id" in case else 2
    assert np.isnan(logits[bad_row]).all()
    good = [r for r in range(len(ids)) if r != bad_row]
    assert np.isfinite(logits[good]).all()


_NO_TF_SCRIPT = """
import sys
sys.modules["tensorflow"] = None  # as if TensorFlow were not installed: importing it fails
import numpy as np, keras
import esm_dual.tf as T
from esm_dual.tf.pydataset import make_pydataset
from tests.conftest import tiny_config
model = T.TFEsmForSequenceClassification(tiny_config("esm2", num_labels=2))
ds = make_pydataset(["MKTAYIAKQR", "MSIQHFRVALIPFF", "MKV"], [0, 1, 0], batch_size=2)
model.compile(optimizer="adam")
hist = model.fit(ds, epochs=1, verbose=0)
model.save(sys.argv[1])
keras.saving.load_model(sys.argv[1])
assert sys.modules["tensorflow"] is None and np.isfinite(hist.history["loss"][0])
print(keras.backend.backend())
"""


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the other backends run without TensorFlow")
def test_runs_without_tensorflow(tmp_path):
    """``import esm_dual.tf``, building, ``fit`` on ``make_pydataset`` and ``.keras`` save/load with TensorFlow
    unimportable (a subprocess)."""
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, str(tmp_path / "m.keras")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == BACKEND


_NO_TF_CONVERT = """
import sys
sys.modules["tensorflow"] = None  # as if TensorFlow were not installed: importing it fails
from esm_dual.cli.main import main
d = sys.argv[1]
assert main(["init", "esm2_t6_8M_UR50D", d + "/hub", "--random", "--tiny"]) == 0
for args in ([d + "/hub", d + "/m.keras"], [d + "/m.keras", d + "/back", "--to", "hf"],
             [d + "/hub", d + "/h5", "--to", "tf-h5"], [d + "/h5", d + "/back2", "--to", "hf"]):
    assert main(["convert", *args, "--verify"]) == 0, args
assert sys.modules["tensorflow"] is None
"""


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the other backends run without TensorFlow")
def test_convert_verify_without_tensorflow(tmp_path):
    """``esm-dual convert --verify`` to and from ``.keras`` and ``tf_model.h5`` runs the Keras side on this
    backend, with TensorFlow unimportable: every output compared within 1e-4, labelled with the backend."""
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-c", _NO_TF_CONVERT, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    verdicts = [line for line in res.stderr.splitlines() if "verify " in line]
    # logits, last hidden state and contacts for each of the four conversions
    assert len(verdicts) == 12 and all(line.endswith(" ok") for line in verdicts), verdicts
    assert sum(f"pt -> keras-{BACKEND}," in line for line in verdicts) == 6
    assert sum(f"keras-{BACKEND} -> pt," in line for line in verdicts) == 6
