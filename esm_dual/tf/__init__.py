"""TensorFlow + Keras 3 ESM models (the twins of ``esm_dual.pt``). Importing this package imports
TensorFlow and Keras; it selects the Keras TensorFlow backend unless KERAS_BACKEND is already set."""

from .modeling_esm import (
    TFEsmContactPredictionHead,
    TFEsmForMaskedLM,
    TFEsmForSequenceClassification,
    TFEsmForTokenClassification,
    TFEsmModel,
    TFEsmPreTrainedModel,
    hub_variable_map,
)

__all__ = [
    "TFEsmContactPredictionHead",
    "TFEsmForMaskedLM",
    "TFEsmForSequenceClassification",
    "TFEsmForTokenClassification",
    "TFEsmModel",
    "TFEsmPreTrainedModel",
    "hub_variable_map",
]
