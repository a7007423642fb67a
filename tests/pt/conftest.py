"""Fixtures of the PyTorch tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fast_path_defaults():
    """``fast_path_defaults(triangle_sdpa=False)``: change the process-wide ``FastPathOptions`` (what the
    ``ESM_DUAL_*`` environment gives, read once) for this test; restored afterwards."""
    from esm_dual.pt.fast.options import default_options, set_default_options

    before = default_options()

    def change(**changes):
        set_default_options(default_options().replace(**changes))
        return default_options()

    yield change
    set_default_options(before)
