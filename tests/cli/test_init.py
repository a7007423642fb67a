"""`esm-dual init MODEL OUTDIR --random`: random checkpoints in a preset's shape (ESMFold included), marked as
random in config.json and by the commands that read them; `esm-dual info` on ESMFold directories."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from esm_dual.cli.main import main
from esm_dual.common.presets import get_preset
from esm_dual.io.hub import iter_checkpoint_tensors
from tests.utils import run_cli


@pytest.fixture(scope="module")
def esm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("init") / "esm2_8M_random"
    assert main(["init", "esm2_t6_8M_UR50D", str(d), "--random", "--seed", "3", "-q"]) == 0
    return d


def test_init_writes_the_preset_shape_marked_random(esm_dir, capsys):
    cfg = json.loads((esm_dir / "config.json").read_text())
    mark = cfg["esm_dual_random_init"]
    assert mark["seed"] == 3 and mark["shape_of"] == "esm2_t6_8M_UR50D" and "RANDOM" in mark["note"]
    preset = get_preset("esm2_t6_8M_UR50D").config
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
              "position_embedding_type", "token_dropout"):
        assert cfg[k] == getattr(preset, k), k
    names = {n: a.shape for n, a in iter_checkpoint_tensors(str(esm_dir))}
    assert names["esm.embeddings.word_embeddings.weight"] == (33, 320)
    assert "esm.contact_head.regression.weight" in names and "lm_head.dense.weight" in names
    assert sum(int(np.prod(s)) for n, s in names.items() if not n.endswith("inv_freq")) > 7_000_000
    rc, out, err = run_cli(capsys, "info", esm_dir)
    assert rc == 0 and "RANDOM weights" in out
    rc, out, _ = run_cli(capsys, "info", "--model-location", esm_dir, "--json")
    assert rc == 0 and json.loads(out)["random_weights"] is True


def test_init_is_seeded_and_warns(tmp_path, esm_dir, capsys):
    rc, out, err = run_cli(capsys, "init", "--model", "esm2_t6_8M_UR50D", tmp_path / "again", "--random", "--seed", "3")
    assert rc == 0
    assert "RANDOM weights" in err and "meaningless" in err
    a = dict(iter_checkpoint_tensors(str(esm_dir)))
    b = dict(iter_checkpoint_tensors(str(tmp_path / "again")))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # An existing checkpoint is kept unless --overwrite.
    rc, _, err = run_cli(capsys, "init", "esm2_t6_8M_UR50D", tmp_path / "again", "--random")
    assert rc == 2 and "--overwrite" in err


def test_init_needs_random_and_a_preset(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "init", "esm2_t6_8M_UR50D", tmp_path / "x")
    assert rc == 2 and "--random" in err and "hf download" in err and "esm-dual init --help" in err
    rc, _, err = run_cli(capsys, "init", "not_a_model", tmp_path / "x", "--random")
    assert rc == 2 and "not a known preset" in err
    assert not (tmp_path / "x").exists()


def test_init_tiny_esmfold_folds_and_info_reads_it(tmp_path, capsys, one_torch_thread, monkeypatch):
    d = tmp_path / "fold_tiny"
    rc, _, err = run_cli(capsys, "init", "esmfold_v1", d, "--random", "--tiny")
    assert rc == 0 and "RANDOM" in err
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["is_folding_model"] and cfg["esm_dual_random_init"]["shape_of"] == "esmfold_v1 (tiny)"
    rc, out, err = run_cli(capsys, "info", d)
    assert rc == 0, err
    assert "ESMFold" in out and "RANDOM" in out and "folding trunk 1 blocks" in out
    fasta = tmp_path / "two.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n>b\nGSHMLE:MKVL\n")
    monkeypatch.setenv("ESM_DUAL_PROGRESS_INTERVAL", "0")
    rc, _, err = run_cli(capsys, "fold", "-i", fasta, "-o", tmp_path / "out", "--model-location", d, "--cpu-only",
                         "--num-recycles", "0")
    assert rc == 0, err
    # stderr is not a terminal here: plain progress lines, no carriage returns; the random weights named
    assert "esm-dual: fold: 2/2 seq (100%)" in err and "\r" not in err and "RANDOM weights" in err
    files = sorted(n for n in os.listdir(tmp_path / "out") if not n.startswith("."))
    assert files == ["a.pdb", "b.pdb", "fold_options.json", "summary.tsv"]

    from esm_dual.pt import EsmForProteinFolding

    model = EsmForProteinFolding.from_pretrained(str(d))
    assert model.config.esmfold_config.trunk.num_blocks == 1


def test_info_on_transformers_esmfold_directory(tmp_path, capsys):
    """A directory written by transformers' EsmForProteinFolding.save_pretrained (its lm_head has 23 outputs)."""
    transformers = pytest.importorskip("transformers")
    from tests.pt.test_esmfold import tiny_esmfold_config_dict

    hf = transformers.EsmForProteinFolding(transformers.EsmConfig(**tiny_esmfold_config_dict()))
    hf.save_pretrained(str(tmp_path / "hf_fold"))
    rc, out, err = run_cli(capsys, "info", tmp_path / "hf_fold")
    assert rc == 0, err
    assert "ESMFold" in out and "esmfold trunk" in out and "RANDOM" not in out
