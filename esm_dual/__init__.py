"""esm-dual: ESM protein language models and ESMFold in PyTorch and TensorFlow/Keras.

``import esm_dual`` is light: it imports neither torch nor TensorFlow. Use ``esm_dual.pt`` or
``esm_dual.tf`` for the models; each imports its framework when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .common.config import ConfigError, EsmConfig, EsmFoldConfig, StructureModuleConfig, TrunkConfig
from .io import resolve as _resolve  # noqa: F401  (EsmConfig.from_pretrained then takes preset names and hub ids)

# name -> module that defines it; imported on first access so `import esm_dual` stays fast.
_LAZY = {
    "EsmTokenizer": "esm_dual.common.tokenizer",
    "read_fasta": "esm_dual.common.fasta",
    "FastaError": "esm_dual.common.fasta",
    "EmbeddingStore": "esm_dual.common.embeddings",
    "PRESETS": "esm_dual.common.presets",
    "get_preset": "esm_dual.common.presets",
    "load_checkpoint": "esm_dual.io.hub",
    "save_checkpoint": "esm_dual.io.hub",
    "CheckpointError": "esm_dual.io.base",
    "convert": "esm_dual.conversion",
    "conversion": "esm_dual.conversion",
    "io": "esm_dual.io",
    "pt": "esm_dual.pt",
    "tf": "esm_dual.tf",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        return mod if mod.__name__.endswith("." + name) else getattr(mod, name)
    raise AttributeError(f"module 'esm_dual' has no attribute {name!r}")


__all__ = ["ConfigError", "EsmConfig", "EsmFoldConfig", "StructureModuleConfig", "TrunkConfig", *_LAZY]
