"""``esm-dual fold``: predict structures of the proteins in a FASTA file with ESMFold.

One ``<id>.pdb`` per record (pLDDT in the B-factor column; multimers as ``:``-separated chains get
chains A, B, ...) and ``summary.tsv`` (id, length, mean_plddt, ptm) in OUTDIR. Records are folded
shortest first in length buckets of at most ``--max-tokens-per-batch`` residues (``infer``'s
buckets: never a batch that costs more than folding its members one by one). A batch that runs out of
GPU memory is retried one record at a time; a record that still does not fit is reported and skipped,
and the rest continue (exit status 1 at the end). Re-running skips records whose PDB exists and is
listed in ``summary.tsv``, unless its sequence changed since (``.fold_sequences.tsv`` records a hash of
each folded sequence): a changed record is refused by name, or folded again with ``--overwrite-changed``;
new weights at the same model path are refused too (``fold_options.json`` records their fingerprint).
Temporary files of an earlier failed run are removed, and a run that fails before folding anything
leaves no output folder behind. Empty or non-protein sequences are refused before the model loads (exit
status 2, the record named). Upper-case letters outside the 20 amino acids are folded as X, as ESMFold
does; lower-case letters, '*' and digits are refused naming the record and position unless
``--unknown-residues unk`` (then they fold as X, as in fair-esm and transformers). Residues are numbered
from 1 in each chain. fair-esm's ``esm-fold -i FASTA -o OUTDIR`` form is accepted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time

from ._common import (
    CliError,
    UsageError,
    add_model_argument,
    add_unknown_residues_argument,
    note,
    positive_int,
    progress,
    read_tab_log,
    residue_problem,
    resolve_positionals,
    warn,
    warn_if_random,
)

SUMMARY = "summary.tsv"
SUMMARY_FIELDS = ("id", "length", "mean_plddt", "ptm")
_PROTEIN_CHARS = re.compile(r"^[A-Za-z:*]+$")
_NUCLEOTIDES = set("ACGTUN")
_STANDARD = set("ACDEFGHIKLMNPQRSTVWY")
OPTIONS = "fold_options.json"  # what made the structures in a folder: a rerun with other options is refused
SEQUENCES = ".fold_sequences.tsv"  # "<id>\t<sequence hash>" of every record folded (appended)
_OUR_TMP = re.compile(r".+\.(pdb|cif)\.tmp|summary\.tsv\.tmp|fold_options\.json\.tmp")


# --trunk-dtype -> the FastPathOptions fields it sets (fold_fast, fold_kernels)
TRUNK_MODES = {"auto": ("auto", "auto"), "fast": ("on", "auto"), "fp32": ("off", "torch"), "bf16": ("on", "torch")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("_positionals", nargs="*", metavar="FASTA OUTDIR",
                        help="input FASTA file (multimers: chains separated by ':') and output directory (created "
                        "if needed); or give them as -i/--fasta and -o/--outdir, as fair-esm's esm-fold")
    parser.add_argument("-i", "--fasta", default=None, help=argparse.SUPPRESS)
    parser.add_argument("-o", "--outdir", "--pdb", dest="outdir", default=None, help=argparse.SUPPRESS)
    add_model_argument(parser, help="esmfold_v1 (default; preset / hub id), a hub-layout directory or fair-esm "
                       "esmfold_3B_v1.pt")
    parser.add_argument("--model-dir", default=None, metavar="DIR",
                        help="fair-esm's esm-fold option: a directory holding esmfold_3B_v1.pt (or checkpoints/"
                        "esmfold_3B_v1.pt, torch hub's layout) and its ESM-2 stem")
    parser.add_argument(
        "--esm-checkpoint",
        default=None,
        help="ESM-2 stem for a fair-esm ESMFold .pt file (default: esm2_t36_3B_UR50D.pt beside it)",
    )
    parser.add_argument(
        "--num-recycles",
        type=int,
        default=None,
        help="recycling iterations (default: the model's max_recycles training value, 4)",
    )
    parser.add_argument(
        "--max-tokens-per-batch",
        type=positive_int,
        default=1024,
        help="most residues per batch (padded, fair-esm's option); sequences of similar length are batched "
        "together only where that costs less than folding them one by one (1: one at a time)",
    )
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="chunk the trunk's pair updates (e.g. 128, 64, 32): less memory, a bit slower",
    )
    parser.add_argument("--cpu-only", action="store_true", help="do not use a GPU even if one is available")
    parser.add_argument("--cpu-offload", action="store_true", help=argparse.SUPPRESS)  # fair-esm's; refused
    parser.add_argument(
        "--trunk-dtype",
        choices=tuple(TRUNK_MODES),
        default=None,
        help="the folding trunk: fast = bf16 with fused triangle kernels (cuEquivariance where installed: "
        "the fold-gpu extra), fp32 = the fp32 trunk that matches HF transformers, bf16 = bf16 with the fp32 "
        "path's kernels; auto = fast on GPU, fp32 on CPU (the structure module always runs in fp32). Sets the "
        "fast-path options fold_fast and fold_kernels; default: what ESM_DUAL_FOLD_FAST and "
        "ESM_DUAL_FOLD_KERNELS say, else auto",
    )
    parser.add_argument(
        "--esm-dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="precision of the ESM-2 stem: auto = fp16 on GPU, fp32 on CPU",
    )
    add_unknown_residues_argument(parser)
    parser.add_argument("--mmcif", action="store_true", help="also write <id>.cif")
    parser.add_argument("--overwrite-changed", action="store_true",
                        help="fold again records whose sequence changed since OUTDIR was written (default: refuse)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or notes")


def finish_args(args: argparse.Namespace) -> None:
    """Positionals or fair-esm's -i/-o; the default model; fair-esm's --model-dir."""
    if getattr(args, "_positionals", None) is not None:
        resolve_positionals(args, ("fasta", "outdir"), "fold")
    if getattr(args, "cpu_offload", False):
        raise UsageError("fold: --cpu-offload (fair-esm's FSDP offload) is not supported; use --chunk-size and "
                         "--trunk-dtype bf16 to fit long sequences")
    if getattr(args, "model_dir", None):
        if args.model:
            raise UsageError("fold: give --model or --model-dir, not both")
        for cand in ("esmfold_3B_v1.pt", os.path.join("checkpoints", "esmfold_3B_v1.pt")):
            path = os.path.join(args.model_dir, cand)
            if os.path.isfile(path):
                args.model = path
                break
        else:
            raise CliError(f"--model-dir {args.model_dir}: no esmfold_3B_v1.pt in it (nor in its checkpoints/)")
    if not args.model:
        args.model = "esmfold_v1"


def safe_name(record_id: str) -> str:
    """A file-name-safe version of a record id."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", record_id).strip(".")
    return name or "record"


def check_sequence(record_id: str, seq: str, unknown: str = "error") -> str:
    """The sequence to fold, or CliError naming the record.

    ``unknown="error"``: every character must be an upper-case letter or the ':' between chains (letters
    outside the 20 amino acids, such as X or B, fold as X, as in ESMFold); a lower-case letter, a '*' or a digit
    is refused naming its position. ``unknown="unk"``: those characters fold as X too, as fair-esm and
    transformers do."""
    s = "".join(seq.split())
    if not s or not s.replace(":", ""):
        raise CliError(f"record {record_id!r}: empty sequence")
    if any(not chain for chain in s.split(":")):
        raise CliError(f"record {record_id!r}: empty chain in multimer {s[:40]!r}")
    letters = s.replace(":", "")
    if unknown != "unk":
        pos = 0
        for ch in s:
            if ch == ":":
                continue
            pos += 1
            if not ("A" <= ch <= "Z"):
                raise CliError(f"record {record_id!r}, residue {pos}: {residue_problem(ch)}; --unknown-residues "
                               "unk folds it as X")
    elif not _PROTEIN_CHARS.match(s):  # digits, '-', '.': not a protein at all
        bad = sorted({c for c in s if not (c.isalpha() or c == ":" or c == "*")})
        if bad:
            raise CliError(f"record {record_id!r}: not a protein sequence (characters {''.join(bad)!r})")
    upper = letters.upper()
    if len(upper) >= 20 and set(upper) <= _NUCLEOTIDES:
        raise CliError(
            f"record {record_id!r}: looks like a nucleotide sequence (only {''.join(sorted(set(upper)))})"
        )
    if not set(letters) & _STANDARD:
        raise CliError(f"record {record_id!r}: no standard amino acid (only {''.join(sorted(set(letters)))}): "
                       "nothing to fold")
    longest = max(len(c) for c in s.split(":"))
    if longest > 9999:  # residues are numbered from 1 in each chain
        raise CliError(f"record {record_id!r}: a chain of {longest} residues; the PDB format numbers at most 9999")
    return s


def _trunk_mode(args: argparse.Namespace) -> str:
    """--trunk-dtype, or the name of what the ESM_DUAL_FOLD_* environment sets (``fold_fast=...,
    fold_kernels=...`` where no name fits), as recorded in fold_options.json."""
    if args.trunk_dtype is not None:
        return args.trunk_dtype
    from ..pt.fast.options import default_options

    try:
        options = default_options()
    except ValueError as e:  # an invalid ESM_DUAL_* value, named
        raise CliError(str(e)) from None
    pair = (options.fold_fast, "torch" if options.fold_fast == "off" and options.fold_kernels == "auto"
            else options.fold_kernels)
    names = [name for name, fields in TRUNK_MODES.items() if fields == pair]
    return names[0] if names else f"fold_fast={pair[0]}, fold_kernels={pair[1]}"


def _check_options(args: argparse.Namespace, path: str, has_results: bool) -> None:
    """Record the options that change the structures in OUTDIR/fold_options.json; refuse a rerun into a folder
    whose finished records were made with other ones."""
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    esm = args.esm_checkpoint and (os.path.abspath(args.esm_checkpoint) if os.path.exists(args.esm_checkpoint)
                                   else args.esm_checkpoint)
    from ..common.fingerprint import weights_fingerprint

    weights = [weights_fingerprint(p) for p in (args.model, args.esm_checkpoint) if p and os.path.exists(p)]
    want = {"model": model, "esm_checkpoint": esm, "num_recycles": args.num_recycles,
            "trunk_dtype": _trunk_mode(args), "esm_dtype": args.esm_dtype, "weights": weights}
    if has_results and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        # "weights" is compared where recorded (folders of older versions have none)
        diffs = [f"{k}: stored {stored.get(k)!r}, this run {v!r}" for k, v in want.items()
                 if stored.get(k) != v and (k != "weights" or k in stored)]
        if diffs:
            raise CliError(f"{os.path.dirname(path) or '.'} holds structures made with other options ("
                           + "; ".join(diffs) + "). Write to another folder, or rerun with the stored options.")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(want, f, indent=1)
    os.replace(tmp, path)


def read_summary(path: str) -> dict[str, dict[str, str]]:
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["id"]: r for r in rows if r.get("id")}


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError:
        raise  # main adds the pointer to `esm-dual fold --help`
    except CliError as e:
        print(f"esm-dual: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ in ("FastaError", "CheckpointError", "LoadingError", "ConfigError"):
            print(f"esm-dual: error: {e}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    from ..common.fasta import read_fasta

    finish_args(args)
    if args.num_recycles is not None and args.num_recycles < 0:
        raise CliError(f"--num-recycles must be >= 0, got {args.num_recycles}")
    if not os.path.exists(args.fasta):  # a directory: read_fasta says so
        raise CliError(f"{args.fasta}: no such file")
    records: list[tuple[str, str, str]] = []  # (id, file stem, sequence)
    stems: dict[str, str] = {}
    for rec in read_fasta(args.fasta):
        seq = check_sequence(rec.id, rec.sequence, getattr(args, "unknown_residues", "error"))
        stem = safe_name(rec.id)
        if stem in stems:
            raise CliError(f"records {stems[stem]!r} and {rec.id!r} would both be written to {stem}.pdb")
        stems[stem] = rec.id
        records.append((rec.id, stem, seq))
    if not records:
        raise CliError(f"{args.fasta}: no records")

    created = not os.path.exists(args.outdir)
    os.makedirs(args.outdir, exist_ok=True)
    try:
        return _fold_into(args, records)
    except BaseException:
        if created:
            _remove_if_nothing_folded(args.outdir)
        raise


def _remove_if_nothing_folded(outdir: str) -> None:
    """A run that created OUTDIR and failed before folding a record leaves no folder holding only its options."""
    if read_summary(os.path.join(outdir, SUMMARY)):
        return
    for name in (OPTIONS, SUMMARY, SEQUENCES):
        path = os.path.join(outdir, name)
        if os.path.isfile(path):
            os.remove(path)
    try:
        os.rmdir(outdir)
    except OSError:
        pass  # something else is there: leave it


def _remove_stale_tmp(outdir: str) -> None:
    """Temporary files an earlier run left when it was killed (only ours: <stem>.pdb.tmp, summary.tsv.tmp ...)."""
    for name in os.listdir(outdir):
        if _OUR_TMP.fullmatch(name) and os.path.isfile(os.path.join(outdir, name)):
            os.remove(os.path.join(outdir, name))


def _fold_into(args: argparse.Namespace, records: list[tuple[str, str, str]]) -> int:
    from ..common.embeddings import sequence_hash

    _remove_stale_tmp(args.outdir)
    summary_path = os.path.join(args.outdir, SUMMARY)
    done = read_summary(summary_path)
    _check_options(args, os.path.join(args.outdir, OPTIONS), bool(done))
    hashes = {rec_id: sequence_hash(seq) for rec_id, _, seq in records}
    stored = read_tab_log(os.path.join(args.outdir, SEQUENCES))
    changed = [r for r in hashes if r in done and stored.get(r) not in (None, hashes[r])]
    if changed and not args.overwrite_changed:
        raise CliError(f"{args.outdir}: {len(changed)} record(s) changed since they were folded (same id, another "
                       f"sequence): {', '.join(repr(c) for c in changed[:10])}"
                       f"{' ...' if len(changed) > 10 else ''}; rerun with --overwrite-changed to fold them again, "
                       "or write to another folder")
    wanted = (".pdb", ".cif") if args.mmcif else (".pdb",)
    todo = [
        r for r in records
        if not (r[0] in done and r[0] not in changed
                and all(os.path.isfile(os.path.join(args.outdir, r[1] + ext)) for ext in wanted))
    ]
    if len(todo) < len(records):
        note(f"skipping {len(records) - len(todo)} record(s) already in {summary_path}", args.quiet)
    if not todo:
        return 0

    import torch

    from ..pt.folding import EsmForProteinFolding, fold_batches, folded_length

    device = "cuda" if torch.cuda.is_available() and not args.cpu_only else "cpu"
    note(f"loading {args.model} on {device}", args.quiet)
    model = EsmForProteinFolding.from_pretrained(
        args.model, device=device, esm_checkpoint=args.esm_checkpoint
    )
    warn_if_random(args.model, model.config)
    model.set_chunk_size(args.chunk_size)
    model.set_esm_dtype(args.esm_dtype)
    if args.trunk_dtype is not None:  # else the options of the environment stay
        fold_fast, fold_kernels = TRUNK_MODES[args.trunk_dtype]
        model.set_fast_path(fold_fast=fold_fast, fold_kernels=fold_kernels)

    new_file = not os.path.isfile(summary_path) or os.path.getsize(summary_path) == 0
    seq_log = open(os.path.join(args.outdir, SEQUENCES), "a", encoding="utf-8")
    summary = open(summary_path, "a", newline="", encoding="utf-8")
    writer = csv.writer(summary, delimiter="\t", lineterminator="\n")
    if new_file:
        writer.writerow(SUMMARY_FIELDS)
        summary.flush()
    lengths = [len(seq.replace(":", "")) for _, _, seq in todo]
    # Buckets as infer() makes them (lengths as folded: chains joined by the poly-G linker).
    batches = fold_batches([folded_length(seq) for _, _, seq in todo], args.max_tokens_per_batch)
    failed: list[str] = []
    bar = progress(len(todo), "fold", "seq", args.quiet)
    t0 = time.time()

    def fold(batch: list[int]) -> None:
        seqs = [todo[i][2] for i in batch]
        with torch.no_grad():
            out = model.infer(seqs, num_recycles=args.num_recycles, max_tokens_per_batch=args.max_tokens_per_batch)
        pdbs = model.output_to_pdb(out)
        cifs = model.output_to_mmcif(out, [todo[i][1] for i in batch]) if args.mmcif else None
        mean_plddt = out["mean_plddt"].float().cpu().tolist()
        ptm = out["ptm"].float().cpu().tolist()
        for j, i in enumerate(batch):
            rec_id, stem, _ = todo[i]
            _write_text(os.path.join(args.outdir, stem + ".pdb"), pdbs[j])
            if cifs is not None:
                _write_text(os.path.join(args.outdir, stem + ".cif"), cifs[j])
            seq_log.write(f"{rec_id}\t{hashes[rec_id]}\n")
            seq_log.flush()
            writer.writerow([rec_id, lengths[i], f"{mean_plddt[j]:.2f}", f"{ptm[j]:.4f}"])
            summary.flush()
            bar.update(1)

    def try_fold(batch: list[int]) -> bool:
        """Fold a batch; False if it ran out of memory. The memory is released after the except block
        has ended (the exception's traceback keeps the failed call's tensors alive until then)."""
        oom = False
        try:
            fold(batch)
        except Exception as e:
            if not _is_oom(e):
                raise
            oom = True
        if oom:
            _free_memory()
        return not oom

    def skip(i: int) -> None:
        failed.append(todo[i][0])
        warn(
            f"record {todo[i][0]!r} ({lengths[i]} residues): out of memory; skipped "
            "(try --chunk-size 64 or smaller, or a larger GPU)"
        )
        bar.update(1)

    try:
        for batch in batches:
            if try_fold(batch):
                continue
            if len(batch) == 1:
                skip(batch[0])
                continue
            warn(f"out of memory on a batch of {len(batch)}; retrying its records one at a time")
            for i in batch:
                if not try_fold([i]):
                    skip(i)
    finally:
        bar.close()
        summary.close()
        seq_log.close()
        _compact_summary(summary_path, [r[0] for r in records])
    n_ok = len(todo) - len(failed)
    note(f"folded {n_ok} record(s) in {time.time() - t0:.2f} s; wrote {args.outdir}", args.quiet)
    if failed:
        warn(f"{len(failed)} record(s) not folded (out of memory): {', '.join(repr(f) for f in failed[:10])}")
        return 1
    return 0


def _compact_summary(path: str, order: list[str]) -> None:
    """Keep one row per id (the latest), records of this FASTA first in its order, then any others."""
    rows = read_summary(path)
    if not rows:
        return
    rank = {rec_id: i for i, rec_id in enumerate(order)}
    ids = sorted(rows, key=lambda r: (rank.get(r, len(rank)), r))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(SUMMARY_FIELDS)
        for rec_id in ids:
            writer.writerow([rows[rec_id].get(k, "") for k in SUMMARY_FIELDS])
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

