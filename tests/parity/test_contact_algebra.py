"""The one-pass contact regression equals symmetrize -> APC -> regression done literally, in both backends."""

from __future__ import annotations

import numpy as np
import pytest


def _literal(x, w, b):
    s = x + np.swapaxes(x, -1, -2)
    a1 = s.sum(-1, keepdims=True)
    a2 = s.sum(-2, keepdims=True)
    a12 = s.sum((-1, -2), keepdims=True)
    apc = s - a1 * a2 / a12
    return np.einsum("bcnm,c->bnm", apc, w) + b


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    x = rng.random((2, 9, 13, 13))
    x[1, :, 10:, :] = 0  # padding rows/columns of a shorter sequence
    x[1, :, :, 10:] = 0
    return x, rng.normal(size=9), np.float64(0.3)


def test_pt_matches_literal(case):
    import torch

    from esm_dual.pt.modeling_esm import average_product_correct, symmetric_apc_regression, symmetrize

    x, w, b = case
    got = symmetric_apc_regression(torch.tensor(x), torch.tensor(w), torch.tensor(b, dtype=torch.float64)).numpy()
    ref = _literal(x, w, b)
    assert np.abs(got - ref).max() < 1e-10
    helpers = average_product_correct(symmetrize(torch.tensor(x))).numpy()
    assert np.abs(np.einsum("bcnm,c->bnm", helpers, w) + b - ref).max() < 1e-10


def test_tf_matches_literal(case):
    import tensorflow as tf

    from esm_dual.tf.modeling_esm import average_product_correct, symmetric_apc_regression, symmetrize

    x, w, b = case
    got = symmetric_apc_regression(tf.constant(x), tf.constant(w), tf.constant(b, dtype=tf.float64)).numpy()
    ref = _literal(x, w, b)
    assert np.abs(got - ref).max() < 1e-10
    helpers = average_product_correct(symmetrize(tf.constant(x))).numpy()
    assert np.abs(np.einsum("bcnm,c->bnm", helpers, w) + b - ref).max() < 1e-10
