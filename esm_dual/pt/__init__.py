"""PyTorch ESM models. Importing this package imports torch."""

from . import fast  # noqa: F401  (imports modeling_esm; notes its reference forwards before user code runs)
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
