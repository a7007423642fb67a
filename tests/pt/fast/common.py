"""Shared helpers of the fast-path tests: tiny hub checkpoints, padded rows, tolerances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esm_dual.pt import EsmForMaskedLM, EsmModel
from tests.utils import write_hub_checkpoint

TOL = 1e-5
CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_model(tmp_path, flavour="esm2", head="mlm", **changes):
    from tests.conftest import tiny_config

    cfg = tiny_config(flavour, **changes)
    write_hub_checkpoint(str(tmp_path), cfg, head=head)
    cls = EsmForMaskedLM if head == "mlm" else EsmModel
    return cls.from_pretrained(str(tmp_path))


def rows_of(ids, mask):
    """Padded [B, L] -> list of the real-token rows."""
    return [ids[b][mask[b] != 0] for b in range(ids.shape[0])]


def padded_sdpa(model):
    model.set_fast_path(attn_implementation="sdpa")
    return model


def lognormal_batch(n, seed, max_len=1022, median=270):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.75, size=n).astype(int), 8, max_len)
    rows = []
    for n_res in lengths:
        res = rng.integers(4, 24, size=n_res)
        res[rng.random(n_res) < 0.1] = 32
        rows.append(np.concatenate([[0], res, [2]]))
    L = max(len(r) for r in rows)
    ids = np.full((n, L), 1, dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    return torch.tensor(ids), torch.tensor(ids != 1).long(), rows


def gpu_model(tmp_path, **changes):
    cfg = dict(hidden_size=320, num_attention_heads=20, num_hidden_layers=4, intermediate_size=1280)
    cfg.update(changes)
    model = tiny_model(tmp_path, "esm2", **cfg)
    with torch.no_grad():
        for p in model.parameters():  # checkpoint weights are N(0, 0.2): scale matrices to a trained net's size
            if p.dim() == 2:
                p.mul_(0.25)
    return model


def fa4_here():
    from esm_dual.pt.fast.attention import fa4_supported

    return CUDA and fa4_supported(torch.empty(0, 1, 64, device="cuda", dtype=torch.bfloat16))
