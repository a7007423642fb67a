"""The Keras models' outputs: the shared dataclasses of ``esm_dual.common.outputs`` (HF field names;
attribute, key and index access), as subclasses that Keras' tree utilities can walk.

``register_outputs`` (called when the first model is built, idempotent) registers them as nested
structures with the fields that are not None as children: for ``tf.nest`` through ``__tf_flatten__``
(tf.function, tf.distribute, SavedModel tracing), for Keras' tree (optree, namespace "keras": ``predict()``
concatenation, symbolic building; torch's pytree on the PyTorch backend, where Keras' tree uses it) and,
on the JAX backend, as JAX pytrees (``jax.jit`` and
``jax.value_and_grad`` carry them out of Keras' train step). So the Keras call path returns the same
objects as eager calls, and ``predict()`` returns one of them holding numpy arrays.
"""

from __future__ import annotations

from ..common.outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    ModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)


def _flatten(out: ModelOutput):
    keys = tuple(out.keys())
    return tuple(getattr(out, k) for k in keys), keys


class _Nested:
    """``tf.nest`` protocol (TensorFlow looks these methods up on the class)."""

    def __tf_flatten__(self):
        children, keys = _flatten(self)
        return keys, children

    @classmethod
    def __tf_unflatten__(cls, keys, children):
        return cls(**dict(zip(keys, children)))


class TFBaseModelOutputWithPooling(_Nested, BaseModelOutputWithPooling):
    pass


class TFMaskedLMOutput(_Nested, MaskedLMOutput):
    pass


class TFSequenceClassifierOutput(_Nested, SequenceClassifierOutput):
    pass


class TFTokenClassifierOutput(_Nested, TokenClassifierOutput):
    pass


OUTPUT_CLASSES = (TFBaseModelOutputWithPooling, TFMaskedLMOutput, TFSequenceClassifierOutput,
                  TFTokenClassifierOutput)
_registered: set[str] = set()


def register_outputs() -> None:
    """Register the output classes with Keras' tree (optree; torch pytree on PyTorch) and, on JAX, as JAX
    pytrees (once each)."""
    import keras

    if "optree" not in _registered:
        import optree

        for cls in OUTPUT_CLASSES:
            optree.register_pytree_node(cls, _flatten, lambda keys, children, cls=cls: cls(**dict(zip(keys, children))),
                                        namespace="keras")
        _registered.add("optree")
    if keras.backend.backend() == "jax" and "jax" not in _registered:
        import jax

        for cls in OUTPUT_CLASSES:
            jax.tree_util.register_pytree_node(cls, _flatten,
                                               lambda keys, children, cls=cls: cls(**dict(zip(keys, children))))
        _registered.add("jax")
    if keras.backend.backend() == "torch" and "torch" not in _registered:
        from torch.utils import _pytree as torch_pytree  # Keras' tree on the torch backend

        for cls in OUTPUT_CLASSES:
            torch_pytree.register_pytree_node(
                cls, _flatten, lambda children, keys, cls=cls: cls(**dict(zip(keys, children))),
                serialized_type_name=f"esm_dual.tf.outputs.{cls.__name__}")
        _registered.add("torch")
