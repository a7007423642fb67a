"""esm_dual.tf against esm_dual.pt on the same tiny hub-layout checkpoints (fp32, CPU, tolerance 1e-4):
names, outputs, contacts, losses and the gradient of the loss for every weight; checkpoints written by
one framework load in the other (and in HF transformers) with the same outputs."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")

import esm_dual.pt as P  # noqa: E402
import esm_dual.tf as T  # noqa: E402
from esm_dual.tf.modeling_esm import hub_variable_map  # noqa: E402
from tests.conftest import make_batch, tiny_config  # noqa: E402
from tests.utils import hf_model, maxdiff, random_labels  # noqa: E402

TOL = 1e-4
HEADS = ("base", "mlm", "seq", "tok")
PT = {"base": P.EsmModel, "mlm": P.EsmForMaskedLM, "seq": P.EsmForSequenceClassification,
      "tok": P.EsmForTokenClassification}
TF = {"base": T.TFEsmModel, "mlm": T.TFEsmForMaskedLM, "seq": T.TFEsmForSequenceClassification,
      "tok": T.TFEsmForTokenClassification}
# Seq-classification variants: (num_labels, problem_type, label kind).
SEQ_VARIANTS = {
    "single": (3, None, "int"),
    "regression1": (1, None, "float1"),
    "regression3": (3, "regression", "float"),
    "multi": (3, "multi_label_classification", "binary"),
}


def _pair(directory, head):
    return PT[head].from_pretrained(directory), TF[head].from_pretrained(directory)


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_hub_name_sets_identical(flavour, head):
    cfg = tiny_config(flavour)
    pt_names = set(PT[head](cfg)._hub_state())
    tf_names = set(hub_variable_map(TF[head](cfg)))
    assert "lm_head.decoder.weight" not in pt_names | tf_names  # tied: left out on both sides
    assert tf_names == pt_names


def test_hub_name_sets_identical_with_pooler():
    cfg = tiny_config("esm2")
    pt_names = set(P.EsmModel(cfg, add_pooling_layer=True)._hub_state())
    tf_names = set(hub_variable_map(T.TFEsmModel(cfg, add_pooling_layer=True)))
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= tf_names
    assert tf_names == pt_names


# ------------------------------------------------------------------------------------------------
# Forward: logits, hidden states, attentions, contacts, losses
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_forward_parity(hub_dir, flavour, head):
    pt_model, tf_model = _pair(hub_dir(flavour, head), head)
    ids, mask = make_batch(seed=1)
    labels = random_labels(head, ids, mask)
    kw = {} if labels is None else {"labels": labels}
    with torch.no_grad():
        a = pt_model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                     output_attentions=True, **{k: torch.tensor(v) for k, v in kw.items()})
        ca = pt_model.predict_contacts(torch.tensor(ids), torch.tensor(mask))
    b = tf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True, **kw)
    cb = tf_model.predict_contacts(ids, mask)
    assert list(b.keys()) == list(a.keys())
    key = "last_hidden_state" if head == "base" else "logits"
    assert maxdiff(a[key], b[key]) < TOL
    assert len(b.hidden_states) == tf_model.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert maxdiff(x, y) < TOL
    assert len(b.attentions) == tf_model.config.num_hidden_layers
    for x, y in zip(a.attentions, b.attentions):
        assert maxdiff(x, y) < TOL
    B, L = ids.shape
    assert tuple(cb.shape) == (B, L - 2, L - 2)
    assert maxdiff(ca, cb) < TOL
    if labels is not None:
        assert abs(a.loss.item() - float(b.loss)) < TOL


@pytest.mark.parametrize("variant", sorted(SEQ_VARIANTS))
def test_sequence_classification_losses(hub_dir, variant):
    num_labels, problem_type, kind = SEQ_VARIANTS[variant]
    d = hub_dir("esm2", "seq", num_labels=num_labels, problem_type=problem_type)
    pt_model, tf_model = _pair(d, "seq")
    ids, mask = make_batch(seed=2)
    labels = random_labels("seq", ids, mask, num_labels, kind)
    with torch.no_grad():
        a = pt_model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    b = tf_model(ids, attention_mask=mask, labels=labels).loss
    assert abs(a.item() - float(b)) < TOL


def test_inputs_embeds_path(hub_dir, flavour):
    pt_model, tf_model = _pair(hub_dir(flavour, "base"), "base")
    ids, mask = make_batch(seed=3)
    emb = pt_model.embeddings.word_embeddings(torch.tensor(ids)).detach()
    with torch.no_grad():
        a = pt_model(inputs_embeds=emb, attention_mask=torch.tensor(mask)).last_hidden_state
    b = tf_model(inputs_embeds=emb.numpy(), attention_mask=mask).last_hidden_state
    assert maxdiff(a, b) < TOL


def test_padded_and_unpadded_agree_in_tf(hub_dir, flavour):
    model = T.TFEsmForMaskedLM.from_pretrained(hub_dir(flavour, "mlm"))
    ids, mask = make_batch(seed=4)
    batched = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    contacts = model.predict_contacts(ids, mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        alone = model(ids[b:b + 1, :n], output_hidden_states=True, output_attentions=True)
        assert maxdiff(alone.logits[0], batched.logits[b, :n]) < TOL
        for x, y in zip(alone.hidden_states, batched.hidden_states):
            assert maxdiff(x[0], y[b, :n]) < TOL
        for x, y in zip(alone.attentions, batched.attentions):
            assert maxdiff(x[0], y[b, :, :n, :n]) < TOL
        assert maxdiff(model.predict_contacts(ids[b:b + 1, :n])[0], contacts[b, :n - 2, :n - 2]) < TOL


# ------------------------------------------------------------------------------------------------
# Gradients of the loss w.r.t. every weight
# ------------------------------------------------------------------------------------------------


def _compare_gradients(pt_model, tf_model, pt_loss_fn, tf_loss_fn) -> float:
    pt_model.zero_grad()
    pt_loss = pt_loss_fn(pt_model)
    pt_loss.backward()
    pt_grads = {n: p.grad for n, p in pt_model.named_parameters()}
    hub = hub_variable_map(tf_model)
    trainable = {n: v for n, (v, _) in hub.items() if v.trainable}
    with tf.GradientTape() as tape:
        tf_loss = tf_loss_fn(tf_model)
    names = sorted(trainable)
    grads = tape.gradient(tf_loss, [trainable[n] for n in names])
    assert abs(pt_loss.item() - float(tf_loss)) < TOL
    assert set(names) == set(pt_grads)  # every weight, no more, no less (inv_freq is a buffer)
    worst = 0.0
    for n, g in zip(names, grads):
        ref = pt_grads[n]
        if ref is None:  # not part of the loss (the contact head): no gradient on either side
            assert g is None or float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) == 0.0, n
            continue
        assert g is not None, n
        g = tf.convert_to_tensor(g).numpy()
        g = g.T if hub[n][1] else g
        d = maxdiff(ref, g)
        assert d < TOL, (n, d)
        worst = max(worst, d)
    return worst


@pytest.mark.parametrize("head", ["mlm", "seq", "tok"])
def test_gradients_match_every_weight(hub_dir, flavour, head):
    pt_model, tf_model = _pair(hub_dir(flavour, head), head)
    ids, mask = make_batch(seed=5)
    labels = random_labels(head, ids, mask)
    _compare_gradients(
        pt_model, tf_model,
        lambda m: m(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss,
        lambda m: m(ids, attention_mask=mask, labels=labels, training=True).loss)


@pytest.mark.parametrize("variant", ["regression1", "multi"])
def test_gradients_match_other_problem_types(hub_dir, variant):
    num_labels, problem_type, kind = SEQ_VARIANTS[variant]
    d = hub_dir("esm2", "seq", num_labels=num_labels, problem_type=problem_type)
    pt_model, tf_model = _pair(d, "seq")
    ids, mask = make_batch(seed=6)
    labels = random_labels("seq", ids, mask, num_labels, kind)
    _compare_gradients(
        pt_model, tf_model,
        lambda m: m(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss,
        lambda m: m(ids, attention_mask=mask, labels=labels, training=True).loss)


def test_gradients_match_base_model_with_pooler(hub_dir, flavour):
    from esm_dual.io.hub import load_checkpoint

    cfg = tiny_config(flavour)
    tensors = dict(load_checkpoint(hub_dir(flavour, "base")).tensors)
    rng = np.random.default_rng(0)
    tensors["pooler.dense.weight"] = rng.normal(0, 0.2, (18, 18)).astype(np.float32)
    tensors["pooler.dense.bias"] = rng.normal(0, 0.2, (18,)).astype(np.float32)
    pt_model = P.EsmModel(cfg, add_pooling_layer=True)
    tf_model = T.TFEsmModel(cfg, add_pooling_layer=True)
    pt_model.load_hub_tensors(tensors)
    tf_model.load_hub_tensors(tensors)
    ids, mask = make_batch(seed=7)
    r = np.random.default_rng(0).normal(size=(*ids.shape, 18)).astype(np.float32)
    q = np.random.default_rng(1).normal(size=(ids.shape[0], 18)).astype(np.float32)

    def pt_loss(m):
        out = m(torch.tensor(ids), attention_mask=torch.tensor(mask))
        return (out.last_hidden_state * torch.tensor(r)).sum() + (out.pooler_output * torch.tensor(q)).sum()

    def tf_loss(m):
        out = m(ids, attention_mask=mask, training=True)
        return tf.reduce_sum(out.last_hidden_state * r) + tf.reduce_sum(out.pooler_output * q)

    _compare_gradients(pt_model, tf_model, pt_loss, tf_loss)


# ------------------------------------------------------------------------------------------------
# Checkpoints across frameworks
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")  # contact head
@pytest.mark.parametrize("head", ["mlm", "seq", "tok"])
def test_keras_trained_model_loads_in_pytorch_and_transformers(hub_dir, tmp_path, head):
    import keras

    tf_model = TF[head].from_pretrained(hub_dir("esm1b", head))
    ids, mask = make_batch(seed=8)
    labels = random_labels(head, ids, mask)
    before = {n: v.numpy().copy() for n, (v, _) in hub_variable_map(tf_model).items()}
    tf_model.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)  # graph modes: tests/tf
    tf_model.fit({"input_ids": ids, "attention_mask": mask}, labels, epochs=1, batch_size=4, verbose=0)
    after = hub_variable_map(tf_model)
    changed = [n for n, (v, _) in after.items() if not np.array_equal(before[n], v.numpy())]
    assert len(changed) > 10  # training moved the weights
    tf_model.save_pretrained(str(tmp_path))
    pt_model = PT[head].from_pretrained(str(tmp_path))
    ref = hf_model(str(tmp_path), head=head)
    out_tf = tf_model(ids, attention_mask=mask).logits
    with torch.no_grad():
        out_pt = pt_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        out_hf = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert maxdiff(out_pt, out_tf) < TOL
    assert maxdiff(out_hf, out_tf) < TOL
    # The saved tensors are the Keras variables, bit for bit.
    for n, (v, transposed) in hub_variable_map(tf_model).items():
        w = pt_model._hub_state()[n].numpy()
        assert np.array_equal(w.T if transposed else w, v.numpy()), n


@pytest.mark.parametrize("head", HEADS)
def test_pytorch_saved_model_loads_in_tf(tmp_path, head):
    torch.manual_seed(0)
    pt_model = PT[head](tiny_config("esm2", num_labels=3))
    with torch.no_grad():
        for p in pt_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pt_model.save_pretrained(str(tmp_path))
    tf_model = TF[head].from_pretrained(str(tmp_path))
    ids, mask = make_batch(seed=9)
    key = "last_hidden_state" if head == "base" else "logits"
    with torch.no_grad():
        a = pt_model(torch.tensor(ids), attention_mask=torch.tensor(mask))[key]
    assert maxdiff(a, tf_model(ids, attention_mask=mask)[key]) < TOL
    # and back: TF's save is the same file content
    tf_model.save_pretrained(str(tmp_path / "again"))
    again = PT[head].from_pretrained(str(tmp_path / "again"))
    for n, t in pt_model._hub_state().items():
        assert torch.equal(t, again._hub_state()[n]), n


def test_fair_esm_file_loads_in_tf_like_pt(tmp_path, flavour):
    from esm_dual.io.fair_esm import save_fair_esm
    from tests.utils import random_hub_tensors

    stem = {"esm2": "esm2_t3_18_tiny", "esm1b": "esm1b_t3_18_tiny", "esm1v": "esm1v_t3_18_tiny_1"}[flavour]
    cfg = tiny_config(flavour, intermediate_size=72)  # fair-esm's ESM2 hard-codes the FFN width to 4 * D
    path = tmp_path / f"{stem}.pt"
    save_fair_esm(str(path), cfg, random_hub_tensors(cfg, "mlm", seed=4))
    pt_model = P.EsmForMaskedLM.from_pretrained(str(path))
    tf_model = T.TFEsmForMaskedLM.from_pretrained(str(path))
    if flavour != "esm2":  # fair-esm zeroes the <mask> row of ESM-1b/1v embeddings
        assert np.all(tf_model.esm.embeddings.word_embeddings.embeddings.numpy()[32] == 0)
    ids, mask = make_batch(seed=10)
    with torch.no_grad():
        a = pt_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert maxdiff(a, tf_model(ids, attention_mask=mask).logits) < TOL
