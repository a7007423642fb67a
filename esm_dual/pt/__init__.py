"""PyTorch ESM models. Importing this package imports torch."""

from .folding import EsmForProteinFolding
from .modeling_esm import (
    EsmContactPredictionHead,
    EsmForMaskedLM,
    EsmForSequenceClassification,
    EsmForTokenClassification,
    EsmModel,
    EsmPreTrainedModel,
)

__all__ = [
    "EsmContactPredictionHead",
    "EsmForMaskedLM",
    "EsmForProteinFolding",
    "EsmForSequenceClassification",
    "EsmForTokenClassification",
    "EsmModel",
    "EsmPreTrainedModel",
]
