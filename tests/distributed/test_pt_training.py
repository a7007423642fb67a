"""DDP / FSDP2 fine-tuning on CPU (gloo) under torchrun equals one process; resume equals no interruption."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.utils import maxdiff, write_hub_checkpoint

from .helpers import head_fasta, torchrun

pytest.importorskip("torch")
MODULE = "esm_dual.train.pt_finetune"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt_ddp")
    write_hub_checkpoint(str(d / "ckpt"), tiny_config("esm2"), "mlm", seed=3)
    head_fasta(str(d / "train.fasta"), 12)
    return d


def _args(d, out, task="mlm", steps=4, **extra):
    # Global batch 4 = 2 per rank; varying lengths; dropout is 0 in the tiny config (checked below).
    a = ["--model", str(d / "ckpt"), "--fasta", str(d / "train.fasta"), "--output", str(out), "--task", task,
         "--steps", str(steps), "--global-batch-size", "4", "--max-length", "48", "--lr", "1e-3",
         "--save-every", "2", "--dropout", "0"]
    for k, v in extra.items():
        a += [f"--{k.replace('_', '-')}", str(v)]
    return a


def _single(d, out, **kw):
    """One process, no process group (in-process: the same code path as ``python -m``)."""
    from esm_dual.train.pt_finetune import main

    assert main(_args(d, out, **kw)) == 0


def _weights(out):
    from safetensors.numpy import load_file

    return load_file(os.path.join(out, "final", "model.safetensors"))


def _losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def single_mlm(setup):
    out = setup / "single_mlm"
    _single(setup, out)
    return out


def test_ddp_equals_single_process_and_resume_is_exact(setup, single_mlm):
    ddp = setup / "ddp"
    torchrun(2, MODULE, _args(setup, ddp, strategy="ddp"))
    ref = _weights(single_mlm)
    got = _weights(ddp)
    assert maxdiff(ref, got) < 1e-5
    # Training changed the weights (the comparison is not vacuous).
    init = _weights_init(setup)
    assert max(float(np.abs(ref[k] - init[k]).max()) for k in ref if k in init) > 1e-3
    np.testing.assert_allclose(_losses(ddp), _losses(single_mlm), rtol=1e-5)

    # Interrupted after step 2 (checkpoint written), then resumed: same final weights as no interruption.
    res = setup / "ddp_resume"
    torchrun(2, MODULE, _args(setup, res, strategy="ddp", stop_after=2))
    assert not os.path.exists(res / "final")
    assert sorted(os.listdir(res / "checkpoints")) == ["step-2"]
    torchrun(2, MODULE, _args(setup, res, strategy="ddp") + ["--resume"])
    assert maxdiff(_weights(ddp), _weights(res)) == 0.0


def _weights_init(setup):
    from safetensors.numpy import load_file

    return load_file(str(setup / "ckpt" / "model.safetensors"))


def test_fsdp_sharded_checkpoint_equals_single_process(setup, single_mlm):
    out = setup / "fsdp"
    torchrun(2, MODULE, _args(setup, out, strategy="fsdp", state_dict="sharded", stop_after=2))
    shard_files = sorted(f for f in os.listdir(out / "checkpoints" / "step-2" / "sharded") if f.endswith(".distcp"))
    assert len(shard_files) == 2  # one file per rank: the state was saved sharded
    torchrun(2, MODULE, _args(setup, out, strategy="fsdp", state_dict="sharded") + ["--resume"])
    assert maxdiff(_weights(single_mlm), _weights(out)) < 1e-5
    with open(out / "run.json") as f:
        info = json.load(f)
    assert info["strategy"] == "fsdp" and info["world_size"] == 2 and info["start_step"] == 2
    # Rank 0 holds about half of the parameters (dim-0 shards of every layer and of the root).
    assert 0.45 * info["params"] < info["params_on_rank0"] < 0.6 * info["params"]


def test_fsdp_regression_full_state_dict_resume(setup):
    ref = setup / "single_reg"
    _single(setup, ref, task="regression")
    out = setup / "fsdp_reg"
    torchrun(2, MODULE, _args(setup, out, task="regression", strategy="fsdp", state_dict="full", stop_after=2))
    assert os.path.isfile(out / "checkpoints" / "step-2" / "state.pt")
    torchrun(2, MODULE, _args(setup, out, task="regression", strategy="fsdp", state_dict="full") + ["--resume"])
    a, b = _weights(ref), _weights(out)
    assert "classifier.out_proj.weight" in a
    assert maxdiff(a, b) < 1e-5
    np.testing.assert_allclose(_losses(out), _losses(ref), rtol=1e-5)


def test_exit_worker_flushes_and_keeps_the_exit_code(tmp_path):
    """The torchrun worker's exit (os._exit, no interpreter teardown) still flushes what was printed and
    reports main's exit code (the torchrun tests above check that finished workers exit 0)."""
    import subprocess
    import sys

    from .helpers import REPO, env

    code = ("import sys; from esm_dual.pt.distributed import exit_worker; "
            "print('out-unflushed', end=''); print('err-unflushed', end='', file=sys.stderr); exit_worker(3)")
    p = subprocess.run([sys.executable, "-c", code], env=env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (3, "out-unflushed", "err-unflushed")
