"""``datasets`` rows to a padded, length-bucketed ``tf.data`` pipeline (HF's ``prepare_tf_dataset`` habit).

``prepare_tf_dataset(dataset, tokenizer)`` takes what ``dataset.map(tokenizer)`` gives (rows with
``input_ids``, optionally ``attention_mask`` and ``labels``) and yields
``({"input_ids": int32 [B, L], "attention_mask": int32 [B, L]}, labels)`` batches for Keras ``fit``. Rows are
grouped into the length buckets of ``esm_dual.tf.data`` and each batch is padded by the tokenizer's ``pad``
to its bucket's length, so the model sees one shape per bucket. Per-token labels are padded with -100, as
transformers' ``DataCollatorForTokenClassification`` does; ``collate_fn`` (an HF data collator built with
``return_tensors="np"``, e.g. ``DataCollatorForLanguageModeling``) replaces the default padding and runs
for every batch of every epoch, so MLM masks are drawn fresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from .data import IGNORE_INDEX, bucket_lengths

__all__ = ["prepare_tf_dataset"]


def _column(dataset: Any, name: str) -> list[Any] | None:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(dataset[name]) if name in names else None
    if isinstance(dataset, dict):
        return list(dataset[name]) if name in dataset else None
    raise TypeError(f"prepare_tf_dataset: expected a datasets.Dataset or a dict of columns, got "
                    f"{type(dataset).__name__}")


def prepare_tf_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    label_column: str = "labels",
    bucket_boundaries: Sequence[int] | None = None,
    drop_remainder: bool = False,
    collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
    prefetch: bool = True,
) -> tf.data.Dataset:
    """Batches of a tokenized ``datasets.Dataset`` (or a dict of columns) for Keras ``fit``/``predict``.

    Args:
        dataset: rows with ``input_ids`` (lists of token ids), optionally ``attention_mask`` and
            ``label_column`` (one label per row, or one per token).
        tokenizer: its ``pad`` pads each batch (``esm_dual.EsmTokenizer`` or ``transformers.EsmTokenizer``).
        batch_size: rows per batch; or ``max_tokens``: a bucket of length L holds ``max(1, max_tokens // L)``.
        shuffle: shuffle rows within buckets and the batch order, anew every epoch (reproducible with ``seed``).
        bucket_boundaries: token lengths of the buckets (default ``esm_dual.tf.data``'s).
        drop_remainder: drop each bucket's last, smaller batch.
        collate_fn: called on each batch's list of rows instead of the default padding; must return a dict
            of arrays (``labels`` among them, if any).
    """
    ids = _column(dataset, "input_ids")
    if ids is None:
        raise ValueError("prepare_tf_dataset: the dataset has no 'input_ids' column; map the tokenizer over it first")
    if not ids:
        raise ValueError("prepare_tf_dataset: the dataset is empty")
    if max_tokens is None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    masks = _column(dataset, "attention_mask")
    labels = _column(dataset, label_column)
    rows = []
    for i, row_ids in enumerate(ids):
        row = {"input_ids": [int(t) for t in row_ids]}
        if masks is not None:
            row["attention_mask"] = [int(t) for t in masks[i]]
        if labels is not None:
            row["labels"] = labels[i]
        rows.append(row)
    lengths = np.asarray([len(r["input_ids"]) for r in rows])
    if (lengths == 0).any():
        raise ValueError(f"prepare_tf_dataset: row {int(np.argmax(lengths == 0))} has no tokens")
    buckets = bucket_lengths(int(lengths.max()), bucket_boundaries)
    which = np.searchsorted(np.asarray(buckets), lengths, side="left")
    per_token = labels is not None and isinstance(labels[0], (list, tuple, np.ndarray))

    def batches(rng: np.random.Generator | None) -> list[tuple[int, np.ndarray]]:
        out = []
        for b, length in enumerate(buckets):
            members = np.flatnonzero(which == b)
            if rng is not None:
                members = rng.permutation(members)
            size = max(1, max_tokens // length) if max_tokens is not None else batch_size
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                if drop_remainder and len(chunk) < size:
                    continue
                out.append((length, chunk))
        if rng is not None:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def collate(length: int, chunk: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        picked = [dict(rows[i]) for i in chunk]
        if collate_fn is not None:
            enc = dict(collate_fn(picked))
            y = enc.pop("labels", None)
        else:
            y = [r.pop("labels") for r in picked] if labels is not None else None
            enc = dict(tokenizer.pad(picked, padding="max_length", max_length=length, return_tensors="np"))
            if y is not None and per_token:
                side = getattr(tokenizer, "padding_side", "right")
                padded = np.full((len(y), length), IGNORE_INDEX, dtype=np.int64)
                for r, lab in enumerate(y):
                    lab = np.asarray(lab)
                    if side == "left":
                        padded[r, length - len(lab):] = lab
                    else:
                        padded[r, :len(lab)] = lab
                y = padded
            elif y is not None:
                y = np.asarray(y)
        x = {k: np.asarray(enc[k]).astype(np.int32) for k in ("input_ids", "attention_mask") if k in enc}
        if "attention_mask" not in x:
            x["attention_mask"] = (x["input_ids"] != tokenizer.pad_token_id).astype(np.int32)
        return x, (None if y is None else np.asarray(y))

    first_x, first_y = collate(*batches(None)[0])
    x_spec = {k: tf.TensorSpec([None, None], tf.int32) for k in first_x}
    if first_y is None:
        signature: Any = x_spec
    else:
        y_dtype = tf.float32 if np.issubdtype(first_y.dtype, np.floating) else tf.int32
        signature = (x_spec, tf.TensorSpec([None] * first_y.ndim, y_dtype))
    state = {"rng": np.random.default_rng(seed) if shuffle else None}

    def generate():
        for length, chunk in batches(state["rng"]):
            x, y = collate(length, chunk)
            if y is None:
                yield x
            else:
                yield x, y.astype(np.float32 if y_dtype == tf.float32 else np.int32)

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    n = len(batches(None))
    ds = ds.apply(tf.data.experimental.assert_cardinality(n))
    return ds.prefetch(tf.data.AUTOTUNE) if prefetch else ds
