"""ESMFold in PyTorch (paper-shaped modules: trunk, triangular updates, structure module, rigids)."""

from .batching import DEFAULT_MAX_TOKENS_PER_BATCH, fold_batches, folded_length
from .esmfold import EsmForProteinFolding
from .inference import EsmForProteinFoldingOutput, encode_sequences

__all__ = [
    "DEFAULT_MAX_TOKENS_PER_BATCH",
    "EsmForProteinFolding",
    "EsmForProteinFoldingOutput",
    "encode_sequences",
    "fold_batches",
    "folded_length",
]
