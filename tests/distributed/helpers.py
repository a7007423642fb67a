"""Launch helpers for multi-process tests: free ports, torchrun as a subprocess, bounded timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.utils import DATA_DIR, write_fasta
from tests.utils import ROOT as REPO

FASTA = os.path.join(DATA_DIR, "P62593.fasta")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TF_CONFIG"):
        e.pop(k, None)
    return e


def run(cmd: list[str], timeout: float = 120, ok=(0,)) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode in ok, f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def torchrun(nproc: int, module: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module, *args]
    return run(cmd, **kw)


def head_fasta(path: str, n: int, max_len: int | None = None) -> str:
    """Write the first ``n`` records of tests/data/P62593.fasta (optionally cut to ``max_len`` residues)."""
    from esm_dual.common.fasta import read_fasta

    records = [r for _, r in zip(range(n), read_fasta(FASTA))]
    return write_fasta(path, {r.description: r.sequence[:max_len] if max_len else r.sequence for r in records})
