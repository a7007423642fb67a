"""``esm-dual embed``: representations and contact maps of every sequence in a FASTA file.

``--format pt`` is a drop-in for fair-esm's ``esm-extract`` (``scripts/extract.py``): OUTPUT is a
directory with one ``<label>.pt`` per record (label = the whole header line, as fair-esm), holding
exactly fair-esm's dict: ``label``, ``representations`` {layer: [N, D]}, ``mean_representations``
{layer: [D]}, ``bos_representations`` {layer: [D]}, ``contacts`` [N, N].

``--format h5`` (default) writes one columnar HDF5 store (see ``esm_dual.common.embeddings``), read
back with ``esm_dual.EmbeddingStore`` (records listed in FASTA order). Both formats resume: records already
written are skipped. Each run checks what it resumes: the store (or, for ``--format pt``, the hidden
``.esm-dual-embed.json`` / ``.esm-dual-embed.tsv`` beside the files) records the options, a fingerprint of
the model's weight files and a hash of every sequence; other options or new weights are refused by name, and
a record whose sequence changed under the same id is refused too, or re-embedded with ``--overwrite-changed``.

Before the model loads, one pass over the FASTA (the same reader that embeds it) counts the records and
checks them: file names ``--format pt`` would give (colliding labels, names too long for the file system),
changed sequences, and the memory contact maps of the longest record would need.

Sequences are read as a stream, sorted by length within windows of ``--sort-window`` records and
batched by a token budget (fair-esm's ``get_batch_indices``). Means and <cls> rows are reduced on the
model's device; whole [B, L, D] states reach the host only for ``per_tok``. Each batch is written on a
background thread while the next one runs on the model (in order; a stopped run keeps every batch already
handed over, and each batch commits atomically).

Several processes: ``--devices N`` starts N workers (one GPU each when GPUs are visible), or launch
``torchrun --nproc_per_node N -m esm_dual.cli.main embed ...`` (ranks from ``RANK``/``WORLD_SIZE``; no
process group is needed). Rank r embeds records ``shard_range(total, r, N)`` (contiguous, by record index)
into its own resumable store ``OUTPUT.rank{r}-of-{N}.h5``; when all are done, rank 0 (or the ``--devices``
parent, or a later ``embed --merge``) merges them into OUTPUT and removes the shards. ``--format pt``
needs no merge: every rank writes its ``<label>.pt`` files into the same directory. Under torchrun rank 0
waits for the other shards (saying which ones every minute, and giving up after ``ESM_DUAL_MERGE_TIMEOUT``
seconds, default 3600, in which no missing shard made progress); with ``RANK``/``WORLD_SIZE`` alone (separate
jobs of a cluster array) no rank waits: each writes its shard, and ``embed --merge`` joins them. ``--devices``
workers exit when their parent dies.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import signal
import sys
import time
from typing import Any, NamedTuple

import numpy as np

from ._common import (
    CliError,
    UsageError,
    add_model_argument,
    add_model_runtime_arguments,
    add_unknown_residues_argument,
    encode_records,
    load_runner,
    name_list,
    note,
    positive_int,
    progress,
    resolve_positionals,
    token_batches,
    warn,
)

INCLUDE = ("mean", "per_tok", "bos", "contacts")
_CRASH_ENV = "ESM_DUAL_TEST_CRASH"  # private test hook: "raise:K" or "kill:K" (see _CrashHook)
PT_OPTIONS = ".esm-dual-embed.json"  # --format pt: options and weights the files were made with
PT_HASHES = ".esm-dual-embed.tsv"  # --format pt: "<label>\t<sequence hash>" per file written (appended)
_LOCK_PREFIX = ".esm-dual-embed."  # --format pt: ".esm-dual-embed.<pid>.lock" while a run writes there
_MERGE_TIMEOUT_ENV = "ESM_DUAL_MERGE_TIMEOUT"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("_positionals", nargs="*", metavar="[MODEL] FASTA OUTPUT",
                   help="input FASTA file (plain or gzip) and OUTPUT: an HDF5 file (--format h5) or a directory of "
                   "<label>.pt files (--format pt); MODEL first, as in fair-esm's esm-extract, or as --model")
    add_model_argument(p)
    p.add_argument("--repr-layers", "--repr_layers", dest="repr_layers", type=int, nargs="+", default=[-1],
                   metavar="LAYER", help="layers to extract, 0 (embeddings) to num_layers; negative counts "
                   "from the end (default: -1, the last)")
    p.add_argument("--include", nargs="+", choices=INCLUDE, default=["mean"],
                   help="what to store (default: mean)")
    p.add_argument("--toks-per-batch", "--toks_per_batch", dest="toks_per_batch", type=positive_int,
                   default=None, metavar="N",
                   help="token budget of a batch, padding included (default 16384 for a PyTorch model on a GPU "
                        "without --include contacts, else 4096)")
    p.add_argument("--truncation-seq-length", "--truncation_seq_length", dest="truncation_seq_length",
                   type=positive_int, default=1022, metavar="N",
                   help="keep at most this many residues of each sequence (default 1022)")
    p.add_argument("--format", choices=("h5", "pt"), default="h5",
                   help="h5: one HDF5 store (default); pt: fair-esm's directory of .pt files")
    p.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none",
                   help="HDF5 dataset compression (default none)")
    add_model_runtime_arguments(p, nogpu=True)
    p.add_argument("--sort-window", type=positive_int, default=100_000, metavar="N",
                   help="sort sequences by length within windows of N records (default 100000)")
    p.add_argument("--plot", metavar="PNG",
                   help="plot contact maps (needs --include contacts and matplotlib): a .png file shows the "
                   "first records; any other path is a directory with one PNG per record")
    p.add_argument("--plot-max", type=positive_int, default=4, metavar="N",
                   help="records shown in a single --plot PNG (default 4)")
    add_unknown_residues_argument(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress or notes (warnings still shown), and no log lines of the frameworks")
    p.add_argument("--devices", type=positive_int, default=1, metavar="N",
                   help="split the FASTA over N worker processes (one GPU each when GPUs are visible) and "
                   "merge their shard stores into OUTPUT (default 1). Under torchrun the ranks split it instead")
    p.add_argument("--merge", action="store_true",
                   help="only merge the finished shard stores OUTPUT.rank*-of-N.h5 into OUTPUT")
    p.add_argument("--overwrite-changed", action="store_true",
                   help="re-embed records whose sequence changed since OUTPUT was written (default: refuse)")
    p.add_argument("--shard-only", action="store_true", help=argparse.SUPPRESS)  # --devices workers


# ================================================================================================
# Output sinks
# ================================================================================================


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


def _run_id() -> str:
    """Processes of one run share this: torchrun's run id, the --devices parent's, or this process's own."""
    return (os.environ.get("ESM_DUAL_EMBED_RUN") or os.environ.get("TORCHELASTIC_RUN_ID")
            or f"pid{os.getpid()}")


class _DirLock:
    """``OUTDIR/.esm-dual-embed.<pid>.lock`` (holding the run id) while a ``--format pt`` run writes there. A lock
    of a live process of another run is refused with its pid; locks of dead processes are removed."""

    def __init__(self, outdir: str):
        self.outdir = outdir
        self.run = _run_id()
        self.path = os.path.join(outdir, f"{_LOCK_PREFIX}{os.getpid()}.lock")
        self.rank, self.world = _env_world()
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


class _PtSink:
    """fair-esm's layout: ``OUTPUT/<label>.pt`` per record; a record is done when its file exists (and, when
    known, its sequence hash in ``.esm-dual-embed.tsv`` is the one this run embeds)."""

    def __init__(self, outdir: str, include: list[str], options: dict[str, Any], redo: set[str] = frozenset()):
        if os.path.isfile(outdir):
            raise CliError(f"--format pt writes a directory, but {outdir} is a file")
        os.makedirs(outdir, exist_ok=True)
        self.outdir = outdir
        self.include = include
        self.redo = set(redo)  # labels to embed again (--overwrite-changed)
        self.lock = _DirLock(outdir)
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

    def write(self, labels, hashes, lengths, rep, before_commit=None) -> None:
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
            if before_commit is not None and i == len(labels) - 1:
                before_commit()
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


def _pt_hashes(outdir: str) -> dict[str, str]:
    """label -> sequence hash of the files an earlier ``--format pt`` run wrote (the latest line wins)."""
    path = os.path.join(outdir, PT_HASHES)
    out: dict[str, str] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                label, sep, h = line.rstrip("\n").rpartition("\t")
                if sep:
                    out[_untsv_field(label)] = h
    return out


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


class _H5Sink:
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

    def write(self, ids, descriptions, hashes, index, lengths, rep, before_commit=None) -> None:
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
        self.writer.append(ids, lengths, descriptions=descriptions, seq_hashes=hashes, input_index=index,
                           _before_commit=before_commit, **kw)

    def close(self) -> None:
        self.writer.close()


class _CrashHook:
    """Private test hook (env ESM_DUAL_TEST_CRASH): "raise:K" raises after K batches were written;
    "kill:K" SIGKILLs the process in the middle of batch K+1 (rows written, not committed); "sleep:S" sleeps
    S seconds after each batch (a run that is still busy when a test kills it)."""

    def __init__(self) -> None:
        spec = os.environ.get(_CRASH_ENV, "")
        self.mode, _, k = spec.partition(":")
        self.k = int(k) if k.isdigit() else -1
        self.written = 0

    def before_commit(self):
        if self.mode == "kill" and self.written == self.k:
            return lambda: os.kill(os.getpid(), signal.SIGKILL)
        return None

    def after_batch(self) -> None:
        self.written += 1
        if self.mode == "sleep":
            time.sleep(self.k)
        if self.mode == "raise" and self.written == self.k:
            raise RuntimeError(f"{_CRASH_ENV}: simulated crash after {self.k} batches")


class _BackgroundWriter:
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


# ================================================================================================
# Main
# ================================================================================================


def _windows(records, size: int):
    buf = []
    for rec in records:
        buf.append(rec)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def normalise_layers(layers: list[int], num_layers: int) -> list[int]:
    """fair-esm's rule: -(num_layers+1) <= i <= num_layers, then (i + num_layers + 1) % (num_layers + 1).

    Sorted and without repeats: fair-esm's model returns its representations in layer order."""
    out: list[int] = []
    for i in layers:
        if not -(num_layers + 1) <= i <= num_layers:
            raise CliError(f"--repr-layers {i}: this model has layers 0..{num_layers} "
                           f"(or -{num_layers + 1}..-1 counted from the end)")
        j = (i + num_layers + 1) % (num_layers + 1)
        if j not in out:
            out.append(j)
    return sorted(out)


# ================================================================================================
# Several processes: shards and merging
# ================================================================================================


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Record indices of ``rank``: a contiguous share of ``n`` (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_path(output: str, rank: int, world_size: int) -> str:
    root, ext = os.path.splitext(output)
    return f"{root}.rank{rank}-of-{world_size}{ext or '.h5'}"


def _env_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _under_torchrun() -> bool:
    """torchrun (torch.distributed.elastic) starts every rank at once and sets these; a cluster array that sets
    RANK/WORLD_SIZE by hand does not, and its ranks may run days apart."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ


def _wait_for_shards(shards: list[str], quiet: bool) -> list[str]:
    """Wait until every shard's ``.done`` marker exists; say which ranks are missing every minute, and give up
    (returning the missing ones) when none of them changed for ``ESM_DUAL_MERGE_TIMEOUT`` seconds."""
    timeout = float(os.environ.get(_MERGE_TIMEOUT_ENV, 3600))
    last_change, last_note, seen = time.monotonic(), time.monotonic(), None
    while True:
        missing = [s for s in shards if not os.path.isfile(s + ".done")]
        if not missing:
            return []
        state = [(s, os.path.getsize(s) if os.path.exists(s) else -1,
                  os.path.getmtime(s) if os.path.exists(s) else 0) for s in missing]
        now = time.monotonic()
        if state != seen:
            seen, last_change = state, now
        if now - last_change >= timeout:
            return missing
        if now - last_note >= 60:
            note(f"waiting for {len(missing)} shard(s): {name_list(missing)}", quiet)
            last_note = now
        time.sleep(min(0.5, max(timeout / 10, 0.01)))


def _merge(args: argparse.Namespace, world_size: int | None = None, wait: bool = False) -> int:
    """Merge ``OUTPUT.rank{r}-of-{n}.h5`` (each finished: its ``.done`` marker exists) into OUTPUT."""
    from ..common.embeddings import merge_stores

    if world_size is None:
        root, ext = os.path.splitext(args.output)
        pattern = re.compile(re.escape(root) + r"\.rank(\d+)-of-(\d+)" + re.escape(ext or ".h5") + "$")
        found = {int(m.group(2)) for f in glob.glob(glob.escape(root) + ".rank*-of-*")
                 if (m := pattern.match(f))}
        if len(found) != 1:
            raise CliError(f"--merge: expected shard stores {shard_path(args.output, 0, 'N')} ... of one run, "
                           f"found {'none' if not found else 'several world sizes ' + str(sorted(found))}")
        world_size = found.pop()
    shards = [shard_path(args.output, r, world_size) for r in range(world_size)]
    if wait:
        missing = _wait_for_shards(shards, args.quiet)
        if missing:
            raise CliError(f"gave up waiting for shard(s) {name_list(missing)}: no progress for "
                           f"{os.environ.get(_MERGE_TIMEOUT_ENV, 3600)} s (did those ranks start?); this rank's shard "
                           f"is kept: run `esm-dual embed ... {args.output} --merge` once they are done")
    missing = [s for s in shards if not os.path.isfile(s + ".done")]
    if missing:
        raise CliError(f"--merge: shard(s) not finished: {name_list(missing)}")
    n = merge_stores(args.output, shards, compression=None if args.compression == "none" else args.compression)
    for s in shards:
        os.remove(s)
        os.remove(s + ".done")
    note(f"merged {world_size} shard stores ({n} records) into {args.output}", args.quiet)
    return 0


def _watch_parent(parent: int) -> None:
    """Exit this process (a --devices worker) as soon as its parent is gone: no orphan keeps a GPU, a shard's
    file lock or the output directory."""
    import threading

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="esm-dual-parent-watch", daemon=True).start()


def _worker(args: argparse.Namespace, rank: int, world_size: int, parent: int | None = None) -> None:
    """One ``--devices`` worker (a spawned process): its own GPU, its shard, no merge."""
    if parent is not None:
        _watch_parent(parent)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(world_size)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[rank % len(gpus)]
    args.devices, args.shard_only, args.plot = 1, True, None
    try:
        sys.exit(run(args))
    except CliError as e:
        warn(str(e))
        sys.exit(2)


def _spawn(args: argparse.Namespace) -> int:
    import multiprocessing as mp

    n = args.devices
    ctx = mp.get_context("spawn")
    os.environ.setdefault("ESM_DUAL_EMBED_RUN", f"devices-{os.getpid()}-{time.time_ns()}")  # shared by workers
    procs = [ctx.Process(target=_worker, args=(args, r, n, os.getpid()), daemon=True) for r in range(n)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:  # interrupted (Ctrl-C, an error): the workers stop with the parent
            if p.is_alive():
                p.terminate()
                p.join(10)
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise CliError(f"--devices {n}: worker(s) {failed} failed; rerun the same command to resume")
    if args.format == "pt":
        return 0
    return _merge(args, world_size=n)


def finish_args(args: argparse.Namespace) -> None:
    """``FASTA OUTPUT --model MODEL`` or esm-extract's ``MODEL FASTA OUTPUT``."""
    given = getattr(args, "_positionals", None)
    if given is None:
        return
    if args.model is None and len(given) == 2:
        raise UsageError("embed: which model? Add --model MODEL (or put it first, as esm-extract: "
                         "embed MODEL FASTA OUTPUT)")
    resolve_positionals(args, ("model", "fasta", "output"), "embed")


class _Scan(NamedTuple):
    total: int
    changed: list[str]  # ids (labels for --format pt) whose sequence differs from what OUTPUT holds
    longest: tuple[int, str]  # (residues after truncation, id) of the longest record


def _stored_hashes(args: argparse.Namespace, rank: int, world: int) -> dict[str, str]:
    """What OUTPUT (and this rank's shard) already hold: id (or pt label) -> sequence hash."""
    if args.format == "pt":
        return _pt_hashes(args.output) if os.path.isdir(args.output) else {}
    from ..common.embeddings import EmbeddingStore, EmbeddingStoreError

    out: dict[str, str] = {}
    paths = [args.output] + ([shard_path(args.output, rank, world)] if world > 1 else [])
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            with EmbeddingStore(path) as store:
                out.update(store.sequence_hashes)
        except (EmbeddingStoreError, OSError, KeyError):
            pass  # the writer reports what is wrong with the file
    return out


def _scan(args: argparse.Namespace) -> _Scan:
    """One pass over the FASTA before the model loads (the reader that embeds it, so the count agrees):
    count, pt file names (outside OUTPUT, too long, two labels on one path), changed sequences, the longest."""
    from ..common.embeddings import sequence_hash
    from ..common.fasta import read_fasta

    rank, world = _env_world()
    stored = _stored_hashes(args, rank, world)
    key = (lambda r: r.description) if args.format == "pt" else (lambda r: r.id)
    paths: dict[str, str] = {}
    changed: list[str] = []
    total = 0
    longest = (0, "")
    for rec in read_fasta(args.fasta):
        total += 1
        n = min(len(rec.sequence), args.truncation_seq_length)
        if n > longest[0]:
            longest = (n, rec.id)
        if args.format == "pt":
            path = pt_path(args.output, rec.description)
            if path in paths:
                raise CliError(f"{args.fasta}: records {paths[path]!r} and {rec.description!r} would both be written "
                               f"to {path} (--format pt names files after the header; '/./', '//' and the like "
                               "collapse): make the headers distinct")
            paths[path] = rec.description
        h = stored.get(key(rec))
        if h and h != sequence_hash(rec.sequence):
            changed.append(key(rec))
    return _Scan(total, changed, longest)


def _check_contact_memory(longest: tuple[int, str], runner, device: str, fasta: str) -> None:
    """Contact maps need every layer's attention maps at once: refuse a record whose maps cannot fit."""
    n, rec_id = longest
    L = n + 2
    cfg = runner.config
    need = 4 * L * L * cfg.num_hidden_layers * cfg.num_attention_heads
    limit = _memory_limit(device)
    if limit is not None and need > limit:
        raise CliError(f"{fasta}: record {rec_id!r} has {n} residues: its contact map needs the attention maps of "
                       f"all {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads, {need / 1e9:.1f} GB "
                       f"(more than the {limit / 1e9:.1f} GB of {'GPU ' if 'cuda' in str(device) else ''}memory here); "
                       "lower --truncation-seq-length or drop --include contacts")


def _memory_limit(device: str) -> int | None:
    try:
        if "cuda" in str(device):
            import torch

            return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):  # pragma: no cover
        return None


def _options(args: argparse.Namespace, runner, include: list[str], layers: list[int]) -> dict[str, Any]:
    """What must be equal for two runs to write into one output (the h5 store's identity)."""
    from ..common.fingerprint import weights_fingerprint

    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    return {
        "model": model,
        "weights": weights_fingerprint(runner.source),
        "model_config": runner.config.to_dict(),
        "truncation_seq_length": args.truncation_seq_length,
        "dtype": runner.dtype,
        "layers": layers,
        "include": include,
    }


def _remove_if_empty(path: str) -> None:
    """A store a failed run created without committing a record pins nothing: remove it."""
    from ..common.embeddings import EmbeddingStore

    try:
        with EmbeddingStore(path) as store:
            empty = len(store) == 0
    except Exception:
        return
    if empty:
        os.remove(path)


def run(args: argparse.Namespace) -> int:
    from ..common.embeddings import sequence_hash
    from ..common.fasta import read_fasta

    finish_args(args)

    rank, world = _env_world()
    if getattr(args, "merge", False):
        return _merge(args)
    if getattr(args, "devices", 1) > 1 and world == 1:
        if args.format == "h5" and os.path.isdir(args.output):
            raise CliError(f"--format h5 writes a file, but {args.output} is a directory (use --format pt?)")
        return _spawn(args)
    if not os.path.exists(args.fasta):
        raise CliError(f"FASTA file {args.fasta!r} not found")
    scan = _scan(args)  # before the model loads: a wrong file fails at once
    total = scan.total
    if total == 0:
        raise CliError(f"{args.fasta}: no FASTA records (no line starts with '>')")
    if scan.changed and not args.overwrite_changed:
        raise CliError(f"{args.output}: {len(scan.changed)} record(s) changed since it was written (same id, "
                       f"another sequence): {name_list(scan.changed)}; rerun with --overwrite-changed to embed them "
                       "again, or write to another output")
    redo = set(scan.changed)
    include = [k for k in INCLUDE if k in args.include]
    want_contacts = "contacts" in include
    if args.plot and not want_contacts:
        raise CliError("--plot draws contact maps: add --include contacts")
    plotter = None
    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()
    if args.format == "pt":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise CliError("--format pt writes torch files and needs PyTorch: "
                           "pip install 'esm-dual[torch]'") from None

    device = args.device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not args.shard_only and not args.nogpu and device in ("auto", "cuda", "gpu"):
        from ._common import _gpu_available

        if _gpu_available(args.backend):  # torchrun: one GPU per local rank
            device = f"cuda:{local_rank}"
    runner = load_runner(args.model, backend=args.backend, head="base", device=device, dtype=args.dtype,
                         nogpu=args.nogpu)
    for msg in runner.load_messages:
        if "lm_head" in msg and "dropping" in msg:
            continue  # embeddings do not use the language-model head
        if "contact_head" in msg and not want_contacts:
            continue
        warn(msg)
    if want_contacts and not runner.has_contact_regression:
        warn(f"{args.model} has no contact-regression weights: contact maps come from an untrained head")
    if args.toks_per_batch is None:
        # On a GPU the packed encoder needs large batches to fill the card (650M on an H100, .pt files with
        # per-residue states: 109k residues/s at 16384 tokens against 60k at 4096, README "Performance");
        # attention maps for contacts grow with the batch, so they keep 4096.
        on_gpu = runner.backend == "pt" and str(runner.device).startswith("cuda")
        args.toks_per_batch = 16384 if on_gpu and not want_contacts else 4096
    layers = normalise_layers(args.repr_layers, runner.num_layers)
    trunc = args.truncation_seq_length
    if runner.max_residues is not None and trunc > runner.max_residues:
        raise CliError(f"--truncation-seq-length {trunc}: this model's learned positions allow at most "
                       f"{runner.max_residues} residues")
    if want_contacts:
        _check_contact_memory(scan.longest, runner, runner.device, args.fasta)
    options = _options(args, runner, include, layers)

    mine = shard_range(total, rank, world)
    prior: set[str] = set()
    if args.format == "pt":
        sink: Any = _PtSink(args.output, include, options, redo)
    else:
        identity = {k: v for k, v in options.items() if k not in ("layers", "include")}  # the writer adds them
        path = shard_path(args.output, rank, world) if world > 1 else args.output
        created = not os.path.exists(path)
        try:
            sink = _H5Sink(path, include, layers, runner, args, args.compression, identity, redo)
        except BaseException:
            if created and os.path.exists(path):
                os.remove(path)  # this run made it and it holds nothing (a full disk, a refused option...)
            raise
        if world > 1 and os.path.isfile(args.output):  # records an earlier merge already holds
            from ..common.embeddings import EmbeddingStore

            with EmbeddingStore(args.output) as merged:
                prior = set(merged.ids)
    hook = _CrashHook()
    if world > 1:
        note(f"rank {rank} of {world}: records {mine.start}..{mine.stop - 1}", args.quiet)
    note(f"{args.fasta}: {total} sequences; model {args.model} ({runner.num_layers} layers, "
         f"hidden {runner.hidden_size}) on {runner.backend}/{runner.device}/{runner.dtype}", args.quiet)

    bar = progress(len(mine), "embed", "seq", args.quiet)
    n_done = n_skipped = n_res = 0
    truncated: list[str] = []
    t0 = time.perf_counter()
    first_window = True
    # Files and store rows are written on a background thread while the next batch runs on the model.
    writer = _BackgroundWriter()
    written = [0]  # records the sink really wrote (the report counts these)

    def write(*a):
        sink.write(*a)
        written[0] += len(a[0])

    finished = False
    try:
        records = ((i, r) for i, r in enumerate(read_fasta(args.fasta)) if i in mine)
        for window in _windows(records, args.sort_window):
            writer.wait()  # what is already there, before deciding what to skip
            key = (lambda r: r.description) if args.format == "pt" else (lambda r: r.id)
            todo_i = [(i, r) for i, r in window if not sink.done(key(r)) and r.id not in prior]
            todo = [r for _, r in todo_i]
            index = [i for i, _ in todo_i]
            skipped = len(window) - len(todo)
            if skipped:
                n_skipped += skipped
                bar.update(skipped)
            if args.plot and first_window:
                from .plot import ContactPlotter

                plotter = ContactPlotter(args.plot, wanted=[r.id for r in todo[: args.plot_max]])
            first_window = False
            if not todo:
                continue
            enc = encode_records(runner.tokenizer, todo, args.fasta, getattr(args, "unknown_residues", "error"))
            cut = [r.id for r, e in zip(todo, enc) if len(e) > trunc]
            if cut:
                truncated += cut
                warn(f"{len(cut)} sequence(s) longer than {trunc} residues truncated to {trunc}: "
                     f"{name_list(cut)}")
            enc = [e[:trunc] for e in enc]
            lengths = [len(e) for e in enc]
            for batch in token_batches(lengths, args.toks_per_batch):
                ids, mask = runner.pad([enc[i] for i in batch])
                rep = runner.representations(ids, mask, layers, want_contacts, per_token="per_tok" in include)
                blen = [lengths[i] for i in batch]
                recs = [todo[i] for i in batch]
                hashes = [sequence_hash(r.sequence) for r in recs]
                if args.format == "pt":
                    writer.submit(write, [r.description for r in recs], hashes, blen, rep, hook.before_commit())
                else:
                    writer.submit(write, [r.id for r in recs], [r.description for r in recs], hashes,
                                  [index[i] for i in batch], blen, rep, hook.before_commit())
                if plotter is not None:
                    for j, r in enumerate(recs):
                        plotter.add(r.id, rep.contacts[j, :blen[j], :blen[j]])
                n_done += len(batch)
                n_res += sum(blen)
                bar.update(len(batch))
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{n_res / dt:.0f} res/s", refresh=False)
                hook.after_batch()
        writer.wait()
        finished = True
    finally:
        writer.close()
        bar.close()
        sink.close()
        if args.format == "h5" and not finished:
            _remove_if_empty(sink.writer.path)  # a failed first run leaves no empty store behind
    dt = time.perf_counter() - t0
    skipped_note = f" (skipped {n_skipped} already there)" if n_skipped else ""
    rate = f"{n_done / max(dt, 1e-9):.1f} seq/s, {n_res / max(dt, 1e-9):.0f} res/s"
    note(f"wrote {written[0]} records to {args.output}{skipped_note} in {dt:.1f} s: {rate}", args.quiet)
    if truncated:
        warn(f"{len(truncated)} sequence(s) were truncated to {trunc} residues: {name_list(truncated)}")
    if plotter is not None:
        written_to = plotter.finish()
        note(f"plotted {plotter.count} contact map(s) to {written_to}", args.quiet)
    if world > 1 and args.format == "h5":
        path = shard_path(args.output, rank, world)
        with open(path + ".done.tmp", "w") as f:
            json.dump({"rank": rank, "world_size": world, "records": len(mine)}, f)
        os.replace(path + ".done.tmp", path + ".done")
        if args.shard_only:
            return 0
        if rank == 0 and _under_torchrun():
            return _merge(args, world_size=world, wait=True)
        if not _under_torchrun():  # a cluster array: nobody waits; the last rank to finish merges
            shards = [shard_path(args.output, r, world) for r in range(world)]
            if all(os.path.isfile(s + ".done") for s in shards):
                try:
                    return _merge(args, world_size=world)
                except Exception as e:  # another rank merging at the same moment: its merge wins
                    warn(f"could not merge the shards now ({e}); run `esm-dual embed ... {args.output} --merge`")
                    return 0
            note(f"rank {rank} of {world} done ({path}); the other ranks' shards are not finished: run "
                 f"`esm-dual embed {args.fasta} {args.output} -m {args.model} --merge` once they are", args.quiet)
    return 0
