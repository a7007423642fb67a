"""ESMFold in PyTorch (paper-shaped modules: trunk, triangular updates, structure module, rigids)."""

from .esmfold import EsmForProteinFolding, EsmForProteinFoldingOutput, encode_sequences

__all__ = ["EsmForProteinFolding", "EsmForProteinFoldingOutput", "encode_sequences"]
