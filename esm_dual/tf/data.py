"""tf.data input pipelines for ESM models: length-bucketed batches and dynamic MLM masking (TensorFlow only;
``esm_dual.tf.pydataset.make_pydataset`` is the same pipeline as a ``keras.utils.PyDataset`` for any backend).

``make_dataset`` turns amino-acid strings (or a FASTA file) into batches of
``({"input_ids": int32 [B, L], "attention_mask": int32 [B, L]}, labels)`` that Keras ``fit`` takes
directly. Sequences are grouped by length into buckets and every batch is padded to its bucket's
length, so the model (and XLA) sees one shape per bucket instead of one per batch. ``max_tokens``
gives token-budget batches: a bucket of length L holds ``max(1, max_tokens // L)`` sequences.

``mlm_mask`` is the BERT/ESM masking recipe as a TensorFlow function: with ``mlm=True`` the pipeline
draws new masks for every batch of every epoch, reproducibly for a given ``seed``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from ..common.tokenizer import EsmTokenizer
from .batching import (
    DEFAULT_BUCKET_BOUNDARIES,
    ESM_MASK_ID,
    ESM_SPECIAL_IDS,
    ESM_STANDARD_AA_IDS,
    IGNORE_INDEX,
    bucket_lengths,
    encode_sequences,
    prepare,
)

__all__ = ["DEFAULT_BUCKET_BOUNDARIES", "bucket_lengths", "encode_sequences", "make_dataset", "mlm_mask"]

# ================================================================================================
# MLM masking
# ================================================================================================


def mlm_mask(
    input_ids: tf.Tensor,
    attention_mask: tf.Tensor,
    seed: tf.Tensor | Sequence[int] | tf.random.Generator | None = None,
    *,
    generator: tf.random.Generator | None = None,
    mlm_probability: float = 0.15,
    mask_token_id: int = ESM_MASK_ID,
    special_ids: Sequence[int] = ESM_SPECIAL_IDS,
    replacement_ids: Sequence[int] = ESM_STANDARD_AA_IDS,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
) -> tuple[tf.Tensor, tf.Tensor]:
    """BERT/ESM masking of a batch: input_ids [B, L], attention_mask [B, L] -> (masked ids, labels).

    Each real residue position (attention_mask 1 and not a special token: never BOS/EOS/padding) is
    selected with probability ``mlm_probability``; a sequence with residues but no selected position
    gets one (so no batch is left without a loss term). Of the selected positions ``mask_fraction``
    become ``<mask>``, ``random_fraction`` a random standard amino acid, the rest are kept. labels
    [B, L] hold the original ids at the selected positions and -100 elsewhere.

    Randomness: ``seed`` is a stateless seed (a shape [2] integer tensor: same seed, same masks), or
    pass a ``tf.random.Generator`` (as ``seed`` or ``generator``) whose state advances per call.
    """
    if isinstance(seed, tf.random.Generator):
        generator, seed = seed, None
    if generator is None and seed is None:
        raise ValueError("mlm_mask needs a stateless seed (shape [2]) or a tf.random.Generator")
    input_ids = tf.convert_to_tensor(input_ids)
    attention_mask = tf.convert_to_tensor(attention_mask)
    shape = tf.shape(input_ids)
    n_replace = len(replacement_ids)
    if generator is not None:
        # [2, B, L]: selection, action
        u = generator.uniform(tf.concat([[2], shape], 0), dtype=tf.float32)
        rand_idx = generator.uniform(shape, minval=0, maxval=n_replace, dtype=tf.int32)
    else:
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
        u = tf.random.stateless_uniform(tf.concat([[2], shape], 0), seed=seeds[0], dtype=tf.float32)
        rand_idx = tf.random.stateless_uniform(shape, seed=seeds[1], minval=0, maxval=n_replace,
                                               dtype=tf.int32)
    eligible = tf.cast(attention_mask, tf.bool)
    for sid in special_ids:
        eligible = tf.logical_and(eligible, tf.not_equal(input_ids, tf.cast(sid, input_ids.dtype)))
    selected = tf.logical_and(u[0] < mlm_probability, eligible)
    # A sequence with residues but nothing selected gets its lowest-draw residue selected.
    empty = tf.logical_and(tf.logical_not(tf.reduce_any(selected, -1)), tf.reduce_any(eligible, -1))
    first = tf.argmin(tf.where(eligible, u[0], 2.0), axis=-1, output_type=tf.int32)
    # [B, L]
    pick = tf.cast(tf.one_hot(first, shape[1], dtype=tf.int32), tf.bool)
    selected = tf.logical_or(selected, tf.logical_and(pick, empty[:, None]))
    to_mask = tf.logical_and(selected, u[1] < mask_fraction)
    to_random = tf.logical_and(selected, tf.logical_and(u[1] >= mask_fraction,
                                                        u[1] < mask_fraction + random_fraction))
    random_tokens = tf.gather(tf.constant(replacement_ids, dtype=input_ids.dtype), rand_idx)
    masked = tf.where(to_mask, tf.cast(mask_token_id, input_ids.dtype),
                      tf.where(to_random, random_tokens, input_ids))
    labels = tf.where(selected, input_ids, tf.cast(IGNORE_INDEX, input_ids.dtype))
    return masked, labels


def make_dataset(
    sequences: Iterable[str] | str | os.PathLike,
    labels: Any = None,
    *,
    tokenizer: EsmTokenizer | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    bucket_boundaries: Sequence[int] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    mlm: bool = False,
    mlm_probability: float = 0.15,
    truncation_length: int | None = 1022,
    label_type: str = "sequence",
    drop_remainder: bool = False,
    strict: bool = True,
) -> tf.data.Dataset:
    """Length-bucketed, per-batch padded batches for ESM models.

    Args:
        sequences: amino-acid strings, FASTA records (with ``.sequence``), or a FASTA file path.
        labels: per-sequence labels ([N] or [N, k] numbers) for ``label_type="sequence"``; one array
            of per-residue labels per sequence for ``label_type="token"`` (padded and BOS/EOS set to
            -100); or a callable applied to each record (FASTA input) or string. None: no labels
            (the dataset yields the input dict alone), unless ``mlm``.
        tokenizer: an ``EsmTokenizer`` (default: the standard ESM vocabulary).
        batch_size: sequences per batch (default 8 when ``max_tokens`` is not given).
        max_tokens: token budget per batch: a bucket of padded length L gets ``max(1, max_tokens // L)``
            sequences (capped by ``batch_size`` when both are given).
        bucket_boundaries: bucket lengths in tokens (BOS/EOS included), rounded up to multiples of 8
            (up to 64) or 64; default ``DEFAULT_BUCKET_BOUNDARIES``. Every batch is padded to the
            length of its bucket, so there are at most ``len(boundaries) + 1`` distinct shapes.
        shuffle: shuffle sequences (and batches) anew every epoch, reproducibly for ``seed``.
        seed: seed for shuffling and MLM masking.
        mlm: yield ``(masked inputs, labels)`` with new masks drawn for every epoch (``mlm_mask``).
        mlm_probability: fraction of residues selected for the MLM loss.
        truncation_length: keep at most this many residues per sequence (1022 for ESM; None: no limit).
        label_type: "sequence" or "token".
        drop_remainder: drop each bucket's last incomplete batch.
        strict: a character outside the tokenizer's vocabulary (lower-case, ``*``, digits) raises a
            ``TokenizerError`` naming the record, position and character; ``False`` maps it to ``<unk>`` as
            HF's tokenizer does (a run of them becomes one token, so later positions shift).

    Returns:
        A ``tf.data.Dataset`` of ``({"input_ids": int32 [B, L], "attention_mask": int32 [B, L]},
        labels)``; labels are [B] / [B, k] (sequence) or [B, L] (token, MLM).
    """
    prep = prepare(sequences, labels, tokenizer=tokenizer, batch_size=batch_size, max_tokens=max_tokens,
                   bucket_boundaries=bucket_boundaries, mlm=mlm, mlm_probability=mlm_probability,
                   truncation_length=truncation_length, label_type=label_type, strict=strict)
    ids, lengths, bounds, sizes = prep.ids, prep.lengths, prep.bounds, prep.sizes

    # Elements: (ids [l], mask [l][, labels]), sliced from flat constants by sequence index.
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = tf.constant(np.concatenate(ids), dtype=tf.int32)
    offsets_t = tf.constant(offsets)
    pad_values: list[Any] = [np.int32(prep.pad_id), np.int32(0)]
    label_shape: tf.TensorShape | None = None
    flat_labels = seq_labels = None
    has_labels = prep.labels is not None
    if has_labels:
        if label_type == "token":
            flat = np.concatenate(prep.labels)
            flat_labels = tf.constant(flat)
            pad_values.append(np.asarray(IGNORE_INDEX, dtype=flat.dtype))
        else:
            arr = prep.labels
            seq_labels = tf.constant(arr)
            label_shape = tf.TensorShape(arr.shape[1:])
            pad_values.append(np.asarray(0, dtype=arr.dtype))

    def element(i):
        start, end = offsets_t[i], offsets_t[i + 1]
        x = flat_ids[start:end]
        out = (x, tf.ones_like(x))
        if flat_labels is not None:
            out += (flat_labels[start:end],)
        elif seq_labels is not None:
            out += (seq_labels[i],)
        return out

    ds = tf.data.Dataset.range(len(ids))
    if shuffle:
        ds = ds.shuffle(len(ids), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    bounds_t = tf.constant(bounds, dtype=tf.int64)
    sizes_t = tf.constant(sizes, dtype=tf.int64)

    def key_func(*elem):
        length = tf.shape(elem[0], out_type=tf.int64)[0]
        # First bucket whose length holds the sequence.
        return tf.reduce_sum(tf.cast(bounds_t < length, tf.int64))

    def reduce_func(key, window):
        length = tf.stack([bounds_t[key]])
        shapes = [length, length]
        if has_labels:
            shapes.append(length if label_type == "token" else label_shape)
        return window.padded_batch(sizes_t[key], padded_shapes=tuple(shapes),
                                   padding_values=tuple(pad_values), drop_remainder=drop_remainder)

    ds = ds.group_by_window(key_func=key_func, reduce_func=reduce_func,
                            window_size_func=lambda key: sizes_t[key])
    # The number of batches is known: tell tf.data (Keras then knows the steps per epoch).
    per_bucket = np.bincount(np.searchsorted(bounds, lengths, side="left"), minlength=len(bounds))
    rounding = np.floor_divide if drop_remainder else (lambda a, b: -(-a // b))
    n_batches = int(sum(rounding(int(n), s) for n, s in zip(per_bucket, sizes)))
    ds = ds.apply(tf.data.experimental.assert_cardinality(n_batches))
    if shuffle:
        ds = ds.shuffle(max(1, min(1024, len(ids) // max(1, min(sizes)) + len(bounds))), seed=seed + 1,
                        reshuffle_each_iteration=True)

    if mlm:
        mask_kwargs = prep.mask_kwargs
        # One stateless seed per batch; a new sequence of seeds every epoch (reproducible from seed).
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

        def to_mlm(elem, batch_seed):
            masked, mlm_labels = mlm_mask(elem[0], elem[1], batch_seed, **mask_kwargs)
            return {"input_ids": masked, "attention_mask": elem[1]}, mlm_labels

        ds = tf.data.Dataset.zip((ds, seeds)).map(to_mlm, num_parallel_calls=tf.data.AUTOTUNE,
                                                  deterministic=True)
    elif has_labels:
        ds = ds.map(lambda i, m, y: ({"input_ids": i, "attention_mask": m}, y))
    else:
        ds = ds.map(lambda i, m: {"input_ids": i, "attention_mask": m})
    return ds.prefetch(tf.data.AUTOTUNE)
