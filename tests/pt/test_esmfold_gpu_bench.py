"""benchmarks/esmfold_gpu.py in its CPU smoke mode (--tiny): the issue-22 suite per length (HF, the fp32 trunk,
the fast mode on the same weights), the set through infer_pdbs and through `esm-dual fold`, and the README
table it prints."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.utils import load_benchmark  # noqa: E402


def test_cpu_smoke_suite_set_and_table(tmp_path, capsys):
    bench = load_benchmark("esmfold_gpu")
    table = tmp_path / "table.md"
    assert bench.main(["--tiny", "--suite", "--lengths", "24,40", "--repeats", "2",
                       "--suite-impls", "esm_dual,esm_dual_fast,hf,esm_dual_cli", "--set", "4", "--max-len", "40",
                       "--set-cli", "--markdown", str(table)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "suite" and report["device"] == "cpu"
    rows = report["results"]["per_length"]
    assert [r["length"] for r in rows] == [24, 40]
    for r in rows:
        for impl in ("esm_dual", "esm_dual_fast", "hf"):
            assert len(r[impl]["runs"]) == 2 and r[impl]["seconds"] > 0, (impl, r[impl])
        # same weights, fp32 on the CPU: esm-dual's fp32 trunk is HF's fold
        assert r["esm_dual_vs_hf"]["max_dev_angstrom"] < 1e-3, r["esm_dual_vs_hf"]
        assert r["fast_vs_fp32_trunk"]["finite"] and r["fast_vs_fp32_trunk"]["rmsd_angstrom"] < 0.5
        assert r["time_ratio_hf_over_esm_dual"] == pytest.approx(r["hf"]["seconds"] / r["esm_dual"]["seconds"],
                                                                 rel=0.05, abs=0.01)
        # `esm-dual fold` per length: its own model from the saved checkpoint, both records written
        c = r["esm_dual_cli"]
        assert c["rc"] == 0 and c["records"] == 2 and c["pdbs"] == 2 and c["command_seconds"] >= c["seconds"] >= 0
        if c["seconds"]:
            assert r["time_ratio_hf_over_esm_dual_cli"] == pytest.approx(r["hf"]["seconds"] / c["seconds"], rel=0.05,
                                                                         abs=0.01)
    s = report["results"]["set"]
    assert s["sequences"] == 4 and s["max_length"] <= 40
    for impl in ("hf", "esm_dual_fast", "esm_dual_fast_one_by_one", "esm_dual", "esm_dual_cli"):
        assert s[impl]["pdbs"] == 4, (impl, s[impl])
    assert s["esm_dual_cli"]["rc"] == 0
    text = table.read_text()
    assert "| 24 |" in text and "| 40 |" in text and "Set of 4 UniRef-like sequences" in text
    assert "`esm-dual fold` with its defaults, per structure" in text and "24: " in text and "40: " in text


def test_first_fold_profile_names_where_the_host_time_went(tmp_path, capsys):
    bench = load_benchmark("esmfold_gpu")
    assert bench.main(["--tiny", "--suite", "--lengths", "24", "--repeats", "2", "--suite-impls", "esm_dual_fast",
                       "--first-fold-profile", str(tmp_path)]) == 0
    row = json.loads(capsys.readouterr().out)["results"]["per_length"][0]
    fast = row["esm_dual_fast"]
    assert fast["profiled"] and len(fast["runs"]) == 2
    ops = fast["profile"]["ops_by_self_cpu"]
    assert ops and all(x["self_cpu_ms"] >= 0 and x["calls"] > 0 for x in ops)
    assert any(x["op"] in ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear") for x in ops)
    assert fast["profile"]["longest_calls"][0]["cpu_ms"] > 0
    text = (tmp_path / "first_fold_24.txt").read_text()
    assert "ops by self CPU time" in text and "longest top-level calls" in text


def test_first_fold_script_cpu_smoke(tmp_path, capsys):
    """benchmarks/esmfold_first_fold.py --tiny: each fold's passes are timed (eager on the CPU: one per pass) and
    the wrapped methods are put back afterwards."""
    from esm_dual.pt.folding import graphs, trunk

    originals = (trunk.FoldingTrunk._recycle_pass, graphs.PassGraphs.capture, graphs.PassGraph.__call__)
    bench = load_benchmark("esmfold_first_fold")
    out = tmp_path / "parts.json"
    assert bench.main(["--tiny", "--lengths", "20,40", "--again", "40", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [next(iter(x)) for x in lines] == ["20_first", "40_first", "40_again"]
    record = json.loads(out.read_text())
    assert not record["cold"] and set(record["folds"]) == {"20_first", "40_first", "40_again"}
    for row in record["folds"].values():
        labels = [label for label, _ in row["parts"]]
        assert labels and set(labels) == {"eager"} and row["total"] >= sum(t for _, t in row["parts"]) * 0.9
    assert (trunk.FoldingTrunk._recycle_pass, graphs.PassGraphs.capture, graphs.PassGraph.__call__) == originals


def test_a_failed_fold_command_gets_no_per_structure_time(tmp_path, capsys, monkeypatch):
    """Where `esm-dual fold` reports no folding time, its whole-command time is not passed off as one."""
    bench = load_benchmark("esmfold_gpu")
    monkeypatch.setattr(bench, "fold_cli", lambda *a, **k: {"seconds": 3.0, "rc": 1, "pdbs": 0, "stderr_tail": "x"})
    table = tmp_path / "table.md"
    assert bench.main(["--tiny", "--suite", "--lengths", "24", "--repeats", "1", "--suite-impls", "hf,esm_dual_cli",
                       "--markdown", str(table)]) == 0
    row = json.loads(capsys.readouterr().out)["results"]["per_length"][0]
    assert row["esm_dual_cli"] == {"command_seconds": 3.0, "records": 1, "rc": 1, "pdbs": 0, "stderr_tail": "x"}
    assert "time_ratio_hf_over_esm_dual_cli" not in row
    assert "`esm-dual fold` with its defaults, per structure" not in table.read_text()
