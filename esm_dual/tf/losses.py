"""The task losses of the Keras models in ``keras.ops`` (torch's functional losses, computed in float32)."""

from __future__ import annotations

from keras import ops


def cross_entropy(logits, labels, ignore_index: int = -100):
    """Mean cross entropy over the labels that are not ``ignore_index`` (torch's ``F.cross_entropy``);
    logits [*, C], labels [*]."""
    logits = ops.cast(logits, "float32")
    labels = ops.cast(labels, "int32")
    valid = ops.not_equal(labels, ignore_index)
    losses = ops.sparse_categorical_crossentropy(ops.where(valid, labels, 0), logits, from_logits=True)
    weights = ops.cast(valid, "float32")
    return ops.sum(losses * weights) / ops.sum(weights)


def mse_loss(x, y):
    return ops.mean(ops.square(ops.cast(x, "float32") - ops.cast(y, "float32")))


def binary_cross_entropy_with_logits(logits, labels):
    logits, labels = ops.cast(logits, "float32"), ops.cast(labels, "float32")
    # max(x, 0) - x * z + log(1 + exp(-|x|)): the stable form torch and TensorFlow use.
    return ops.mean(ops.relu(logits) - logits * labels + ops.log1p(ops.exp(-ops.abs(logits))))


def squeeze_last(x):
    """torch's ``squeeze(-1)``: drops the last axis only when it is (statically) 1."""
    return ops.squeeze(x, -1) if len(x.shape) and x.shape[-1] == 1 else x
