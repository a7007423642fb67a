"""What ``EsmForProteinFolding.infer`` wraps around the model: the output dataclass, sequences (chains
separated by ``:``, fair-esm's multimer convention) -> padded model inputs, atom14 -> atom37 positions, and
merging the outputs of length buckets back into one batch in input order."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ...common import residue_constants as rc
from .structure_module import STRUCTURE_OUTPUTS, residue_constant

__all__ = ["EsmForProteinFoldingOutput", "atom14_to_atom37", "encode_sequences", "merge_outputs", "take_rows"]


@dataclass(repr=False)
class EsmForProteinFoldingOutput:
    """ESMFold outputs (fair-esm's keys). S = structure-module blocks, B batch, N residues.

    positions [S, B, N, 14, 3] (Angstrom); frames [S, B, N, 7]; sidechain_frames [S, B, N, 8, 4, 4];
    angles / unnormalized_angles [S, B, N, 7, 2]; states [S, B, N, C_s]; s_s [B, N, C_s];
    s_z [B, N, N, C_z]; distogram_logits [B, N, N, 64]; lm_logits [B, N, 23]; lddt_head
    [S, B, N, 37, 50]; plddt [B, N, 37] (0-100); ptm_logits [B, N, N, 64]; ptm [B];
    aligned_confidence_probs [B, N, N, 64]; predicted_aligned_error [B, N, N];
    aatype / residue_index [B, N]; atom14_atom_exists [B, N, 14]; atom37_atom_exists [B, N, 37];
    residx_atom14_to_atom37 [B, N, 14]; residx_atom37_to_atom14 [B, N, 37]. ``infer`` adds
    mean_plddt [B], chain_index [B, N] (-1 = padding), final_atom_positions [B, N, 37, 3] and
    final_atom_mask [B, N, 37]. Key access (``out["ptm"]``) and assignment work as on a dict.
    """

    frames: torch.Tensor | None = None
    sidechain_frames: torch.Tensor | None = None
    unnormalized_angles: torch.Tensor | None = None
    angles: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    states: torch.Tensor | None = None
    s_s: torch.Tensor | None = None
    s_z: torch.Tensor | None = None
    distogram_logits: torch.Tensor | None = None
    lm_logits: torch.Tensor | None = None
    aatype: torch.Tensor | None = None
    atom14_atom_exists: torch.Tensor | None = None
    residx_atom14_to_atom37: torch.Tensor | None = None
    residx_atom37_to_atom14: torch.Tensor | None = None
    atom37_atom_exists: torch.Tensor | None = None
    residue_index: torch.Tensor | None = None
    lddt_head: torch.Tensor | None = None
    plddt: torch.Tensor | None = None
    ptm_logits: torch.Tensor | None = None
    ptm: torch.Tensor | None = None
    aligned_confidence_probs: torch.Tensor | None = None
    predicted_aligned_error: torch.Tensor | None = None
    max_predicted_aligned_error: torch.Tensor | None = None
    mean_plddt: torch.Tensor | None = None
    chain_index: torch.Tensor | None = None
    final_atom_positions: torch.Tensor | None = None
    final_atom_mask: torch.Tensor | None = None

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(f"{key!r} is not an ESMFold output field")
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def to_dict(self) -> dict[str, Any]:
        return dict(self.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.keys())})"


# ================================================================================================
# Sequence encoding (fair-esm's convention for multimers)
# ================================================================================================


def encode_sequences(
    seqs: list[str], residue_index_offset: int | None = 512, chain_linker: str | None = "G" * 25
) -> dict[str, torch.Tensor]:
    """Sequences (chains separated by ``:``) -> padded aatype, mask, residx, linker_mask, chain_index [B, N].

    Chains are joined with ``chain_linker``; the residue index jumps by ``residue_index_offset`` at each
    chain (the linker belongs to the preceding chain); linker_mask is 0 on linker residues. Letters
    outside the 20 amino acids become X (index 20). Padding: aatype 0, mask 0, chain_index -1.
    """
    chain_linker = chain_linker or ""
    residue_index_offset = residue_index_offset or 0
    rows = []
    for seq in seqs:
        chains = seq.split(":")
        aatype = rc.sequence_to_aatype(chain_linker.join(chains))
        residx = np.arange(len(aatype))
        linker = np.ones(len(aatype), dtype=np.float32)
        chain_index = np.zeros(len(aatype), dtype=np.int64)
        start = 0
        for i, chain in enumerate(chains):
            end = start + len(chain)
            span = end + (len(chain_linker) if i < len(chains) - 1 else 0)
            residx[start:span] += i * residue_index_offset
            chain_index[start:span] = i
            linker[end:span] = 0
            start = span
        rows.append((aatype, residx, linker, chain_index))
    B = len(rows)
    N = max((len(r[0]) for r in rows), default=0)
    out = {
        "aatype": torch.zeros(B, N, dtype=torch.long),
        "mask": torch.zeros(B, N, dtype=torch.long),
        "residx": torch.zeros(B, N, dtype=torch.long),
        "linker_mask": torch.zeros(B, N, dtype=torch.float32),
        "chain_index": torch.full((B, N), -1, dtype=torch.long),
    }
    for b, (aatype, residx, linker, chain_index) in enumerate(rows):
        n = len(aatype)
        out["aatype"][b, :n] = torch.from_numpy(aatype)
        out["mask"][b, :n] = 1
        out["residx"][b, :n] = torch.from_numpy(residx)
        out["linker_mask"][b, :n] = torch.from_numpy(linker)
        out["chain_index"][b, :n] = torch.from_numpy(chain_index)
    return out


def atom14_to_atom37(atom14: torch.Tensor, aatype: torch.Tensor) -> torch.Tensor:
    """atom14 [*, N, 14, 3] -> atom37 [*, N, 37, 3], zero where the residue type has no such atom."""
    idx = residue_constant("restype_atom37_to_atom14", aatype.device)[aatype]
    # [*, N, 37, 3]
    out = torch.gather(atom14, -2, idx[..., None].expand(idx.shape + (3,)))
    return out * residue_constant("restype_atom37_mask", aatype.device)[aatype][..., None]


def take_rows(x: torch.Tensor | list | None, rows: list[int]) -> torch.Tensor | list | None:
    """Rows ``rows`` of a per-sequence argument (tensor [B, N] or list), None stays None."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(rows, device=x.device)]
    return [x[i] for i in rows]


# Where each output has its batch dimension (the S-stacked structure-module outputs: 1) and how many
# residue dimensions follow it (pair outputs: 2). Everything else: batch first, one residue dimension.
_STACKED = {*STRUCTURE_OUTPUTS, "lddt_head"}
_PAIR = {"s_z", "distogram_logits", "ptm_logits", "aligned_confidence_probs", "predicted_aligned_error"}
_PER_SEQUENCE = {"ptm", "mean_plddt"}


def merge_outputs(
    parts: list[EsmForProteinFoldingOutput], batches: list[list[int]], total: int
) -> EsmForProteinFoldingOutput:
    """Outputs of length buckets -> one output over all ``total`` sequences in input order, padded to
    the longest (padding: 0, chain_index -1, as ``encode_sequences``)."""
    out = EsmForProteinFoldingOutput()
    n_max = max(p.aatype.shape[1] for p in parts)
    for key in parts[0].keys():
        first = parts[0][key]
        if key == "max_predicted_aligned_error" or not isinstance(first, torch.Tensor) or first.dim() == 0:
            out[key] = first
            continue
        bdim = 1 if key in _STACKED else 0
        n_res = 0 if key in _PER_SEQUENCE else 2 if key in _PAIR else 1
        shape = list(first.shape)
        shape[bdim] = total
        for d in range(bdim + 1, bdim + 1 + n_res):
            shape[d] = n_max
        fill = -1 if key == "chain_index" else 0
        merged = first.new_full(shape, fill)
        for part, batch in zip(parts, batches):
            t = part[key]
            idx = torch.as_tensor(batch, device=t.device)
            # the part's residues occupy the leading positions of each residue dimension
            view = merged
            for d in range(bdim + 1, bdim + 1 + n_res):
                view = view.narrow(d, 0, t.shape[d])
            view.index_copy_(bdim, idx, t)
        out[key] = merged
    return out
