"""make_pydataset (keras.utils.PyDataset, every backend): the batches of make_dataset (tf.data), its MLM
masking recipe, and fit on the backend of this process."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from esm_dual.tf.batching import IGNORE_INDEX  # noqa: E402
from esm_dual.tf.pydataset import make_pydataset  # noqa: E402
from tests.utils import random_sequences  # noqa: E402

HAS_TF = importlib.util.find_spec("tensorflow") is not None


def _rows(batches, with_labels):
    """Each batch as a sorted tuple of (ids row, label) pairs: order-free comparison."""
    out = []
    for b in batches:
        x, y = (b if with_labels else (b, None))
        ids = np.asarray(x["input_ids"])
        mask = np.asarray(x["attention_mask"])
        rows = []
        for r in range(len(ids)):
            lab = None if y is None else np.asarray(y)[r].tolist()
            rows.append((ids.shape[1], tuple(ids[r].tolist()), tuple(mask[r].tolist()), str(lab)))
        out.append(tuple(sorted(rows)))
    return sorted(out)


@pytest.mark.skipif(not HAS_TF, reason="compares with the tf.data pipeline")
@pytest.mark.parametrize("label_type", ["sequence", "token"])
def test_same_batches_as_make_dataset(label_type):
    from esm_dual.tf.data import make_dataset

    seqs = random_sequences(23, 3, 70, seed=1)
    if label_type == "sequence":
        labels = np.arange(len(seqs)) % 3
    else:
        labels = [np.arange(len(s)) % 2 for s in seqs]
    kw = dict(max_tokens=200, bucket_boundaries=(16, 32, 64), label_type=label_type)
    ours = make_pydataset(seqs, labels, **kw)
    ref = [tuple(e) for e in make_dataset(seqs, labels, **kw).as_numpy_iterator()]
    assert len(ours) == len(ref)
    assert _rows([ours[i] for i in range(len(ours))], True) == _rows(ref, True)


def test_buckets_padding_and_shuffle():
    seqs = random_sequences(30, 3, 60, seed=2)
    ds = make_pydataset(seqs, batch_size=4, bucket_boundaries=(16, 32), shuffle=True, seed=3)
    seen = []
    for i in range(len(ds)):
        x = ds[i]
        L = x["input_ids"].shape[1]
        assert L in (16, 32, 64) and len(x["input_ids"]) <= 4
        lengths = x["attention_mask"].sum(1)
        assert np.all(x["input_ids"][np.arange(len(lengths)), 0] == 0)  # <cls>
        assert np.all(x["input_ids"][np.arange(len(lengths)), lengths - 1] == 2)  # <eos>
        assert np.all(x["input_ids"][x["attention_mask"] == 0] == 1)  # <pad>
        seen += [tuple(r[:n]) for r, n in zip(x["input_ids"], lengths)]
    assert len(seen) == 30
    first = [tuple(ds[i]["input_ids"][0]) for i in range(len(ds))]
    ds.on_epoch_end()
    assert [tuple(ds[i]["input_ids"][0]) for i in range(len(ds))] != first  # a new order every epoch


def test_mlm_masking_recipe():
    seqs = random_sequences(40, 20, 60, seed=4)
    ds = make_pydataset(seqs, mlm=True, batch_size=8, seed=5)
    total = selected = 0
    for i in range(len(ds)):
        x, y = ds[i]
        ids, mask = x["input_ids"], x["attention_mask"]
        sel = y != IGNORE_INDEX
        assert np.all(sel.any(1))  # every sequence has a loss term
        special = np.isin(y, (0, 1, 2, 3, 32))
        assert not np.any(sel & special) and not np.any(sel & (mask == 0))
        assert not np.any(ids[~sel] == 32)  # only selected positions are masked
        total += int((((mask == 1) & ~np.isin(ids, (0, 1, 2, 3, 32))) | sel).sum())
        selected += int(sel.sum())
        # 80% of the selected positions are <mask>
        assert np.mean(ids[sel] == 32) > 0.5
    assert 0.1 < selected / total < 0.22


def test_fit_on_this_backend():
    from esm_dual.tf import TFEsmForSequenceClassification
    from tests.conftest import tiny_config

    seqs = random_sequences(12, 5, 30, seed=6)
    ds = make_pydataset(seqs, np.arange(12) % 2, batch_size=4, bucket_boundaries=(16,))
    model = TFEsmForSequenceClassification(tiny_config("esm2", num_labels=2))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    hist = model.fit(ds, epochs=2, verbose=0)
    assert len(hist.history["loss"]) == 2 and all(np.isfinite(hist.history["loss"]))
