"""`esm-dual info` on tiny checkpoints in every layout, `info --presets`, and the entry point's plumbing."""

from __future__ import annotations

import json

from esm_dual.cli import main as cli_main
from esm_dual.common.presets import PRESETS, count_parameters
from esm_dual.io.fair_esm import save_fair_esm
from esm_dual.io.hub import save_checkpoint
from tests.conftest import tiny_config
from tests.utils import run_cli, write_hub_checkpoint


def _fields(text):
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition("  ")
        out[key.strip()] = value.strip()
    return out


def test_info_hub_directory(tmp_path, capsys):
    cfg = tiny_config("esm2")
    write_hub_checkpoint(str(tmp_path / "m"), cfg, "mlm")
    rc, out, err = run_cli(capsys, "info", tmp_path / "m")
    assert rc == 0, err
    f = _fields(out)
    assert f["layout"] == "safetensors"
    assert f["family"] == "ESM-2"
    assert f["architectures"] == "EsmForMaskedLM"
    assert f["hidden size"] == "18" and f["layers"] == "3" and f["vocabulary"] == "33"
    assert f["attention heads"] == "3 (head dim 6)"
    assert f["positions"].startswith("rotary, max_position_embeddings 1026")
    assert f["heads present"] == "lm_head, contact_head"
    assert f"{count_parameters(cfg):,} in the masked-LM model" in f["parameters"]


def test_info_names_a_preset_only_when_the_config_matches(tmp_path, capsys):
    cfg = tiny_config("esm2")
    write_hub_checkpoint(str(tmp_path / "esm2_t33_650M_UR50D"), cfg, "mlm")  # a preset's name, a tiny model
    rc, out, err = run_cli(capsys, "info", tmp_path / "esm2_t33_650M_UR50D")
    assert rc == 0, err
    assert _fields(out)["family"] == "ESM-2"
    rc, out, _ = run_cli(capsys, "info", tmp_path / "esm2_t33_650M_UR50D", "--json")
    assert "preset" not in json.loads(out)
    preset = PRESETS["esm2_t6_8M_UR50D"]  # the preset's own shape under its name: named
    write_hub_checkpoint(str(tmp_path / "esm2_t6_8M_UR50D"), preset.config, "mlm")
    rc, out, _ = run_cli(capsys, "info", tmp_path / "esm2_t6_8M_UR50D")
    assert _fields(out)["family"] == "ESM-2 (preset esm2_t6_8M_UR50D)"


def test_info_fair_esm_file_json(tmp_path, capsys):
    cfg = tiny_config("esm1b", intermediate_size=72)
    tensors = write_hub_checkpoint(str(tmp_path / "hub"), cfg, "mlm")
    pt = save_fair_esm(str(tmp_path / "esm1b_t3_tiny.pt"), cfg, tensors)
    rc, out, err = run_cli(capsys, "info", pt, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["layout"] == "fair-esm" and info["family"] == "ESM-1b"
    assert info["num_layers"] == 3 and info["num_heads"] == 3 and info["hidden_size"] == 18
    assert info["position_embedding_type"] == "absolute" and info["max_residues"] == 1022
    assert info["heads"] == ["lm_head", "contact_head"]
    assert info["parameters_mlm_model"] == count_parameters(cfg) == info["parameters_stored"]


def test_info_sharded_classifier(tmp_path, capsys):
    cfg = tiny_config("esm1v", num_labels=3)
    tensors = write_hub_checkpoint(str(tmp_path / "tmp"), cfg, "seq")
    save_checkpoint(str(tmp_path / "sharded"), cfg.copy(architectures=["EsmForSequenceClassification"]),
                    tensors, max_shard_size=20_000)
    rc, out, err = run_cli(capsys, "info", tmp_path / "sharded", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["layout"] == "safetensors-sharded"
    assert info["family"] == "ESM-1v"
    assert "classifier (sequence)" in info["heads"] and "lm_head" not in info["heads"]
    assert info["num_labels"] == 3


def test_info_presets(capsys):
    rc, out, err = run_cli(capsys, "info", "--presets")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "family", "hub"]
    for name, p in PRESETS.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert p.hub_id in row and p.fair_esm_name in row.split()
    assert any(line.startswith("esm2_t6_8M_UR50D ") and line.rstrip().endswith("7.5M") for line in lines)
    rc, out, _ = run_cli(capsys, "info", "--presets", "--json")
    table = json.loads(out)
    assert [r["name"] for r in table] == list(PRESETS)
    assert {r["name"]: r["num_params"] for r in table}["esm2_t6_8M_UR50D"] == 7_512_474


def test_info_errors(tmp_path, capsys):
    for argv, msg in [(["info"], "needs a MODEL"),
                      (["info", tmp_path / "missing"], "no such file or directory"),
                      (["info", "esm2_t6_8M_UR50D", "--presets"], "not both")]:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and msg in err and "Traceback" not in err, err
    (tmp_path / "x.txt").write_text("hello")
    rc, _, err = run_cli(capsys, "info", tmp_path / "x.txt")
    assert rc == 2 and "unknown checkpoint file type" in err


def test_entry_point_plumbing(capsys, monkeypatch):
    rc, _, err = run_cli(capsys)
    assert rc == 2 and "embed" in err and "score" in err and "fold" in err and "info" in err
    rc, out, _ = run_cli(capsys, "--version")
    assert rc == 0 and out.startswith("esm-dual ")
    rc, _, err = run_cli(capsys, "frobnicate")
    assert rc == 2 and "invalid choice" in err
    # A subcommand whose module is absent says so cleanly (fold is imported lazily).
    monkeypatch.setitem(cli_main.COMMANDS, "fold", ("esm_dual.cli._not_there", "predict structures"))
    rc, _, err = run_cli(capsys, "fold", "in.fasta", "out")
    assert rc == 2 and "`esm-dual fold` is not available" in err
    rc, _, err = run_cli(capsys, "info", "--presets", "--json")  # other commands unaffected
    assert rc == 0


def test_info_shows_the_fast_path_options(tmp_path, capsys, monkeypatch):
    """The PyTorch fast path's options as the environment sets them (one line; a dict in JSON); an invalid
    ESM_DUAL_* value is named there instead."""
    from esm_dual.pt.fast.options import FastPathOptions, set_default_options

    write_hub_checkpoint(str(tmp_path / "m"), tiny_config("esm2"), "mlm")
    previous = set_default_options(None)  # read the environment again
    try:
        monkeypatch.setenv("ESM_DUAL_FA4", "0")
        monkeypatch.setenv("ESM_DUAL_VARLEN", "dense")
        monkeypatch.setenv("ESM_DUAL_FOLD_KERNELS", "sdpa")
        rc, out, err = run_cli(capsys, "info", tmp_path / "m")
        assert rc == 0, err
        assert _fields(out)["fast path"] == (
            "attn_implementation=auto, varlen_backend=dense, fa4=off, triton=on, fused_loop=auto, "
            "residual_epilogue=on, exact_gelu=off, triangle_sdpa=on, fold_fast=auto, fold_kernels=sdpa, "
            "fold_graphs=auto")
        rc, out, _ = run_cli(capsys, "info", tmp_path / "m", "--json")
        assert json.loads(out)["fast_path"] == FastPathOptions(varlen_backend="dense", fa4=False,
                                                               fold_kernels="sdpa").as_dict()
        set_default_options(None)
        monkeypatch.setenv("ESM_DUAL_FA4", "2")
        rc, out, err = run_cli(capsys, "info", tmp_path / "m")
        assert rc == 0, err
        assert _fields(out)["fast path"] == ("error: environment variable ESM_DUAL_FA4='2' is not valid; use 1 or 0 "
                                             "(also true/false, yes/no, on/off)")
    finally:
        set_default_options(previous)


def test_info_says_whether_esmfolds_fused_kernels_are_available(esmfold_dir, capsys, monkeypatch):
    """ESMFold checkpoints get a cuEquivariance row: "available", or why not (here: not installed)."""
    import sys

    from esm_dual.pt.folding import kernels

    kernels.cueq_import_error.cache_clear()
    monkeypatch.setitem(sys.modules, "cuequivariance_ops_torch", None)
    try:
        rc, out, err = run_cli(capsys, "info", esmfold_dir)
        assert rc == 0, err
        row = _fields(out)["cuEquivariance"]
        assert row.startswith("not importable (") and "cuequivariance_ops_torch" in row and "SDPA fallback" in row
        rc, out, _ = run_cli(capsys, "info", esmfold_dir, "--json")
        assert json.loads(out)["cuequivariance"] == row
    finally:
        kernels.cueq_import_error.cache_clear()
    # encoders have no such row
    write_hub_checkpoint(str(esmfold_dir) + "_enc", tiny_config("esm2"), "mlm")
    rc, out, _ = run_cli(capsys, "info", str(esmfold_dir) + "_enc")
    assert "cuEquivariance" not in _fields(out)
