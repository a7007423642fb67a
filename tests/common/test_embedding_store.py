"""EmbeddingStore's view of a store: input order vs stored (written) order, the writer's metadata, format checks.

The round trip through EmbeddingWriter, resuming and crash safety are in test_embeddings.py."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from esm_dual.common.embedding_store import EmbeddingStore, EmbeddingStoreError, check_format
from esm_dual.common.embeddings import EmbeddingWriter, sequence_hash


def test_stored_order_and_input_order(tmp_path):
    path = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    mean = {0: rng.normal(size=(3, 4)).astype(np.float32)}
    with EmbeddingWriter(path, layers=[0], include=["mean"], hidden_size=4, num_layers=1,
                         identity={"model": "tiny"}, metadata={"backend": "pt"}) as w:
        w.append(["c", "a", "b"], [3, 1, 2], mean=mean, input_index=[2, 0, 1],
                 seq_hashes=[sequence_hash(s) for s in ("CCC", "A", "BB")])
    with EmbeddingStore(path) as store:
        assert store.row_ids == ["c", "a", "b"]  # as written
        assert store.ids == ["a", "b", "c"]  # as in the input
        assert [store.row(j)["id"] for j in range(3)] == store.row_ids
        assert [store.record(i)["id"] for i in range(3)] == store.ids
        np.testing.assert_array_equal(store.row(0)["mean"][0], mean[0][0])
        assert store.row(1)["sequence_hash"] == sequence_hash("A") and store.row(1)["input_index"] == 0
        assert store.writer_metadata == {"backend": "pt"}
        assert store.metadata["backend"] == "pt" and store.metadata["model"] == "tiny"


def test_a_newer_store_is_refused_by_name(tmp_path):
    path = tmp_path / "new.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "esm-dual-embeddings"
        f.attrs["version"] = 99
    with pytest.raises(EmbeddingStoreError, match=r"new\.h5: store version 99 is newer"):
        EmbeddingStore(path)
    with h5py.File(path, "r") as f, pytest.raises(EmbeddingStoreError, match="newer than this esm-dual"):
        check_format(f, str(path))
