"""Helpers shared by the tests of esm_dual.io: bit-exact comparisons and fair-esm-compatible tiny configs."""

from __future__ import annotations

import numpy as np

from esm_dual.common.config import EsmConfig
from tests.conftest import tiny_config


def fair_config(flavour: str) -> EsmConfig:
    """A tiny config fair-esm can hold (its ESM2 hard-codes the FFN width to 4 * embed_dim)."""
    return tiny_config(flavour, intermediate_size=72) if flavour == "esm2" else tiny_config(flavour)


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of an array (bit-exact comparisons, NaN-safe, dtype-agnostic)."""
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def assert_same(a: dict, b: dict) -> None:
    """Same names, dtypes, shapes and bits."""
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(bits(a[k]), bits(b[k]), err_msg=k)


def torch_bits(t) -> np.ndarray:
    """The raw bits of a torch tensor (bfloat16 included)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return bits(t.numpy())
