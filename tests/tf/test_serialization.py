"""Every Keras class esm_dual registers round-trips ``get_config()`` / ``from_config()`` (and Keras'
``serialize_keras_object`` / ``deserialize_keras_object``): same config, same variables, same outputs."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import esm_dual.tf as T  # noqa: E402
from esm_dual.tf import modeling_esm as M  # noqa: E402
from esm_dual.tf.layers import ConfigLayer  # noqa: E402
from tests.conftest import make_batch, tiny_config  # noqa: E402

CFG = tiny_config("esm1b", num_labels=3)
# Constructors of the classes that take more than an EsmConfig.
SPECIAL = {
    M.TFEsmRotaryEmbedding: lambda: M.TFEsmRotaryEmbedding(6, 10000.0, name="rotary_embeddings"),
    M.TFEsmContactPredictionHead: lambda: M.TFEsmContactPredictionHead(9, eos_idx=2, initializer_range=0.05),
    M.TFEsmModel: lambda: M.TFEsmModel(CFG, add_pooling_layer=True),
}


def _registered() -> list[type]:
    return [cls for name, cls in sorted(keras.saving.get_custom_objects().items()) if name.startswith("esm_dual>")]


def _make(cls):
    if cls in SPECIAL:
        return SPECIAL[cls]()
    assert issubclass(cls, (ConfigLayer, T.TFEsmPreTrainedModel)), f"no constructor for {cls.__name__} in the test"
    return cls(CFG)


def test_every_registered_class_is_covered():
    names = {cls.__name__ for cls in _registered()}
    assert len(names) == 17, sorted(names)
    assert {"TFEsmSelfAttention", "TFEsmLMHead", "TFEsmForMaskedLM", "TFEsmRotaryEmbedding"} <= names


@pytest.mark.parametrize("cls", _registered(), ids=lambda c: c.__name__)
def test_get_config_from_config_round_trip(cls):
    obj = _make(cls)
    if not obj.built:
        obj.build()
    config = obj.get_config()
    clone = cls.from_config(config)
    if not clone.built:
        clone.build()
    assert clone.get_config() == config
    assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in obj.weights]
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
    assert type(again) is cls and again.get_config() == config


@pytest.mark.parametrize("head", ["TFEsmModel", "TFEsmForMaskedLM", "TFEsmForTokenClassification"])
def test_models_from_config_compute_the_same(head):
    cls = getattr(M, head)
    model = _make(cls)
    clone = cls.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    ids, mask = make_batch(seed=3)
    a, b = model(ids, attention_mask=mask), clone(ids, attention_mask=mask)
    key = "last_hidden_state" if head == "TFEsmModel" else "logits"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(a[key]), keras.ops.convert_to_numpy(b[key]))
