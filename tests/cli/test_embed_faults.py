"""`esm-dual embed` under faults and odd input (issue 19): what a failed or changed run must never do.

Each test names the README "What is guaranteed" promise it checks. Tiny random checkpoints, small FASTAs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from esm_dual.cli.main import main
from esm_dual.common.embeddings import EmbeddingStore
from tests.conftest import tiny_config
from tests.utils import small_disk, write_hub_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RNG = np.random.default_rng(0)
AA = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
SEQS = {f"p{i}": "".join(RNG.choice(AA, size=int(n))) for i, n in enumerate(RNG.integers(20, 90, size=15))}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_models")
    write_hub_checkpoint(str(d / "esm2"), tiny_config("esm2"), "mlm", seed=1)
    write_hub_checkpoint(str(d / "esm2_other"), tiny_config("esm2"), "mlm", seed=2)
    return str(d / "esm2"), str(d / "esm2_other")


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")  # tiny models, a busy 2-core box


def _fasta(path, seqs=SEQS, newline="\n", bom=False, headers=None) -> str:
    text = "".join(f">{(headers or {}).get(k, k)}\n{v[:40]}\n{v[40:]}\n" for k, v in seqs.items())
    raw = text.replace("\n", newline).encode()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + raw)
    return str(path)


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error_line(err: str) -> None:
    assert "Traceback" not in err, err
    assert len([x for x in err.strip().splitlines() if x.startswith("esm-dual: error")]) == 1, err


def _arrays(path):
    with EmbeddingStore(path) as s:
        return {rid: s[rid] for rid in s.ids}, list(s.ids)


# ---- FASTA: every line-end convention, BOM, NBSP; and the store in FASTA order ---------------------------------


@pytest.mark.parametrize("newline,bom", [("\r", False), ("\r\n", True), ("\n", True)])
def test_every_line_end_and_a_bom_embed_every_record(tmp_path, capsys, hub, newline, bom):
    """Guarantee "one FASTA reader": a CR-only or BOM file embeds all 15 records, in FASTA order."""
    ref = _fasta(tmp_path / "lf.fa")
    odd = _fasta(tmp_path / "odd.fa", newline=newline, bom=bom)
    assert _run(capsys, "embed", ref, tmp_path / "ref.h5", "-m", hub[0], "-q")[0] == 0
    rc, _, err = _run(capsys, "embed", odd, tmp_path / "odd.h5", "-m", hub[0], "--toks-per-batch", 200)
    assert rc == 0, err
    assert "wrote 15 records" in err
    a, ids = _arrays(tmp_path / "odd.h5")
    b, _ = _arrays(tmp_path / "ref.h5")
    assert ids == list(SEQS)  # EmbeddingStore.ids in FASTA order (rows were written length-sorted)
    for rid in ids:
        np.testing.assert_allclose(a[rid]["mean"][3], b[rid]["mean"][3], atol=1e-5)


def test_nul_in_a_header_is_one_line_before_the_model_loads(tmp_path, capsys, hub):
    fa = tmp_path / "nul.fa"
    fa.write_bytes(b">good\nMKTAYIAK\n>bad\x00x\nMKT\n")
    rc, _, err = _run(capsys, "embed", fa, tmp_path / "o.h5", "-m", hub[0], "-q")
    assert rc == 2 and "nul.fa:3" in err and "NUL" in err, err
    _one_error_line(err)
    assert not (tmp_path / "o.h5").exists()


# ---- --format pt: file names ------------------------------------------------------------------------------------


def test_pt_labels_on_one_path_are_refused_naming_both(tmp_path, capsys, hub):
    """Guarantee "--format pt never overwrites": `a/./b` and `a/b`, `c//d` and `c/d` collide."""
    for first, second in (("a/./b", "a/b"), ("c//d", "c/d")):
        fa = _fasta(tmp_path / "x.fa", {first: "MKTAYIAK", second: "MKTAYIAKQ"})
        out = tmp_path / f"out_{first[0]}"
        rc, _, err = _run(capsys, "embed", fa, out, "-m", hub[0], "--format", "pt", "-q")
        assert rc == 2 and repr(first) in err and repr(second) in err, err
        _one_error_line(err)
        assert not list(out.rglob("*.pt")) if out.exists() else True


def test_pt_header_too_long_for_a_file_name_is_named_up_front(tmp_path, capsys, hub):
    long = "L" + "x" * 4999
    fa = _fasta(tmp_path / "x.fa", {"ok": "MKTAYIAK", long: "MKTAYIAKQ"})
    for _ in range(2):  # a rerun says the same, not an OSError from the middle of the run
        rc, _, err = _run(capsys, "embed", fa, tmp_path / "out", "-m", hub[0], "--format", "pt", "-q")
        assert rc == 2 and "file name would be 5003 bytes" in err and "'Lxxx" in err, err
        _one_error_line(err)
    fa = _fasta(tmp_path / "x.fa", {"ok": "MKTAYIAK", "short": "MKTAYIAKQ"})
    rc, _, err = _run(capsys, "embed", fa, tmp_path / "out", "-m", hub[0], "--format", "pt")
    assert rc == 0 and "wrote 2 records" in err, err


def test_concurrent_pt_runs_into_one_directory_are_refused(tmp_path, capsys, hub):
    """Guarantee "one writer per output": a live run's lock names its pid; a dead run's lock is cleared."""
    fa = _fasta(tmp_path / "x.fa", {"a": "MKTAYIAK"})
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / f".esm-dual-embed.{other.pid}.lock").write_text('{"run": "another", "rank": 0, "world_size": 1}')
        rc, _, err = _run(capsys, "embed", fa, out, "-m", hub[0], "--format", "pt", "-q")
        assert rc == 2 and f"another embed run (pid {other.pid})" in err, err
    finally:
        other.kill()
        other.wait()
    (out / "sub").mkdir()
    for name in ("a.pt.tmp", "sub/x.pt.tmp", "notes.tmp"):  # a killed run's partial files, and a user's file
        (out / name).write_bytes(b"partial")
    rc, _, err = _run(capsys, "embed", fa, out, "-m", hub[0], "--format", "pt", "-q")
    assert rc == 0, err  # the dead process's lock is removed
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".lock")) == []
    assert (out / "a.pt").exists()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp")) == ["notes.tmp"]  # only ours removed


# ---- resume: changed sequences and new weights ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["h5", "pt"])
def test_resume_refuses_changed_sequences_or_re_embeds_them(tmp_path, capsys, hub, fmt):
    """Guarantee "resume checks sequences": a sequence changed under its id is refused by name; with
    --overwrite-changed the result equals a clean run on the new FASTA."""
    out = tmp_path / ("o.h5" if fmt == "h5" else "o")
    fa = _fasta(tmp_path / "x.fa")
    assert _run(capsys, "embed", fa, out, "-m", hub[0], "--format", fmt, "-q")[0] == 0
    changed = dict(SEQS, p3="MKTAYIAKQRQISFVK", p7=SEQS["p7"][::-1])
    fa2 = _fasta(tmp_path / "y.fa", changed)
    rc, _, err = _run(capsys, "embed", fa2, out, "-m", hub[0], "--format", fmt, "-q")
    assert rc == 2 and "2 record(s) changed" in err and "'p3', 'p7'" in err and "--overwrite-changed" in err, err
    _one_error_line(err)
    rc, _, err = _run(capsys, "embed", fa2, out, "-m", hub[0], "--format", fmt, "--overwrite-changed")
    assert rc == 0 and "wrote 2 records" in err, err
    clean = tmp_path / ("c.h5" if fmt == "h5" else "c")
    assert _run(capsys, "embed", fa2, clean, "-m", hub[0], "--format", fmt, "-q")[0] == 0
    for rid in changed:
        if fmt == "h5":
            with EmbeddingStore(out) as a, EmbeddingStore(clean) as b:
                assert a.ids == b.ids == list(changed)
                np.testing.assert_allclose(a[rid]["mean"][3], b[rid]["mean"][3], atol=1e-5)
        else:
            a = torch.load(out / f"{rid}.pt")["mean_representations"][3]
            b = torch.load(clean / f"{rid}.pt")["mean_representations"][3]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert _run(capsys, "embed", fa2, out, "-m", hub[0], "--format", fmt, "-q")[0] == 0  # now consistent


@pytest.mark.parametrize("fmt", ["h5", "pt"])
def test_new_weights_at_the_same_model_path_are_refused(tmp_path, capsys, hub, fmt):
    """Guarantee "resume checks the weights": the store records a fingerprint of the weight files."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(hub[0], model)
    out = tmp_path / ("o.h5" if fmt == "h5" else "o")
    fa = _fasta(tmp_path / "x.fa", dict(list(SEQS.items())[:3]))
    assert _run(capsys, "embed", fa, out, "-m", model, "--format", fmt, "-q")[0] == 0
    shutil.rmtree(model)
    shutil.copytree(hub[1], model)  # same path, same shapes, new values
    fa = _fasta(tmp_path / "x.fa", SEQS)
    rc, _, err = _run(capsys, "embed", fa, out, "-m", model, "--format", fmt, "-q")
    assert rc == 2 and "weights" in err, err
    _one_error_line(err)


# ---- failed runs leave nothing to trip on ----------------------------------------------------------------------


def test_a_failed_first_run_leaves_no_store(tmp_path, capsys, hub):
    fa = _fasta(tmp_path / "x.fa", {"a": "MKTAYIAK", "b": "MKT1AYIAK"})
    rc, _, err = _run(capsys, "embed", fa, tmp_path / "o.h5", "-m", hub[0], "-q")
    assert rc == 2 and "record 'b'" in err, err
    assert not (tmp_path / "o.h5").exists()


def test_contacts_of_a_huge_record_are_refused_up_front(tmp_path, capsys, hub):
    fa = _fasta(tmp_path / "x.fa", {"small": "MKTAYIAK", "huge": "A" * 50_000})
    t0 = time.perf_counter()
    rc, _, err = _run(capsys, "embed", fa, tmp_path / "o.h5", "-m", hub[0], "--include", "contacts",
                      "--truncation-seq-length", 60_000, "-q")
    assert rc == 2 and "record 'huge' has 50000 residues" in err and "GB" in err, err
    _one_error_line(err)
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "o.h5").exists()


def test_plot_files_of_ids_that_sanitise_alike_stay_apart(tmp_path, capsys, hub):
    pytest.importorskip("matplotlib")
    fa = _fasta(tmp_path / "x.fa", {"a|b": "MKTAYIAK", "a_b": "MKTAYIAKQ", "c": "MKV"})
    rc, _, err = _run(capsys, "embed", fa, tmp_path / "o.h5", "-m", hub[0], "--include", "contacts", "--plot",
                      tmp_path / "maps", "-q")
    assert rc == 0, err
    names = sorted(os.listdir(tmp_path / "maps"))
    assert len(names) == 3 and "a_b.png" in names and "c.png" in names, names


# ---- a full disk ---------------------------------------------------------------------------------------------


def test_embed_on_a_full_disk(tmp_path, capsys, hub):
    """Guarantee "a full disk loses nothing committed": one error line naming the output and the records kept;
    the store reopens; every committed record is byte-identical to a clean run's; a rerun with room resumes."""
    seqs = {f"r{i}": "".join(RNG.choice(AA, size=280)) for i in range(24)}
    fa = _fasta(tmp_path / "x.fa", seqs)
    opts = ["-m", hub[0], "--include", "mean", "contacts", "--toks-per-batch", 300, "-q"]
    assert _run(capsys, "embed", fa, tmp_path / "clean.h5", *opts)[0] == 0
    clean, _ = _arrays(tmp_path / "clean.h5")
    with small_disk(tmp_path, "4m") as disk:
        out = disk / "o.h5"
        rc, _, err = _run(capsys, "embed", fa, out, *opts)
        assert rc == 2 and str(out) in err and "disk is full" in err and "committed record(s)" in err, err
        _one_error_line(err)
        got, ids = _arrays(out)
        assert 0 < len(ids) < len(seqs)
        assert f"keeps its {len(ids)} committed record(s)" in err
        for rid in ids:
            assert got[rid]["contacts"].tobytes() == clean[rid]["contacts"].tobytes()
            assert got[rid]["mean"][3].tobytes() == clean[rid]["mean"][3].tobytes()
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        rc, _, err = _run(capsys, "embed", fa, out, *opts)
        assert rc == 0, err
        got, ids = _arrays(out)
        assert ids == list(seqs)
        for rid in ids:
            np.testing.assert_allclose(got[rid]["contacts"], clean[rid]["contacts"], atol=1e-6)


# ---- several processes ----------------------------------------------------------------------------------------


def _env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
              "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    e.update(extra)
    return e


def _world(monkeypatch, rank, world, **extra):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


def test_a_cluster_array_rank_does_not_wait_for_the_others(tmp_path, capsys, monkeypatch, hub):
    """RANK=0 WORLD_SIZE=2 alone (docs/distributed.md's cluster array): writes its shard, says to --merge, exits;
    rank 1 later finds every shard done and merges the whole store."""
    fa = _fasta(tmp_path / "x.fa", dict(list(SEQS.items())[:5]))
    out = tmp_path / "o.h5"
    _world(monkeypatch, 0, 2)
    rc, _, err = _run(capsys, "embed", fa, out, "-m", hub[0])
    assert rc == 0 and "--merge" in err, err
    assert (tmp_path / "o.rank0-of-2.h5.done").exists() and not out.exists()
    _world(monkeypatch, 1, 2)
    rc, _, err = _run(capsys, "embed", fa, out, "-m", hub[0], "-q")
    assert rc == 0, err  # the last rank to finish merges
    with EmbeddingStore(out) as s:
        assert s.ids == list(SEQS)[:5]


def test_torchrun_rank_zero_gives_up_waiting_with_a_message(tmp_path, capsys, monkeypatch, hub):
    fa = _fasta(tmp_path / "x.fa", dict(list(SEQS.items())[:3]))
    _world(monkeypatch, 0, 2, TORCHELASTIC_RUN_ID="t1", ESM_DUAL_MERGE_TIMEOUT="1")
    rc, _, err = _run(capsys, "embed", fa, tmp_path / "o.h5", "-m", hub[0], "-q")
    assert rc == 2 and "gave up waiting for shard(s)" in err and "rank1-of-2" in err, err
    _one_error_line(err)
    assert (tmp_path / "o.rank0-of-2.h5.done").exists()  # its own shard is kept for --merge


@pytest.mark.slow
def test_devices_workers_exit_when_the_parent_is_killed(tmp_path, hub):
    """A killed `embed --devices 2` parent leaves no orphan workers, and the rerun completes the store."""
    psutil = pytest.importorskip("psutil")
    seqs = {f"r{i}": "".join(RNG.choice(AA, size=60)) for i in range(12)}
    fa = _fasta(tmp_path / "x.fa", seqs)
    out = tmp_path / "o.h5"
    cmd = ["embed", fa, str(out), "-m", hub[0], "--devices", "2", "--toks-per-batch", "64", "--include", "mean",
           "per_tok", "-q"]
    # The workers sleep 30 s after each batch they write: still busy when the parent is killed.
    slow = [sys.executable, os.path.join(ROOT, "tests", "cli", "faulty_embed.py"), "sleep-after-write:30"]
    parent = subprocess.Popen(slow + cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not (tmp_path / "o.rank1-of-2.h5").exists():
            time.sleep(0.2)
        kids = psutil.Process(parent.pid).children(recursive=True)
        assert kids, "no workers started"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs(kids, timeout=15)
        assert not alive, f"orphan workers {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
    p = subprocess.run([sys.executable, "-m", "esm_dual.cli.main", *cmd[:-1]], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with EmbeddingStore(out) as s:
        assert s.ids == list(seqs)


def test_a_rank_with_no_records_still_finishes_its_shard(tmp_path, capsys, monkeypatch, hub):
    fa = _fasta(tmp_path / "x.fa", {"only": "MKTAYIAK"})
    out = tmp_path / "o.h5"
    for rank in (1, 0):  # rank 1's share of one record is empty
        _world(monkeypatch, rank, 2)
        rc, _, err = _run(capsys, "embed", fa, out, "-m", hub[0], "-q")
        assert rc == 0, err
    with EmbeddingStore(out) as s:
        assert s.ids == ["only"]


def test_ranks_cut_a_cr_only_file_as_one_process_reads_it(tmp_path, capsys, monkeypatch, hub):
    """Guarantee "one FASTA reader" under sharding: each rank counts and reads the CR-only file alike, so the
    merged store holds every record once."""
    fa = _fasta(tmp_path / "x.fa", newline="\r", bom=True)
    out = tmp_path / "o.h5"
    for rank in (0, 1):
        _world(monkeypatch, rank, 2)
        rc, _, err = _run(capsys, "embed", fa, out, "-m", hub[0], "-q")
        assert rc == 0, err
    with EmbeddingStore(out) as s:
        assert s.ids == list(SEQS)
