"""Where ``esm-dual embed`` writes: the HDF5 store sink, fair-esm's directory of ``<label>.pt`` files (with its
options file, sequence-hash log and directory lock), and the background thread that writes each batch while the
next one runs on the model.

A sink's ``write`` commits one batch atomically (the store's counters; ``os.replace`` of each ``.pt`` file), so a
run stopped at any point keeps every batch it handed over and leaves nothing a rerun trips on.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from typing import Any

import numpy as np

from ._common import CliError, read_tab_log, warn
from .embed_shards import env_world, run_id

PT_OPTIONS = ".esm-dual-embed.json"  # --format pt: options and weights the files were made with
PT_HASHES = ".esm-dual-embed.tsv"  # --format pt: "<label>\t<sequence hash>" per file written (appended)
_LOCK_PREFIX = ".esm-dual-embed."  # --format pt: ".esm-dual-embed.<pid>.lock" while a run writes there


def pt_path(outdir: str, label: str) -> str:
    """Where ``--format pt`` writes a record (fair-esm: ``OUTPUT/<label>.pt``; '/' makes subdirectories), or a
    CliError naming the record when that path leaves OUTPUT or has a name too long for the file system."""
    path = os.path.normpath(os.path.join(outdir, f"{label}.pt"))
    base = os.path.normpath(os.path.abspath(outdir))
    if os.path.commonpath([base, os.path.abspath(path)]) != base:
        raise CliError(f"record {label!r}: its file {path} would lie outside {outdir} ('..' or an "
                       "absolute path in the header); rename the record")
    limit = _name_max(outdir)
    for part in os.path.relpath(path, outdir).split(os.sep):
        if len(os.fsencode(part)) > limit:
            shown = label if len(label) <= 60 else label[:57] + "..."
            raise CliError(f"record {shown!r}: its file name would be {len(os.fsencode(part))} bytes, longer than "
                           f"the {limit} the file system allows (--format pt names files after the whole "
                           "header line, as fair-esm); shorten the header")
    return path


def _name_max(path: str) -> int:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    try:
        return os.pathconf(path or ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # pragma: no cover
        return 255


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


class DirLock:
    """``OUTDIR/.esm-dual-embed.<pid>.lock`` (holding the run id) while a ``--format pt`` run writes there. A lock
    of a live process of another run is refused with its pid; locks of dead processes are removed."""

    def __init__(self, outdir: str):
        self.outdir = outdir
        self.run = run_id()
        self.path = os.path.join(outdir, f"{_LOCK_PREFIX}{os.getpid()}.lock")
        self.rank, self.world = env_world()
        self._check()
        with open(self.path, "w") as f:
            json.dump({"run": self.run, "rank": self.rank, "world_size": self.world}, f)
        try:
            self._check()  # two runs that started at the same moment: both see each other, both stop
        except CliError:
            self.release()
            raise

    def _check(self) -> None:
        self.siblings = 0  # live locks of other ranks of this job
        for name in os.listdir(self.outdir):
            if not (name.startswith(_LOCK_PREFIX) and name.endswith(".lock")):
                continue
            pid_s = name[len(_LOCK_PREFIX):-len(".lock")]
            if not pid_s.isdigit() or int(pid_s) == os.getpid():
                continue
            path = os.path.join(self.outdir, name)
            try:
                with open(path) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                other = {}
            run = other.get("run") if isinstance(other, dict) else None
            if not _pid_alive(int(pid_s)):
                try:
                    os.remove(path)  # a run that was killed
                except OSError:
                    pass
                continue
            # The ranks of one sharded job (torchrun, or a cluster array's RANK/WORLD_SIZE) share the directory.
            sibling = self.world > 1 and other.get("world_size") == self.world and other.get("rank") != self.rank
            if run == self.run or sibling:
                self.siblings += 1
                continue
            raise CliError(f"{self.outdir}: another embed run (pid {pid_s}) is writing into this directory; "
                           "wait for it to finish or write to another directory")

    def release(self) -> None:
        try:
            os.remove(self.path)
        except OSError:
            pass


class PtSink:
    """fair-esm's layout: ``OUTPUT/<label>.pt`` per record; a record is done when its file exists (and, when
    known, its sequence hash in ``.esm-dual-embed.tsv`` is the one this run embeds)."""

    def __init__(self, outdir: str, include: list[str], options: dict[str, Any], redo: set[str] = frozenset()):
        if os.path.isfile(outdir):
            raise CliError(f"--format pt writes a directory, but {outdir} is a file")
        os.makedirs(outdir, exist_ok=True)
        self.outdir = outdir
        self.include = include
        self.redo = set(redo)  # labels to embed again (--overwrite-changed)
        self.lock = DirLock(outdir)
        try:
            if not self.lock.siblings:
                _remove_stale_pt_tmp(outdir)
            _check_pt_options(outdir, options)
            self.hash_log = open(os.path.join(outdir, PT_HASHES), "a", encoding="utf-8")
        except BaseException:
            self.lock.release()
            raise
        import torch

        self.torch = torch

    def path(self, label: str) -> str:
        return pt_path(self.outdir, label)

    def done(self, label: str) -> bool:
        return label not in self.redo and os.path.exists(self.path(label))

    def write(self, labels, hashes, lengths, rep) -> None:
        torch = self.torch
        for i, label in enumerate(labels):
            n = int(lengths[i])
            result: dict[str, Any] = {"label": label}
            # Fresh tensors (never views into the batch), as fair-esm's .clone().
            if "per_tok" in self.include:
                result["representations"] = {
                    layer: torch.from_numpy(np.array(t[i, 1:n + 1], dtype=np.float32))
                    for layer, t in rep.tokens.items()}
            if "mean" in self.include:
                result["mean_representations"] = {
                    layer: torch.from_numpy(np.array(t[i], dtype=np.float32)) for layer, t in rep.mean.items()}
            if "bos" in self.include:
                result["bos_representations"] = {
                    layer: torch.from_numpy(np.array(t[i], dtype=np.float32)) for layer, t in rep.bos.items()}
            if "contacts" in self.include:
                result["contacts"] = torch.from_numpy(np.array(rep.contacts[i, :n, :n], dtype=np.float32))
            path = self.path(label)
            # Labels with '/' make subdirectories, as in fair-esm.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            try:
                torch.save(result, tmp)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
            os.replace(tmp, path)  # a killed run never leaves a half-written <label>.pt
            self.hash_log.write(f"{_tsv_field(label)}\t{hashes[i]}\n")
        self.hash_log.flush()

    def close(self) -> None:
        self.hash_log.close()
        self.lock.release()


def _remove_stale_pt_tmp(outdir: str) -> None:
    """``<label>.pt.tmp`` files a killed run left (only ours; the directory lock says no run writes now)."""
    for root, _, names in os.walk(outdir):
        for name in names:
            if name.endswith(".pt.tmp") or name == PT_OPTIONS + ".tmp":
                os.remove(os.path.join(root, name))


def _tsv_field(label: str) -> str:
    return label.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _untsv_field(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), text)


def pt_hashes(outdir: str) -> dict[str, str]:
    """label -> sequence hash of the files an earlier ``--format pt`` run wrote (the latest line wins)."""
    return read_tab_log(os.path.join(outdir, PT_HASHES), decode_key=_untsv_field)


def _check_pt_options(outdir: str, options: dict[str, Any]) -> None:
    """The options a ``--format pt`` directory was written with: a rerun with others is refused (as the h5
    store's identity is), once the directory holds a file."""
    path = os.path.join(outdir, PT_OPTIONS)
    want = json.loads(json.dumps(options, sort_keys=True))
    if os.path.isfile(path) and os.path.isfile(os.path.join(outdir, PT_HASHES)) and \
            os.path.getsize(os.path.join(outdir, PT_HASHES)) > 0:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        diffs = [f"{k}: stored {stored.get(k)!r}, this run {want.get(k)!r}" for k in sorted(set(stored) | set(want))
                 if stored.get(k) != want.get(k)]
        if diffs:
            raise CliError(f"{outdir} holds embeddings made with other options ({'; '.join(diffs)}). Write to "
                           "another directory, or rerun with the stored options to resume.")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(want, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class H5Sink:
    def __init__(self, path: str, include: list[str], layers: list[int], runner, args, compression: str,
                 identity: dict[str, Any], redo: set[str] = frozenset()):
        from ..common.embeddings import EmbeddingWriter

        if os.path.isdir(path):
            raise CliError(f"--format h5 writes a file, but {path} is a directory (use --format pt?)")
        from esm_dual import __version__

        metadata = {"backend": runner.backend, "device": runner.device, "esm_dual_version": __version__,
                    "fasta": os.path.abspath(args.fasta), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime())}
        from ..common.embeddings import EmbeddingStoreError

        try:
            self.writer = EmbeddingWriter(path, layers=layers, include=include, hidden_size=runner.hidden_size,
                                          num_layers=runner.num_layers, identity=identity, metadata=metadata,
                                          compression=None if compression == "none" else compression)
        except EmbeddingStoreError as e:
            diffs = dict((k, (a, b)) for k, a, b in getattr(e, "differences", []))
            if "weights" in diffs and diffs["weights"][0] is not None:
                raise CliError(f"{path}: the model's weights changed since this store was written (weights "
                               f"fingerprint {diffs['weights'][0]}, now {diffs['weights'][1]} at {args.model}); "
                               "mixing them would give one sequence two embeddings: write to another output") from None
            raise
        self.include = include
        self.layers = layers
        if self.writer.repaired is not None:
            warn(f"{path}: an earlier run stopped in the middle of a batch; rebuilt the store from its "
                 f"{self.writer.repaired} committed records")
        if redo:
            n = self.writer.drop(sorted(redo))
            if n:
                warn(f"{path}: removed {n} record(s) whose sequence changed, to embed them again "
                     "(--overwrite-changed)")

    def done(self, record_id: str) -> bool:
        return record_id in self.writer

    def write(self, ids, descriptions, hashes, index, lengths, rep) -> None:
        kw: dict[str, Any] = {}
        if "mean" in self.include:
            kw["mean"] = {layer: rep.mean[layer] for layer in self.layers}
        if "bos" in self.include:
            kw["bos"] = {layer: rep.bos[layer] for layer in self.layers}
        if "per_tok" in self.include:
            kw["per_tok"] = {layer: [rep.tokens[layer][i, 1:n + 1] for i, n in enumerate(lengths)]
                             for layer in self.layers}
        if "contacts" in self.include:
            kw["contacts"] = [rep.contacts[i, :n, :n] for i, n in enumerate(lengths)]
        self.writer.append(ids, lengths, descriptions=descriptions, seq_hashes=hashes, input_index=index, **kw)

    def close(self) -> None:
        self.writer.close()


class BackgroundWriter:
    """The sink's writes on one background thread, in order, while the next batch runs on the model.

    At most ``depth`` batches wait to be written (their arrays stay in memory until then). A failed write is
    raised in the main loop, at the next hand-over or at :meth:`wait`, and no later batch is written.
    :meth:`close` waits for every batch already handed over, also when the loop stopped on another error, so a
    stopped run keeps all of them (each write commits atomically, as before)."""

    def __init__(self, depth: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esm-dual-embed-writer")
        self._pending: collections.deque = collections.deque()
        self._failed = False
        self.depth = depth

    def submit(self, fn, *args) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._run, fn, args))

    def _run(self, fn, args) -> None:
        if self._failed:  # after a failed write nothing later is written: the output keeps the batch order
            return
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for the batches handed over; their errors are left to :meth:`wait` (the error that stopped
        the loop is the one to report)."""
        try:
            for f in self._pending:
                f.exception()
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)
