"""EmbeddingStore / EmbeddingWriter: the columnar HDF5 layout, reading back, resuming, crash safety."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from esm_dual.common.embeddings import EmbeddingStore, EmbeddingStoreError, EmbeddingWriter

D = 5
LAYERS = [0, 3]
ALL = ["mean", "per_tok", "bos", "contacts"]


def _batch(rng, ids, lengths):
    return dict(
        ids=ids, lengths=lengths, descriptions=[f"{i} some description" for i in ids],
        mean={layer: rng.normal(size=(len(ids), D)).astype(np.float32) for layer in LAYERS},
        bos={layer: rng.normal(size=(len(ids), D)).astype(np.float32) for layer in LAYERS},
        per_tok={layer: [rng.normal(size=(n, D)).astype(np.float32) for n in lengths] for layer in LAYERS},
        contacts=[rng.random((n, n)).astype(np.float32) for n in lengths],
    )


def _writer(path, include=ALL, layers=LAYERS, model="tiny", **kw):
    return EmbeddingWriter(path, layers=layers, include=include, hidden_size=D, num_layers=3,
                           identity={"model": model}, metadata={"backend": "pt"}, **kw)


def _append(w, b, **kw):
    w.append(b["ids"], b["lengths"], descriptions=b["descriptions"],
             **{k: b[k] for k in ("mean", "bos", "per_tok", "contacts") if k in w.include}, **kw)


def _check(store, b, i):
    rec = store[b["ids"][i]]
    n = b["lengths"][i]
    assert rec["length"] == n and rec["description"] == b["descriptions"][i]
    for layer in LAYERS:
        np.testing.assert_array_equal(rec["mean"][layer], b["mean"][layer][i])
        np.testing.assert_array_equal(rec["bos"][layer], b["bos"][layer][i])
        np.testing.assert_array_equal(rec["per_tok"][layer], b["per_tok"][layer][i])
    np.testing.assert_array_equal(rec["contacts"], b["contacts"][i])


def test_round_trip_and_mapping_api(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "e.h5"
    b1 = _batch(rng, ["a", "b", "c"], [4, 1, 7])
    b2 = _batch(rng, ["d", "e"], [2, 9])
    with _writer(path, compression="gzip") as w:
        _append(w, b1)
        _append(w, b2)
        assert len(w) == 5 and "d" in w
    with EmbeddingStore(path) as store:
        assert len(store) == 5
        assert list(store) == ["a", "b", "c", "d", "e"]
        assert "c" in store and "zz" not in store
        assert store.layers == LAYERS and store.hidden_size == D
        assert store.model == "tiny"
        md = store.metadata
        assert md["backend"] == "pt" and md["layers"] == LAYERS and md["count"] == 5
        assert md["dims"] == {"mean": (D,), "per_tok": ("N", D), "bos": (D,), "contacts": ("N", "N")}
        for i in range(3):
            _check(store, b1, i)
        for i in range(2):
            _check(store, b2, i)
        # Layer keys are ints; bulk columns in store order.
        assert set(store["a"]["mean"]) == {0, 3}
        np.testing.assert_array_equal(store.mean(3), np.concatenate([b1["mean"][3], b2["mean"][3]]))
        np.testing.assert_array_equal(store.lengths, [4, 1, 7, 2, 9])
        with pytest.raises(KeyError, match="no record 'nope' in .*"):
            store["nope"]
        assert store.get("nope") is None
        with pytest.raises(KeyError, match="layer 1"):
            store.mean(1)
    with pytest.raises(EmbeddingStoreError, match="the store is closed"):
        store["a"]
    with pytest.raises(EmbeddingStoreError, match="the store is closed"):
        store.mean(3)
    # The layout is columnar: one concatenated per_tok dataset per layer, flattened contacts.
    with h5py.File(path, "r") as f:
        assert f["per_tok/3"].shape == (23, D)
        assert f["contacts"].shape == (16 + 1 + 49 + 4 + 81,)
        assert f["mean/0"].maxshape == (None, D) and f["mean/0"].chunks is not None
        assert f["mean/0"].compression == "gzip"


def test_only_some_kinds(tmp_path):
    rng = np.random.default_rng(1)
    b = _batch(rng, ["x", "y"], [3, 2])
    with _writer(tmp_path / "m.h5", include=["mean"]) as w:
        _append(w, b)
    with EmbeddingStore(tmp_path / "m.h5") as store:
        rec = store["y"]
        assert set(rec) == {"id", "description", "length", "mean"}
        np.testing.assert_array_equal(rec["mean"][0], b["mean"][0][1])


def test_resume_appends_and_refuses_conflicts(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "r.h5"
    b1, b2 = _batch(rng, ["a", "b"], [3, 4]), _batch(rng, ["c"], [5])
    with _writer(path) as w:
        _append(w, b1)
    with _writer(path) as w:  # same identity: resumes
        assert w.ids == {"a", "b"}
        _append(w, b2)
        with pytest.raises(EmbeddingStoreError, match="already stored"):
            _append(w, b1)
    with EmbeddingStore(path) as store:
        assert list(store) == ["a", "b", "c"]
        _check(store, b2, 0)
    with pytest.raises(EmbeddingStoreError, match="model: stored 'tiny', this run 'other'"):
        _writer(path, model="other")
    with pytest.raises(EmbeddingStoreError, match="layers"):
        _writer(path, layers=[0, 2])
    with pytest.raises(EmbeddingStoreError, match="include"):
        _writer(path, include=["mean"])


def test_uncommitted_rows_are_invisible_and_cut_on_resume(tmp_path):
    """A writer that dies after writing a batch's rows but before committing leaves a readable store."""
    rng = np.random.default_rng(3)
    path = tmp_path / "c.h5"
    b1, b2, b3 = _batch(rng, ["a", "b"], [3, 4]), _batch(rng, ["c", "d"], [6, 2]), _batch(rng, ["e"], [1])

    def crash():
        raise RuntimeError("killed")

    w = _writer(path)
    _append(w, b1)
    with pytest.raises(RuntimeError, match="killed"):
        _append(w, b2, _before_commit=crash)
    w._f.flush()  # the rows of b2 reach the file; the counters do not
    with h5py.File(path, "r") as f:
        assert f["ids"].shape[0] == 4 and f.attrs["n_committed"] == 2
    w.close()
    with EmbeddingStore(path) as store:
        assert list(store) == ["a", "b"]
        _check(store, b1, 1)
    with _writer(path) as w:  # resuming rebuilds the store from the committed rows
        assert w.repaired == 2
        _append(w, b3)
    with _writer(path) as w:  # a clean store is not rebuilt
        assert w.repaired is None
    with EmbeddingStore(path) as store:
        assert list(store) == ["a", "b", "e"]
        _check(store, b3, 0)
        assert store._f["per_tok/0"].shape[0] == 3 + 4 + 1


def test_not_a_store(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(EmbeddingStoreError, match="not an esm-dual embedding store"):
        EmbeddingStore(tmp_path / "other.h5")
    with pytest.raises(EmbeddingStoreError, match="not an esm-dual embedding store"):
        _writer(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_text("hello")
    with pytest.raises(EmbeddingStoreError, match="cannot open as HDF5"):
        EmbeddingStore(tmp_path / "junk.h5")
    with pytest.raises(FileNotFoundError):
        EmbeddingStore(tmp_path / "missing.h5")


def test_shape_checks(tmp_path):
    rng = np.random.default_rng(4)
    b = _batch(rng, ["a"], [3])
    b["mean"][0] = np.zeros((1, D + 1), np.float32)
    with _writer(tmp_path / "s.h5") as w, pytest.raises(ValueError, match=r"mean\[0\]"):
        _append(w, b)
