"""PyTorch ESM models. Importing this package imports torch."""

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
    "EsmForSequenceClassification",
    "EsmForTokenClassification",
    "EsmModel",
    "EsmPreTrainedModel",
]
