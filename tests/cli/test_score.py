"""`esm-dual score` end to end, checked against fair-esm's model running predict.py's logic.

The scan is built from P62593.fasta: headers ``index|beta-lactamase_<WT><pos><MT>|fitness`` with 1-based
positions (``--offset-idx 1``); the wild type is the first record with its mutation undone.
"""

from __future__ import annotations

import argparse
import csv
import os
import re

import numpy as np
import pytest
import torch

from esm_dual.common.fasta import read_fasta
from esm_dual.io.fair_esm import save_fair_esm
from tests.conftest import DATA_DIR, tiny_config
from tests.utils import run_cli, write_hub_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")  # tiny models: one thread is faster
N_ROWS = 30
MULTI = ["E26A:V31C", "S2A:K284W"]  # checked against the wild type in _dms()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("score_models")
    out = {}
    for flavour, stem in (("esm2", "esm2_t3_tiny"), ("esm1b", "esm1b_t3_tiny")):
        cfg = tiny_config(flavour, intermediate_size=72)
        tensors = write_hub_checkpoint(str(d / f"{flavour}_hub"), cfg, "mlm", seed=2)
        out[flavour] = (str(d / f"{flavour}_hub"), save_fair_esm(str(d / f"{stem}.pt"), cfg, tensors))
    return out


@pytest.fixture(scope="module")
def dms(tmp_path_factory):
    """(wild-type sequence, CSV path, rows as dicts) for the first N_ROWS variants plus two multi-mutants."""
    records = []
    for i, rec in enumerate(read_fasta(os.path.join(DATA_DIR, "P62593.fasta"))):
        if i >= N_ROWS:
            break
        index, name, fitness = rec.id.split("|")
        records.append((name.split("_", 1)[1], fitness, index, rec.sequence))
    wt, pos, mt = re.match(r"([A-Z])(\d+)([A-Z])$", records[0][0]).groups()
    seq = records[0][3]
    assert seq[int(pos) - 1] == mt
    seq = seq[: int(pos) - 1] + wt + seq[int(pos):]
    for mutant, _, _, mseq in records:  # every record is the wild type with its one mutation
        w, p, m = re.match(r"([A-Z])(\d+)([A-Z])$", mutant).groups()
        assert seq[int(p) - 1] == w and mseq == seq[: int(p) - 1] + m + seq[int(p):]
    for m in ":".join(MULTI).split(":"):
        assert seq[int(m[1:-1]) - 1] == m[0], m
    path = tmp_path_factory.mktemp("dms") / "dms.csv"
    rows = [{"mutant": m, "DMS_score": f, "index": i} for m, f, i, _ in records]
    rows += [{"mutant": m, "DMS_score": "0.5", "index": f"multi{k}"} for k, m in enumerate(MULTI)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "mutant", "DMS_score"])
        w.writeheader()
        w.writerows(rows)
    return seq, str(path), rows


def _read(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def _fair_esm(pt):
    import esm

    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(pt)
    return model.eval(), alphabet


def _reference(pt, seq, mutants, offset, strategy):
    """predict.py's label_row / masked-marginals loop with fair-esm's model; multi-mutants summed."""
    model, alphabet = _fair_esm(pt)
    _, _, toks = alphabet.get_batch_converter()([("protein1", seq)])
    parts = [[(m[0], int(m[1:-1]) - offset, m[-1]) for m in mutant.split(":")] for mutant in mutants]
    with torch.no_grad():
        if strategy == "wt-marginals":
            lp = torch.log_softmax(model(toks)["logits"], dim=-1)[0]
            per_pos = {i: lp[1 + i] for p in parts for _, i, _ in p}
        else:  # masked-marginals: fair-esm masks one token per forward pass
            per_pos = {}
            for i in sorted({i for p in parts for _, i, _ in p}):
                masked = toks.clone()
                masked[0, 1 + i] = alphabet.mask_idx
                per_pos[i] = torch.log_softmax(model(masked)["logits"], dim=-1)[0, 1 + i]
    out = []
    for p in parts:
        total = 0.0
        for wt, i, mt in p:
            assert seq[i] == wt, "The listed wildtype does not match the provided sequence"
            total += (per_pos[i][alphabet.get_idx(mt)] - per_pos[i][alphabet.get_idx(wt)]).item()
        out.append(total)
    return np.array(out)


def _reference_pll(pt, seq, mutants, offset):
    """Pseudo-log-likelihood of each mutated sequence with fair-esm's model: sum over residues i of
    log p(x_i | x with token i masked)."""
    model, alphabet = _fair_esm(pt)
    out = []
    for mutant in mutants:
        s = seq
        for m in mutant.split(":"):
            i = int(m[1:-1]) - offset
            assert s[i] == m[0]
            s = s[:i] + m[-1] + s[i + 1:]
        _, _, toks = alphabet.get_batch_converter()([("protein1", s)])
        n = len(s)
        masked = toks.repeat(n, 1)
        masked[torch.arange(n), torch.arange(n) + 1] = alphabet.mask_idx
        with torch.no_grad():  # the masked copies are independent: run them in a few chunks
            lp = torch.cat([torch.log_softmax(model(chunk)["logits"], dim=-1) for chunk in masked.split(48)])
        out.append(sum(lp[i, i + 1, toks[0, i + 1]].item() for i in range(n)))
    return np.array(out)


@pytest.mark.parametrize("flavour,strategy", [("esm2", "wt-marginals"), ("esm2", "masked-marginals"),
                                              ("esm1b", "masked-marginals")])
def test_marginals_match_fair_esm_predict(tmp_path, capsys, models, dms, flavour, strategy):
    hub, pt = models[flavour]
    seq, path, rows = dms
    out = tmp_path / "out.csv"
    rc, _, err = run_cli(capsys, "score", "--model-location", pt, hub, "--sequence", seq, "--dms-input", path,
                         "--mutation-col", "mutant", "--dms-output", out, "--offset-idx", 1,
                         "--scoring-strategy", strategy, "--nogpu", "--toks-per-batch", 2000, "-q")
    assert rc == 0, err
    header, got = _read(out)
    assert header == ["index", "mutant", "DMS_score", pt, hub, "ensemble"]  # input columns kept, in order
    assert [{k: r[k] for k in ("index", "mutant", "DMS_score")} for r in got] == rows
    ref = _reference(pt, seq, [r["mutant"] for r in rows], 1, strategy)
    a = np.array([float(r[pt]) for r in got])
    b = np.array([float(r[hub]) for r in got])
    np.testing.assert_allclose(a, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(b, ref, atol=1e-5, rtol=0)  # same weights in the hub layout
    np.testing.assert_allclose([float(r["ensemble"]) for r in got], (a + b) / 2, atol=1e-12)
    # Synonymous mutations score 0; a multi-mutant is the sum of its parts.
    assert a[0] == 0.0 and rows[0]["mutant"] == "P20P"
    parts = _reference(pt, seq, MULTI[0].split(":"), 1, strategy)
    assert a[N_ROWS] == pytest.approx(parts.sum(), abs=1e-5)


def test_pseudo_ppl_is_the_pseudo_log_likelihood(tmp_path, capsys, models, dms):
    hub, pt = models["esm2"]
    seq, path, rows = dms
    small = tmp_path / "small.csv"
    pick = [rows[3], rows[N_ROWS]]  # a missense and a double mutant
    with open(small, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mutant", "DMS_score"])
        w.writeheader()
        w.writerows({"mutant": r["mutant"], "DMS_score": r["DMS_score"]} for r in pick)
    out = tmp_path / "out.csv"
    rc, _, err = run_cli(capsys, "score", "--model-location", hub, "--sequence", seq, "--dms-input", small,
                         "--dms-output", out, "--offset-idx", 1, "--scoring-strategy", "pseudo-ppl",
                         "--toks-per-batch", 20000, "-q")
    assert rc == 0, err
    header, got = _read(out)
    assert header == ["mutant", "DMS_score", hub]
    ref = _reference_pll(pt, seq, [r["mutant"] for r in pick], 1)
    np.testing.assert_allclose([float(r[hub]) for r in got], ref, atol=1e-4, rtol=1e-6)


def test_tf_backend_matches_pt(tmp_path, capsys, models, dms):
    pytest.importorskip("tensorflow")
    hub, _ = models["esm2"]
    seq, path, _ = dms
    cols = []
    for backend in ("pt", "tf"):
        out = tmp_path / f"{backend}.csv"
        rc, _, err = run_cli(capsys, "score", "--model-location", hub, "--sequence", seq, "--dms-input", path,
                             "--dms-output", out, "--offset-idx", 1, "--scoring-strategy", "masked-marginals",
                             "--backend", backend, "-q")
        assert rc == 0, err
        cols.append([float(r[hub]) for r in _read(out)[1]])
    np.testing.assert_allclose(cols[1], cols[0], atol=1e-4, rtol=0)


def test_wild_type_mismatch_names_the_row(tmp_path, capsys, models, dms):
    hub, _ = models["esm2"]
    seq, path, rows = dms
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mutant", "DMS_score"])
        w.writeheader()
        w.writerows([{"mutant": "P20P", "DMS_score": "1"}, {"mutant": "D207D", "DMS_score": "1"},
                     {"mutant": "W26A", "DMS_score": "1"}])
    out = tmp_path / "out.csv"
    rc, _, err = run_cli(capsys, "score", "--model-location", hub, "--sequence", seq, "--dms-input", bad,
                         "--dms-output", out, "--offset-idx", 1)
    assert rc == 2
    assert "line 4 ('W26A')" in err and "wild type 'W'" in err and "'E' at position 26" in err  # file line
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # Forgetting the offset is caught the same way (position 20 is 'E' 0-based, not 'P').
    rc, _, err = run_cli(capsys, "score", "--model-location", hub, "--sequence", seq, "--dms-input", path,
                         "--dms-output", out)
    assert rc == 2 and "line 2 ('P20P')" in err and "--offset-idx 0" in err


def test_bad_sequence_and_csv_are_named(tmp_path, capsys, models, dms):
    hub, _ = models["esm2"]
    seq, path, rows = dms
    out = tmp_path / "o.csv"
    base = ["score", "--model-location", hub, "--dms-input", path, "--dms-output", out, "--offset-idx", 1]
    for bad, msg in ((seq[:20] + "*" + seq[21:], "'*' (a stop codon?"), (seq[:20] + "1" + seq[21:], "'1', not a"),
                     (seq.lower(), "lower-case 'm'" if seq[0] == "M" else "lower-case")):
        rc, _, err = run_cli(capsys, *base, "--sequence", bad)
        assert rc == 2 and msg in err, err
        assert ("position 21" if bad[:20] == seq[:20] else "position 1") in err and "Traceback" not in err
    assert not out.exists()
    # a CSV that is not UTF-8, a directory, blank lines counted in the line numbers
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"mutant,DMS_score\nP20A,1\xff\n")
    rc, _, err = run_cli(capsys, *base[:4], latin, *base[5:], "--sequence", seq)
    assert rc == 2 and "latin.csv: not UTF-8" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, *base[:4], tmp_path, *base[5:], "--sequence", seq)
    assert rc == 2 and "is a directory" in err
    gaps = tmp_path / "gaps.csv"
    gaps.write_text(f"mutant,DMS_score\n\n{rows[0]['mutant']},1\n\nW26A,1\n")
    rc, _, err = run_cli(capsys, *base[:4], gaps, *base[5:], "--sequence", seq)
    assert rc == 2 and "gaps.csv line 5 ('W26A')" in err, err


def test_input_errors(tmp_path, capsys, models, dms):
    hub, pt = models["esm2"]
    seq, path, _ = dms
    out = tmp_path / "o.csv"
    base = ["score", "--sequence", seq, "--dms-input", path, "--dms-output", out, "--offset-idx", 1]
    cases = [
        ([*base, "--model-location", hub, "--mutation-col", "variant"], "not a column"),
        ([*base, "--model-location", hub, "hub2", hub], "same model twice"),
        ([*base, "--model-location", tmp_path / "nope"], "no such file or directory"),
        ([*base, "--model-location", hub, "--msa-path", "x.a3m"], "MSA Transformer"),
        (["score", "--sequence", seq[:100], "--dms-input", path, "--dms-output", out, "--offset-idx", 1,
          "--model-location", hub], "outside the sequence of length 100"),
        (["score", "--sequence", seq, "--dms-input", tmp_path / "none.csv", "--dms-output", out,
          "--model-location", hub], "no such file"),
    ]
    for argv, msg in cases:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and msg in err and "Traceback" not in err, (argv, err)
    # A checkpoint without the LM head cannot score.
    base_dir = tmp_path / "base"
    write_hub_checkpoint(str(base_dir), tiny_config("esm2"), "base")
    rc, _, err = run_cli(capsys, *base, "--model-location", base_dir)
    assert rc == 2 and "no language-model head" in err


def test_score_plot(tmp_path, capsys, models, dms):
    pytest.importorskip("matplotlib")
    hub, pt = models["esm2"]
    seq, path, _ = dms
    rc, _, err = run_cli(capsys, "score", "--model-location", hub, pt, "--sequence", seq, "--dms-input", path,
                         "--dms-output", tmp_path / "o.csv", "--offset-idx", 1, "--plot", tmp_path / "p.png", "-q")
    assert rc == 0, err
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
