"""``make_pydataset``: the ``make_dataset`` pipeline as a ``keras.utils.PyDataset``, for every Keras backend
(JAX and PyTorch without TensorFlow installed).

Same arguments, length buckets, per-batch padding, labels and MLM masking recipe as
``esm_dual.tf.data.make_dataset`` (shared in ``batching``); batches are numpy
``({"input_ids": int32 [B, L], "attention_mask": int32 [B, L]}, labels)``. With ``shuffle`` or ``mlm`` the
order and the masks change every epoch (``on_epoch_end``), reproducibly for ``seed``; MLM draws come from
numpy, so the masks are not the same draws as tf.data's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np

from .batching import IGNORE_INDEX, Prepared, mlm_mask_np, prepare


class EsmPyDataset(keras.utils.PyDataset):
    """Length-bucketed, per-batch padded batches (see ``make_pydataset``)."""

    def __init__(self, prep: Prepared, *, label_type: str = "sequence", shuffle: bool = False, seed: int = 0,
                 mlm: bool = False, drop_remainder: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.prep = prep
        self.label_type = label_type
        self.shuffle = shuffle
        self.seed = seed
        self.mlm = mlm
        self.drop_remainder = drop_remainder
        self.epoch = 0
        # Bucket of each sequence: the first whose length holds it.
        self.bucket = np.searchsorted(np.asarray(prep.bounds), prep.lengths, side="left")
        self._plan()

    def _plan(self) -> None:
        """The batches of this epoch: sequence indices per batch, bucket by bucket (shuffled if asked)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.prep.ids)) if self.shuffle else np.arange(len(self.prep.ids))
        batches = []
        for k, size in enumerate(self.prep.sizes):
            members = order[self.bucket[order] == k]
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                if len(chunk) == size or not self.drop_remainder:
                    batches.append((k, chunk))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        k, members = self.batches[index]
        L = self.prep.bounds[k]
        ids = np.full((len(members), L), self.prep.pad_id, dtype=np.int32)
        mask = np.zeros((len(members), L), dtype=np.int32)
        for row, i in enumerate(members):
            n = len(self.prep.ids[i])
            ids[row, :n] = self.prep.ids[i]
            mask[row, :n] = 1
        if self.mlm:
            rng = np.random.default_rng([self.seed, self.epoch, index, 1])
            masked, labels = mlm_mask_np(ids, mask, rng, **self.prep.mask_kwargs)
            return {"input_ids": masked, "attention_mask": mask}, labels
        x = {"input_ids": ids, "attention_mask": mask}
        if self.prep.labels is None:
            return x
        if self.label_type == "token":
            first = self.prep.labels[members[0]]
            y = np.full((len(members), L), IGNORE_INDEX, dtype=first.dtype)
            for row, i in enumerate(members):
                y[row, :len(self.prep.labels[i])] = self.prep.labels[i]
            return x, y
        return x, self.prep.labels[members]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        if self.shuffle:
            self._plan()


def make_pydataset(
    sequences: Iterable[str] | str | os.PathLike,
    labels: Any = None,
    *,
    tokenizer: Any = None,
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
    **pydataset_kwargs: Any,
) -> EsmPyDataset:
    """``make_dataset`` (same arguments and batches) as a ``keras.utils.PyDataset`` that ``fit`` takes on every
    Keras backend; ``pydataset_kwargs`` go to ``PyDataset`` (``workers``, ``use_multiprocessing``)."""
    prep = prepare(sequences, labels, tokenizer=tokenizer, batch_size=batch_size, max_tokens=max_tokens,
                   bucket_boundaries=bucket_boundaries, mlm=mlm, mlm_probability=mlm_probability,
                   truncation_length=truncation_length, label_type=label_type, strict=strict)
    return EsmPyDataset(prep, label_type=label_type, shuffle=shuffle, seed=seed, mlm=mlm,
                        drop_remainder=drop_remainder, **pydataset_kwargs)
