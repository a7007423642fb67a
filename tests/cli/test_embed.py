"""`esm-dual embed` end to end on tiny checkpoints, checked against fair-esm's own model code.

The fair-esm reference reproduces scripts/extract.py: FastaBatchedDataset labels, the batch converter with
truncation, repr_layers normalised, means over residues, BOS states and contacts cut to the truncated length.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from esm_dual.cli._common import TorchRunner, token_batches
from esm_dual.cli.main import main
from esm_dual.common.embeddings import EmbeddingStore
from esm_dual.io.fair_esm import save_fair_esm
from tests.conftest import DATA_DIR, tiny_config
from tests.utils import write_hub_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRUNC = 300
FAULTY_EMBED = os.path.join(ROOT, "tests", "cli", "faulty_embed.py")  # esm-dual with a writer fault


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{flavour: (hub dir, fair-esm .pt)} with the same random weights (fair-esm-compatible sizes)."""
    d = tmp_path_factory.mktemp("embed_models")
    out = {}
    for flavour, stem in (("esm2", "esm2_t3_tiny"), ("esm1b", "esm1b_t3_tiny")):
        cfg = tiny_config(flavour, intermediate_size=72)
        tensors = write_hub_checkpoint(str(d / f"{flavour}_hub"), cfg, "mlm", seed=1)
        pt = save_fair_esm(str(d / f"{stem}.pt"), cfg, tensors)
        out[flavour] = (str(d / f"{flavour}_hub"), pt)
    return out


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    """some_proteins.fasta (15 records, 71..935 residues) plus a record whose header has a description."""
    p = tmp_path_factory.mktemp("embed_fasta") / "proteins.fasta"
    with open(os.path.join(DATA_DIR, "some_proteins.fasta")) as f:
        text = f.read()
    p.write_text(text.rstrip("\n") + "\n>extra_1 a described protein OS=Nowhere\nMKTAYIAKQRQISFVKSHFSRQLEERLGL\n")
    return str(p)


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")  # tiny models, a busy 2-core box


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _fair_esm_extract(pt_path, fasta, repr_layers, include, truncation):
    """scripts/extract.py's per-record dicts, computed with fair-esm's model, one sequence per batch."""
    import esm

    with torch.serialization.safe_globals([argparse.Namespace]):
        model, alphabet = esm.pretrained.load_model_and_alphabet_local(pt_path)
    model.eval()
    dataset = esm.FastaBatchedDataset.from_file(fasta)
    layers = [(i + model.num_layers + 1) % (model.num_layers + 1) for i in repr_layers]
    convert = alphabet.get_batch_converter(truncation)
    out = {}
    with torch.no_grad():
        for label, seq in dataset:
            labels, strs, toks = convert([(label, seq)])
            res = model(toks, repr_layers=layers, return_contacts="contacts" in include)
            reps = res["representations"]
            n = min(truncation, len(strs[0]))
            d = {"label": label}
            if "per_tok" in include:
                d["representations"] = {k: t[0, 1:n + 1].clone() for k, t in reps.items()}
            if "mean" in include:
                d["mean_representations"] = {k: t[0, 1:n + 1].mean(0).clone() for k, t in reps.items()}
            if "bos" in include:
                d["bos_representations"] = {k: t[0, 0].clone() for k, t in reps.items()}
            if "contacts" in include:
                d["contacts"] = res["contacts"][0, :n, :n].clone()
            out[label] = d
    return out


def _assert_same_dict(ours, ref, atol):
    assert list(ours) == list(ref)
    assert ours["label"] == ref["label"]
    for key in ("representations", "mean_representations", "bos_representations"):
        if key in ref:
            assert list(ours[key]) == list(ref[key])  # same int layer keys, same order
            for layer in ref[key]:
                a, b = ours[key][layer], ref[key][layer]
                assert a.dtype == torch.float32 and a.shape == b.shape
                torch.testing.assert_close(a, b, atol=atol, rtol=0)
                assert a.untyped_storage().nbytes() == a.numel() * 4  # cloned, not a view of the batch
    if "contacts" in ref:
        torch.testing.assert_close(ours["contacts"], ref["contacts"], atol=atol, rtol=0)


@pytest.mark.parametrize("flavour", ["esm2", "esm1b"])
def test_pt_format_is_fair_esm_extract(tmp_path, capsys, models, fasta, flavour):
    hub, pt = models[flavour]
    out = tmp_path / "out"
    include = ["mean", "per_tok", "bos", "contacts"]
    rc, _, err = _run(capsys, "embed", fasta, out, "--model", pt, "--format", "pt", "--include", *include,
                      "--repr-layers", "0", "-1", "2", "--toks-per-batch", 1500,
                      "--truncation-seq-length", TRUNC, "-q")
    assert rc == 0, err
    ref = _fair_esm_extract(pt, fasta, [0, -1, 2], include, TRUNC)
    files = sorted(f for f in os.listdir(out) if not f.startswith("."))  # hidden: resume records
    assert files == sorted(f"{label}.pt" for label in ref)  # label = the whole header line
    assert "extra_1 a described protein OS=Nowhere.pt" in files
    for label, r in ref.items():
        ours = torch.load(out / f"{label}.pt")
        _assert_same_dict(ours, r, atol=1e-5)
        assert set(ours["representations"]) == {0, 3, 2}
    # Sequences longer than the limit were truncated, with a warning naming them (and only them).
    from esm_dual.common.fasta import read_fasta

    lengths = {r.id: len(r.sequence) for r in read_fasta(fasta)}
    long_ids = [i for i, n in lengths.items() if n > TRUNC]
    assert len(long_ids) == 6
    warning = " ".join(line for line in err.splitlines() if "truncated" in line)
    assert warning.startswith("esm-dual: warning: 6 sequence(s) longer than 300 residues truncated")
    for i, n in lengths.items():
        assert (f"'{i}'" in warning) == (n > TRUNC), i
        label = next(label for label in ref if label.split()[0] == i)
        assert ref[label]["representations"][3].shape[0] == min(n, TRUNC)


@pytest.mark.parametrize("layers", [["-1"], ["0", "-1"]])
def test_means_without_per_token_states(tmp_path, capsys, models, fasta, layers):
    """Without per_tok the means and <cls> rows are reduced on the model's device and only [B, D] crosses to the
    host (with the last layer alone, no other layer's states are kept): the same numbers as fair-esm's
    extract, in both formats; the TF backend gives the same store."""
    hub, pt = models["esm2"]
    args = ["--model", pt, "--include", "mean", "bos", "--repr-layers", *layers, "--toks-per-batch", 1500,
            "--truncation-seq-length", TRUNC, "-q"]
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "out", "--format", "pt", *args)
    assert rc == 0, err
    ref = _fair_esm_extract(pt, fasta, [int(x) for x in layers], ["mean", "bos"], TRUNC)
    for label, r in ref.items():
        ours = torch.load(tmp_path / "out" / f"{label}.pt")
        assert "representations" not in ours
        _assert_same_dict(ours, r, atol=1e-5)
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "e.h5", *args)
    assert rc == 0, err
    with EmbeddingStore(tmp_path / "e.h5") as store:
        assert store.layers == sorted({int(x) % 4 for x in layers})
        for label, r in ref.items():
            rec = store[label.split()[0]]
            for layer in store.layers:
                np.testing.assert_allclose(rec["mean"][layer], r["mean_representations"][layer], atol=1e-5, rtol=0)
                np.testing.assert_allclose(rec["bos"][layer], r["bos_representations"][layer], atol=1e-5, rtol=0)
    if layers == ["0", "-1"] and importlib.util.find_spec("tensorflow") is not None:
        rc, _, err = _run(capsys, "embed", fasta, tmp_path / "tf.h5", *args, "--backend", "tf")
        assert rc == 0, err
        a, b = _store_arrays(tmp_path / "tf.h5"), _store_arrays(tmp_path / "e.h5")
        assert set(a) == set(b)
        for i in a:
            for kind in ("mean", "bos"):
                for layer in (0, 3):
                    np.testing.assert_allclose(a[i][kind][layer], b[i][kind][layer], atol=1e-4, rtol=0)


def test_h5_store_matches_pt_format(tmp_path, capsys, models, fasta):
    hub, pt = models["esm2"]
    args = ["--model", hub, "--include", "mean", "per_tok", "bos", "contacts", "--repr-layers", "-1", "1",
            "--toks-per-batch", 1500, "--truncation-seq-length", TRUNC, "-q"]
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "pt", "--format", "pt", *args)
    assert rc == 0, err
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "e.h5", *args, "--sort-window", 4, "--compression", "gzip")
    assert rc == 0, err
    assert "lm_head" not in err  # the dropped LM head is not worth a warning here
    from esm_dual.common.fasta import read_fasta

    records = list(read_fasta(fasta))
    with EmbeddingStore(tmp_path / "e.h5") as store:
        assert len(store) == len(records)
        assert set(store) == {r.id for r in records}
        assert "extra_1" in store and "nope" not in store
        assert store.layers == [1, 3]
        assert store.metadata["hidden_size"] == 18 and store.metadata["num_layers"] == 3
        assert store.model == os.path.abspath(hub)
        assert store._f["mean/3"].compression == "gzip"
        for r in records:
            ref = torch.load(tmp_path / "pt" / f"{r.description}.pt")
            rec = store[r.id]
            assert rec["description"] == r.description
            assert rec["length"] == min(TRUNC, len(r.sequence))
            for layer in (3, 1):
                np.testing.assert_allclose(rec["mean"][layer], ref["mean_representations"][layer], atol=1e-5)
                np.testing.assert_allclose(rec["bos"][layer], ref["bos_representations"][layer], atol=1e-5)
                np.testing.assert_allclose(rec["per_tok"][layer], ref["representations"][layer], atol=1e-5)
            np.testing.assert_allclose(rec["contacts"], ref["contacts"], atol=1e-5)


def _store_arrays(path):
    with EmbeddingStore(path) as s:
        return {i: s[i] for i in s}


def _assert_stores_close(a, b, atol=1e-5):
    assert set(a) == set(b)
    for i in a:
        for kind in ("mean", "per_tok", "bos"):
            for layer in a[i][kind]:
                np.testing.assert_allclose(a[i][kind][layer], b[i][kind][layer], atol=atol, rtol=0)
        np.testing.assert_allclose(a[i]["contacts"], b[i]["contacts"], atol=atol, rtol=0)


def _batches_of(fasta, toks):
    from esm_dual.common.fasta import read_fasta

    recs = list(read_fasta(fasta))
    lengths = [min(TRUNC, len(r.sequence)) for r in recs]
    return [[recs[i].id for i in b] for b in token_batches(lengths, toks)]


def test_resume_after_a_crash(tmp_path, capsys, models, fasta, monkeypatch):
    hub, _ = models["esm2"]
    args = ["--model", hub, "--include", "mean", "per_tok", "bos", "contacts", "--repr-layers", "0", "-1",
            "--toks-per-batch", 700, "--truncation-seq-length", TRUNC, "-q"]
    batches = _batches_of(fasta, 700)
    assert len(batches) > 4
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "fresh.h5", *args)
    assert rc == 0, err
    real, calls = TorchRunner.representations, []

    def representations(self, *a, **k):  # the model fails on the third batch, after two were handed over
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash after 2 batches")
        return real(self, *a, **k)

    monkeypatch.setattr(TorchRunner, "representations", representations)
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "e.h5", *args)
    assert rc == 1 and "simulated crash" in err and "Traceback" not in err
    with EmbeddingStore(tmp_path / "e.h5") as store:  # readable, holds exactly the two finished batches
        assert sorted(store) == sorted(batches[0] + batches[1])  # listed in FASTA order (issue 20)
    monkeypatch.setattr(TorchRunner, "representations", real)
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "e.h5", *args[:-1])
    assert rc == 0, err
    n_done = len(batches[0]) + len(batches[1])
    assert f"skipped {n_done} already there" in err
    _assert_stores_close(_store_arrays(tmp_path / "e.h5"), _store_arrays(tmp_path / "fresh.h5"))


def test_resume_after_sigkill_mid_batch(tmp_path, capsys, models, fasta):
    """A process killed between writing a batch's rows and committing them loses nothing committed."""
    hub, _ = models["esm2"]
    args = ["--model", hub, "--include", "mean", "per_tok", "contacts", "--toks-per-batch", 700,
            "--truncation-seq-length", TRUNC, "-q"]
    batches = _batches_of(fasta, 700)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, FAULTY_EMBED, "kill-before-commit:1", "embed", fasta,
                           str(tmp_path / "k.h5"), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr
    with EmbeddingStore(tmp_path / "k.h5") as store:
        assert sorted(store) == sorted(batches[0])  # the second batch was written but never committed
        rec = store[batches[0][0]]
        assert rec["per_tok"][3].shape == (rec["length"], 18)
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "k.h5", *args)
    assert rc == 0, err
    assert f"rebuilt the store from its {len(batches[0])} committed records" in err
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "fresh.h5", *args)
    assert rc == 0, err
    a, b = _store_arrays(tmp_path / "k.h5"), _store_arrays(tmp_path / "fresh.h5")
    assert set(a) == set(b)
    for i in a:
        np.testing.assert_allclose(a[i]["per_tok"][3], b[i]["per_tok"][3], atol=1e-5)
        np.testing.assert_allclose(a[i]["contacts"], b[i]["contacts"], atol=1e-5)


def test_background_writer_order_errors_and_close():
    from esm_dual.cli.embed_writers import BackgroundWriter

    done = []
    w = BackgroundWriter(depth=2)
    for i in range(6):
        w.submit(lambda i=i: (time.sleep(0.01 * (i % 2)), done.append(i)))
    w.wait()
    assert done == list(range(6))  # in order, all of them

    def boom():
        raise OSError("No space left on device")

    w.submit(lambda: (time.sleep(0.05), done.append(8)))
    w.submit(boom)
    w.close()  # waits for what was handed over and leaves write errors to wait()
    assert done[-1] == 8
    w = BackgroundWriter(depth=2)
    w.submit(boom)
    w.submit(done.append, 6)
    with pytest.raises(OSError, match="No space"):  # raised in the caller, at the next hand-over or wait
        w.submit(done.append, 7)
        w.wait()
    w.close()
    assert 6 not in done and 7 not in done  # nothing after a failed write


def test_failed_write_stops_the_run_and_keeps_earlier_batches(tmp_path, capsys, models, fasta, monkeypatch):
    """A write that fails (disk full) is reported in one line; the batches written before it stay, and a rerun
    finishes the job."""
    from esm_dual.cli.embed_writers import PtSink

    hub, _ = models["esm2"]
    args = ["--model", hub, "--format", "pt", "--include", "mean", "--toks-per-batch", 700,
            "--truncation-seq-length", TRUNC, "-q"]
    batches = _batches_of(fasta, 700)
    real, calls = PtSink.write, []

    def write(self, labels, *a, **k):
        calls.append(labels)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, labels, *a, **k)

    monkeypatch.setattr(PtSink, "write", write)
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "out", *args)
    assert rc == 2 and "Traceback" not in err  # the machine's error, not esm-dual's: no "internal error"
    assert err.strip().splitlines()[-1] == "esm-dual: error: [Errno 28] No space left on device"
    kept = {f[:-3] for f in os.listdir(tmp_path / "out") if f.endswith(".pt")}
    assert {label.split()[0] for label in kept} == set(batches[0] + batches[1])
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]
    monkeypatch.setattr(PtSink, "write", real)
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "out", *args[:-1])
    assert rc == 0 and f"skipped {len(kept)} already there" in err


def test_rerun_with_conflicting_options_is_refused(tmp_path, capsys, models, data_dir):
    hub, pt = models["esm2"]
    few = os.path.join(data_dir, "few_proteins.fasta")
    out = tmp_path / "e.h5"
    assert _run(capsys, "embed", few, out, "--model", hub, "-q")[0] == 0
    rc, _, err = _run(capsys, "embed", few, out, "--model", hub, "-q")  # same options: nothing to do
    assert rc == 0
    rc, _, err = _run(capsys, "embed", few, out, "--model", hub, "--repr-layers", "1", "-q")
    assert rc == 2 and "layers: stored [3], this run [1]" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run(capsys, "embed", few, out, "--model", hub, "--include", "mean", "bos", "-q")
    assert rc == 2 and "include" in err
    rc, _, err = _run(capsys, "embed", few, out, "--model", models["esm1b"][0], "-q")
    assert rc == 2 and "model" in err and "Traceback" not in err
    with EmbeddingStore(out) as store:  # untouched by the refused runs
        assert len(store) == 3 and store.layers == [3]


def test_pt_format_skips_existing_files(tmp_path, capsys, models, data_dir):
    _, pt = models["esm2"]
    few = os.path.join(data_dir, "few_proteins.fasta")
    out = tmp_path / "pt"
    assert _run(capsys, "embed", few, out, "--model", pt, "--format", "pt", "-q")[0] == 0
    first = sorted(f for f in os.listdir(out) if f.endswith(".pt"))[0]
    (out / first).write_bytes(b"sentinel")  # a record "already done": must not be recomputed
    rc, _, err = _run(capsys, "embed", few, out, "--model", pt, "--format", "pt")
    assert rc == 0 and "skipped 3 already there" in err
    assert (out / first).read_bytes() == b"sentinel"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_tf_backend_matches_pt(tmp_path, capsys, models, fasta):
    pytest.importorskip("tensorflow")
    hub, _ = models["esm2"]
    args = ["--model", hub, "--include", "mean", "per_tok", "bos", "contacts", "--repr-layers", "0", "2", "-1",
            "--toks-per-batch", 2000, "--truncation-seq-length", TRUNC, "-q"]
    assert _run(capsys, "embed", fasta, tmp_path / "pt.h5", *args)[0] == 0
    rc, _, err = _run(capsys, "embed", fasta, tmp_path / "tf.h5", *args, "--backend", "tf")
    assert rc == 0, err
    with EmbeddingStore(tmp_path / "tf.h5") as s:
        assert s.metadata["backend"] == "tf"
    _assert_stores_close(_store_arrays(tmp_path / "tf.h5"), _store_arrays(tmp_path / "pt.h5"), atol=1e-4)


def test_input_errors_are_one_line(tmp_path, capsys, models, data_dir):
    hub, _ = models["esm2"]
    bad = tmp_path / "bad.fasta"
    bad.write_text("MKTAYIAK\n>x\nMKT\n")
    few = os.path.join(data_dir, "few_proteins.fasta")
    cases = [
        (["embed", bad, tmp_path / "o.h5", "--model", hub], "text before the first '>' header"),
        (["embed", tmp_path / "missing.fasta", tmp_path / "o.h5", "--model", hub], "not found"),
        (["embed", few, tmp_path / "o.h5", "--model", tmp_path / "nope"], "no such file or directory"),
        (["embed", few, tmp_path / "o.h5", "--model", hub, "--repr-layers", "7"], "layers 0..3"),
        (["embed", few, tmp_path / "o2.h5", "--model", models["esm1b"][0], "--truncation-seq-length", "2000"],
         "at most 1022 residues"),
        (["embed", few, tmp_path / "o.h5", "--model", hub, "--plot", tmp_path / "c.png"], "--include contacts"),
    ]
    for argv, msg in cases:
        rc, out, err = _run(capsys, *argv)
        assert rc == 2, (argv, err)
        assert msg in err and "Traceback" not in err, (argv, err)
        assert len([line for line in err.strip().splitlines() if line.startswith("esm-dual: error")]) == 1
    # bad.fasta raised before anything was written
    assert not (tmp_path / "o.h5").exists() or EmbeddingStore(tmp_path / "o.h5").__len__() == 0
    # --debug shows the traceback (the exception propagates).
    from esm_dual.common.fasta import FastaError

    with pytest.raises(FastaError):
        main(["embed", str(bad), str(tmp_path / "o3.h5"), "--model", hub, "--debug"])


def test_plot_contact_maps(tmp_path, capsys, models, data_dir, monkeypatch):
    hub, _ = models["esm2"]
    few = os.path.join(data_dir, "few_proteins.fasta")
    # Without matplotlib: one clear line.
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)
        rc, _, err = _run(capsys, "embed", few, tmp_path / "a.h5", "--model", hub, "--include", "contacts",
                          "--plot", tmp_path / "c.png")
    assert rc == 2 and "needs matplotlib" in err and "esm-dual[plot]" in err
    pytest.importorskip("matplotlib")
    rc, _, err = _run(capsys, "embed", few, tmp_path / "a.h5", "--model", hub, "--include", "contacts",
                      "--plot", tmp_path / "c.png", "-q")
    assert rc == 0, err
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    rc, _, err = _run(capsys, "embed", few, tmp_path / "pt", "--format", "pt", "--model", hub, "--include",
                      "contacts", "--plot", tmp_path / "maps", "-q")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "maps")) == ["UniRef50_A0A090SUK6.png", "UniRef50_A0A223SCH7.png",
                                                     "UniRef50_UPI0003108055.png"]


def test_token_batches_match_fair_esm():
    import esm

    rng = np.random.default_rng(0)
    seqs = ["A" * int(n) for n in rng.integers(1, 400, size=60)]
    ds = esm.FastaBatchedDataset([f"s{i}" for i in range(60)], seqs)
    for toks in (1, 300, 1024, 4096):
        assert token_batches([len(s) for s in seqs], toks, extra_toks_per_seq=1) == \
            ds.get_batch_indices(toks, extra_toks_per_seq=1)


def test_cli_import_is_light_and_help_works():
    code = ("import sys, esm_dual.cli.main as m; "
            "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules, 'heavy import'; "
            "m.build_parser(); assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(
        os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "esm_dual.cli.main", "embed", "--help"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0 and "--toks-per-batch" in proc.stdout and "--repr-layers" in proc.stdout


def test_bad_residues_and_unreadable_files_are_named(tmp_path, capsys, models):
    """Characters outside the vocabulary, empty/undecodable/damaged files and directories: one-line errors that
    name the file and record, exit 2, nothing stored; never a silent <unk> that shifts later positions."""
    import gzip

    hub, _ = models["esm2"]
    out = tmp_path / "o.h5"
    cases = {
        "lower.fa": (b">ok\nMKTAYIAK\n>soft soft-masked\nMKTayiAK\n", "record 'soft', residue 4: lower-case 'a'"),
        "stop.fa": (b">s\nMKTA*\n", "record 's', residue 5: '*' (a stop codon?"),
        "digit.fa": (b">d\nMK1TA\n", "record 'd', residue 3: '1', not a residue of the model's vocabulary"),
        "empty.fa": (b"; only a comment\n\n", "no FASTA records"),
        "latin.fa": (b">x\nMKT\xe9A\n", "latin.fa: not UTF-8 text"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "cut.fa.gz").write_bytes(gzip.compress(b"".join(b">a%d\nMKTAYIAKQR\n" % i for i in range(50)))[:40])
    cases["cut.fa.gz"] = (None, "cut.fa.gz: the gzip data is damaged or cut short")
    (tmp_path / "dir.fa").mkdir()
    cases["dir.fa"] = (None, "dir.fa is a directory")
    for name, (_, msg) in cases.items():
        rc, _, err = _run(capsys, "embed", tmp_path / name, out, "--model", hub, "-q")
        assert rc == 2 and msg in err, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        if out.exists():  # a window is checked before the model runs on it: 'ok' was not written either
            with EmbeddingStore(out) as store:
                assert len(store) == 0, name


def test_failed_first_run_does_not_pin_the_store(tmp_path, capsys, models, data_dir):
    hub, _ = models["esm2"]
    dup = tmp_path / "dup.fa"
    dup.write_text(">a\nMKTAYIAK\n>a\nMKT\n")
    out = tmp_path / "o.h5"
    rc, _, err = _run(capsys, "embed", dup, out, "--model", hub, "-q")
    assert rc == 2 and "duplicate record id 'a'" in err
    few = os.path.join(data_dir, "few_proteins.fasta")
    rc, _, err = _run(capsys, "embed", few, out, "--model", hub, "--include", "mean", "per_tok", "-q")
    assert rc == 0, err  # the empty store of the failed run held no options
    with EmbeddingStore(out) as store:
        assert len(store) == 3 and "per_tok" in store.include
    rc, _, err = _run(capsys, "embed", few, out, "--model", hub, "-q")  # a store with records still pins them
    assert rc == 2 and "other options" in err


def test_pt_format_refuses_headers_that_leave_the_output(tmp_path, capsys, models):
    _, pt = models["esm2"]
    fa = tmp_path / "x.fa"
    fa.write_text(">ok/nested\nMKTAYIAK\n>x/../../escape\nMKTAYIAK\n")
    rc, _, err = _run(capsys, "embed", fa, tmp_path / "out", "--model", pt, "--format", "pt", "-q")
    assert rc == 2 and "record 'x/../../escape'" in err and "outside" in err, err
    assert not (tmp_path / "escape.pt").exists() and not list((tmp_path / "out").rglob("*.pt"))
    fa.write_text(">ok/nested\nMKTAYIAK\n")
    assert _run(capsys, "embed", fa, tmp_path / "out", "--model", pt, "--format", "pt", "-q")[0] == 0
    assert (tmp_path / "out" / "ok" / "nested.pt").exists()  # '/' inside the output: subdirectories, as fair-esm
