"""Protein structures as numpy arrays and their PDB / mmCIF text (framework-neutral).

A ``Protein`` holds atom37 coordinates as ESMFold / AlphaFold2 produce them. ``from_folding_output``
turns a batched model output (torch or numpy arrays) into one ``Protein`` per sequence, with padding
and multimer linker residues removed. pLDDT (0-100) goes into the B-factor column.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import residue_constants as rc

CHAIN_IDS = string.ascii_uppercase + string.ascii_lowercase + string.digits


@dataclass
class Protein:
    """aatype [N] (AlphaFold order, 20 = X); atom_positions [N, 37, 3] (Angstrom); atom_mask [N, 37];
    residue_index [N] (1-based numbering written to the file); b_factors [N, 37]; chain_index [N]."""

    aatype: np.ndarray
    atom_positions: np.ndarray
    atom_mask: np.ndarray
    residue_index: np.ndarray
    b_factors: np.ndarray
    chain_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.aatype.shape[0]
        for name in ("atom_positions", "atom_mask", "residue_index", "b_factors"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"Protein.{name} has {getattr(self, name).shape[0]} residues, aatype {n}")
        if self.chain_index is None:
            self.chain_index = np.zeros(n, dtype=np.int64)
        if np.any(self.aatype > rc.restype_num) or np.any(self.aatype < 0):
            raise ValueError("aatype values must be in 0..20")
        if self.chain_index.size and self.chain_index.max() >= len(CHAIN_IDS):
            raise ValueError(f"at most {len(CHAIN_IDS)} chains can be written")

    @property
    def sequence(self) -> str:
        return rc.aatype_to_sequence(self.aatype)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def from_folding_output(output: Any) -> list[Protein]:
    """One ``Protein`` per batch entry of an ESMFold output (keys as ``EsmForProteinFolding.infer``).

    Residues that are padding or multimer linker (no existing atoms) are dropped.
    """
    aatype = _np(output["aatype"])
    if "final_atom_positions" in output and output["final_atom_positions"] is not None:
        positions = _np(output["final_atom_positions"])
    else:
        positions = atom14_to_atom37(_np(output["positions"])[-1], aatype)
    atom_mask = _np(output["atom37_atom_exists"])
    residue_index = _np(output["residue_index"])
    plddt = _np(output["plddt"])
    chain_index = _np(output["chain_index"]) if output.get("chain_index") is not None else None
    proteins = []
    for i in range(aatype.shape[0]):
        keep = atom_mask[i].sum(-1) > 0
        if chain_index is not None:
            keep &= chain_index[i] >= 0
        proteins.append(
            Protein(
                aatype=aatype[i][keep],
                atom_positions=positions[i][keep] * atom_mask[i][keep][..., None],
                atom_mask=atom_mask[i][keep],
                residue_index=residue_index[i][keep] + 1,
                b_factors=plddt[i][keep],
                chain_index=None if chain_index is None else chain_index[i][keep],
            )
        )
    return proteins


def atom14_to_atom37(atom14: np.ndarray, aatype: np.ndarray) -> np.ndarray:
    """atom14 coordinates [*, N, 14, 3] -> atom37 [*, N, 37, 3] (zero where the residue has no atom)."""
    idx = rc.restype_atom37_to_atom14[aatype]  # [*, N, 37]
    out = np.take_along_axis(atom14, idx[..., None], axis=-2)
    return out * rc.restype_atom37_mask[aatype][..., None]


def _res3(aatype: int) -> str:
    return rc.restype_1to3.get(rc.restypes_with_x[int(aatype)], rc.unk_restype)


def to_pdb(prot: Protein) -> str:
    """PDB text: ATOM records per chain, TER after each chain, pLDDT in the B-factor column."""
    numbers = np.asarray(prot.residue_index)
    if numbers.size and (int(numbers.max()) > 9999 or int(numbers.min()) < -999):
        raise ValueError(f"residue numbers {int(numbers.min())}..{int(numbers.max())} do not fit the PDB format's "
                         "4 columns (-999..9999); write mmCIF instead (to_mmcif, `esm-dual fold --mmcif`)")
    lines: list[str] = []
    atom_index = 1
    n = prot.aatype.shape[0]
    chains = prot.chain_index
    lines.append("PARENT N/A")
    for i in range(n):
        res_name = _res3(prot.aatype[i])
        chain_id = CHAIN_IDS[int(chains[i])]
        for atom_name, pos, mask, b in zip(
            rc.atom_types, prot.atom_positions[i], prot.atom_mask[i], prot.b_factors[i]
        ):
            if mask < 0.5:
                continue
            name = atom_name if len(atom_name) == 4 else f" {atom_name}"
            # PDB is a fixed-column format: every space matters.
            lines.append(
                f"{'ATOM':<6}{atom_index:>5} {name:<4}{'':>1}{res_name:>3} {chain_id:>1}"
                f"{int(prot.residue_index[i]):>4}{'':>1}   "
                f"{pos[0]:>8.3f}{pos[1]:>8.3f}{pos[2]:>8.3f}{1.0:>6.2f}{b:>6.2f}          "
                f"{atom_name[0]:>2}{'':>2}"
            )
            atom_index += 1
        if i == n - 1 or chains[i + 1] != chains[i]:
            lines.append(
                f"{'TER':<6}{atom_index:>5}      {res_name:>3} {chain_id:>1}{int(prot.residue_index[i]):>4}"
            )
            atom_index += 1
            if i != n - 1:
                lines.append("PARENT N/A")
    lines.append("END")
    lines.append("")
    return "\n".join(lines)


_ATOM_SITE_FIELDS = (
    "group_PDB",
    "id",
    "type_symbol",
    "label_atom_id",
    "label_alt_id",
    "label_comp_id",
    "label_asym_id",
    "label_entity_id",
    "label_seq_id",
    "pdbx_PDB_ins_code",
    "Cartn_x",
    "Cartn_y",
    "Cartn_z",
    "occupancy",
    "B_iso_or_equiv",
    "auth_seq_id",
    "auth_asym_id",
    "pdbx_PDB_model_num",
)


def to_mmcif(prot: Protein, name: str = "esmfold_prediction") -> str:
    """mmCIF text: entity/sequence records per chain and an ``_atom_site`` loop; pLDDT as B_iso."""
    block = "".join(c if c.isalnum() or c in "_-." else "_" for c in name) or "structure"
    lines = [f"data_{block}", "#", f"_entry.id {block}", "#"]
    chains = [int(c) for c in dict.fromkeys(prot.chain_index.tolist())]
    lines += [
        "loop_",
        "_entity_poly_seq.entity_id",
        "_entity_poly_seq.num",
        "_entity_poly_seq.mon_id",
        "_entity_poly_seq.hetero",
    ]
    for entity, c in enumerate(chains, start=1):
        sel = np.nonzero(prot.chain_index == c)[0]
        for k, i in enumerate(sel, start=1):
            lines.append(f"{entity} {k} {_res3(prot.aatype[i])} n")
    lines += ["#", "loop_", "_struct_asym.id", "_struct_asym.entity_id"]
    for entity, c in enumerate(chains, start=1):
        lines.append(f"{CHAIN_IDS[c]} {entity}")
    lines += ["#", "loop_"] + [f"_atom_site.{f}" for f in _ATOM_SITE_FIELDS]
    atom_id = 1
    for entity, c in enumerate(chains, start=1):
        sel = np.nonzero(prot.chain_index == c)[0]
        for seq_id, i in enumerate(sel, start=1):
            res_name = _res3(prot.aatype[i])
            for atom_name, pos, mask, b in zip(
                rc.atom_types, prot.atom_positions[i], prot.atom_mask[i], prot.b_factors[i]
            ):
                if mask < 0.5:
                    continue
                lines.append(
                    f"ATOM {atom_id} {atom_name[0]} {atom_name} . {res_name} {CHAIN_IDS[c]} {entity} "
                    f"{seq_id} ? "
                    f"{pos[0]:.3f} {pos[1]:.3f} {pos[2]:.3f} 1.00 {b:.2f} {int(prot.residue_index[i])} "
                    f"{CHAIN_IDS[c]} 1"
                )
                atom_id += 1
    lines += ["#", ""]
    return "\n".join(lines)


def read_pdb_atoms(text: str) -> list[dict[str, Any]]:
    """Parse the ATOM records of PDB text (fixed columns) into dicts; used by tests and tools."""
    atoms = []
    for line in text.splitlines():
        if line.startswith("ATOM"):
            atoms.append(
                {
                    "serial": int(line[6:11]),
                    "name": line[12:16].strip(),
                    "res_name": line[17:20].strip(),
                    "chain": line[21],
                    "res_seq": int(line[22:26]),
                    "xyz": (float(line[30:38]), float(line[38:46]), float(line[46:54])),
                    "occupancy": float(line[54:60]),
                    "b_factor": float(line[60:66]),
                    "element": line[76:78].strip(),
                }
            )
    return atoms
