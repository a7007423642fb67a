"""benchmarks/keras_gpu.py in its CPU smoke mode (a subprocess: the script runs the Keras JAX backend):
esm-dual and keras-hub on the same weights agree on unpadded sequences, every section reports tokens/s."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.utils import ROOT

pytest.importorskip("jax")
pytest.importorskip("keras_hub")



def test_smoke_runs_and_agrees_with_keras_hub(tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "keras_gpu.py"), "--smoke", "--dtype",
                          "float32", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["device"].startswith("cpu")
    # same weights: keras-hub (token dropout folded into its embeddings) and ours agree on unpadded sequences
    assert report["numerics"]["max_abs_diff_last_hidden_single_sequences"] < 1e-4
    for section in ("inference", "training"):
        for name in ("keras_hub", "esm_dual"):
            assert report[section][name]["tokens_per_s"] > 0
        assert report[section]["speedup_vs_keras_hub"] > 0
    if "error" not in report.get("pytorch", {"error": ""}):
        assert report["pytorch"]["inference"]["tokens_per_s"] > 0
    else:
        pytest.importorskip("torch")
        raise AssertionError(report["pytorch"])
