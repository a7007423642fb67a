"""EmbeddingStore / EmbeddingWriter: the columnar HDF5 layout, reading back, resuming, crash safety."""

from __future__ import annotations

import errno
import os

import h5py
import numpy as np
import pytest

from esm_dual.common.embeddings import (
    EmbeddingStore,
    EmbeddingStoreError,
    EmbeddingWriter,
    StoreFullError,
    sequence_hash,
)
from tests.utils import small_disk

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
        assert set(rec) == {"id", "description", "length", "mean", "sequence_hash", "input_index"}
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

    class Killed(BaseException):  # not an Exception: nothing in the writer handles it, as nothing runs after a kill
        pass

    def crash(*_):
        raise Killed("killed")

    w = _writer(path)
    _append(w, b1)
    w._commit = crash  # the process dies between writing the rows and committing them
    with pytest.raises(Killed, match="killed"):
        _append(w, b2)
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


# ---- issue 20: FASTA order; issue 19.1: full disk; 19.4: hashes, dropping changed records -------------------


def test_records_are_listed_in_input_order(tmp_path):
    """Rows are written length-sorted (as embed batches them); every reader follows input_index."""
    rng = np.random.default_rng(5)
    path = tmp_path / "o.h5"
    b1 = _batch(rng, ["c", "a"], [1, 2])
    b2 = _batch(rng, ["d", "b"], [5, 7])
    with _writer(path) as w:
        _append(w, b1, input_index=[2, 0], seq_hashes=[sequence_hash("C"), sequence_hash("AA")])
        _append(w, b2, input_index=[3, 1], seq_hashes=[sequence_hash("D" * 5), sequence_hash("B" * 7)])
        assert w.hashes["a"] == sequence_hash("AA")
    with EmbeddingStore(path) as store:
        assert store.ids == list(store) == ["a", "b", "c", "d"]
        assert store.lengths.tolist() == [2, 7, 1, 5]
        assert store.record(1)["id"] == "b" and store.record(1)["input_index"] == 1
        np.testing.assert_array_equal(store.mean(3), np.stack([b1["mean"][3][1], b2["mean"][3][1],
                                                                b1["mean"][3][0], b2["mean"][3][0]]))
        _check(store, b2, 1)


def test_drop_removes_records_and_keeps_the_rest(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "d.h5"
    b = _batch(rng, ["a", "b", "c"], [3, 4, 2])
    with _writer(path) as w:
        _append(w, b, seq_hashes=["1" * 32, "2" * 32, "3" * 32])
        assert w.drop(["b", "zz"]) == 1
        assert w.ids == {"a", "c"} and w.hashes == {"a": "1" * 32, "c": "3" * 32}
        b2 = _batch(rng, ["b"], [6])
        _append(w, b2, input_index=[1])
    with EmbeddingStore(path) as store:
        assert store.ids == ["a", "b", "c"]
        _check(store, b, 0)
        _check(store, b, 2)
        _check(store, b2, 0)
        assert store._f["per_tok/0"].shape[0] == 3 + 2 + 6


def test_an_older_store_is_read_but_not_resumed(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "v1.h5"
    with _writer(path) as w:
        _append(w, _batch(rng, ["a"], [2]))
    with h5py.File(path, "r+") as f:
        f.attrs["version"] = 1
    with EmbeddingStore(path) as store:
        assert store.ids == ["a"]
    with pytest.raises(EmbeddingStoreError, match="older esm-dual"):
        _writer(path)


def _clean_store(tmp_path, batches):
    clean = tmp_path / "clean.h5"
    with _writer(clean) as w:
        for b in batches:
            _append(w, b)
    return clean


def _assert_committed_identical(path, clean):
    """Every record the store marks committed is byte-identical to the clean run's."""
    with EmbeddingStore(path) as got, EmbeddingStore(clean) as ref:
        for rid in got.ids:
            a, b = got[rid], ref[rid]
            assert a["length"] == b["length"] and a["description"] == b["description"]
            for kind in ("mean", "bos", "per_tok"):
                for layer in LAYERS:
                    assert a[kind][layer].tobytes() == b[kind][layer].tobytes(), (rid, kind, layer)
            assert a["contacts"].tobytes() == b["contacts"].tobytes(), rid
        return len(got)


def test_a_write_that_fails_mid_batch_keeps_the_committed_records(tmp_path, monkeypatch):
    """Fault injection past the free-space check (another process filled the disk): the dataset write raises
    ENOSPC half-way through a batch. The error names the file and the count kept; the store reopens with the
    committed records intact, and a rerun resumes to exactly the clean result."""
    rng = np.random.default_rng(8)
    batches = [_batch(rng, [f"r{i}a", f"r{i}b"], [30 + i, 20 + i]) for i in range(4)]
    clean = _clean_store(tmp_path, batches)
    path = tmp_path / "f.h5"
    w = _writer(path)
    _append(w, batches[0])
    _append(w, batches[1])
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def flaky(self, key, value):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", flaky)
    with pytest.raises(StoreFullError) as err:
        _append(w, batches[2])
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    msg = str(err.value)
    assert str(path) in msg and "disk is full" in msg and "keeps its 4 committed record(s)" in msg
    with pytest.raises(EmbeddingStoreError, match="earlier batch failed"):
        _append(w, batches[3])
    w.close()
    assert _assert_committed_identical(path, clean) == 4
    with _writer(path) as w:
        assert w.repaired == 4
        _append(w, batches[2])
        _append(w, batches[3])
    assert _assert_committed_identical(path, clean) == 8


@pytest.mark.parametrize("size", ["12m", "14m"])
def test_a_full_disk_is_a_clean_error_and_the_store_resumes(tmp_path, size):
    """A real full file system (tmpfs): the error comes before the file is touched, names it and the count
    kept; the store reopens, committed records are byte-identical to a clean run, and after space is freed a
    rerun completes it."""
    rng = np.random.default_rng(9)
    batches = [_batch(rng, [f"r{i}"], [300]) for i in range(30)]  # 360 KB of contacts per record
    clean = _clean_store(tmp_path, batches)
    with small_disk(tmp_path, size) as disk:
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (1 << 20))
        path = disk / "e.h5"
        w = _writer(path)
        done = 0
        with pytest.raises(StoreFullError) as err:
            for b in batches:
                _append(w, b)
                done += 1
        w.close()
        msg = str(err.value)
        assert str(path) in msg and f"keeps its {done} committed record(s)" in msg
        assert 0 < done < len(batches)
        assert _assert_committed_identical(path, clean) == done
        os.remove(ballast)
        with _writer(path) as w:
            for b in batches[done:]:
                try:
                    _append(w, b)
                except StoreFullError:
                    break
                done += 1
        assert _assert_committed_identical(path, clean) == done
