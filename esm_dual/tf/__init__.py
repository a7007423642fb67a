"""Keras 3 ESM models (the twins of ``esm_dual.pt``) on every Keras backend: TensorFlow, JAX and PyTorch.

Importing this package imports Keras (the backend is Keras' choice: ``KERAS_BACKEND`` or
``~/.keras/keras.json``, TensorFlow by default) and registers the classes for ``.keras`` loading; it
imports TensorFlow only on the TensorFlow backend. ``esm_dual.keras`` is the same package under a
backend-neutral name. TensorFlow-only: ``esm_dual.tf.data`` (tf.data pipelines), SavedModel ``export``
and HF's legacy ``tf_model.h5``; ``esm_dual.tf.pydataset`` feeds ``fit`` on any backend.
"""

from .hub_names import hub_variable_map
from .modeling_esm import (
    TFEsmContactPredictionHead,
    TFEsmForMaskedLM,
    TFEsmForSequenceClassification,
    TFEsmForTokenClassification,
    TFEsmModel,
    TFEsmPreTrainedModel,
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
