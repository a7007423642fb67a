"""Framework idioms of the Keras twin, in ``keras.ops`` (TensorFlow, JAX and PyTorch backends).

Same names as the helpers of the PyTorch twin where there is one. The value checks (token ids in the
vocabulary, at least one attended token per row) run where each backend can run them: on concrete values
they raise ``ValueError`` at once (eager TensorFlow, eager JAX, PyTorch); inside a traced function
``traced_value_checks`` adds TensorFlow assertions (plain graphs) or a JAX host callback that raises
(``jax.jit``), and marks bad rows so that ``poison_rows`` turns their outputs into NaN where no op can raise
(TensorFlow XLA drops assertions).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import keras
import numpy as np
from keras import ops

_DTYPE_MIN = {"float32": float(np.finfo(np.float32).min), "float16": float(np.finfo(np.float16).min),
              "bfloat16": -3.3895313892515355e38, "float64": float(np.finfo(np.float64).min)}


def backend() -> str:
    return keras.backend.backend()


def masked_fill(x, mask, value: float):
    """``x`` with ``value`` where the (broadcast) boolean ``mask`` is True (torch's ``masked_fill``)."""
    return ops.where(mask, ops.cast(value, x.dtype), x)


def softmax_fp32(x, dtype):
    """Softmax over the last axis computed in float32, returned in ``dtype`` (mixed precision)."""
    return ops.cast(ops.softmax(ops.cast(x, "float32"), axis=-1), dtype)


def dtype_min(dtype) -> float:
    return _DTYPE_MIN[keras.backend.standardize_dtype(dtype)]


def dims(x) -> list:
    """Shape of ``x``: static sizes where known, dynamic ones elsewhere (TensorFlow graphs)."""
    return list(ops.shape(x))


def is_integer(x) -> bool:
    return keras.backend.standardize_dtype(x.dtype).startswith(("int", "uint"))


def attention_probs(q, k, attention_bias):
    """q, k [B, L, H, K] (q already scaled), attention_bias [B, 1, 1, L] -> probabilities [B, H, L, L] (fp32
    softmax, returned in q's dtype)."""
    # [B, H, L, L]
    scores = ops.einsum("blhk,bmhk->bhlm", q, k) + ops.cast(attention_bias, q.dtype)
    return softmax_fp32(scores, q.dtype)


def scaled_dot_product_attention(q, k, v, attention_bias, dropout: keras.layers.Dropout, training):
    """Attention without returning the probabilities: q, k, v [B, L, H, K] (q already scaled), attention_bias
    [B, 1, 1, L] -> context [B, L, H, K].

    Without attention dropout, Keras' ``dot_product_attention`` on JAX and PyTorch (fused kernels where the
    backend has them: cuDNN through JAX, SDPA in PyTorch); on TensorFlow, which has no fused kernel, and with
    dropout, the same math written out (under XLA the scores, fp32 softmax and value product fuse).
    """
    if backend() != "tensorflow" and not (training and dropout.rate > 0):
        if backend() == "jax" and use_cudnn_attention(q):
            return _jax_cudnn_attention(q, k, v, attention_bias)
        return ops.dot_product_attention(q, k, v, bias=ops.cast(attention_bias, q.dtype), scale=1.0)
    probs = attention_probs(q, k, attention_bias)
    # [B, L, H, K]
    return ops.einsum("bhlm,bmhk->blhk", dropout(probs, training=training), v)


def cudnn_attention_enabled() -> bool:
    """The switch ``ESM_DUAL_KERAS_CUDNN_ATTENTION`` (default on; "0" turns cuDNN attention off)."""
    return os.environ.get("ESM_DUAL_KERAS_CUDNN_ATTENTION", "1") != "0"


def use_cudnn_attention(q) -> bool:
    """JAX on a CUDA GPU, half precision and a head size cuDNN's flash attention takes (a multiple of 8, at
    most 128): attention through cuDNN (``_jax_cudnn_attention``). ``ESM_DUAL_KERAS_CUDNN_ATTENTION=0`` (read
    at trace time) sends it to XLA's attention instead.

    On an H100 (650M shape, bf16, 128 UniRef-like sequences) it made esm-dual's inference 1.37x keras-hub's
    and its training step 1.08x (XLA's attention: 0.94x / 0.89x); its GPU test holds outputs and gradients to
    XLA's attention on right- and left-padded batches."""
    import jax

    if not cudnn_attention_enabled() or jax.default_backend() != "gpu":
        return False
    head = q.shape[-1]
    return keras.backend.standardize_dtype(q.dtype) in ("bfloat16", "float16") and head % 8 == 0 and head <= 128


def key_lengths(attention_bias):
    """[B, 1, 1, L] additive bias (0 for real keys) -> (key lengths [B] int32, whether every row is right-
    padded with at least one real key: real keys exactly the first ``length``)."""
    valid = ops.equal(attention_bias[:, 0, 0, :], 0)
    lengths = ops.sum(ops.cast(valid, "int32"), axis=-1)
    L = ops.shape(valid)[-1]
    first = ops.less(ops.arange(L)[None, :], lengths[:, None])
    ok = ops.logical_and(ops.all(ops.equal(valid, first)), ops.all(ops.greater(lengths, 0)))
    return lengths, ok


def _jax_cudnn_attention(q, k, v, attention_bias):
    """cuDNN flash attention on JAX (Keras' own call refuses our [B, 1, 1, L] bias and runs XLA's attention,
    which writes the [B, H, L, L] fp32 scores): padding passed as key lengths, so nothing of size L x L is
    stored. Rows must be right-padded for that; a batch that is not (left padding, holes, an empty row)
    takes XLA's attention with the bias instead, chosen on the device at run time (``lax.cond``)."""
    import jax

    lengths, right_padded = key_lengths(attention_bias)

    def fused(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, scale=1.0,
                                            implementation="cudnn")

    def plain(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0, implementation="xla")

    try:
        return jax.lax.cond(right_padded, fused, plain, q, k, v, attention_bias)
    except Exception:  # noqa: BLE001 - cuDNN refused these shapes while tracing: XLA's attention
        return plain(q, k, v, attention_bias)


# ------------------------------------------------------------------------------------------------
# Value checks
# ------------------------------------------------------------------------------------------------


def concrete_numpy(x) -> np.ndarray | None:
    """``x`` as numpy when its values are known now (eager), None inside a traced function."""
    if x is None or keras.backend.is_keras_tensor(x):
        return None
    if isinstance(x, np.ndarray):
        return x
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
    elif name == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
    elif name == "torch":
        import torch

        if torch.compiler.is_compiling():
            return None
    return ops.convert_to_numpy(x)


def id_error(ids: np.ndarray, vocab_size: int) -> str | None:
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        return f"token id {bad.flat[0]} is outside the vocabulary (0..{vocab_size - 1})"
    return None


def mask_error(mask: np.ndarray) -> str | None:
    """The message of the PyTorch twin's ``check_attention_rows`` for rows of ``mask`` with no real token."""
    rows = np.flatnonzero(~np.asarray(mask).astype(bool).any(-1)).tolist()
    if not rows:
        return None
    shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
    return (f"attention_mask: row{'s' if len(rows) > 1 else ''} {shown} of the batch "
            f"{'have' if len(rows) > 1 else 'has'} no real token (all padding); every sequence needs at "
            "least one position with attention_mask 1 (<cls> and <eos> count)")


def _raise_on_host(bad_id, empty_row, vocab_size: int) -> None:
    """JAX host callback: raise on the host what the traced checks found (the error surfaces from jit)."""
    bad_id, empty_row = int(bad_id), int(empty_row)
    if bad_id != 0:
        raise ValueError(f"a token id is outside the vocabulary (0..{vocab_size - 1}) (checked under jit)")
    if empty_row >= 0:
        raise ValueError(f"attention_mask: row {empty_row} of the batch has no real token (all padding) "
                         "(checked under jit)")


def traced_value_checks(input_ids, attention_mask, vocab_size: int, check_mask: bool,
                        max_length: int | None = None, length_message: str = ""):
    """Checks on traced values. Returns (input_ids, bad_rows): ``input_ids`` made to depend on TensorFlow
    assertions (plain graphs: they raise before the lookups); ``bad_rows`` [B] bool, True for a row with an
    id outside the vocabulary or no attended token (for ``poison_rows``: XLA drops assertions). Under
    ``jax.jit`` a host callback raises. A length only known at run time (TensorFlow) is checked against
    ``max_length`` too. None when nothing can be checked."""
    bad_rows = None
    if input_ids is not None:
        ids = ops.cast(input_ids, "int32")
        bad_rows = ops.any(ops.logical_or(ids < 0, ids >= vocab_size), axis=-1)
    empty_rows = None
    if check_mask and attention_mask is not None:
        empty_rows = ops.logical_not(ops.any(ops.cast(attention_mask, "bool"), axis=-1))
        bad_rows = empty_rows if bad_rows is None else ops.logical_or(bad_rows, empty_rows)
    if bad_rows is None:
        return input_ids, None
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        checks = []
        if input_ids is not None:
            msg = f"a token id is outside the vocabulary (0..{vocab_size - 1})"
            checks.append(tf.debugging.assert_non_negative(input_ids, message=msg))
            checks.append(tf.debugging.assert_less(input_ids, tf.cast(vocab_size, input_ids.dtype), message=msg))
        x = input_ids if input_ids is not None else attention_mask
        if max_length is not None and x is not None and x.shape[1] is None:  # length known at run time
            checks.append(tf.debugging.assert_less_equal(tf.shape(x)[1], max_length, message=length_message))
        if empty_rows is not None:
            checks.append(tf.debugging.Assert(tf.logical_not(tf.reduce_any(empty_rows)), [
                "attention_mask: a row of the batch has no real token (all padding); rows:",
                tf.where(empty_rows)[:, 0]]))
        if input_ids is not None:
            with tf.control_dependencies(checks):
                input_ids = tf.identity(input_ids)
    elif name == "jax":
        import jax

        bad_id = ops.any(ops.logical_and(bad_rows, ops.logical_not(empty_rows))) if empty_rows is not None \
            else ops.any(bad_rows)
        first_empty = (ops.where(ops.any(empty_rows), ops.argmax(ops.cast(empty_rows, "int32")), -1)
                       if empty_rows is not None else -1)
        jax.debug.callback(lambda a, b: _raise_on_host(a, b, vocab_size), bad_id, first_empty)
    return input_ids, bad_rows


def safe_ids(input_ids, vocab_size: int):
    """Ids clipped into the vocabulary for the lookups (rows with bad ids are poisoned afterwards)."""
    return ops.clip(input_ids, 0, vocab_size - 1)


def poison_rows(x, bad_rows):
    """``x`` [B, ...] with NaN in every row where ``bad_rows`` [B] is True (traced inputs that failed a check
    on a backend that cannot raise there)."""
    if bad_rows is None:
        return x
    shape = [-1] + [1] * (len(x.shape) - 1)
    nan = ops.where(ops.reshape(bad_rows, shape), ops.cast(float("nan"), x.dtype), ops.cast(0.0, x.dtype))
    return x + nan


def device_scope(device: str | None):
    """A scope that places what is built inside on ``device`` ("cpu:0", "gpu:0"; TensorFlow's "/GPU:0" too);
    None: Keras' own placement."""
    if device is None:
        return nullcontext()
    if backend() == "tensorflow":
        import tensorflow as tf

        return tf.device(device)
    return keras.device(device.lstrip("/").lower())


def as_tensor(x: Any) -> Any:
    return x if x is None or hasattr(x, "dtype") else ops.convert_to_tensor(x)
