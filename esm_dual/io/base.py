"""What every reader and writer shares: the in-memory :class:`Checkpoint`, its error, the layout names.

A checkpoint in memory is ``{canonical HF name: np.ndarray}`` + ``EsmConfig``: tensor names are the HF hub
names of the checkpoint as stored (``esm.encoder.layer.0...`` for the MLM and classification models, no
``esm.`` prefix for ``EsmModel`` files); arrays are in PyTorch orientation (``Linear.weight`` is
``[out, in]``) and keep the stored dtype (``bfloat16`` through ``ml_dtypes``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..common.config import EsmConfig

# The hub layout's file names (transformers' names).
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

LAYOUT_SAFETENSORS = "safetensors"
LAYOUT_SAFETENSORS_SHARDED = "safetensors-sharded"
LAYOUT_PYTORCH_BIN = "pytorch-bin"
LAYOUT_PYTORCH_BIN_SHARDED = "pytorch-bin-sharded"
LAYOUT_FAIR_ESM = "fair-esm"


class CheckpointError(ValueError):
    """A checkpoint cannot be read, written or used; the message names the file and the tensor."""


@dataclass
class Checkpoint:
    """A checkpoint in memory.

    Attributes:
        config: the model configuration.
        tensors: canonical HF name -> array (PyTorch orientation, stored dtype).
        source: where it was read from (path or description).
        layout: one of ``"safetensors"``, ``"safetensors-sharded"``, ``"pytorch-bin"``,
            ``"pytorch-bin-sharded"``, ``"fair-esm"`` (or the format a converter read).
    """

    config: EsmConfig
    tensors: dict[str, np.ndarray]
    source: str
    layout: str

    def __repr__(self) -> str:
        n = sum(int(a.size) for a in self.tensors.values())
        return (
            f"Checkpoint(source={self.source!r}, layout={self.layout!r}, tensors={len(self.tensors)}, "
            f"parameters={n})"
        )


def format_names(names: Iterable[str], limit: int = 20) -> str:
    """``"a, b, c"`` sorted, at most ``limit`` names, then ``", ... (N more)"``."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def one_line(e: BaseException) -> str:
    """An exception's message on one line, at most 500 characters (for errors that quote another library's)."""
    return " ".join(str(e).split())[:500]


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LAYOUT_FAIR_ESM",
    "LAYOUT_PYTORCH_BIN",
    "LAYOUT_PYTORCH_BIN_SHARDED",
    "LAYOUT_SAFETENSORS",
    "LAYOUT_SAFETENSORS_SHARDED",
    "PT_WEIGHTS_INDEX_NAME",
    "PT_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "format_names",
    "one_line",
]
