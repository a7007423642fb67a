"""Writing embedding stores: ``EmbeddingWriter`` (create, resume, crash-safe append, drop) and ``merge_stores``.

The format and the reader (``EmbeddingStore``) are in ``common.embedding_store``; this module re-exports their
public names, so ``from esm_dual.common.embeddings import EmbeddingStore, EmbeddingWriter, sequence_hash`` is
the one import users need. Written by ``esm-dual embed --format h5``; framework-neutral (numpy + h5py only).

Every dataset is chunked and resizable along axis 0. Crash safety: before a batch is written the root
attribute ``dirty`` is set to 1 and the file flushed; the rows are written, the file flushed and the rows
read back and compared with what was written; only then are the counters (``n_committed`` ...) updated,
``dirty`` reset and the file flushed again. Readers only ever look at the committed rows. Before a batch
the writer checks that the file system has room for it (new chunks included); a full disk, or any failed
write, is an ``EmbeddingStoreError`` that names the file and the records it keeps, and leaves the
committed records as they were. HDF5 is not journaled, so a writer killed mid-batch can leave the file's free-space
and heap bookkeeping inconsistent for further writes: a resuming writer that finds ``dirty`` set (or rows
past the counters) rebuilds the store from its committed rows into a fresh file before appending.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .embedding_store import (
    FORMAT,
    KINDS,
    VERSION,
    EmbeddingStore,
    EmbeddingStoreError,
    check_format,
    decode_str,
    h5py_module,
    open_h5,
    sequence_hash,
)

_HASH_DTYPE = "S32"
_SLACK = 1 << 20  # free bytes kept beyond a batch's data and new chunks (HDF5 metadata, heaps)
_STR = None  # h5py string dtype, made on first use


class StoreFullError(EmbeddingStoreError):
    """The disk (or quota) has no room for the next batch; the store keeps its committed records."""


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    except (OSError, AttributeError):  # pragma: no cover - no statvfs (Windows)
        return None
    return st.f_bavail * st.f_frsize


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    msg = str(e)
    return "No space left on device" in msg or "errno = 28" in msg or "Disk quota exceeded" in msg


def _str_dtype():
    global _STR
    if _STR is None:
        _STR = h5py_module().string_dtype("utf-8")
    return _STR


def _rows_per_chunk(row_elems: int, target_bytes: int = 1 << 20) -> int:
    return max(1, min(1 << 16, target_bytes // max(1, 4 * row_elems)))


class EmbeddingWriter:
    """Appends batches of records to a store; creates it or resumes an existing one.

    ``identity`` holds everything that must be equal for two runs to write into the same file (model,
    layers, include, truncation, dtype ...); a resumed store with a different identity is refused.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        layers: Sequence[int],
        include: Sequence[str],
        hidden_size: int,
        num_layers: int,
        identity: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        compression: str | None = None,
    ):
        self.path = os.fspath(path)
        self.layers = [int(x) for x in layers]
        self.include = [k for k in KINDS if k in set(include)]
        unknown = set(include) - set(KINDS)
        if unknown:
            raise EmbeddingStoreError(f"unknown include kind(s) {sorted(unknown)}; use {list(KINDS)}")
        if not self.include:
            raise EmbeddingStoreError("nothing to store: include at least one of " + ", ".join(KINDS))
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.identity = dict(identity or {})
        self.identity.update(layers=self.layers, include=self.include, hidden_size=self.hidden_size)
        self.compression = None if compression in (None, "none") else compression
        self.repaired: int | None = None  # committed records kept when an interrupted store was rebuilt
        self._failed: BaseException | None = None  # a write failed: nothing more is written or flushed
        self._hashes: dict[str, str] | None = None
        if os.path.exists(self.path) and self._holds_nothing():
            os.remove(self.path)  # a store that never committed a record pins no options (a failed first run)
        if os.path.exists(self.path):
            self._f = open_h5(self.path, "r+")  # HDF5's file lock: this is the only writer now
            for stale in (self.path + ".rebuild.tmp", self.path + ".drop.tmp"):  # of a run killed mid-rebuild
                if os.path.isfile(stale):
                    os.remove(stale)
            try:
                self._resume()
            except BaseException:
                if self._f:
                    self._f.close()
                raise
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._f = open_h5(self.path, "w")
            try:
                self._create(metadata or {})
            except BaseException:
                self._f.close()
                raise
        self._ids: set[str] | None = None

    # ---- creation / resumption -----------------------------------------------------------------
    def _holds_nothing(self) -> bool:
        """An esm-dual store of this format that has no committed record (else False, also for other files)."""
        try:
            with h5py_module().File(self.path, "r") as f:
                return (f.attrs.get("format") == FORMAT and int(f.attrs.get("version", 0)) <= VERSION
                        and int(f.attrs.get("n_committed", -1)) == 0)
        except Exception:  # not HDF5, unreadable: open_h5 / _resume report it
            return False

    def _dataset(self, name: str, shape_tail: tuple[int, ...], dtype, rows_per_chunk: int | None = None):
        elems = int(np.prod(shape_tail)) if shape_tail else 1
        rows = rows_per_chunk or _rows_per_chunk(elems)
        kw = {"compression": self.compression} if self.compression else {}
        self._f.create_dataset(name, shape=(0, *shape_tail), maxshape=(None, *shape_tail), dtype=dtype,
                               chunks=(rows, *shape_tail), **kw)

    def _create(self, metadata: Mapping[str, Any]) -> None:
        f, D = self._f, self.hidden_size
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["layers"] = json.dumps(self.layers)
        f.attrs["include"] = json.dumps(self.include)
        f.attrs["hidden_size"] = D
        f.attrs["num_layers"] = self.num_layers
        f.attrs["identity"] = json.dumps(self.identity, sort_keys=True)
        f.attrs["metadata"] = json.dumps(dict(metadata), sort_keys=True, default=str)
        self._dataset("ids", (), _str_dtype(), 4096)
        self._dataset("descriptions", (), _str_dtype(), 4096)
        self._dataset("lengths", (), np.int32, 1 << 14)
        self._dataset("input_index", (), np.int64, 1 << 14)
        self._dataset("seq_hash", (), _HASH_DTYPE, 1 << 14)
        for kind in ("mean", "bos", "per_tok"):
            if kind in self.include:
                for layer in self.layers:
                    self._dataset(f"{kind}/{layer}", (D,), np.float32)
        if "per_tok" in self.include:
            self._dataset("per_tok_offsets", (), np.int64, 1 << 14)
        if "contacts" in self.include:
            self._dataset("contacts", (), np.float32, 1 << 18)
            self._dataset("contacts_offsets", (), np.int64, 1 << 14)
        self._commit(0, 0, 0)

    def _resume(self) -> None:
        f = self._f
        check_format(f, self.path)
        if int(f.attrs.get("version", 0)) < VERSION:
            raise EmbeddingStoreError(
                f"{self.path} was written by an older esm-dual (store version {int(f.attrs.get('version', 0))}, "
                "without sequence hashes), so a resumed run could not tell changed sequences; it can still be "
                "read: write new records to another output")
        stored = json.loads(f.attrs["identity"])
        want = json.loads(json.dumps(self.identity, sort_keys=True))
        diffs = [(k, stored.get(k), want.get(k)) for k in sorted(set(stored) | set(want))
                 if stored.get(k) != want.get(k)]
        if diffs:
            err = EmbeddingStoreError(
                f"{self.path} already holds embeddings made with other options ("
                + "; ".join(f"{k}: stored {a!r}, this run {b!r}" for k, a, b in diffs)
                + "). Write to another output, or rerun with the stored options to resume.")
            err.differences = diffs  # type: ignore[attr-defined]
            raise err
        # A writer killed mid-batch: rebuild the store from its committed rows.
        extents = self._extents()
        if int(f.attrs.get("dirty", 0)) or any(f[name].shape[0] != n for name, n in extents.items()):
            self._rebuild(extents)

    def _extents(self) -> dict[str, int]:
        """Dataset name -> committed length along axis 0."""
        n, r, c = self.counts
        out = {name: n for name in self._record_datasets()}
        if "per_tok" in self.include:
            out.update({f"per_tok/{layer}": r for layer in self.layers})
        if "contacts" in self.include:
            out["contacts"] = c
        return out

    def _rebuild(self, extents: dict[str, int], block: int = 1 << 16) -> None:
        old = self._f
        tmp = self.path + ".rebuild.tmp"
        try:
            with h5py_module().File(tmp, "w") as new:
                for k, v in old.attrs.items():
                    new.attrs[k] = v
                for name, n in extents.items():
                    src = old[name]
                    dst = new.create_dataset(name, shape=(n, *src.shape[1:]), maxshape=src.maxshape,
                                             dtype=src.dtype, chunks=src.chunks, compression=src.compression,
                                             compression_opts=src.compression_opts)
                    for s in range(0, n, block):
                        dst[s:min(n, s + block)] = src[s:min(n, s + block)]
                new.attrs["dirty"] = 0
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise EmbeddingStoreError(f"{self.path}: an earlier run was interrupted and its committed records "
                                      f"cannot be read back ({e}); delete the file to start over") from None
        old.close()
        self._f = None
        os.replace(tmp, self.path)
        self._f = open_h5(self.path, "r+")
        self.repaired = self.counts[0]

    def _record_datasets(self) -> list[str]:
        names = ["ids", "descriptions", "lengths", "input_index", "seq_hash"]
        for kind in ("mean", "bos"):
            if kind in self.include:
                names += [f"{kind}/{layer}" for layer in self.layers]
        if "per_tok" in self.include:
            names.append("per_tok_offsets")
        if "contacts" in self.include:
            names.append("contacts_offsets")
        return names

    @property
    def counts(self) -> tuple[int, int, int]:
        a = self._f.attrs
        return int(a["n_committed"]), int(a["n_residues"]), int(a["n_contact_values"])

    def _commit(self, n: int, r: int, c: int) -> None:
        a = self._f.attrs
        a["n_committed"] = n
        a["n_residues"] = r
        a["n_contact_values"] = c
        a["dirty"] = 0
        self._f.flush()

    # ---- queries -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.counts[0]

    @property
    def ids(self) -> set[str]:
        """Ids already committed (what a resumed run skips)."""
        if self._ids is None:
            n = self.counts[0]
            self._ids = {decode_str(x) for x in self._f["ids"][:n]}
        return self._ids

    def __contains__(self, record_id: object) -> bool:
        return record_id in self.ids

    @property
    def hashes(self) -> dict[str, str]:
        """id -> :func:`sequence_hash` of what was embedded, for the committed records."""
        if self._hashes is None:
            n = self.counts[0]
            ids = [decode_str(x) for x in self._f["ids"][:n]]
            self._hashes = dict(zip(ids, (decode_str(h) for h in self._f["seq_hash"][:n])))
        return self._hashes

    def drop(self, record_ids: Sequence[str]) -> int:
        """Remove committed records (a rerun re-embeds changed sequences): the store is rebuilt without them
        into a temporary file that then replaces it. Returns how many were removed."""
        gone = set(record_ids) & self.ids
        if not gone:
            return 0
        tmp = self.path + ".drop.tmp"
        if os.path.exists(tmp):
            os.remove(tmp)
        a = self._f.attrs
        metadata = json.loads(a["metadata"])
        identity = json.loads(a["identity"])
        self.close()
        src = EmbeddingStore(self.path)
        try:
            row_ids = src.row_ids
            rows = [j for j in range(len(src)) if row_ids[j] not in gone]
            with EmbeddingWriter(tmp, layers=self.layers, include=self.include, hidden_size=self.hidden_size,
                                 num_layers=self.num_layers, identity=identity, metadata=metadata,
                                 compression=self.compression) as out:
                _copy_rows(src, out, rows)
        except BaseException:
            src.close()
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        src.close()
        os.replace(tmp, self.path)
        self._f = open_h5(self.path, "r+")
        self._ids = self._hashes = None
        return len(gone)

    def _room_needed(self, new_rows: Mapping[str, tuple[int, int]], strings: int) -> int:
        """Bytes the file may grow by when ``new_rows`` {dataset: (start, end)} are written: whole new chunks
        (HDF5 allocates a chunk at its first write), the string heap and some metadata."""
        need = strings + _SLACK
        for name, (start, end) in new_rows.items():
            ds = self._f[name]
            rows = ds.chunks[0]
            row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
            new_chunks = -(-end // rows) - (-(-start // rows))
            need += new_chunks * rows * row_bytes
        return need

    def _fail(self, e: BaseException, b: int, kept: int) -> EmbeddingStoreError:
        """Turn a failed batch into one error naming the file and what it keeps; stop writing."""
        self._failed = e
        first = " ".join(str(e).split())[:300]
        free = _free_bytes(self.path)
        full = _is_disk_full(e) or (free is not None and free < _SLACK)  # HDF5 does not always say why
        cls = StoreFullError if full else EmbeddingStoreError
        what = "the disk is full" if cls is StoreFullError else f"writing failed ({type(e).__name__}: {first})"
        todo = "Free some space and rerun" if cls is StoreFullError else "Rerun"
        return cls(f"{self.path}: {what}; the batch of {b} record(s) was not stored and the store keeps its "
                   f"{kept} committed record(s). {todo} the same command to resume")

    # ---- writing -------------------------------------------------------------------------------
    def append(
        self,
        ids: Sequence[str],
        lengths: Sequence[int],
        *,
        descriptions: Sequence[str] | None = None,
        mean: Mapping[int, np.ndarray] | None = None,
        bos: Mapping[int, np.ndarray] | None = None,
        per_tok: Mapping[int, Sequence[np.ndarray]] | None = None,
        contacts: Sequence[np.ndarray] | None = None,
        seq_hashes: Sequence[str] | None = None,
        input_index: Sequence[int] | None = None,
    ) -> None:
        """Append one batch and commit it.

        ``mean``/``bos``: {layer: [b, D]}; ``per_tok``: {layer: [[N_i, D]]}; ``contacts``: [[N_i, N_i]];
        ``lengths``: N_i per record; ``seq_hashes``: :func:`sequence_hash` of each sequence (default: none
        recorded); ``input_index``: each record's position in the input (default: after the stored ones).

        The rows are written, flushed and read back before the batch is committed; a failure (a full disk
        included) raises :class:`EmbeddingStoreError` naming the file, and the writer then refuses further
        batches (the committed records stay as they were)."""
        if self._failed is not None:
            raise EmbeddingStoreError(f"{self.path}: an earlier batch failed to write; reopen the store to resume")
        if self._f is None:
            raise EmbeddingStoreError(f"{self.path}: the writer is closed")
        f = self._f
        b = len(ids)
        if b == 0:
            return
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (b,):
            raise ValueError(f"lengths must have one entry per id ({b}), got shape {lengths.shape}")
        dup = [i for i in ids if i in self.ids]
        if dup or len(set(ids)) != b:
            raise EmbeddingStoreError(f"{self.path}: record id(s) already stored: {dup or sorted(ids)[:5]}")
        descriptions = list(descriptions) if descriptions is not None else list(ids)
        n0, r0, c0 = self.counts
        n1 = n0 + b
        hashes = [str(h) for h in seq_hashes] if seq_hashes is not None else [""] * b
        index = np.asarray(input_index if input_index is not None else range(n0, n1), dtype=np.int64)
        if len(hashes) != b or index.shape != (b,):
            raise ValueError(f"seq_hashes and input_index need one entry per id ({b})")

        # Everything is checked and laid out before the file is touched: (dataset, start, values).
        rows: list[tuple[str, int, Any]] = [
            ("ids", n0, np.array([str(i) for i in ids], dtype=object)),
            ("descriptions", n0, np.array([str(d) for d in descriptions], dtype=object)),
            ("lengths", n0, lengths.astype(np.int32)),
            ("input_index", n0, index),
            ("seq_hash", n0, np.array([h.encode("ascii") for h in hashes], dtype=_HASH_DTYPE)),
        ]
        for kind, data in (("mean", mean), ("bos", bos)):
            if kind not in self.include:
                continue
            for layer in self.layers:
                arr = np.asarray(data[layer], dtype=np.float32)  # type: ignore[index]
                if arr.shape != (b, self.hidden_size):
                    raise ValueError(f"{kind}[{layer}] must be [{b}, {self.hidden_size}], got {arr.shape}")
                rows.append((f"{kind}/{layer}", n0, arr))
        r1 = r0
        if "per_tok" in self.include:
            offsets = r0 + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            r1 = r0 + int(lengths.sum())
            for layer in self.layers:
                parts = per_tok[layer]  # type: ignore[index]
                if [len(p) for p in parts] != lengths.tolist():
                    raise ValueError(f"per_tok[{layer}] row counts do not match lengths")
                rows.append((f"per_tok/{layer}", r0, np.concatenate(parts, 0).astype(np.float32, copy=False)))
            rows.append(("per_tok_offsets", n0, offsets.astype(np.int64)))
        c1 = c0
        if "contacts" in self.include:
            sizes = lengths * lengths
            for cmap, n in zip(contacts, lengths):  # type: ignore[arg-type]
                if tuple(np.shape(cmap)) != (n, n):
                    raise ValueError(f"contact map must be [{n}, {n}], got {np.shape(cmap)}")
            offsets = c0 + np.concatenate([[0], np.cumsum(sizes)[:-1]])
            c1 = c0 + int(sizes.sum())
            flat = np.concatenate([np.asarray(m, dtype=np.float32).reshape(-1) for m in contacts])  # type: ignore
            rows.append(("contacts", c0, flat))
            rows.append(("contacts_offsets", n0, offsets.astype(np.int64)))

        free = _free_bytes(self.path)
        strings = sum(len(str(x).encode("utf-8")) + 32 for x in list(ids) + descriptions)
        need = self._room_needed({name: (start, start + len(v)) for name, start, v in rows}, strings)
        if free is not None and free < need:
            raise self._fail(OSError(errno.ENOSPC, "No space left on device"), b, n0)
        try:
            f.attrs["dirty"] = 1
            f.flush()
            for name, start, values in rows:
                ds = f[name]
                ds.resize(start + len(values), axis=0)
                ds[start:start + len(values)] = values
            f.flush()  # the rows reach the file before the counters say they are there
            for name, start, values in rows:  # and read back as written
                back = f[name][start:start + len(values)]
                if back.dtype == object:
                    same = [decode_str(x) for x in back] == [decode_str(x) for x in values]
                else:
                    same = np.array_equal(back, values)
                if not same:
                    raise OSError(f"dataset {name!r} rows {start}..{start + len(values) - 1} read back differently")
        except Exception as e:
            raise self._fail(e, b, n0) from None
        try:
            self._commit(n1, r1, c1)
        except Exception as e:
            try:  # the counters stay those of the last committed batch, also in memory
                a = f.attrs
                a["n_committed"], a["n_residues"], a["n_contact_values"] = n0, r0, c0
            except Exception:
                pass
            raise self._fail(e, b, n0) from None
        if self._ids is not None:
            self._ids.update(str(i) for i in ids)
        if self._hashes is not None:
            self._hashes.update(zip((str(i) for i in ids), hashes))

    def close(self) -> None:
        if self._f:
            f, self._f = self._f, None
            if self._failed is not None:
                # After a failed write HDF5 may fail again while closing; the committed state is on disk
                # already, and the error that matters was raised.
                try:
                    f.close()
                except Exception:
                    pass
                return
            try:
                f.flush()
            finally:
                f.close()

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _copy_rows(store: EmbeddingStore, out: EmbeddingWriter, rows: Sequence[int], block: int = 256) -> int:
    """Append the records stored in ``rows`` of ``store`` to ``out`` (hashes and input positions kept)."""
    for s in range(0, len(rows), block):
        recs = [store.row(j) for j in rows[s:s + block]]
        kw: dict[str, Any] = {}
        for kind in ("mean", "bos"):
            if kind in store.include:
                kw[kind] = {la: np.stack([r[kind][la] for r in recs]) for la in store.layers}
        if "per_tok" in store.include:
            kw["per_tok"] = {la: [r["per_tok"][la] for r in recs] for la in store.layers}
        if "contacts" in store.include:
            kw["contacts"] = [r["contacts"] for r in recs]
        if all("sequence_hash" in r for r in recs):
            kw["seq_hashes"] = [r["sequence_hash"] for r in recs]
            kw["input_index"] = [r["input_index"] for r in recs]
        out.append([r["id"] for r in recs], [r["length"] for r in recs],
                   descriptions=[r["description"] for r in recs], **kw)
    return len(rows)


def merge_stores(path: str | os.PathLike, shards: Sequence[str | os.PathLike], *, compression: str | None = None,
                 block: int = 256) -> int:
    """Append every record of the ``shards`` stores (in order) to the store at ``path``; returns the count added.

    The shards must have been written with the same options (identity). ``path`` is created or resumed:
    ids it already holds are skipped, so an interrupted merge can simply be run again."""
    if not shards:
        raise EmbeddingStoreError("merge_stores: no shard stores given")
    stores = [EmbeddingStore(s) for s in shards]
    try:
        first = stores[0]
        for s in stores[1:]:
            if s.identity != first.identity:
                raise EmbeddingStoreError(f"{s.path} was written with other options than {first.path}; "
                                          "shards of one store must come from one run")
        metadata = dict(first.writer_metadata, shards=len(stores))
        added = 0
        with EmbeddingWriter(path, layers=first.layers, include=first.include, hidden_size=first.hidden_size,
                             num_layers=first.num_layers, identity=first.identity, metadata=metadata,
                             compression=compression) as out:
            for store in stores:
                rows = [j for j, rid in enumerate(store.row_ids) if rid not in out]
                added += _copy_rows(store, out, rows, block)
        return added
    finally:
        for s in stores:
            s.close()


__all__ = ["FORMAT", "KINDS", "VERSION", "EmbeddingStore", "EmbeddingStoreError", "EmbeddingWriter", "StoreFullError",
           "merge_stores", "sequence_hash"]
