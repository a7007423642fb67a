"""``esm-dual embed``: representations and contact maps of every sequence in a FASTA file.

``--format pt`` is a drop-in for fair-esm's ``esm-extract`` (``scripts/extract.py``): OUTPUT is a
directory with one ``<label>.pt`` per record (label = the whole header line, as fair-esm), holding
exactly fair-esm's dict: ``label``, ``representations`` {layer: [N, D]}, ``mean_representations``
{layer: [D]}, ``bos_representations`` {layer: [D]}, ``contacts`` [N, N].

``--format h5`` (default) writes one columnar HDF5 store (see ``esm_dual.common.embeddings``), read
back with ``esm_dual.EmbeddingStore``. Both formats resume: records already written are skipped.

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
needs no merge: every rank writes its ``<label>.pt`` files into the same directory.
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
from typing import Any

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
    p.add_argument("--shard-only", action="store_true", help=argparse.SUPPRESS)  # --devices workers


# ================================================================================================
# Output sinks
# ================================================================================================


class _PtSink:
    """fair-esm's layout: ``OUTPUT/<label>.pt`` per record; a record is done when its file exists."""

    def __init__(self, outdir: str, include: list[str]):
        if os.path.isfile(outdir):
            raise CliError(f"--format pt writes a directory, but {outdir} is a file")
        os.makedirs(outdir, exist_ok=True)
        self.outdir = outdir
        self.include = include
        import torch

        self.torch = torch

    def path(self, label: str) -> str:
        path = os.path.normpath(os.path.join(self.outdir, f"{label}.pt"))
        base = os.path.normpath(os.path.abspath(self.outdir))
        if os.path.commonpath([base, os.path.abspath(path)]) != base:
            raise CliError(f"record {label!r}: its file {path} would lie outside {self.outdir} ('..' or an "
                           "absolute path in the header); rename the record")
        return path

    def done(self, label: str) -> bool:
        return os.path.exists(self.path(label))

    def write(self, labels, ids, lengths, rep, before_commit=None) -> None:
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
            torch.save(result, tmp)
            if before_commit is not None and i == len(labels) - 1:
                before_commit()
            os.replace(tmp, path)  # a killed run never leaves a half-written <label>.pt

    def close(self) -> None:
        pass


class _H5Sink:
    def __init__(self, path: str, include: list[str], layers: list[int], runner, args, compression: str):
        from ..common.embeddings import EmbeddingWriter

        if os.path.isdir(path):
            raise CliError(f"--format h5 writes a file, but {path} is a directory (use --format pt?)")
        model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
        identity = {
            "model": model,
            "model_config": runner.config.to_dict(),
            "truncation_seq_length": args.truncation_seq_length,
            "dtype": runner.dtype,
        }
        from esm_dual import __version__

        metadata = {"backend": runner.backend, "device": runner.device, "esm_dual_version": __version__,
                    "fasta": os.path.abspath(args.fasta), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime())}
        self.writer = EmbeddingWriter(path, layers=layers, include=include, hidden_size=runner.hidden_size,
                                      num_layers=runner.num_layers, identity=identity, metadata=metadata,
                                      compression=None if compression == "none" else compression)
        self.include = include
        self.layers = layers
        if self.writer.repaired is not None:
            warn(f"{path}: an earlier run stopped in the middle of a batch; rebuilt the store from its "
                 f"{self.writer.repaired} committed records")

    def done(self, record_id: str) -> bool:
        return record_id in self.writer

    def write(self, ids, descriptions, lengths, rep, before_commit=None) -> None:
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
        self.writer.append(ids, lengths, descriptions=descriptions, _before_commit=before_commit, **kw)

    def close(self) -> None:
        self.writer.close()


class _CrashHook:
    """Private test hook (env ESM_DUAL_TEST_CRASH): "raise:K" raises after K batches were written;
    "kill:K" SIGKILLs the process in the middle of batch K+1 (rows written, not committed)."""

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
    while True:
        missing = [s for s in shards if not os.path.isfile(s + ".done")]
        if not missing or not wait:
            break
        time.sleep(0.5)
    if missing:
        raise CliError(f"--merge: shard(s) not finished: {name_list(missing)}")
    n = merge_stores(args.output, shards, compression=None if args.compression == "none" else args.compression)
    for s in shards:
        os.remove(s)
        os.remove(s + ".done")
    note(f"merged {world_size} shard stores ({n} records) into {args.output}", args.quiet)
    return 0


def _worker(args: argparse.Namespace, rank: int, world_size: int) -> None:
    """One ``--devices`` worker (a spawned process): its own GPU, its shard, no merge."""
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
    procs = [ctx.Process(target=_worker, args=(args, r, n)) for r in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
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


def run(args: argparse.Namespace) -> int:
    from ..common.fasta import count_fasta, read_fasta

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
    total = count_fasta(args.fasta)  # before the model loads: a wrong file fails at once
    if total == 0:
        raise CliError(f"{args.fasta}: no FASTA records (no line starts with '>')")
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

    mine = shard_range(total, rank, world)
    prior: set[str] = set()
    if args.format == "pt":
        sink: Any = _PtSink(args.output, include)
    elif world > 1:
        sink = _H5Sink(shard_path(args.output, rank, world), include, layers, runner, args, args.compression)
        if os.path.isfile(args.output):  # records an earlier merge already holds
            from ..common.embeddings import EmbeddingStore

            with EmbeddingStore(args.output) as merged:
                prior = set(merged.ids)
    else:
        sink = _H5Sink(args.output, include, layers, runner, args, args.compression)
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
    try:
        records = (r for i, r in enumerate(read_fasta(args.fasta)) if i in mine)
        for window in _windows(records, args.sort_window):
            writer.wait()  # what is already there, before deciding what to skip
            key = (lambda r: r.description) if args.format == "pt" else (lambda r: r.id)
            todo = [r for r in window if not sink.done(key(r)) and r.id not in prior]
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
                if args.format == "pt":
                    writer.submit(sink.write, [r.description for r in recs], None, blen, rep, hook.before_commit())
                else:
                    writer.submit(sink.write, [r.id for r in recs], [r.description for r in recs], blen, rep,
                                  hook.before_commit())
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
    finally:
        writer.close()
        bar.close()
        sink.close()
    dt = time.perf_counter() - t0
    skipped_note = f" (skipped {n_skipped} already there)" if n_skipped else ""
    rate = f"{n_done / max(dt, 1e-9):.1f} seq/s, {n_res / max(dt, 1e-9):.0f} res/s"
    note(f"wrote {n_done} records to {args.output}{skipped_note} in {dt:.1f} s: {rate}", args.quiet)
    if truncated:
        warn(f"{len(truncated)} sequence(s) were truncated to {trunc} residues: {name_list(truncated)}")
    if plotter is not None:
        written = plotter.finish()
        note(f"plotted {plotter.count} contact map(s) to {written}", args.quiet)
    if world > 1 and args.format == "h5":
        path = shard_path(args.output, rank, world)
        with open(path + ".done.tmp", "w") as f:
            json.dump({"rank": rank, "world_size": world, "records": len(mine)}, f)
        os.replace(path + ".done.tmp", path + ".done")
        if rank == 0 and not args.shard_only:
            return _merge(args, world_size=world, wait=True)
    return 0
