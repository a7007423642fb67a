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

This module parses the arguments and runs the loop; ``embed_writers`` holds the sinks (HDF5 store, ``.pt``
files) and the background writer thread, ``embed_shards`` the several-process parts (shards, workers, merge).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, NamedTuple

from ._common import (
    CliError,
    UsageError,
    add_model_argument,
    add_model_runtime_arguments,
    add_unknown_residues_argument,
    encode_records,
    gpu_available,
    load_runner,
    name_list,
    note,
    positive_int,
    progress,
    resolve_positionals,
    token_batches,
    warn,
)
from .embed_shards import env_world, merge_shards, shard_path, shard_range, spawn, under_torchrun
from .embed_writers import BackgroundWriter, H5Sink, PtSink, pt_hashes, pt_path

INCLUDE = ("mean", "per_tok", "bos", "contacts")


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
        return pt_hashes(args.output) if os.path.isdir(args.output) else {}
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

    rank, world = env_world()
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

    rank, world = env_world()
    if getattr(args, "merge", False):
        return merge_shards(args)
    if getattr(args, "devices", 1) > 1 and world == 1:
        if args.format == "h5" and os.path.isdir(args.output):
            raise CliError(f"--format h5 writes a file, but {args.output} is a directory (use --format pt?)")
        return spawn(args, run)
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
        if gpu_available(args.backend):  # torchrun: one GPU per local rank
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
        sink: Any = PtSink(args.output, include, options, redo)
    else:
        identity = {k: v for k, v in options.items() if k not in ("layers", "include")}  # the writer adds them
        path = shard_path(args.output, rank, world) if world > 1 else args.output
        created = not os.path.exists(path)
        try:
            sink = H5Sink(path, include, layers, runner, args, args.compression, identity, redo)
        except BaseException:
            if created and os.path.exists(path):
                os.remove(path)  # this run made it and it holds nothing (a full disk, a refused option...)
            raise
        if world > 1 and os.path.isfile(args.output):  # records an earlier merge already holds
            from ..common.embeddings import EmbeddingStore

            with EmbeddingStore(args.output) as merged:
                prior = set(merged.ids)
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
    writer = BackgroundWriter()
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
                    writer.submit(write, [r.description for r in recs], hashes, blen, rep)
                else:
                    writer.submit(write, [r.id for r in recs], [r.description for r in recs], hashes,
                                  [index[i] for i in batch], blen, rep)
                if plotter is not None:
                    for j, r in enumerate(recs):
                        plotter.add(r.id, rep.contacts[j, :blen[j], :blen[j]])
                n_done += len(batch)
                n_res += sum(blen)
                bar.update(len(batch))
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{n_res / dt:.0f} res/s", refresh=False)
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
        if rank == 0 and under_torchrun():
            return merge_shards(args, world_size=world, wait=True)
        if not under_torchrun():  # a cluster array: nobody waits; the last rank to finish merges
            shards = [shard_path(args.output, r, world) for r in range(world)]
            if all(os.path.isfile(s + ".done") for s in shards):
                try:
                    return merge_shards(args, world_size=world)
                except Exception as e:  # another rank merging at the same moment: its merge wins
                    warn(f"could not merge the shards now ({e}); run `esm-dual embed ... {args.output} --merge`")
                    return 0
            note(f"rank {rank} of {world} done ({path}); the other ranks' shards are not finished: run "
                 f"`esm-dual embed {args.fasta} {args.output} -m {args.model} --merge` once they are", args.quiet)
    return 0
