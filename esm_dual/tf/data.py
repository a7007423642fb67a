"""tf.data input pipelines for ESM models: length-bucketed batches and dynamic MLM masking.

``make_dataset`` turns amino-acid strings (or a FASTA file) into batches of
``({"input_ids": int32 [B, L], "attention_mask": int32 [B, L]}, labels)`` that Keras ``fit`` takes
directly. Sequences are grouped by length into buckets and every batch is padded to its bucket's
length, so the model (and XLA) sees one shape per bucket instead of one per batch. ``max_tokens``
gives token-budget batches: a bucket of length L holds ``max(1, max_tokens // L)`` sequences.

``mlm_mask`` is the BERT/ESM masking recipe as a TensorFlow function: with ``mlm=True`` the pipeline
draws new masks for every batch of every epoch, reproducibly for a given ``seed``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from ..common.tokenizer import EsmTokenizer

__all__ = ["DEFAULT_BUCKET_BOUNDARIES", "bucket_lengths", "encode_sequences", "make_dataset", "mlm_mask"]

IGNORE_INDEX = -100
# Token lengths (BOS/EOS included) of the default buckets; the top bucket is capped at the data's
# longest sequence (rounded up to a multiple of 8), so short-only data never pads to 1024.
DEFAULT_BUCKET_BOUNDARIES = (16, 32, 64, 128, 192, 256, 320, 384, 512, 640, 768, 1024)

# ESM vocabulary (all ESM-1b/1v/2 checkpoints): <cls>=0 <pad>=1 <eos>=2 <unk>=3, the 20 standard
# amino acids at 4..23 (L A G V S E R T I D P K Q N F Y M H W C), <mask>=32.
_ESM_SPECIAL_IDS = (0, 1, 2, 3, 32)
_ESM_STANDARD_AA_IDS = tuple(range(4, 24))
_ESM_MASK_ID = 32
_ESM_PAD_ID = 1
_STANDARD_AA = "LAGVSERTIDPKQNFYMHWC"


# ================================================================================================
# Shapes
# ================================================================================================


def _round_length(n: int) -> int:
    """Round a token length up: to a multiple of 8 up to 64, of 64 above."""
    step = 8 if n <= 64 else 64
    return int(math.ceil(n / step) * step)


def bucket_lengths(max_length: int, boundaries: Sequence[int] | None = None) -> list[int]:
    """Padded lengths of the buckets for data whose longest tokenized sequence has ``max_length`` tokens.

    ``boundaries`` (token lengths, BOS/EOS included) are rounded up (multiples of 8 up to 64, of 64
    above), sorted and de-duplicated; those at or above the data's maximum are replaced by one top
    bucket of ``max_length`` rounded up to a multiple of 8.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    bounds = DEFAULT_BUCKET_BOUNDARIES if boundaries is None else boundaries
    bounds = sorted({_round_length(int(b)) for b in bounds})
    if bounds and bounds[0] < 1:
        raise ValueError(f"bucket boundaries must be positive, got {list(boundaries or [])}")
    top = int(math.ceil(max_length / 8) * 8)
    out = [b for b in bounds if b < top]
    # The top bucket: the first boundary that holds the longest sequence, if it is not wastefully large.
    above = [b for b in bounds if b >= top]
    out.append(above[0] if above and above[0] - top < 8 else top)
    return out


# ================================================================================================
# Tokenizing
# ================================================================================================


def _special_ids(tokenizer: Any) -> tuple[int, ...]:
    ids = getattr(tokenizer, "all_special_ids", None)
    return tuple(int(i) for i in ids) if ids else _ESM_SPECIAL_IDS


def _token_id(tokenizer: Any, attr: str, default: int) -> int:
    v = getattr(tokenizer, attr, None)
    return int(v) if v is not None else default


def _standard_aa_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the 20 standard amino acids (the replacement pool of MLM masking)."""
    conv = getattr(tokenizer, "convert_tokens_to_ids", None)
    if conv is None:
        return _ESM_STANDARD_AA_IDS
    ids = conv(list(_STANDARD_AA))
    return tuple(int(i) for i in ids)


def _encode_residues(sequences: Sequence[str], tokenizer: Any, strict: bool = True,
                     ids: Sequence[Any] | None = None) -> list[np.ndarray]:
    """Residue ids (no BOS/EOS) of each sequence. ``strict``: a character outside the vocabulary is a
    ``TokenizerError`` naming the record (``ids``), position and character, instead of ``<unk>``."""
    if hasattr(tokenizer, "encode_residues_np"):
        return list(tokenizer.encode_residues_np(list(sequences), strict=strict, ids=ids))
    enc = tokenizer(list(sequences), add_special_tokens=False)
    return [np.asarray(r, dtype=np.int64) for r in enc["input_ids"]]


def encode_sequences(sequences: Sequence[str], tokenizer: EsmTokenizer | None = None,
                     truncation_length: int | None = 1022, strict: bool = True) -> list[np.ndarray]:
    """Token ids (int32, ``<cls>`` + residues + ``<eos>``) of each sequence; at most ``truncation_length``
    residues are kept (the first ones), with a warning naming the sequences cut. ``strict=False`` maps
    characters outside the vocabulary to ``<unk>`` as HF's tokenizer does (a run of them to one)."""
    tok = tokenizer if tokenizer is not None else EsmTokenizer()
    return _add_special(_encode_residues(sequences, tok, strict), tok, truncation_length)


def _add_special(residues: list[np.ndarray], tok: Any, truncation_length: int | None,
                 names: Sequence[Any] | None = None) -> list[np.ndarray]:
    if truncation_length is not None and truncation_length < 1:
        raise ValueError(f"truncation_length must be >= 1 or None, got {truncation_length}")
    if truncation_length is not None:
        cut = [i for i, r in enumerate(residues) if len(r) > truncation_length]
        if cut:
            shown = ", ".join(repr(names[i]) if names is not None else f"#{i}" for i in cut[:5])
            more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
            warnings.warn(f"{len(cut)} sequence(s) longer than {truncation_length} residues truncated to their "
                          f"first {truncation_length} (truncation_length): {shown}{more}", stacklevel=3)
    cls = _token_id(tok, "cls_token_id", 0)
    eos = _token_id(tok, "eos_token_id", 2)
    out = []
    for r in residues:
        row = np.empty(min(len(r), truncation_length or len(r)) + 2, dtype=np.int32)
        row[0], row[-1] = cls, eos
        row[1:-1] = r[: len(row) - 2]
        out.append(row)
    return out


def _read_sequences(sequences: Any) -> tuple[list[str], list[Any]]:
    """(sequences, records) from a FASTA path, FASTA records or strings."""
    if isinstance(sequences, (str, os.PathLike)):
        path = os.fspath(sequences)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no FASTA file at {path!r} (make_dataset takes a FASTA path or a list of sequences)")
        from ..common.fasta import read_fasta

        records = list(read_fasta(path))
        return [r.sequence for r in records], records
    items = list(sequences)
    if items and not isinstance(items[0], str) and hasattr(items[0], "sequence"):
        return [r.sequence for r in items], items
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise TypeError(f"sequence {i} is a {type(s).__name__}, expected an amino-acid string")
    return items, items


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
    mask_token_id: int = _ESM_MASK_ID,
    special_ids: Sequence[int] = _ESM_SPECIAL_IDS,
    replacement_ids: Sequence[int] = _ESM_STANDARD_AA_IDS,
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


# ================================================================================================
# Dataset
# ================================================================================================


def _label_array(labels: Any, n: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape[:1] != (n,):
        raise ValueError(f"got {arr.shape[0] if arr.ndim else 'scalar'} labels for {n} sequences")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int32)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    raise TypeError(f"labels must be numbers, got dtype {arr.dtype}")


def _token_labels(labels: Sequence[Any], residues: Sequence[np.ndarray], truncation_length: int | None
                  ) -> list[np.ndarray]:
    """Per-residue labels -> per-token labels (-100 at BOS/EOS), truncated as the sequences are."""
    if len(labels) != len(residues):
        raise ValueError(f"got {len(labels)} label arrays for {len(residues)} sequences")
    out = []
    is_float = False
    for i, (lab, res) in enumerate(zip(labels, residues)):
        a = np.asarray(lab)
        if a.ndim != 1 or a.shape[0] != len(res):
            raise ValueError(f"token labels of sequence {i} have shape {a.shape}; "
                             f"expected one label per residue token ({len(res)})")
        is_float = is_float or a.dtype.kind == "f"
        if truncation_length is not None:
            a = a[:truncation_length]
        out.append(np.concatenate([[IGNORE_INDEX], a, [IGNORE_INDEX]]))
    dtype = np.float32 if is_float else np.int32
    return [a.astype(dtype) for a in out]


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
    if label_type not in ("sequence", "token"):
        raise ValueError(f"label_type must be 'sequence' or 'token', got {label_type!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if mlm and labels is not None:
        raise ValueError("mlm=True makes its own labels; pass labels=None")
    if batch_size is None and max_tokens is None:
        batch_size = 8

    tok = tokenizer if tokenizer is not None else EsmTokenizer()
    seqs, records = _read_sequences(sequences)
    if not seqs:
        raise ValueError("no sequences")
    if callable(labels):
        labels = [labels(r) for r in records]
    names = [getattr(r, "id", None) or f"sequence {i}" for i, r in enumerate(records)] \
        if records is not seqs else None
    residues = _encode_residues(seqs, tok, strict, names)
    ids = _add_special(residues, tok, truncation_length, names)
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))

    # Buckets: padded length and batch size of each.
    bounds = bucket_lengths(int(lengths.max()), bucket_boundaries)
    sizes = []
    for b in bounds:
        n = max(1, max_tokens // b) if max_tokens is not None else batch_size
        sizes.append(min(n, batch_size) if batch_size is not None else n)

    # Elements: (ids [l], mask [l][, labels]), sliced from flat constants by sequence index.
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat_ids = tf.constant(np.concatenate(ids), dtype=tf.int32)
    offsets_t = tf.constant(offsets)
    pad_values: list[Any] = [np.int32(_token_id(tok, "pad_token_id", _ESM_PAD_ID)), np.int32(0)]
    label_shape: tf.TensorShape | None = None
    flat_labels = seq_labels = None
    has_labels = labels is not None
    if has_labels:
        if label_type == "token":
            flat = np.concatenate(_token_labels(labels, residues, truncation_length))
            flat_labels = tf.constant(flat)
            pad_values.append(np.asarray(IGNORE_INDEX, dtype=flat.dtype))
        else:
            arr = _label_array(labels, len(seqs))
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

    ds = tf.data.Dataset.range(len(seqs))
    if shuffle:
        ds = ds.shuffle(len(seqs), seed=seed, reshuffle_each_iteration=True)
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
        ds = ds.shuffle(max(1, min(1024, len(seqs) // max(1, min(sizes)) + len(bounds))), seed=seed + 1,
                        reshuffle_each_iteration=True)

    if mlm:
        mask_kwargs = dict(
            mlm_probability=mlm_probability,
            mask_token_id=_token_id(tok, "mask_token_id", _ESM_MASK_ID),
            special_ids=_special_ids(tok),
            replacement_ids=_standard_aa_ids(tok),
        )
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
