"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def esmfold_dir(tmp_path_factory) -> str:
    """A tiny random ESMFold checkpoint in the hub layout (config.json + model.safetensors), one per module."""
    from tests.pt.test_esmfold import write_tiny_esmfold

    d = str(tmp_path_factory.mktemp("esmfold"))
    write_tiny_esmfold(d)
    return d
