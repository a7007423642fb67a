"""`esm-dual fold` and `score` under faults and odd input (issue 19.2, 19.4, 19.11, 19.12; issue 20's failed runs).

Promises of README "What is guaranteed". Tiny random checkpoints."""

from __future__ import annotations

import argparse
import os
import shutil

import pytest

from esm_dual.cli.main import main
from tests.conftest import tiny_config
from tests.pt.test_esmfold import one_thread  # noqa: F401 (autouse fixture)
from tests.utils import write_fasta, write_hub_checkpoint

SEQS = {"a": "MKTAYIAKQRQISFVKSHFSRQ", "b": "GSHMLEDPVAGGL", "c": "MKVLAAGIVGLLLA"}


def _fold(outdir, fasta, model, *extra):
    from esm_dual.cli import fold

    parser = argparse.ArgumentParser()
    fold.add_arguments(parser)
    return fold.run(parser.parse_args([str(fasta), str(outdir), "--model", model, "--cpu-only", "--quiet",
                                       "--num-recycles", "0", *extra]))


def test_fold_reads_cr_only_and_bom_files_whole(tmp_path, esmfold_dir, capsys):
    """Guarantee "one FASTA reader" for fold: a CR-only file with a BOM folds every record."""
    fa = write_fasta(tmp_path / "x.fa", SEQS, newline="\r", bom=True)
    assert _fold(tmp_path / "out", fa, esmfold_dir) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.pdb")) == ["a.pdb", "b.pdb", "c.pdb"]


def test_fold_resume_refuses_changed_sequences_and_new_weights(tmp_path, esmfold_dir, capsys):
    """Guarantee "resume checks sequences and weights" for fold."""
    model = tmp_path / "model"
    shutil.copytree(esmfold_dir, model)
    out = tmp_path / "out"
    fa = write_fasta(tmp_path / "x.fa", SEQS)
    assert _fold(out, fa, str(model)) == 0
    pdb_b = (out / "b.pdb").read_text()
    fa2 = write_fasta(tmp_path / "y.fa", dict(SEQS, a="MKTAYIAKQRQISFVKSHFSRQLEERLGL"))
    capsys.readouterr()
    assert _fold(out, fa2, str(model)) == 2
    err = capsys.readouterr().err
    assert "1 record(s) changed" in err and "'a'" in err and "--overwrite-changed" in err, err
    assert _fold(out, fa2, str(model), "--overwrite-changed") == 0
    assert (out / "b.pdb").read_text() == pdb_b  # unchanged records are skipped
    n_atoms = sum(1 for line in (out / "a.pdb").read_text().splitlines() if line.startswith("ATOM"))
    assert n_atoms > 0 and "LEU A  29" in (out / "a.pdb").read_text()  # the new, longer sequence
    # new weights at the same path
    from safetensors.numpy import load_file, save_file

    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(n for n in tensors if n.endswith("layer_norm.weight") or n.endswith("LayerNorm.weight"))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    capsys.readouterr()
    assert _fold(out, fa2, str(model)) == 2
    assert "weights" in capsys.readouterr().err


def test_a_failed_fold_leaves_no_folder_and_stale_tmp_files_are_cleaned(tmp_path, esmfold_dir, capsys):
    """Guarantee "failed runs leave nothing to trip on": a run that fails before folding anything removes the
    folder it created (no folder holding only fold_options.json); our own *.pdb.tmp / summary.tsv.tmp of a
    killed run are removed by the next run, other files are left alone."""
    fa = write_fasta(tmp_path / "x.fa", SEQS)
    out = tmp_path / "out"
    assert _fold(out, fa, str(tmp_path / "no_such_model")) == 2
    assert not out.exists(), os.listdir(out)
    out.mkdir()
    for name in ("a.pdb.tmp", "summary.tsv.tmp", "fold_options.json.tmp", "mine.tmp"):
        (out / name).write_text("partial")
    assert _fold(out, fa, esmfold_dir) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == ["mine.tmp"]


# ---- score --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    d = tmp_path_factory.mktemp("score_faults")
    write_hub_checkpoint(str(d / "hub"), tiny_config("esm2", intermediate_size=72), "mlm", seed=2)
    return str(d / "hub")


def _score(capsys, *argv):
    rc = main(["score", *[str(a) for a in argv]])
    return rc, capsys.readouterr().err


def test_score_header_only_csv_and_directory_output_are_named_before_scoring(tmp_path, mlm, capsys, monkeypatch):
    from esm_dual.cli import _common

    header_only = tmp_path / "h.csv"
    header_only.write_text("mutant,DMS_score\n")
    good = tmp_path / "g.csv"
    good.write_text("mutant,DMS_score\nM1A,0.1\n")
    outdir = tmp_path / "outdir"
    outdir.mkdir()

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(_common, "load_runner", no_model)
    monkeypatch.setattr("esm_dual.cli.score.load_runner", no_model)
    common = ["--model-location", mlm, "--sequence", "MKTAYIAK"]
    rc, err = _score(capsys, *common, "--dms-input", header_only, "--dms-output", tmp_path / "o.csv",
                     "--scoring-strategy", "pseudo-ppl")
    assert rc == 2 and "no rows to score" in err and "Traceback" not in err, err
    for out in (outdir, str(tmp_path / "newdir") + os.sep):
        rc, err = _score(capsys, *common, "--dms-input", good, "--dms-output", out)
        assert rc == 2 and "is a directory" in err and "Traceback" not in err, err
    assert os.listdir(outdir) == [] and not (tmp_path / "newdir").exists()
