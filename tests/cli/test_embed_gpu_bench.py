"""benchmarks/embed_gpu.py in its CPU smoke mode: all three tools run, and on CPU fp32 the same weights give
the same mean embeddings (esm-dual vs fair-esm's extract steps vs HF transformers)."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import DATA_DIR
from tests.utils import load_benchmark

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("esm")  # fair-esm


def test_cpu_smoke(tmp_path, one_torch_thread):
    bench = load_benchmark("embed_gpu")
    fasta = os.path.join(DATA_DIR, "few_proteins.fasta")
    argv = ["--device", "cpu", "--shape", "tiny", "--lognormal", "20", "--work-dir", str(tmp_path),
            "--out", str(tmp_path / "r.json")]
    if os.path.isfile(fasta):
        argv += ["--fasta", fasta]
    argv += ["--fasta", str(tmp_path / "absent.fasta")]  # missing datasets are skipped with a note
    result = bench.main(argv)
    with open(tmp_path / "r.json") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert any("absent.fasta" in n for n in result["notes"])
    assert result["datasets"], result
    assert result["datasets"][-1]["name"] == "lognormal20"
    for ds in result["datasets"]:
        assert set(ds["tools"]) == {"esm_dual", "esm_dual_big", "fair_esm", "hf", "hf_big"}, ds["tools"]
        for tool, r in ds["tools"].items():
            assert "error" not in r, (tool, r)
            assert r["records"] == ds["records"] > 0
            assert r["residues_per_s"] > 0 and "missing_files" not in r, (tool, r)
        assert set(ds["ratios"]) >= {"esm_dual/fair_esm", "esm_dual/hf", "esm_dual_big/hf_big", "esm_dual_big/hf_best"}
        best = max(ds["tools"]["hf"]["residues_per_s"], ds["tools"]["hf_big"]["residues_per_s"])
        assert ds["ratios"]["esm_dual_big/hf_best"] == round(ds["tools"]["esm_dual_big"]["residues_per_s"] / best, 3)
        assert ds["tools"]["hf_big"]["toks_per_batch"] == 16384 and ds["tools"]["hf"]["toks_per_batch"] == 4096
        for key in ("esm_dual_vs_fair_esm", "esm_dual_vs_hf", "esm_dual_vs_esm_dual_big", "hf_vs_hf_big"):
            c = ds["check"][key]
            assert c["records"] == min(ds["records"], 64), (key, c)
            assert c["max_abs"] < 1e-4, (ds["name"], key, c)
    # nothing left behind in the work dir
    assert sorted(os.listdir(tmp_path)) == ["r.json"]
