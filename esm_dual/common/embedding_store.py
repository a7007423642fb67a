"""EmbeddingStore: a columnar HDF5 file of per-sequence embeddings that scales to millions of records; the
format and the reader.

Written by ``esm-dual embed --format h5``; framework-neutral (numpy + h5py only).

Layout (``L`` = a layer index as written by ``embed``, non-negative; ``n`` records, ``D`` hidden size)::

    /                      attrs: format, version, n_committed, n_residues, n_contact_values,
                                  layers, include, hidden_size, num_layers, identity, metadata (JSON)
    ids            [n]     utf-8 record ids (the first word of the FASTA header)
    descriptions   [n]     utf-8 full header lines
    lengths        [n]     int32 residues stored (after truncation)
    input_index    [n]     int64 the record's position in the input FASTA (readers list records in this order)
    seq_hash       [n]     S32 hex digest of the sequence embedded (``sequence_hash``; resume compares it)
    mean/L         [n, D]  float32 mean over residues (BOS/EOS excluded)            (include "mean")
    bos/L          [n, D]  float32 BOS (<cls>) state                                   (include "bos")
    per_tok/L      [R, D]  float32 residue states of all records, concatenated       (include "per_tok")
    per_tok_offsets [n]    int64 first row of each record in per_tok/L
    contacts       [C]     float32 flattened [N, N] contact maps, concatenated       (include "contacts")
    contacts_offsets [n]   int64 first element of each record in contacts

Rows are stored in the order they were written (``embed`` batches by length); the reader lists records in
input order (``input_index``), so ``store.ids``, iteration, ``record(i)``, ``lengths`` and the column
readers all follow the FASTA.

The writer (``EmbeddingWriter``: create, resume, crash-safe append, drop; ``merge_stores``) is in
``common.embeddings``, which also re-exports this module's public names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

FORMAT = "esm-dual-embeddings"
VERSION = 2  # 2: input_index and seq_hash
KINDS = ("mean", "per_tok", "bos", "contacts")


class EmbeddingStoreError(ValueError):
    """The file is not a usable embedding store, or was written with conflicting options."""


def sequence_hash(sequence: str) -> str:
    """The digest a store records for a sequence (32 hex characters of BLAKE2b)."""
    return hashlib.blake2b(sequence.encode("utf-8"), digest_size=16).hexdigest()


def h5py_module():
    """h5py, imported on first use."""
    import h5py

    return h5py


def decode_str(x: Any) -> str:
    """An HDF5 string (bytes or str) as str."""
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def open_h5(path: str, mode: str):
    """The HDF5 file at ``path``; a file in use or not HDF5 is an EmbeddingStoreError naming it."""
    h5py = h5py_module()
    try:
        return h5py.File(path, mode)
    except OSError as e:
        msg = str(e)
        if "lock" in msg.lower():
            raise EmbeddingStoreError(
                f"{path}: the file is in use by another process (HDF5 file lock); wait for it to finish"
            ) from None
        raise EmbeddingStoreError(f"{path}: cannot open as HDF5 ({msg.splitlines()[0]}); "
                                  "is it an esm-dual embedding store?") from None


def check_format(f, path: str) -> None:
    """Refuse an HDF5 file that is not a store, or a store newer than this esm-dual reads."""
    if f.attrs.get("format") != FORMAT:
        raise EmbeddingStoreError(f"{path} is an HDF5 file but not an esm-dual embedding store")
    version = int(f.attrs.get("version", 0))
    if version > VERSION:
        raise EmbeddingStoreError(f"{path}: store version {version} is newer than this esm-dual "
                                  f"understands ({VERSION}); upgrade esm-dual")


class EmbeddingStore(Mapping):
    """Read an embedding store: ``store[record_id]["mean"][layer]`` -> np.ndarray [D].

    ``store[id]`` is a dict with the kinds the store holds: ``"mean"``/``"bos"`` {layer: [D]},
    ``"per_tok"`` {layer: [N, D]}, ``"contacts"`` [N, N], plus ``"length"``, ``"description"`` and
    ``"sequence_hash"``. Layer keys are the ints ``embed`` wrote (negative indices normalised).
    Everything is in input (FASTA) order, whatever order the rows were written in: iteration, ``ids``,
    ``record(i)``, ``lengths`` and the column readers ``mean(layer)`` / ``bos(layer)`` ([n, D] for all
    records); ``len``, ``in``, ``metadata``, ``layers``, ``hidden_size`` are there for bulk use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no embedding store at {self.path}")
        self._f = open_h5(self.path, "r")
        try:
            check_format(self._f, self.path)
        except BaseException:
            self._f.close()
            raise
        a = self._f.attrs
        self._n = int(a["n_committed"])
        self.layers: list[int] = json.loads(a["layers"])
        self.include: list[str] = json.loads(a["include"])
        self.hidden_size: int = int(a["hidden_size"])
        self.num_layers: int = int(a["num_layers"])
        self.identity: dict[str, Any] = json.loads(a["identity"])
        self._metadata: dict[str, Any] = json.loads(a["metadata"])
        self._ids: list[str] | None = None
        self._index: dict[str, int] | None = None
        if "input_index" in self._f:  # version 2: rows in written order, records listed in input order
            self._order = np.argsort(self._f["input_index"][: self._n], kind="stable")
        else:
            self._order = np.arange(self._n)

    @property
    def _file(self):
        if self._f is None:
            raise EmbeddingStoreError(f"{self.path}: the store is closed (reopen it with EmbeddingStore(path))")
        return self._f

    # ---- metadata ------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        out = dict(self._metadata)
        out.update(self.identity)
        out.update(layers=self.layers, include=self.include, hidden_size=self.hidden_size,
                   num_layers=self.num_layers, count=self._n, dims=self.dims)
        return out

    @property
    def writer_metadata(self) -> dict[str, Any]:
        """The ``metadata`` the writer was given, as stored (``metadata`` adds the identity and the shapes)."""
        return dict(self._metadata)

    @property
    def model(self) -> str | None:
        return self.identity.get("model", self._metadata.get("model"))

    @property
    def dims(self) -> dict[str, tuple]:
        """Per-record shapes: {"mean": (D,), "bos": (D,), "per_tok": ("N", D), "contacts": ("N", "N")}."""
        D = self.hidden_size
        shapes = {"mean": (D,), "bos": (D,), "per_tok": ("N", D), "contacts": ("N", "N")}
        return {k: shapes[k] for k in self.include}

    # ---- ids -----------------------------------------------------------------------------------
    @property
    def row_ids(self) -> list[str]:
        """Ids in the order the rows are stored (written), which ``row(i)`` follows."""
        return [decode_str(x) for x in self._file["ids"][: self._n]]

    @property
    def ids(self) -> list[str]:
        """Record ids in input (FASTA) order."""
        if self._ids is None:
            rows = self.row_ids
            self._ids = [rows[j] for j in self._order]
        return self._ids

    @property
    def sequence_hashes(self) -> dict[str, str]:
        """id -> :func:`sequence_hash` of the sequence embedded ("" where not recorded; {} for stores older than
        version 2)."""
        if "seq_hash" not in self._file:
            return {}
        return dict(zip(self.row_ids, (decode_str(h) for h in self._file["seq_hash"][: self._n])))

    def _idx(self, record_id: str) -> int:
        if self._index is None:
            self._index = {r: i for i, r in enumerate(self.ids)}
        try:
            return self._index[record_id]
        except KeyError:
            raise KeyError(f"no record {record_id!r} in {self.path}") from None

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __contains__(self, record_id: object) -> bool:
        if self._index is None:
            self._index = {r: i for i, r in enumerate(self.ids)}
        return record_id in self._index

    @property
    def lengths(self) -> np.ndarray:
        return self._file["lengths"][: self._n].astype(np.int64)[self._order]

    # ---- records -------------------------------------------------------------------------------
    def __getitem__(self, record_id: str) -> dict[str, Any]:
        return self.record(self._idx(record_id))

    def record(self, i: int) -> dict[str, Any]:
        """The i-th record in input order (see ``__getitem__``)."""
        if not 0 <= i < self._n:
            raise IndexError(f"record index {i} out of range (store has {self._n})")
        return self.row(int(self._order[i]))

    def row(self, i: int) -> dict[str, Any]:
        """The record stored in row ``i`` (written order, as ``row_ids``; ``record(i)`` is input order)."""
        f = self._file
        n = int(f["lengths"][i])
        out: dict[str, Any] = {"id": decode_str(f["ids"][i]), "description": decode_str(f["descriptions"][i]),
                               "length": n}
        if "seq_hash" in f:
            out["sequence_hash"] = decode_str(f["seq_hash"][i])
            out["input_index"] = int(f["input_index"][i])
        for kind in ("mean", "bos"):
            if kind in self.include:
                out[kind] = {layer: f[f"{kind}/{layer}"][i] for layer in self.layers}
        if "per_tok" in self.include:
            start = int(f["per_tok_offsets"][i])
            out["per_tok"] = {layer: f[f"per_tok/{layer}"][start : start + n] for layer in self.layers}
        if "contacts" in self.include:
            start = int(f["contacts_offsets"][i])
            out["contacts"] = f["contacts"][start : start + n * n].reshape(n, n)
        return out

    def _column(self, kind: str, layer: int) -> np.ndarray:
        if kind not in self.include:
            raise KeyError(f"{self.path} holds no {kind!r} embeddings (it has {self.include})")
        if layer not in self.layers:
            raise KeyError(f"{self.path} holds no layer {layer} (it has {self.layers})")
        return self._file[f"{kind}/{layer}"][: self._n][self._order]

    def mean(self, layer: int) -> np.ndarray:
        """Mean embeddings of every record, [n, D], in input order (as ``ids``)."""
        return self._column("mean", layer)

    def bos(self, layer: int) -> np.ndarray:
        """BOS embeddings of every record, [n, D], in input order (as ``ids``)."""
        return self._column("bos", layer)

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EmbeddingStore({self.path!r}, records={self._n}, model={self.model!r}, "
                f"layers={self.layers}, include={self.include}, hidden_size={self.hidden_size})")


__all__ = ["FORMAT", "KINDS", "VERSION", "EmbeddingStore", "EmbeddingStoreError", "check_format", "decode_str",
           "h5py_module", "open_h5", "sequence_hash"]
