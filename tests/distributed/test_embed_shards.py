"""`esm-dual embed` split over processes (--devices, torchrun ranks, --merge) equals one process."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from esm_dual.cli.embed_shards import shard_range
from esm_dual.cli.main import main
from esm_dual.common.embeddings import EmbeddingStore
from tests.conftest import tiny_config
from tests.utils import write_hub_checkpoint

from .helpers import head_fasta, torchrun

N_RECORDS = 11  # odd: shards of 6 and 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("embed_shards")
    write_hub_checkpoint(str(d / "ckpt"), tiny_config("esm2"), "mlm", seed=2)
    head_fasta(str(d / "in.fasta"), N_RECORDS, max_len=60)
    single = d / "single.h5"
    assert main(["embed", str(d / "in.fasta"), str(single), *_opts(d)]) == 0
    return d


def _opts(d):
    return ["-m", str(d / "ckpt"), "--include", "mean", "per_tok", "bos", "contacts", "--repr-layers", "0", "-1",
            "--toks-per-batch", "200", "-q"]


def _assert_same(path_a, path_b):
    with EmbeddingStore(path_a) as a, EmbeddingStore(path_b) as b:
        assert len(a) == len(b) == N_RECORDS
        assert sorted(a.ids) == sorted(b.ids)
        assert a.identity == b.identity
        worst = 0.0
        for rid in a.ids:
            ra, rb = a[rid], b[rid]
            assert ra["length"] == rb["length"] and ra["description"] == rb["description"]
            for kind in ("mean", "bos", "per_tok"):
                for layer in a.layers:
                    worst = max(worst, float(np.abs(ra[kind][layer] - rb[kind][layer]).max()))
            worst = max(worst, float(np.abs(ra["contacts"] - rb["contacts"]).max()))
        # Records meet other batch neighbours (other padding) in a shard: equal up to float rounding.
        assert worst < 1e-5


def _no_shards(out):
    root = os.path.splitext(str(out))[0]
    assert glob.glob(glob.escape(root) + ".rank*") == []


def test_shard_range_covers_every_record_once():
    for n in (0, 1, 5, 11, 64):
        for world in (1, 2, 3, 8):
            parts = [list(shard_range(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_devices_option_merges_into_one_store(setup):
    out = setup / "devices.h5"
    assert main(["embed", str(setup / "in.fasta"), str(out), *_opts(setup), "--devices", "2"]) == 0
    _assert_same(setup / "single.h5", out)
    _no_shards(out)
    with EmbeddingStore(out) as s:
        assert s.metadata["shards"] == 2


def test_torchrun_ranks_then_rank0_merges(setup):
    out = setup / "torchrun.h5"
    torchrun(2, "esm_dual.cli.main", ["embed", str(setup / "in.fasta"), str(out), *_opts(setup)])
    _assert_same(setup / "single.h5", out)
    _no_shards(out)


def test_ranks_as_separate_jobs_then_merge(setup, monkeypatch):
    out = setup / "jobs.h5"
    args = ["embed", str(setup / "in.fasta"), str(out), *_opts(setup)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0  # rank 1 never merges
    assert os.path.isfile(str(setup / "jobs.rank1-of-2.h5.done"))
    with EmbeddingStore(setup / "jobs.rank1-of-2.h5") as s:
        assert len(s) == len(shard_range(N_RECORDS, 1, 2)) == 5
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert main([*args, "--merge"]) == 2  # rank 0 has not run yet: refused, nothing merged
    assert not out.exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([*args, "--shard-only"]) == 0
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert main([*args, "--merge"]) == 0
    _assert_same(setup / "single.h5", out)
    _no_shards(out)


def _pt_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".pt"))


def test_pt_format_ranks_write_into_one_directory(setup, monkeypatch):
    import torch

    opts = ["-m", str(setup / "ckpt"), "--include", "mean", "--format", "pt", "-q"]
    single, shared = setup / "single_pt", setup / "ranks_pt"
    assert main(["embed", str(setup / "in.fasta"), str(single), *opts]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        assert main(["embed", str(setup / "in.fasta"), str(shared), *opts]) == 0
        if rank == 1:
            assert len(_pt_files(shared)) == len(shard_range(N_RECORDS, 1, 2))
    names = _pt_files(single)
    assert len(names) == N_RECORDS and _pt_files(shared) == names
    for name in names:
        a = torch.load(single / name)["mean_representations"]
        b = torch.load(shared / name)["mean_representations"]
        assert a.keys() == b.keys()
        for layer in a:
            torch.testing.assert_close(a[layer], b[layer], atol=1e-5, rtol=0)
