"""Make the tiny HF-legacy ``tf_model.h5`` fixtures under ``tests/fixtures/tf_model_h5/``.

NOT part of the test run, and not run with esm-dual's environment: it needs transformers 4.x (the last
major version with TensorFlow models) and tf-keras, in a throwaway virtual environment::

    python3 -m venv /tmp/hf4venv
    /tmp/hf4venv/bin/pip install "transformers<5" tensorflow-cpu tf-keras torch==2.13.0 h5py
    /tmp/hf4venv/bin/python conversion/make_tf_h5_fixture.py tests/fixtures/tf_model_h5

For each tiny config it builds the transformers 4.x TF model (TFEsmForMaskedLM for the ESM-2-like
config, TFEsmForSequenceClassification for the ESM-1b-like one), gives every variable a seeded
random value (LayerNorm gains around 1, biases non-zero, rotary ``inv_freq`` kept), saves it with
``save_pretrained`` (-> ``config.json`` + ``tf_model.h5``), loads that file into the transformers 4.x
*PyTorch* model (``from_pretrained(..., from_tf=True)``) and records its logits on a fixed batch with
padding and ``<mask>`` tokens (``input_ids.npy``, ``attention_mask.npy``, ``logits_pt.npy``: run one
sequence at a time, unpadded, zeros at padding), plus the TF model's own logits on the padded batch
(``logits_tf.npy``).

``--check DIR`` instead loads every ``DIR/*/tf_model.h5`` (e.g. files written by esm-dual's tf-h5
writer) into the transformers 4.x TF model and compares its logits with ``logits_pt.npy`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402

COMMON = dict(
    vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=12, num_hidden_layers=2,
    num_attention_heads=3, intermediate_size=25, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-5, max_position_embeddings=40, initializer_range=0.02,
)
FIXTURES = {
    # ESM-2-like: rotary, token dropout, no embedding LayerNorm; masked LM.
    "esm2_mlm": dict(COMMON, position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                     architectures=["EsmForMaskedLM"]),
    # ESM-1b-like: learned positions, embedding LayerNorm, token dropout; sequence classification.
    "esm1b_seq": dict(COMMON, position_embedding_type="absolute", token_dropout=True, emb_layer_norm_before=True,
                      num_labels=3, architectures=["EsmForSequenceClassification"]),
}


def fixed_batch() -> tuple[np.ndarray, np.ndarray]:
    """[4, 12] token ids with BOS/EOS, padding (1) and <mask> (32); the first row has no <mask>."""
    rng = np.random.default_rng(1234)
    lengths = (10, 6, 8, 3)
    L = max(lengths) + 2
    ids = np.full((len(lengths), L), 1, dtype=np.int32)
    mask = np.zeros((len(lengths), L), dtype=np.int32)
    for b, n in enumerate(lengths):
        res = rng.integers(4, 24, size=n)
        if b > 0:
            res[rng.integers(0, n)] = 32
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = 0, res, 2
        mask[b, :n + 2] = 1
    return ids, mask


def _classes(arch: str):
    import transformers

    tf_cls = getattr(transformers, "TF" + arch)
    pt_cls = getattr(transformers, arch)
    return tf_cls, pt_cls


def pt_tf_twin(pt_cls, config, tf_model):
    """The transformers 4.x PyTorch model with the TF model's weights, names converted by transformers' own
    ``convert_tf_weight_name_to_pt_weight_name`` (``load_tf2_checkpoint_in_pytorch_model`` would re-initialise
    the tied decoder after loading, and with it the word embeddings)."""
    import torch
    from transformers.modeling_tf_pytorch_utils import convert_tf_weight_name_to_pt_weight_name

    pt = pt_cls(config).eval()
    state = pt.state_dict()
    loaded = set()
    for w in tf_model.weights:
        name, transpose = convert_tf_weight_name_to_pt_weight_name(
            w.name, start_prefix_to_remove=tf_model.name + "/", tf_weight_shape=w.shape)
        value = w.numpy()
        if name not in state and (name.endswith("inv_freq") or (
                name.endswith("position_embeddings.weight") and config.position_embedding_type == "rotary")):
            continue  # PT computes inv_freq (same values); ESM-2 PT models have no learned-position table
        if transpose is not None and transpose.name != "NO":
            value = value.T
        assert name in state and tuple(state[name].shape) == value.shape, (w.name, name, value.shape)
        with torch.no_grad():
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        loaded.add(name)
    left = [k for k in state if k not in loaded and not k.endswith(("position_ids", "lm_head.decoder.weight"))]
    assert not left, left
    pt.tie_weights()
    return pt


def make(out_dir: str) -> None:
    import transformers

    ids, mask = fixed_batch()
    for name, cfg in FIXTURES.items():
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        config = transformers.EsmConfig(**cfg)
        tf_cls, pt_cls = _classes(cfg["architectures"][0])
        model = tf_cls(config)
        model(ids, attention_mask=mask)  # build
        rng = np.random.default_rng(0)
        values: dict[str, np.ndarray] = {}
        for w in model.weights:
            if "inv_freq" in w.name:
                continue
            # The TF 4.x MLM head's "tied" decoder is a second variable with the word embeddings' name:
            # give both the same value (as in real files).
            if w.name not in values:
                v = rng.normal(0.0, 0.3, size=tuple(w.shape)).astype(np.float32)
                if "LayerNorm" in w.name or "layer_norm" in w.name:
                    v = v + 1.0 if w.name.endswith("gamma:0") else v
                values[w.name] = v
            w.assign(values[w.name])
        model.save_pretrained(d)
        logits_tf = model(ids, attention_mask=mask).logits.numpy()
        import torch

        pt = pt_tf_twin(pt_cls, config, model)
        # One sequence at a time, unpadded: transformers 4.57's PyTorch ESM disagrees with its TF twin,
        # transformers 5 and esm-dual on the real tokens of padded rows (see NOTE.md). Padding stays 0.
        logits_pt = np.zeros(logits_tf.shape, np.float32)
        with torch.no_grad():
            for b in range(ids.shape[0]):
                n = int(mask[b].sum())
                out = pt(torch.from_numpy(ids[b:b + 1, :n].astype(np.int64))).logits.numpy()
                if out.ndim == 3:
                    logits_pt[b, :n] = out[0]
                else:
                    logits_pt[b] = out[0]
        np.save(os.path.join(d, "input_ids.npy"), ids)
        np.save(os.path.join(d, "attention_mask.npy"), mask)
        np.save(os.path.join(d, "logits_pt.npy"), logits_pt.astype(np.float32))
        np.save(os.path.join(d, "logits_tf.npy"), logits_tf.astype(np.float32))
        m = mask.astype(bool) if logits_tf.ndim == 3 else np.ones(len(ids), bool)
        diff = float(np.max(np.abs(logits_pt - logits_tf)[m]))
        size = os.path.getsize(os.path.join(d, "tf_model.h5"))
        print(json.dumps({"fixture": name, "transformers": transformers.__version__,
                          "max_abs_pt_vs_tf_real_tokens": diff, "bytes": size}))


def check(directory: str) -> int:
    """Load each ``*/tf_model.h5`` under ``directory`` in transformers 4.x TF and compare with logits_pt.npy."""
    import transformers

    ok = True
    for name in sorted(os.listdir(directory)):
        d = os.path.join(directory, name)
        if not os.path.isfile(os.path.join(d, "tf_model.h5")):
            continue
        with open(os.path.join(d, "config.json")) as f:
            arch = json.load(f)["architectures"][0]
        tf_cls, _ = _classes(arch)
        model, info = tf_cls.from_pretrained(d, output_loading_info=True)
        ids = np.load(os.path.join(d, "input_ids.npy"))
        mask = np.load(os.path.join(d, "attention_mask.npy"))
        ref = np.load(os.path.join(d, "logits_pt.npy"))
        got = model(ids, attention_mask=mask).logits.numpy()
        real = mask.astype(bool) if got.ndim == 3 else np.ones(len(ids), bool)
        diff = float(np.max(np.abs(got - ref)[real]))
        bad = info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"] or diff > 1e-4
        ok = ok and not bad
        print(json.dumps({"dir": d, "transformers": transformers.__version__, "max_abs_vs_logits_pt_real_tokens": diff,
                          "loading_info": {k: list(v) for k, v in info.items()}}))
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--check", action="store_true", help="check files instead of making them")
    a = p.parse_args()
    if a.check:
        return check(a.out_dir)
    make(a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
