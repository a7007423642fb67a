"""`esm-dual fold` end to end on a tiny ESMFold checkpoint in the hub layout."""

from __future__ import annotations

import argparse
import csv
import os
import shutil

import pytest
import torch

from esm_dual.common.fasta import read_fasta
from esm_dual.common.protein import read_pdb_atoms
from tests.pt.test_esmfold import one_thread  # noqa: F401 (autouse fixture)


def _args(fasta, outdir, model, *extra):
    from esm_dual.cli import fold

    parser = argparse.ArgumentParser()
    fold.add_arguments(parser)
    return parser.parse_args([str(fasta), str(outdir), "--model", model, "--cpu-only", "--quiet", *extra])


def _summary(outdir):
    with open(os.path.join(outdir, "summary.tsv"), newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_fold_end_to_end_and_resume(tmp_path, esmfold_dir, data_dir, monkeypatch, capsys):
    from esm_dual.cli import fold
    from esm_dual.pt import EsmForProteinFolding

    fasta = os.path.join(data_dir, "few_proteins.fasta")
    records = list(read_fasta(fasta))
    out = tmp_path / "out"
    rc = fold.run(
        _args(
            fasta,
            out,
            esmfold_dir,
            "--num-recycles",
            "1",
            "--max-tokens-per-batch",
            "200",
            "--chunk-size",
            "16",
            "--mmcif",
        )
    )
    assert rc == 0
    rows = _summary(out)
    assert [r["id"] for r in sorted(rows, key=lambda r: r["id"])] == sorted(r.id for r in records)
    assert list(rows[0]) == ["id", "length", "mean_plddt", "ptm"]
    model = EsmForProteinFolding.from_pretrained(esmfold_dir)
    model.set_chunk_size(16)
    for rec in records:
        row = next(r for r in rows if r["id"] == rec.id)
        assert int(row["length"]) == len(rec.sequence)
        assert 0 <= float(row["mean_plddt"]) <= 100 and 0 <= float(row["ptm"]) <= 1
        pdb = (out / f"{rec.id}.pdb").read_text()
        atoms = read_pdb_atoms(pdb)
        assert len({a["res_seq"] for a in atoms}) == len(rec.sequence)
        assert (out / f"{rec.id}.cif").is_file()
        # Same structure as the Python API (batching and chunking do not change it).
        with torch.no_grad():
            ref = read_pdb_atoms(model.infer_pdb(rec.sequence, num_recycles=1))
        assert len(ref) == len(atoms)
        assert max(abs(p - q) for a, b in zip(atoms, ref) for p, q in zip(a["xyz"], b["xyz"])) <= 2e-3

    # Re-running skips everything already listed (the model is not even loaded).
    def boom(*a, **k):
        raise AssertionError("model loaded although every record is done")

    monkeypatch.setattr(EsmForProteinFolding, "from_pretrained", classmethod(boom))
    assert fold.run(_args(fasta, out, esmfold_dir, "--num-recycles", "1")) == 0
    assert len(_summary(out)) == len(records)
    monkeypatch.undo()

    # Other options than those that made the folder's structures: refused, nothing changed.
    capsys.readouterr()
    assert fold.run(_args(fasta, out, esmfold_dir, "--num-recycles", "2")) == 2
    assert "num_recycles: stored 1, this run 2" in capsys.readouterr().err

    # A record missing a file that is asked for (--mmcif) is folded again.
    os.remove(out / f"{records[0].id}.cif")
    assert fold.run(_args(fasta, out, esmfold_dir, "--num-recycles", "1", "--mmcif")) == 0
    assert (out / f"{records[0].id}.cif").is_file()

    # A record whose PDB was deleted is folded again; the others are skipped.
    os.remove(out / f"{records[1].id}.pdb")
    assert fold.run(_args(fasta, out, esmfold_dir, "--num-recycles", "1")) == 0
    assert (out / f"{records[1].id}.pdb").is_file()
    assert [r["id"] for r in _summary(out)] == [r.id for r in records]  # one row each, FASTA order


def test_out_of_memory_record_is_reported_and_others_continue(
    tmp_path, esmfold_dir, data_dir, monkeypatch, capsys
):
    from esm_dual.cli import fold
    from esm_dual.pt import EsmForProteinFolding

    fasta = os.path.join(data_dir, "few_proteins.fasta")
    records = list(read_fasta(fasta))
    too_big = max(records, key=lambda r: len(r.sequence))
    calls: list[int] = []
    real_infer = EsmForProteinFolding.infer

    def infer(self, seqs, *args, **kwargs):
        calls.append(len(seqs))
        if len(seqs) > 1 or seqs[0] == too_big.sequence:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_infer(self, seqs, *args, **kwargs)

    monkeypatch.setattr(EsmForProteinFolding, "infer", infer)
    out = tmp_path / "out"
    rc = fold.run(
        _args(fasta, out, esmfold_dir, "--num-recycles", "0", "--max-tokens-per-batch", "100000")
    )
    assert rc == 1
    assert calls[0] == len(records) and calls[1:] == [1] * len(records)  # batch, then each alone
    err = capsys.readouterr().err
    assert too_big.id in err and "out of memory" in err
    done = {r["id"] for r in _summary(out)}
    assert done == {r.id for r in records} - {too_big.id}
    assert not (out / f"{too_big.id}.pdb").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (">ok\nMKV\n>bad_one\nMKV1234\n", "bad_one"),
        (">ok\nMKV\n>empty_chain\nMKV::GG\n", "empty_chain"),
        (">dna\nACGTACGTACGTACGTACGTACGTAGCTAGCTAGCAT\n", "nucleotide"),
        (">ok\nMKV\n>nothing\n\n>x\nMK\n", "nothing"),
        (">xs\nXXXXBZ\n", "no standard amino acid"),
        (">big\n" + "MKTAYIAKQR" * 1000 + "\n", "a chain of 10000 residues; the PDB format numbers at most 9999"),
        (">lower\nMKVtay\n", "record 'lower', residue 4: lower-case 't'"),
        (">stop\nMKV*\n", "record 'stop', residue 4: '*'"),
    ],
)
def test_bad_sequences_are_refused_before_loading(tmp_path, content, message, capsys, monkeypatch):
    from esm_dual.cli import fold
    from esm_dual.pt import EsmForProteinFolding

    def boom(*a, **k):
        raise AssertionError("model loaded for invalid input")

    monkeypatch.setattr(EsmForProteinFolding, "from_pretrained", classmethod(boom))
    fasta = tmp_path / "in.fasta"
    fasta.write_text(content)
    assert fold.run(_args(fasta, tmp_path / "out", "unused")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_residues_fold_as_x_and_main_entry(tmp_path, esmfold_dir):
    from esm_dual.cli.main import main

    fasta = tmp_path / "in.fasta"
    fasta.write_text(">weird|id/1 description\nMKBZUOX\n>dimer\nMKTAYIAK:GSHMLED\n")
    out = tmp_path / "out"
    rc = main(
        [
            "fold",
            str(fasta),
            str(out),
            "--model",
            esmfold_dir,
            "--cpu-only",
            "--quiet",
            "--num-recycles",
            "0",
        ]
    )
    assert rc == 0
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [  # hidden: sequence hashes for resume
        "dimer.pdb", "fold_options.json", "summary.tsv", "weird_id_1.pdb"]
    atoms = read_pdb_atoms((out / "weird_id_1.pdb").read_text())
    assert {a["res_name"] for a in atoms} == {"MET", "LYS"}  # X residues have no atoms
    dimer = read_pdb_atoms((out / "dimer.pdb").read_text())
    assert {a["chain"] for a in dimer} == {"A", "B"}
    assert "GLY" not in {a["res_name"] for a in dimer if a["chain"] == "A"}  # the poly-G linker is gone
    rows = {r["id"]: r for r in _summary(out)}
    assert rows["weird|id/1"]["length"] == "7" and rows["dimer"]["length"] == "15"
    shutil.rmtree(out)


def test_fold_batches_by_length_and_fast_mode_option(tmp_path, esmfold_dir, data_dir, monkeypatch):
    """Records go to infer() in fold_batches' buckets (the one bucketing helper); --trunk-dtype fast
    runs the fast mode (bf16, SDPA kernels on the CPU) and is recorded with the structures."""
    import json

    from esm_dual.cli import fold
    from esm_dual.pt import EsmForProteinFolding
    from esm_dual.pt.folding import fold_batches

    fasta = os.path.join(data_dir, "few_proteins.fasta")
    records = list(read_fasta(fasta))
    seen: list[tuple[list[str], bool]] = []
    real_infer = EsmForProteinFolding.infer

    def infer(self, seqs, *args, **kwargs):
        seen.append((list(seqs), self.fast))
        return real_infer(self, seqs, *args, **kwargs)

    monkeypatch.setattr(EsmForProteinFolding, "infer", infer)
    out = tmp_path / "out"
    budget = 2 * max(len(r.sequence) for r in records)
    assert fold.run(_args(fasta, out, esmfold_dir, "--num-recycles", "0", "--trunk-dtype", "fast",
                          "--max-tokens-per-batch", str(budget))) == 0
    lengths = [len(r.sequence) for r in records]
    expected = [[records[i].sequence.upper() for i in b] for b in fold_batches(lengths, budget)]
    assert [s for s, _ in seen] == expected
    assert all(fast for _, fast in seen)
    assert json.loads((out / "fold_options.json").read_text())["trunk_dtype"] == "fast"
    assert len(_summary(out)) == len(records)


def test_trunk_mode_from_the_environment_and_the_flag_over_it(tmp_path, esmfold_dir, monkeypatch, capsys):
    """Without --trunk-dtype the ESM_DUAL_FOLD_* environment decides (and is recorded by name); the flag sets
    the model's fold_fast / fold_kernels over it; an invalid value is an error naming the variable."""
    import json

    from esm_dual.cli import fold
    from esm_dual.pt import EsmForProteinFolding
    from esm_dual.pt.fast.options import set_default_options

    fasta = tmp_path / "one.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISF\n")
    seen = []
    real_infer = EsmForProteinFolding.infer

    def infer(self, seqs, *args, **kwargs):
        o = self.fast_path_options
        seen.append((self.fast, o.fold_fast, o.fold_kernels))
        return real_infer(self, seqs, *args, **kwargs)

    monkeypatch.setattr(EsmForProteinFolding, "infer", infer)
    previous = set_default_options(None)  # read the environment again
    try:
        monkeypatch.setenv("ESM_DUAL_FOLD_FAST", "on")
        assert fold.run(_args(fasta, tmp_path / "env", esmfold_dir, "--num-recycles", "0")) == 0
        assert seen.pop() == (True, "on", "auto")
        assert json.loads((tmp_path / "env" / "fold_options.json").read_text())["trunk_dtype"] == "fast"
        assert fold.run(_args(fasta, tmp_path / "flag", esmfold_dir, "--num-recycles", "0",
                              "--trunk-dtype", "bf16")) == 0
        assert seen.pop() == (False, "on", "torch")
        monkeypatch.setenv("ESM_DUAL_FOLD_KERNELS", "sdpa")
        set_default_options(None)
        assert fold.run(_args(fasta, tmp_path / "sdpa", esmfold_dir, "--num-recycles", "0")) == 0
        assert seen.pop() == (True, "on", "sdpa")
        recorded = json.loads((tmp_path / "sdpa" / "fold_options.json").read_text())["trunk_dtype"]
        assert recorded == "fold_fast=on, fold_kernels=sdpa"
        monkeypatch.setenv("ESM_DUAL_FOLD_FAST", "fast")
        set_default_options(None)
        capsys.readouterr()
        assert fold.run(_args(fasta, tmp_path / "bad", esmfold_dir)) == 2
        err = capsys.readouterr().err
        assert "ESM_DUAL_FOLD_FAST='fast'" in err and "auto, on, off" in err
        assert not seen and not (tmp_path / "bad").exists()
    finally:
        set_default_options(previous)
