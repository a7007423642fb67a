"""Packing data: sequences end to end in one [T] token stream, and padded [B, L] <-> packed [T].

The B sequences of a batch are laid end to end (each with its own BOS/EOS); ``cu_seqlens`` [B + 1] int32
marks where each starts (sequence b is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``), ``max_seqlen`` is the
longest (a host int). :func:`pack_sequences` builds a pack from token-id lists; :func:`unpad` /
:func:`gather_tokens` / :func:`repad` move between a padded batch and its real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Pack:
    """A pack of sequences. input_ids [T]; cu_seqlens [B + 1] int32; max_seqlen int (host)."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to(self, device) -> Pack:
        return Pack(self.input_ids.to(device, non_blocking=True), self.cu_seqlens.to(device, non_blocking=True),
                    self.max_seqlen)


def pack_sequences(sequences: Sequence, device=None) -> Pack:
    """Token-id sequences (lists / numpy / tensors, each with BOS/EOS already) -> a :class:`Pack`.

    cu_seqlens and max_seqlen are computed on the host, so nothing waits on the device.
    """
    arrays = [np.asarray(s.cpu() if isinstance(s, torch.Tensor) else s, dtype=np.int64).reshape(-1)
              for s in sequences]
    if not arrays:
        raise ValueError("pack_sequences needs at least one sequence")
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError("pack_sequences: empty sequence at position(s) "
                         f"{np.flatnonzero(lengths == 0).tolist()}")
    cu = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = torch.from_numpy(np.concatenate(arrays))
    pack = Pack(ids, torch.from_numpy(cu), int(lengths.max()))
    return pack.to(device) if device is not None else pack


def pack_by_token_budget(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy packs (in the given order) of at most ``max_tokens`` tokens; a longer sequence goes alone."""
    packs: list[list[int]] = []
    cur: list[int] = []
    n = 0
    for i, length in enumerate(lengths):
        if cur and n + length > max_tokens:
            packs.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += int(length)
    if cur:
        packs.append(cur)
    return packs


def segment_ids(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """[T] sequence index of every token of a pack (no host sync)."""
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(T, device=cu_seqlens.device),
                              right=True)


def packed_positions(cu_seqlens: torch.Tensor, T: int, seg: torch.Tensor | None = None) -> torch.Tensor:
    """[T] position of every token within its own sequence (0 at each BOS)."""
    if seg is None:
        seg = segment_ids(cu_seqlens, T)
    return torch.arange(T, device=cu_seqlens.device) - cu_seqlens.to(torch.int64)[seg]


# ================================================================================================
# padded <-> packed
# ================================================================================================


@dataclass
class Unpadded:
    """indices [T] into the flattened [B * L]; cu_seqlens [B + 1] int32; max_seqlen int; B, L."""

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    length: int


def unpad(attention_mask: torch.Tensor) -> Unpadded:
    """Where the real tokens of a padded batch are. attention_mask [B, L] (nonzero = real token).

    One host sync (the lengths); the real tokens of each row keep their order, wherever the padding is.
    """
    B, L = attention_mask.shape
    mask = attention_mask.reshape(B, L) != 0
    lengths = mask.sum(-1, dtype=torch.int32)
    lengths_host = lengths.cpu()
    T = int(lengths_host.sum())
    max_seqlen = int(lengths_host.max()) if B else 0
    cu = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum(lengths, 0, dtype=torch.int32)
    flat = mask.reshape(-1)
    if hasattr(torch, "nonzero_static"):
        indices = torch.nonzero_static(flat, size=T).reshape(-1)
    else:  # pragma: no cover - torch < 2.3
        indices = flat.nonzero().reshape(-1)
    return Unpadded(indices, cu, max_seqlen, B, L)


def gather_tokens(x: torch.Tensor, u: Unpadded) -> torch.Tensor:
    """[B, L, ...] -> [T, ...] (the real tokens)."""
    return x.reshape(u.batch * u.length, *x.shape[2:]).index_select(0, u.indices)


def repad(x: torch.Tensor, u: Unpadded) -> torch.Tensor:
    """[T, ...] -> [B, L, ...], zeros at padded positions (differentiable)."""
    out = x.new_zeros(u.batch * u.length, *x.shape[1:])
    out = out.index_copy(0, u.indices, x)
    return out.view(u.batch, u.length, *x.shape[1:])
