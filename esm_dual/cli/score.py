"""``esm-dual score``: label a deep mutational scan with ESM scores; a drop-in for fair-esm's
``examples/variant-prediction/predict.py`` (same flags and semantics), batched and CPU-friendly.

Strategies (positions are ``int(mutant[1:-1]) - offset_idx``, 0-based into ``--sequence``):

* ``wt-marginals``: one forward pass of the wild type; score = log p(mt) - log p(wt) at the position.
* ``masked-marginals``: the same difference with the position masked; the masked copies of the wild type
  (one per position that occurs in the scan) run many to a forward pass.
* ``pseudo-ppl``: the pseudo-log-likelihood of the mutated sequence, sum over residues i of
  log p(x_i | x with i masked) (Salazar et al.); every masked copy of every distinct mutant runs batched.
  fair-esm's loop reads the wrong target (residue i + 1 at masked token i) and skips the last two
  residues; this implements what it means to compute.

Multi-mutants ``A24C:G30D`` are summed for the marginals and applied together for pseudo-ppl. The output
CSV has every input column in order, one column per ``--model-location`` (named by the string given),
and an ``ensemble`` mean column when several models are given. (fair-esm writes pandas' index as an extra
unnamed first column; esm-dual does not.)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from ._common import (
    CliError,
    add_model_argument,
    add_model_runtime_arguments,
    add_unknown_residues_argument,
    load_runner,
    note,
    positive_int,
    progress,
    residue_problem,
    warn,
)

STRATEGIES = ("wt-marginals", "pseudo-ppl", "masked-marginals")
_MUT = re.compile(r"^([A-Za-z])(-?\d+)([A-Za-z])$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, required=True, dest="model_location", nargs="+",
                       help="one or more models (preset name, hub id, hub-layout directory or fair-esm .pt file); "
                       "several give an ensemble")
    p.add_argument("--sequence", required=True,
                   help="base (wild-type) sequence to which mutations were applied")
    p.add_argument("--dms-input", required=True, metavar="CSV",
                   help="CSV file containing the deep mutational scan")
    p.add_argument("--mutation-col", default="mutant",
                   help="column labelling the mutation as 'AiB' (multi-mutants 'AiB:CjD'); default mutant")
    p.add_argument("--dms-output", required=True, metavar="CSV",
                   help="output CSV: the input columns plus one score column per model")
    p.add_argument("--offset-idx", type=int, default=0, metavar="N",
                   help="offset of the mutation positions in --mutation-col (1 for 1-based numbering)")
    p.add_argument("--scoring-strategy", choices=STRATEGIES, default="wt-marginals",
                   help="default wt-marginals")
    p.add_argument("--toks-per-batch", type=positive_int, default=4096, metavar="N",
                   help="token budget of a forward pass of masked copies (default 4096)")
    add_model_runtime_arguments(p, nogpu=True)
    p.add_argument("--plot", metavar="PNG", help="per-position score plot (needs matplotlib)")
    add_unknown_residues_argument(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress or notes, and no log lines of the frameworks")
    # fair-esm's MSA Transformer flags: accepted so that scripts fail with a clear message.
    p.add_argument("--msa-path", help=argparse.SUPPRESS)
    p.add_argument("--msa-samples", type=int, default=400, help=argparse.SUPPRESS)
    p.add_argument("--lowercase-type", choices=("insertion", "nonfocus"), default="nonfocus",
                   help=argparse.SUPPRESS)


@dataclass
class Mutation:
    wt: str
    idx: int  # 0-based index into the sequence
    mt: str


def parse_mutations(text: str, sequence: str, offset_idx: int, where: str) -> list[Mutation]:
    """``'A24C'`` or ``'A24C:G30D'`` -> mutations; checks positions and wild types against ``sequence``."""
    text = text.strip()
    if not text:
        raise CliError(f"{where}: empty mutation")
    muts = []
    for part in text.split(":"):
        m = _MUT.match(part.strip())
        if m is None:
            raise CliError(f"{where}: cannot parse mutation {part!r} (expected e.g. 'A24C' or 'A24C:G30D')")
        wt, pos, mt = m.group(1), int(m.group(2)), m.group(3)
        idx = pos - offset_idx
        if not 0 <= idx < len(sequence):
            raise CliError(f"{where}: mutation {part!r} is at index {idx} (position {pos} - offset "
                           f"{offset_idx}), outside the sequence of length {len(sequence)}; "
                           "check --offset-idx")
        if sequence[idx] != wt:
            raise CliError(f"{where}: the listed wild type {wt!r} of {part!r} does not match the provided "
                           f"sequence, which has {sequence[idx]!r} at position {pos} (index {idx} "
                           f"with --offset-idx {offset_idx})")
        muts.append(Mutation(wt, idx, mt))
    if len({m.idx for m in muts}) != len(muts):
        raise CliError(f"{where}: mutation {text!r} changes the same position twice")
    return muts


def check_sequence(sequence: str, token_id) -> None:
    """Every character of --sequence a one-letter token of the vocabulary (``token_id(ch)`` not None)."""
    for i, aa in enumerate(sequence):
        if token_id(aa) is None:
            raise CliError(f"--sequence, position {i + 1} (1-based; a mutation's position is this + --offset-idx "
                           f"- 1): {residue_problem(aa)}; --unknown-residues unk reads it as <unk>")


def read_dms(path: str) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, data rows, the file line where each data row starts); blank lines are skipped."""
    if os.path.isdir(path):
        raise CliError(f"--dms-input {path!r} is a directory, not a CSV file")
    if not os.path.isfile(path):
        raise CliError(f"--dms-input {path!r}: no such file")
    rows, lines = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            start = 1
            for r in reader:
                rows.append(r)
                lines.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise CliError(f"--dms-input {path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start} "
                       "of a read block)") from None
    except csv.Error as e:
        raise CliError(f"--dms-input {path}: line {reader.line_num}: not valid CSV: {e}") from None
    if not rows:
        raise CliError(f"--dms-input {path}: empty file")
    header = rows[0]
    body = [(r, ln) for r, ln in zip(rows[1:], lines[1:]) if r]
    for r, ln in body:
        if len(r) != len(header):
            raise CliError(f"--dms-input {path}: line {ln} has {len(r)} fields, the header has {len(header)}")
    return header, [r for r, _ in body], [ln for _, ln in body]


def _fmt(x: float) -> str:
    return "" if not math.isfinite(x) else repr(float(x))


class Scorer:
    """Scores of one model for every row; the forward passes are batched."""

    def __init__(self, runner, sequence: str, toks_per_batch: int, quiet: bool, unknown: str = "error"):
        self.r = runner
        self.sequence = sequence
        self.toks_per_batch = toks_per_batch
        self.quiet = quiet
        self.unk_id = runner.tokenizer.unk_token_id if unknown == "unk" else None
        if self.unk_id is None:
            check_sequence(sequence, runner.token_id)
            enc = runner.tokenizer.encode_residues_np([sequence])[0]
        else:  # one <unk> per unknown character, so positions stay aligned with the mutations'
            enc = np.asarray([self.tok(aa, "--sequence") for aa in sequence], dtype=np.int64)
        if len(enc) != len(sequence):  # a residue letter the tokenizer still reads otherwise
            raise CliError("--sequence must be plain one-letter residues (it tokenises to "
                           f"{len(enc)} tokens for {len(sequence)} characters)")
        lim = runner.max_residues
        if lim is not None and len(sequence) > lim:
            raise CliError(f"--sequence has {len(sequence)} residues; {runner.location} takes at most {lim}")
        self.wt_ids = enc

    def tok(self, aa: str, where: str) -> int:
        i = self.r.token_id(aa)
        if i is None and self.unk_id is not None:
            return self.unk_id
        if i is None:
            raise CliError(f"{where}: residue {aa!r} is not in the model's vocabulary")
        return i

    def _rows_per_pass(self, L: int) -> int:
        return max(1, self.toks_per_batch // L)

    def _bar(self, total: int, desc: str, unit: str = "seq"):
        return progress(total, desc, unit, self.quiet)

    def wt_marginals(self) -> np.ndarray:
        """log-softmax [N + 2, V] of the unmasked wild type (token positions)."""
        ids, mask = self.r.pad([self.wt_ids])
        return self.r.log_probs(ids, mask)[0]

    def masked_marginals(self, positions: list[int]) -> dict[int, np.ndarray]:
        """{residue index: log-softmax [V] with that position masked}."""
        ids, mask = self.r.pad([self.wt_ids])
        L = ids.shape[1]
        step = self._rows_per_pass(L)
        out: dict[int, np.ndarray] = {}
        bar = self._bar(len(positions), "masked-marginals", "positions")
        for s in range(0, len(positions), step):
            chunk = positions[s:s + step]
            toks = np.repeat(ids, len(chunk), axis=0)
            tpos = np.asarray(chunk) + 1  # +1 for BOS
            toks[np.arange(len(chunk)), tpos] = self.r.mask_id
            lp = self.r.log_probs(toks, np.repeat(mask, len(chunk), axis=0), positions=tpos)
            for p, row in zip(chunk, lp):
                out[p] = row
            bar.update(len(chunk))
        bar.close()
        return out

    def pseudo_log_likelihoods(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Sum over residues of log p(x_i | x masked at i), for each residue-id array (all of one length)."""
        n = len(seqs[0])
        L = n + 2
        step = self._rows_per_pass(L)
        # Every (sequence, position) pair as one masked copy; passes run over the flat list.
        total = len(seqs) * n
        pll = np.zeros(len(seqs), dtype=np.float64)
        bar = self._bar(len(seqs), "pseudo-ppl")
        done_seqs = 0
        base_ids, mask = self.r.pad(seqs)
        for s in range(0, total, step):
            flat = np.arange(s, min(total, s + step))
            which, pos = flat // n, flat % n
            toks = base_ids[which].copy()
            toks[np.arange(len(flat)), pos + 1] = self.r.mask_id
            lp = self.r.log_probs(toks, mask[which], positions=pos + 1)
            target = base_ids[which, pos + 1]
            np.add.at(pll, which, lp[np.arange(len(flat)), target].astype(np.float64))
            finished = int(flat[-1] + 1) // n
            bar.set_postfix_str(f"{int(flat[-1]) + 1}/{total} masked copies", refresh=False)
            bar.update(finished - done_seqs)
            done_seqs = finished
        bar.close()
        return pll


def run(args: argparse.Namespace) -> int:
    if args.msa_path is not None:
        raise CliError("MSA Transformer models (--msa-path) are not supported by esm-dual; "
                       "use fair-esm's predict.py for those")
    locations = list(args.model_location)
    if len(set(locations)) != len(locations):
        raise CliError("--model-location lists the same model twice")
    sequence = args.sequence.strip()
    if not sequence:
        raise CliError("--sequence is empty")
    from ..common.tokenizer import EsmTokenizer

    if args.unknown_residues != "unk":
        check_sequence(sequence, EsmTokenizer().get_vocab().get)  # the ESM alphabet, before any model loads
    header, rows, lines = read_dms(args.dms_input)
    if args.mutation_col not in header:
        raise CliError(f"--mutation-col {args.mutation_col!r} is not a column of {args.dms_input} "
                       f"(columns: {', '.join(header)})")
    if not rows:
        raise CliError(f"--dms-input {args.dms_input}: no rows to score (the file holds only its header)")
    if os.path.isdir(args.dms_output) or args.dms_output.endswith(("/", os.sep)):
        raise CliError(f"--dms-output {args.dms_output!r} is a directory; give the CSV file to write")
    col = header.index(args.mutation_col)
    where = [f"{args.dms_input} line {ln} ({r[col]!r})" for r, ln in zip(rows, lines)]
    parsed = [parse_mutations(r[col], sequence, args.offset_idx, w) for r, w in zip(rows, where)]
    if args.plot:
        from .plot import require_matplotlib

        require_matplotlib()

    scores: dict[str, np.ndarray] = {}
    for loc in locations:
        t0 = time.perf_counter()
        runner = load_runner(loc, backend=args.backend, head="mlm", device=args.device, dtype=args.dtype,
                             nogpu=args.nogpu)
        for msg in runner.load_messages:
            if "contact_head" not in msg:
                warn(msg)
        sc = Scorer(runner, sequence, args.toks_per_batch, args.quiet, args.unknown_residues)
        ids = [[(m, sc.tok(m.wt, w), sc.tok(m.mt, w)) for m in muts] for muts, w in zip(parsed, where)]
        vals = np.zeros(len(rows), dtype=np.float64)
        if args.scoring_strategy == "wt-marginals":
            lp = sc.wt_marginals()
            for k, muts in enumerate(ids):
                vals[k] = sum(float(lp[1 + m.idx, mt] - lp[1 + m.idx, wt]) for m, wt, mt in muts)
        elif args.scoring_strategy == "masked-marginals":
            positions = sorted({m.idx for muts in parsed for m in muts})
            lps = sc.masked_marginals(positions)
            for k, muts in enumerate(ids):
                vals[k] = sum(float(lps[m.idx][mt] - lps[m.idx][wt]) for m, wt, mt in muts)
        else:
            # Each distinct mutated sequence once: synonymous rows (P20P) and repeated variants share it.
            variants: dict[bytes, int] = {}
            seqs: list[np.ndarray] = []
            row_var = []
            for muts in ids:
                s = sc.wt_ids.copy()
                for m, _, mt in muts:
                    s[m.idx] = mt
                key = s.tobytes()
                if key not in variants:
                    variants[key] = len(seqs)
                    seqs.append(s)
                row_var.append(variants[key])
            if len(seqs) < len(rows):
                note(f"{loc}: {len(rows)} rows are {len(seqs)} distinct sequences; each is scored once", args.quiet)
            pll = sc.pseudo_log_likelihoods(seqs)
            vals = pll[np.asarray(row_var, dtype=np.int64)]
        scores[loc] = vals
        note(f"{loc}: scored {len(rows)} rows ({args.scoring_strategy}) in {time.perf_counter() - t0:.1f} s",
             args.quiet)
        del runner, sc

    out_header = list(header)
    columns = dict(scores)
    if len(locations) > 1:
        columns["ensemble"] = np.mean(np.stack([scores[loc] for loc in locations]), axis=0)
    out_rows = [list(r) for r in rows]
    for name, vals in columns.items():
        if name in out_header:  # re-scoring an output file: replace the column (as pandas would)
            j = out_header.index(name)
            for r, v in zip(out_rows, vals):
                r[j] = _fmt(v)
        else:
            out_header.append(name)
            for r, v in zip(out_rows, vals):
                r.append(_fmt(v))
    os.makedirs(os.path.dirname(os.path.abspath(args.dms_output)), exist_ok=True)
    tmp = args.dms_output + ".tmp"
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(out_header)
            w.writerows(out_rows)
        os.replace(tmp, args.dms_output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # a full disk or a bad path leaves no half-written .tmp behind
        raise
    note(f"wrote {len(rows)} rows to {args.dms_output}", args.quiet)
    if args.plot:
        from .plot import plot_scores

        first = np.asarray([muts[0].idx for muts in parsed], dtype=np.int64)
        plot_scores(args.plot, sequence, first, columns, args.offset_idx)
        note(f"plotted per-position scores to {args.plot}", args.quiet)
    return 0
