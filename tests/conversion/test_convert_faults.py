"""``esm-dual convert`` under faults (issue 19.1, 19.5, 19.12): full disks, --overwrite of a directory that holds
other files, staging directories that failed runs left. Promises of README "What is guaranteed"."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conversion.helpers import assert_same_tensors, hub_tensors, leftovers, make_hub
from tests.utils import run_cli, small_disk


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("faults") / "esm2")
    make_hub(d, "esm2", "mlm", hidden_size=48, intermediate_size=192)
    return d


def test_overwrite_refuses_a_directory_holding_other_files(hub, tmp_path, capsys):
    """Guarantee "--overwrite replaces only a checkpoint": notes beside the weights are never deleted silently."""
    dst = tmp_path / "out"
    assert run_cli(capsys, "convert", hub, dst, "--to", "hf", "-q")[0] == 0
    (dst / "notes.txt").write_text("my results")
    (dst / "results").mkdir()
    rc, _, err = run_cli(capsys, "convert", hub, dst, "--to", "hf", "--overwrite")
    assert rc == 2 and "notes.txt" in err and "results/" in err and "--overwrite-dir" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (dst / "notes.txt").read_text() == "my results"
    # a directory holding only checkpoint files is replaced by --overwrite
    clean = tmp_path / "clean"
    assert run_cli(capsys, "convert", hub, clean, "--to", "hf", "-q")[0] == 0
    assert run_cli(capsys, "convert", hub, clean, "--to", "hf", "--overwrite", "--dtype", "fp16", "-q")[0] == 0
    # --overwrite-dir replaces the whole directory, as asked
    assert run_cli(capsys, "convert", hub, dst, "--to", "hf", "--overwrite-dir", "-q")[0] == 0
    assert not (dst / "notes.txt").exists()
    assert_same_tensors(hub_tensors(hub), hub_tensors(str(dst)))


def test_the_library_overwrite_refuses_other_files_too(hub, tmp_path):
    """``esm_dual.convert(..., overwrite=True)`` keeps the CLI's promise: a directory that holds files other than
    a checkpoint's is refused, naming them, and left as it was; ``overwrite="dir"`` replaces it whole."""
    import esm_dual
    from esm_dual.io.base import CheckpointError

    dst = tmp_path / "out"
    esm_dual.convert(hub, dst, to="hf")
    (dst / "notes.txt").write_text("my results")
    with pytest.raises(CheckpointError, match=r"notes\.txt.*overwrite='dir'"):
        esm_dual.convert(hub, dst, to="hf", overwrite=True)
    assert (dst / "notes.txt").read_text() == "my results"
    with pytest.raises(ValueError, match="overwrite must be False, True or 'dir'"):
        esm_dual.convert(hub, dst, to="hf", overwrite="yes")
    esm_dual.convert(hub, dst, to="hf", overwrite="dir")
    assert not (dst / "notes.txt").exists()
    assert_same_tensors(hub_tensors(hub), hub_tensors(str(dst)))


def test_stale_staging_directories_are_cleaned_by_the_next_run(hub, tmp_path, capsys):
    """Guarantee "no litter": a killed run's `.DST.tmp-XXXXXXXX` is removed by the next conversion to DST; one of
    a conversion still running (its owner pid alive) and directories of other names are left alone."""
    stale = tmp_path / ".out.tmp-abc_1234"
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / ".out.tmp-live0000"
    live.mkdir()
    (live / ".owner").write_text(str(os.getpid()))
    other = tmp_path / ".other.tmp-abc_1234"
    other.mkdir()
    assert run_cli(capsys, "convert", hub, tmp_path / "out", "--to", "hf", "-q")[0] == 0
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(leftovers(str(tmp_path))) == [".other.tmp-abc_1234", ".out.tmp-live0000"]


@pytest.mark.parametrize("to, name", [("tf-h5", "out"), ("fair-esm", "esm2_t3_tiny.pt"), ("hf", "out")])
def test_convert_onto_a_full_disk_is_one_clear_error(hub, tmp_path, capsys, to, name):
    """Guarantee "a full disk is an error, not a crash": a destination without room is refused before anything
    is written, in one line naming DST; nothing is left behind."""
    with small_disk(tmp_path, "200k") as disk:
        dst = disk / name
        rc, _, err = run_cli(capsys, "convert", hub, dst, "--to", to)
        assert rc == 2 and str(dst) in err and "free space" in err and "Traceback" not in err, err
        assert os.listdir(disk) == []


@pytest.mark.parametrize("size", ["300k", "400k"])  # the disk fills in the middle of the file (h5py crashed)
def test_tf_h5_on_a_disk_that_fills_during_the_write_raises(hub, tmp_path, size):
    """The library call (no room check) onto a full disk: an OSError, no segfault, nothing left behind."""
    with small_disk(tmp_path, size) as disk:
        code = ("import esm_dual.conversion as c\n"
                "try:\n"
                f"    c.convert({hub!r}, {str(disk / 'out')!r}, to='tf-h5')\n"
                "except OSError as e:\n"
                "    print('raised', e.errno)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "raised 28" in p.stdout, (p.returncode, p.stderr[-2000:])
        assert os.listdir(disk) == []


def test_fair_esm_on_a_disk_that_fills_during_the_write(hub, tmp_path, capsys, monkeypatch):
    """Past the room check (another process fills the disk): torch's zip writer fails with an 'enforce fail'
    message; the command says the disk is full, in one line naming DST, and leaves nothing behind."""
    from esm_dual.cli import convert as cli_convert

    monkeypatch.setattr(cli_convert, "_check_room", lambda *a: None)
    with small_disk(tmp_path, "200k") as disk:
        dst = disk / "esm2_t3_x.pt"
        rc, _, err = run_cli(capsys, "convert", hub, dst, "--to", "fair-esm")
        assert rc == 2 and "the disk is full" in err and str(dst) in err, err
        assert "internal error" not in err and "Traceback" not in err
        assert os.listdir(disk) == []


def test_disk_filling_during_the_write_is_one_clear_error(hub, tmp_path, capsys, monkeypatch):
    """The room check passes but the disk fills while writing (another process): one line naming DST and the
    full disk; the staging directory is removed."""
    import esm_dual.conversion as conv

    real = conv._get_hook

    def failing_get(source):
        get = real(source)
        calls = {"n": 0}

        def get_or_fail(name):
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError(28, "No space left on device")
            return get(name)

        return get_or_fail

    monkeypatch.setattr(conv, "_get_hook", failing_get)
    for to, name in (("hf", "a"), ("fair-esm", "esm2_t3_x.pt")):
        rc, _, err = run_cli(capsys, "convert", hub, tmp_path / name, "--to", to)
        assert rc == 2 and "the disk is full" in err and str(tmp_path / name) in err, err
        assert "Traceback" not in err and "internal error" not in err
        assert leftovers(str(tmp_path)) == [] and not (tmp_path / name).exists()
