"""HF habits in esm_dual.tf: from_pretrained's loading arguments, push_to_hub through huggingface_hub (a local
fake), and prepare_tf_dataset over ``datasets`` rows."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
datasets = pytest.importorskip("datasets")

from esm_dual.common.hf_hub import LoadingArgumentError  # noqa: E402
from esm_dual.common.tokenizer import EsmTokenizer  # noqa: E402
from esm_dual.tf import TFEsmForSequenceClassification, TFEsmForTokenClassification  # noqa: E402
from esm_dual.tf.hf_data import prepare_tf_dataset  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.utils import write_hub_checkpoint  # noqa: E402

datasets.disable_progress_bars()
SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MKV", "ACDEFGHIKLMN", "W", "MKKLLPTAAAGLLLLAAQPAMA", "GSHMAS", "MKTAY"]


@pytest.fixture(scope="module")
def seq_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfhub") / "seq")
    write_hub_checkpoint(d, tiny_config("esm2"), "seq", seed=3)
    return d


def _probe(model):
    enc = EsmTokenizer()(["MKTAYIAK", "ACD"], padding=True, return_tensors="np")
    return np.asarray(model(dict(enc)).logits)


def test_tf_from_pretrained_hub_arguments(seq_ckpt, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    snap = tmp_path / "snap"
    shutil.copytree(seq_ckpt, snap / "sub")
    seen = []

    def snapshot_download(repo_id, **kwargs):
        seen.append({"repo_id": repo_id, **kwargs})
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = TFEsmForSequenceClassification.from_pretrained(
        "someone/tiny-esm", revision="v1", token="hf_SECRET", cache_dir=str(tmp_path / "c"), subfolder="sub",
        device_map="cpu", attn_implementation="sdpa")
    assert seen[0]["revision"] == "v1" and seen[0]["token"] == "hf_SECRET"
    assert all(p.startswith("sub/") for p in seen[0]["allow_patterns"])
    np.testing.assert_allclose(_probe(model), _probe(TFEsmForSequenceClassification.from_pretrained(seq_ckpt)),
                               atol=1e-6)
    model.save_pretrained(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "hf_SECRET" not in json.dumps(cfg) and "revision" not in cfg and "device_map" not in cfg
    with pytest.raises(LoadingArgumentError, match="'output_loading_info'"):
        TFEsmForSequenceClassification.from_pretrained(seq_ckpt, output_loading_info=True)
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        TFEsmForSequenceClassification.from_pretrained(seq_ckpt, attn_implementation="flash_attention_2")


def test_tf_push_to_hub(seq_ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    from tests.pt.test_hf_surface import FakeHfApi

    FakeHfApi.root, FakeHfApi.calls = str(tmp_path / "hub"), []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    model = TFEsmForSequenceClassification.from_pretrained(seq_ckpt)
    model.push_to_hub("me/tf-esm", token="hf_SECRET")
    repo = tmp_path / "hub" / "me" / "tf-esm"
    assert {"config.json", "model.safetensors"} <= set(os.listdir(repo))
    np.testing.assert_allclose(_probe(TFEsmForSequenceClassification.from_pretrained(str(repo))), _probe(model),
                               atol=1e-6)


def _rows(tok, token_labels):
    ds = datasets.Dataset.from_dict({"seq": SEQS, "y": [0, 1, 1, 0, 1, 0, 1]})

    def enc(batch):
        out = tok(batch["seq"])
        out["labels"] = ([[-100] + [ord(c) % 2 for c in s] + [-100] for s in batch["seq"]] if token_labels
                         else batch["y"])
        return out

    return ds.map(enc, batched=True, remove_columns=["seq", "y"])


def test_prepare_tf_dataset_pads_per_bucket_and_fits():
    tok = EsmTokenizer()
    ds = _rows(tok, token_labels=True)
    tfds = prepare_tf_dataset(ds, tok, batch_size=2, shuffle=True, seed=0, bucket_boundaries=(8, 16))
    seen = []
    for x, y in tfds:
        L = x["input_ids"].shape[1]
        assert L in (8, 16, 24) and y.shape == x["input_ids"].shape
        assert x["input_ids"].dtype == tf.int32
        ids, mask, lab = x["input_ids"].numpy(), x["attention_mask"].numpy(), y.numpy()
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            assert (ids[r, n:] == tok.pad_token_id).all() and (lab[r, n:] == -100).all()
            seen.append(tuple(ids[r, :n]))
    assert sorted(seen) == sorted(tuple(r) for r in ds["input_ids"])
    order1 = [tuple(x["input_ids"].numpy()[:, 1]) for x, _ in tfds]
    order2 = [tuple(x["input_ids"].numpy()[:, 1]) for x, _ in tfds]
    assert order1 != order2 or len(order1) == 1  # reshuffled every epoch
    model = TFEsmForTokenClassification(tiny_config("esm2"))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    history = model.fit(tfds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_prepare_tf_dataset_sequence_labels_and_hf_collator():
    transformers = pytest.importorskip("transformers")
    tok = EsmTokenizer()
    ds = _rows(tok, token_labels=False)
    tfds = prepare_tf_dataset(ds, tok, max_tokens=48)
    for x, y in tfds:
        assert y.shape == (x["input_ids"].shape[0],) and x["input_ids"].shape[0] * x["input_ids"].shape[1] <= 48
    mlm = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.5, return_tensors="np", seed=0)
    plain = ds.remove_columns(["labels"])
    tfds = prepare_tf_dataset(plain, tok, batch_size=4, collate_fn=mlm)
    (x, y), = list(tfds.take(1))
    assert (y.numpy() != -100).any() and ((x["input_ids"].numpy() == tok.mask_token_id) | (y.numpy() == -100)).any()
    with pytest.raises(ValueError, match="input_ids"):
        prepare_tf_dataset(datasets.Dataset.from_dict({"seq": ["MKV"]}), tok)
