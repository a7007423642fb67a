"""Batches for ESM models without TensorFlow: tokenizing, length buckets, labels and MLM masking in numpy.

The shared preparation of ``esm_dual.tf.data.make_dataset`` (tf.data, TensorFlow backend) and
``esm_dual.tf.pydataset.make_pydataset`` (``keras.utils.PyDataset``, every Keras backend): the same
arguments, buckets, padding and labels.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..common.tokenizer import EsmTokenizer

IGNORE_INDEX = -100
# Token lengths (BOS/EOS included) of the default buckets; the top bucket is capped at the data's
# longest sequence (rounded up to a multiple of 8), so short-only data never pads to 1024.
DEFAULT_BUCKET_BOUNDARIES = (16, 32, 64, 128, 192, 256, 320, 384, 512, 640, 768, 1024)

# ESM vocabulary (all ESM-1b/1v/2 checkpoints): <cls>=0 <pad>=1 <eos>=2 <unk>=3, the 20 standard
# amino acids at 4..23 (L A G V S E R T I D P K Q N F Y M H W C), <mask>=32.
ESM_SPECIAL_IDS = (0, 1, 2, 3, 32)
ESM_STANDARD_AA_IDS = tuple(range(4, 24))
ESM_MASK_ID = 32
ESM_PAD_ID = 1
STANDARD_AA = "LAGVSERTIDPKQNFYMHWC"


# ================================================================================================
# Shapes
# ================================================================================================


def round_length(n: int) -> int:
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
    bounds = sorted({round_length(int(b)) for b in bounds})
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


def special_ids(tokenizer: Any) -> tuple[int, ...]:
    ids = getattr(tokenizer, "allspecial_ids", None)
    return tuple(int(i) for i in ids) if ids else ESM_SPECIAL_IDS


def token_id(tokenizer: Any, attr: str, default: int) -> int:
    v = getattr(tokenizer, attr, None)
    return int(v) if v is not None else default


def standard_aa_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the 20 standard amino acids (the replacement pool of MLM masking)."""
    conv = getattr(tokenizer, "convert_tokens_to_ids", None)
    if conv is None:
        return ESM_STANDARD_AA_IDS
    ids = conv(list(STANDARD_AA))
    return tuple(int(i) for i in ids)


def encode_residues(sequences: Sequence[str], tokenizer: Any, strict: bool = True,
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
    return add_special(encode_residues(sequences, tok, strict), tok, truncation_length)


def add_special(residues: list[np.ndarray], tok: Any, truncation_length: int | None,
                 names: Sequence[Any] | None = None, stacklevel: int = 3) -> list[np.ndarray]:
    if truncation_length is not None and truncation_length < 1:
        raise ValueError(f"truncation_length must be >= 1 or None, got {truncation_length}")
    if truncation_length is not None:
        cut = [i for i, r in enumerate(residues) if len(r) > truncation_length]
        if cut:
            shown = ", ".join(repr(names[i]) if names is not None else f"#{i}" for i in cut[:5])
            more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
            warnings.warn(f"{len(cut)} sequence(s) longer than {truncation_length} residues truncated to their "
                          f"first {truncation_length} (truncation_length): {shown}{more}", stacklevel=stacklevel)
    cls = token_id(tok, "cls_token_id", 0)
    eos = token_id(tok, "eos_token_id", 2)
    out = []
    for r in residues:
        row = np.empty(min(len(r), truncation_length or len(r)) + 2, dtype=np.int32)
        row[0], row[-1] = cls, eos
        row[1:-1] = r[: len(row) - 2]
        out.append(row)
    return out


def read_sequences(sequences: Any) -> tuple[list[str], list[Any]]:
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
# Dataset
# ================================================================================================


def label_array(labels: Any, n: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape[:1] != (n,):
        raise ValueError(f"got {arr.shape[0] if arr.ndim else 'scalar'} labels for {n} sequences")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int32)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    raise TypeError(f"labels must be numbers, got dtype {arr.dtype}")


def token_labels(labels: Sequence[Any], residues: Sequence[np.ndarray], truncation_length: int | None
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



@dataclass
class Prepared:
    """Everything a pipeline needs: token ids per sequence, bucket lengths and batch sizes, labels."""

    ids: list[np.ndarray]
    lengths: np.ndarray
    bounds: list[int]
    sizes: list[int]
    labels: Any  # None, [N, ...] array (sequence labels) or a list of per-token arrays
    pad_id: int
    mask_kwargs: dict[str, Any]


def prepare(sequences: Any, labels: Any, *, tokenizer: Any, batch_size: int | None, max_tokens: int | None,
            bucket_boundaries: Sequence[int] | None, mlm: bool, mlm_probability: float,
            truncation_length: int | None, label_type: str, strict: bool) -> Prepared:
    """Check the arguments of ``make_dataset``/``make_pydataset`` and tokenize, bucket and label."""
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
    seqs, records = read_sequences(sequences)
    if not seqs:
        raise ValueError("no sequences")
    if callable(labels):
        labels = [labels(r) for r in records]
    names = [getattr(r, "id", None) or f"sequence {i}" for i, r in enumerate(records)] \
        if records is not seqs else None
    residues = encode_residues(seqs, tok, strict, names)
    ids = add_special(residues, tok, truncation_length, names, stacklevel=4)  # user -> make_* -> prepare
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))

    # Buckets: padded length and batch size of each.
    bounds = bucket_lengths(int(lengths.max()), bucket_boundaries)
    sizes = []
    for b in bounds:
        n = max(1, max_tokens // b) if max_tokens is not None else batch_size
        sizes.append(min(n, batch_size) if batch_size is not None else n)
    if labels is not None:
        labels = token_labels(labels, residues, truncation_length) if label_type == "token" \
            else label_array(labels, len(seqs))
    mask_kwargs = dict(
        mlm_probability=mlm_probability,
        mask_token_id=token_id(tok, "mask_token_id", ESM_MASK_ID),
        special_ids=special_ids(tok),
        replacement_ids=standard_aa_ids(tok),
    )
    return Prepared(ids, lengths, bounds, sizes, labels, token_id(tok, "pad_token_id", ESM_PAD_ID), mask_kwargs)


def mlm_mask_np(input_ids: np.ndarray, attention_mask: np.ndarray, rng: np.random.Generator, *,
                mlm_probability: float = 0.15, mask_token_id: int = ESM_MASK_ID,
                special_ids: Sequence[int] = ESM_SPECIAL_IDS, replacement_ids: Sequence[int] = ESM_STANDARD_AA_IDS,
                mask_fraction: float = 0.8, random_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``esm_dual.tf.data.mlm_mask`` in numpy (same recipe; the draws come from ``rng``)."""
    B, L = input_ids.shape
    # [2, B, L]: selection, action
    u = rng.random((2, B, L), dtype=np.float32)
    rand_idx = rng.integers(0, len(replacement_ids), (B, L))
    eligible = attention_mask.astype(bool) & ~np.isin(input_ids, np.asarray(special_ids))
    selected = (u[0] < mlm_probability) & eligible
    # A sequence with residues but nothing selected gets its lowest-draw residue selected.
    empty = ~selected.any(-1) & eligible.any(-1)
    first = np.argmin(np.where(eligible, u[0], 2.0), axis=-1)
    selected[np.flatnonzero(empty), first[empty]] = True
    to_mask = selected & (u[1] < mask_fraction)
    to_random = selected & (u[1] >= mask_fraction) & (u[1] < mask_fraction + random_fraction)
    random_tokens = np.asarray(replacement_ids, dtype=input_ids.dtype)[rand_idx]
    masked = np.where(to_mask, mask_token_id, np.where(to_random, random_tokens, input_ids)).astype(input_ids.dtype)
    labels = np.where(selected, input_ids, IGNORE_INDEX).astype(input_ids.dtype)
    return masked, labels
