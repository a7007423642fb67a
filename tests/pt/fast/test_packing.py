"""Packing data: packs, positions, padded <-> packed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esm_dual.pt.fast.packing import pack_by_token_budget, pack_sequences, packed_positions, repad, segment_ids, unpad
from tests.conftest import make_batch


def test_pack_sequences_and_positions():
    pack = pack_sequences([[0, 5, 6, 2], [0, 7, 2], np.array([0, 9, 9, 9, 9, 2])])
    assert pack.input_ids.tolist() == [0, 5, 6, 2, 0, 7, 2, 0, 9, 9, 9, 9, 2]
    assert pack.cu_seqlens.dtype == torch.int32
    assert pack.cu_seqlens.tolist() == [0, 4, 7, 13]
    assert pack.max_seqlen == 6
    assert pack.lengths.tolist() == [4, 3, 6]
    T = pack.input_ids.shape[0]
    assert segment_ids(pack.cu_seqlens, T).tolist() == [0] * 4 + [1] * 3 + [2] * 6
    assert packed_positions(pack.cu_seqlens, T).tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="empty sequence"):
        pack_sequences([[0, 2], []])


def test_pack_by_token_budget():
    packs = pack_by_token_budget([5, 5, 5, 12, 3], max_tokens=10)
    assert packs == [[0, 1], [2], [3], [4]]
    assert sum(packs, []) == list(range(5))


def test_unpad_repad_roundtrip_any_padding_side():
    ids, mask = (torch.tensor(x) for x in make_batch())
    # left-pad the second row, holes in the fourth: the real tokens keep their order.
    mask2 = mask.clone()
    mask2[1] = torch.flip(mask[1], [0])
    mask2[3, 1] = 0
    for m in (mask, mask2):
        u = unpad(m)
        assert u.cu_seqlens.tolist() == [0, *np.cumsum(m.sum(-1).tolist()).tolist()]
        assert u.max_seqlen == int(m.sum(-1).max())
        x = torch.randn(*ids.shape, 5)
        packed = x.reshape(-1, 5)[u.indices]
        back = repad(packed, u)
        assert torch.equal(back, x * m[..., None])
