"""Keras ``fit`` under tf.distribute on CPU: MirroredStrategy over 2 logical CPU devices and
MultiWorkerMirroredStrategy over 2 worker processes on localhost train like one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.utils import maxdiff, write_hub_checkpoint

from .helpers import REPO, env, free_port, head_fasta, run

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
MODULE = "esm_dual.train.tf_finetune"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("keras_dist")
    write_hub_checkpoint(str(d / "ckpt"), tiny_config("esm2"), "mlm", seed=4)
    head_fasta(str(d / "train.fasta"), 16)  # global batch 8: 2 steps per epoch, 4 sequences per replica
    # The one-device reference runs in this process (no strategy, default device).
    from esm_dual.train.tf_finetune import main

    assert main(_args(d, d / "single", "none")) == 0
    return d


def _args(d, out, strategy):
    return ["--model", str(d / "ckpt"), "--fasta", str(d / "train.fasta"), "--output", str(out),
            "--strategy", strategy, "--task", "regression", "--epochs", "2", "--global-batch-size", "8",
            "--max-length", "40", "--dropout", "0", "--lr", "1e-3"]


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _history(path):
    with open(os.path.join(path, "history.json")) as f:
        return json.load(f)


def test_mirrored_two_cpu_devices_equals_one_device(setup):
    # A subprocess: the 2 logical CPU devices must be configured before TensorFlow starts.
    out = setup / "mirrored"
    run([sys.executable, "-m", MODULE, *_args(setup, out, "mirrored"), "--cpu-devices", "2"], timeout=180)
    assert _history(out / "final")["replicas"] == 2
    ref, got = _weights(setup / "single" / "final"), _weights(out / "final")
    assert maxdiff(ref, got) < 1e-4
    assert max(float(np.abs(ref[k] - v).max()) for k, v in _weights(setup / "ckpt").items() if k in ref) > 1e-3
    np.testing.assert_allclose(_history(out / "final")["loss"], _history(setup / "single" / "final")["loss"],
                               rtol=1e-5)


@pytest.mark.slow
def test_multi_worker_mirrored_two_processes(setup):
    out = setup / "multi"
    ports = [free_port(), free_port()]
    procs = []
    for i in range(2):
        e = env()
        e["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                     "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen([sys.executable, "-m", MODULE, *_args(setup, out, "multi-worker")], env=e,
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    chief, other = _weights(out / "final"), _weights(out / "final-worker1")
    assert _history(out / "final")["replicas"] == 2
    assert maxdiff(chief, other) == 0.0  # both workers hold the same weights
    assert maxdiff(chief, _weights(setup / "single" / "final")) < 1e-4
