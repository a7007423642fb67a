"""Keras integration of the ESM models: inputs as dicts, the model's own loss in ``fit``, metrics on the
positions that have a target, serialization, SavedModel export (TensorFlow only) and value checks before
XLA steps. ``KerasModelMixin`` is a base of ``TFEsmPreTrainedModel``; the model file holds the twin of the
PyTorch model and nothing of this.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import keras
from keras import ops

from ..common.config import EsmConfig
from ..common.outputs import ModelOutput
from .ops import as_tensor, backend, concrete_numpy, id_error, mask_error

IGNORE_INDEX = -100


def unpack_inputs(input_ids: Any, **named: Any) -> dict[str, Any]:
    """Keras-style dict input (``model({"input_ids": ..., "attention_mask": ...})``) -> named arguments;
    Python lists become tensors (Keras itself converts numpy arrays)."""
    if not isinstance(input_ids, Mapping):
        return {k: as_tensor(v) for k, v in {"input_ids": input_ids, **named}.items()}
    unknown = sorted(set(input_ids) - set(named) - {"input_ids"})
    if unknown:
        raise ValueError(f"unknown input key(s) {unknown}; expected some of {['input_ids', *named]}")
    out = {"input_ids": input_ids.get("input_ids"), **named}
    for key, value in input_ids.items():
        if key != "input_ids" and named.get(key) is not None:
            raise ValueError(f"{key} given both in the input dict and as an argument")
        if value is not None:
            out[key] = value
    return {k: as_tensor(v) for k, v in out.items()}


def labels_from(x: Any, y: Any) -> Any:
    if y is not None:
        return y
    return x.get("labels") if isinstance(x, Mapping) else None


def _input_of(x: Any, key: str) -> Any:
    """``input_ids`` or ``attention_mask`` of fit/predict data: a dict, a tuple (x, y, ...) or the ids alone."""
    if isinstance(x, Mapping):
        return x.get(key)
    if isinstance(x, (tuple, list)):
        return _input_of(x[0], key) if x else None
    return x if key == "input_ids" else None


class _BadBatch(Exception):
    """A batch that failed the host-side checks (JAX), raised as ValueError once the weights are back."""


class KerasModelMixin:
    """Keras training, serialization and export for the ESM models (``self.config`` is an EsmConfig)."""

    # Heads whose labels mark positions without a target by -100 (token classification, MLM).
    _labels_ignore_index = False

    def hf_compute_loss(self, labels, logits):
        raise NotImplementedError(f"{type(self).__name__} has no loss of its own; compile with a loss")

    @staticmethod
    def _prediction(y_pred: Any) -> Any:
        """The tensor Keras losses and metrics see: the logits (last_hidden_state for TFEsmModel)."""
        if isinstance(y_pred, ModelOutput):
            return y_pred.logits if hasattr(y_pred, "logits") else y_pred.last_hidden_state
        return y_pred

    def _keras_loss_compiled(self) -> bool:
        """Whether the latest ``compile`` was given a loss. (Keras keeps ``self.loss`` from an earlier
        ``compile`` when a later one has none; its recorded compile config says what the latest one had.)"""
        cfg = getattr(self, "_compile_config", None)
        if cfg is not None and isinstance(getattr(cfg, "config", None), dict):
            return cfg.config.get("loss") is not None
        return self.loss is not None

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Compiled without a loss: the model's own loss (as in the PyTorch twin), labels from ``y`` or
        from a "labels" key of ``x``. Compiled with a Keras loss: that loss on the logits."""
        if self._keras_loss_compiled():
            return super().compute_loss(x, labels_from(x, y), self._prediction(y_pred), sample_weight, training)
        if sample_weight is not None:
            raise ValueError("sample weights need a Keras loss: compile(loss=...)")
        if y is None and isinstance(y_pred, ModelOutput) and y_pred.get("loss") is not None:
            loss = y_pred.loss  # labels came in the input dict; the model computed its loss in call
        else:
            labels = labels_from(x, y)
            if labels is None:
                raise ValueError("no labels: pass y to fit() or a 'labels' key in the inputs, "
                                 "or compile with a Keras loss")
            loss = self.hf_compute_loss(labels, self._prediction(y_pred))
        for extra in self.losses:
            loss = loss + ops.cast(ops.sum(extra), loss.dtype)
        if backend() == "tensorflow":
            import tensorflow as tf

            # Per-replica mean; gradients are summed over replicas (tf.distribute).
            loss = loss / ops.cast(tf.distribute.get_strategy().num_replicas_in_sync, loss.dtype)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Compiled metrics on the logits. For token classification and MLM, only the positions with a target
        count (labels other than -100: not padding, BOS/EOS or unmasked residues), as in the model's own loss:
        on TensorFlow and PyTorch metrics see those positions' labels [N] and logits [N, C] (and sample
        weights at those positions); on JAX, where shapes are static under jit, all positions with weight 0
        where there is no target (the same value for every weighted-mean metric)."""
        labels = labels_from(x, y)
        logits = self._prediction(y_pred)
        if self._labels_ignore_index and labels is not None and getattr(self, "_compile_metrics", None) is not None:
            valid = ops.not_equal(labels, ops.cast(IGNORE_INDEX, labels.dtype))
            sw = None
            if sample_weight is not None:
                sw = ops.cast(sample_weight, "float32")
                # [B] -> [B, 1] ... -> the labels' shape
                while len(sw.shape) < len(labels.shape):
                    sw = ops.expand_dims(sw, -1)
                sw = ops.broadcast_to(sw, ops.shape(labels))
            if backend() == "jax":
                weight = ops.cast(valid, "float32")
                sample_weight = weight if sw is None else weight * sw
                labels = ops.where(valid, labels, ops.zeros_like(labels))
            elif backend() == "tensorflow":
                import tensorflow as tf

                sample_weight = None if sw is None else tf.boolean_mask(sw, valid)
                labels, logits = tf.boolean_mask(labels, valid), tf.boolean_mask(logits, valid)
            else:
                sample_weight = None if sw is None else sw[valid]
                labels, logits = labels[valid], logits[valid]
        return super().compute_metrics(x, labels, logits, sample_weight)

    # ---- value checks before XLA steps (TensorFlow) ---------------------------------------------
    def _checked_data(self, x: Any) -> Any:
        """Under TensorFlow XLA (``compile(jit_compile=True)``) assertions inside the step are dropped: token ids
        and attention masks are checked before the step instead (numpy inputs at once, ``tf.data`` in the
        pipeline)."""
        if backend() != "tensorflow" or not self.jit_compile or self.run_eagerly:
            return x
        import tensorflow as tf

        vocab = self.config.vocab_size
        if isinstance(x, tf.data.Dataset):
            msg = f"a token id is outside the vocabulary (0..{vocab - 1})"

            def check(*elem):
                data = elem[0] if len(elem) == 1 else elem
                ids, mask = _input_of(data, "input_ids"), _input_of(data, "attention_mask")
                checks = []
                if ids is not None and ids.dtype.is_integer:
                    checks += [tf.debugging.assert_non_negative(ids, message=msg),
                               tf.debugging.assert_less(ids, tf.cast(vocab, ids.dtype), message=msg)]
                if mask is not None:
                    checks.append(tf.debugging.Assert(
                        tf.reduce_all(tf.reduce_any(tf.cast(mask, tf.bool), -1)),
                        ["attention_mask: a row of the batch has no real token (all padding)"]))
                with tf.control_dependencies(checks):
                    return tf.nest.map_structure(tf.identity, data)

            return x.map(check)
        if isinstance(x, keras.utils.PyDataset):
            return x
        ids, mask = concrete_numpy(_input_of(x, "input_ids")), concrete_numpy(_input_of(x, "attention_mask"))
        err = (id_error(ids, vocab) if ids is not None and ids.dtype.kind in "iu" else None) or \
            (mask_error(mask) if mask is not None else None)
        if err:
            raise ValueError(err)
        return x

    # JAX: Keras' train/test/predict functions take a Python iterator of batches into a jitted step that owns
    # (donates) the model's variables; an error raised inside the step would leave the model without weights.
    # The batches are checked on the host before they enter the step instead.
    def _check_batch(self, data: Any) -> Any:
        ids, mask = _input_of(data, "input_ids"), _input_of(data, "attention_mask")
        ids = None if ids is None else ops.convert_to_numpy(ids)
        mask = None if mask is None else ops.convert_to_numpy(mask)
        err = (id_error(ids, self.config.vocab_size) if ids is not None and ids.dtype.kind in "iu" else None) or \
            (mask_error(mask) if mask is not None else None)
        if err:
            raise _BadBatch(err)
        return data

    def _checked_step(self, name: str) -> None:
        fn = getattr(self, name, None)
        if backend() != "jax" or fn is None or getattr(fn, "checks_batches", False):
            return

        keys = {"train_function": ("trainable_variables", "non_trainable_variables", "optimizer_variables",
                                   "metrics_variables"),
                "test_function": ("trainable_variables", "non_trainable_variables", "metrics_variables"),
                "predict_function": ("trainable_variables", "non_trainable_variables")}[name]

        def step(state, iterator):
            try:
                return fn(state, (self._check_batch(data) for data in iterator))
            except _BadBatch as e:
                # Raised before the step ran: ``state`` still holds the weights Keras took off the variables.
                self._jax_state = dict(zip(keys, state))
                self._jax_state_synced = False
                self.jax_state_sync()
                raise ValueError(str(e)) from None

        step.checks_batches = True
        setattr(self, name, step)

    def make_train_function(self, force=False):
        out = super().make_train_function(force)
        self._checked_step("train_function")
        return out

    def make_test_function(self, force=False):
        out = super().make_test_function(force)
        self._checked_step("test_function")
        return out

    def make_predict_function(self, force=False):
        out = super().make_predict_function(force)
        self._checked_step("predict_function")
        return out

    def fit(self, x=None, *args, **kwargs):
        # No task loss reaches the contact head (as in PyTorch, where its .grad stays None); Keras would warn
        # about exactly these two variables on every fit. Other variables without gradients are still reported.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", category=UserWarning,
                message=r"Gradients do not exist for variables \['[^']*contact_head/regression/kernel', "
                        r"'[^']*contact_head/regression/bias'\] ")
            return super().fit(self._checked_data(x), *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        return super().evaluate(self._checked_data(x), *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        return super().predict(self._checked_data(x), *args, **kwargs)

    # ---- Keras serialization and export --------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        base = super().get_config()
        out = {**base, "config": self.config.to_dict()}
        if self.get_base_model() is not self and not self.get_base_model().trainable:
            out["base_model_frozen"] = True  # freeze_base_model: .keras files keep it (and the optimizer's slots)
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        config = dict(config)
        frozen = config.pop("base_model_frozen", False)
        model = cls(EsmConfig.from_dict(config.pop("config")), **config)
        if frozen:
            model.freeze_base_model()
        return model

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """A SavedModel for serving (TensorFlow backend only) with endpoints ``serve(input_ids,
        attention_mask)`` -> dict of the output fields (``logits``, or ``last_hidden_state`` / ``pooler_output``)
        and ``predict_contacts(input_ids, attention_mask)`` -> ``{"contacts": [B, N, N]}``; int32 [B, L]."""
        if format != "tf_saved_model":
            return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature,
                                  **kwargs)
        if backend() != "tensorflow":
            raise ValueError(f"SavedModel export of the ESM models needs the Keras TensorFlow backend (this process "
                             f"runs {backend()!r}); save a .keras file or save_pretrained and export from "
                             "KERAS_BACKEND=tensorflow")
        import tensorflow as tf

        archive = keras.export.ExportArchive()
        archive.track(self)
        spec = input_signature or [tf.TensorSpec([None, None], tf.int32, name="input_ids"),
                                   tf.TensorSpec([None, None], tf.int32, name="attention_mask")]

        def serve(input_ids, attention_mask):
            return self(input_ids=input_ids, attention_mask=attention_mask, training=False).to_dict()

        def contacts(input_ids, attention_mask):
            return {"contacts": self.predict_contacts(input_ids, attention_mask)}

        archive.add_endpoint("serve", serve, input_signature=spec)
        archive.add_endpoint("predict_contacts", contacts, input_signature=spec)
        archive.write_out(filepath, verbose=True if verbose is None else verbose)
