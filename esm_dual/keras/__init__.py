"""The Keras 3 ESM models under a backend-neutral name: the same classes as ``esm_dual.tf`` (which runs on
the TensorFlow, JAX and PyTorch Keras backends), with and without the ``TF`` prefix."""

from ..tf import (
    TFEsmContactPredictionHead,
    TFEsmForMaskedLM,
    TFEsmForSequenceClassification,
    TFEsmForTokenClassification,
    TFEsmModel,
    TFEsmPreTrainedModel,
    hub_variable_map,
)

EsmContactPredictionHead = TFEsmContactPredictionHead
EsmForMaskedLM = TFEsmForMaskedLM
EsmForSequenceClassification = TFEsmForSequenceClassification
EsmForTokenClassification = TFEsmForTokenClassification
EsmModel = TFEsmModel
EsmPreTrainedModel = TFEsmPreTrainedModel

__all__ = [
    "EsmContactPredictionHead",
    "EsmForMaskedLM",
    "EsmForSequenceClassification",
    "EsmForTokenClassification",
    "EsmModel",
    "EsmPreTrainedModel",
    "TFEsmContactPredictionHead",
    "TFEsmForMaskedLM",
    "TFEsmForSequenceClassification",
    "TFEsmForTokenClassification",
    "TFEsmModel",
    "TFEsmPreTrainedModel",
    "hub_variable_map",
]
