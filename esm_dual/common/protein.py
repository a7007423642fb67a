"""Protein structures as numpy arrays and their PDB / mmCIF text (framework-neutral).

A ``Protein`` holds atom37 coordinates as ESMFold / AlphaFold2 produce them. ``from_folding_output``
turns a batched model output (torch or numpy arrays) into one ``Protein`` per sequence, with padding
and multimer linker residues removed. pLDDT (0-100) goes into the B-factor column.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import residue_constants as rc

CHAIN_IDS = string.ascii_uppercase + string.ascii_lowercase + string.digits


@dataclass
class Protein:
    """aatype [N] (AlphaFold order, 20 = X: no atoms); atom_positions [N, 37, 3] (Angstrom); atom_mask [N, 37];
    residue_index [N] (the numbering written to the file, from 1 in each chain); b_factors [N, 37] (pLDDT);
    chain_index [N]; ptm (the model's predicted TM-score, when known)."""

    aatype: np.ndarray
    atom_positions: np.ndarray
    atom_mask: np.ndarray
    residue_index: np.ndarray
    b_factors: np.ndarray
    chain_index: np.ndarray | None = None
    ptm: float | None = None

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

    Padding and multimer linker residues are dropped; unknown residues (X, which have no atoms) are kept, so
    sequences and numbering stay whole. Residues are numbered from 1 in each chain (the model's
    ``residue_index`` jumps by 512 at each chain and counts the linker; fair-esm and transformers write those
    numbers as they are, so their chain B starts at len(A) + 538).
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
    ptm = _np(output["ptm"]) if output.get("ptm") is not None else None
    proteins = []
    for i in range(aatype.shape[0]):
        # Linker and padding residues have a residue type but no atoms; X has neither.
        keep = (atom_mask[i].sum(-1) > 0) | (aatype[i] == rc.unk_restype_index)
        if chain_index is not None:
            keep &= chain_index[i] >= 0
        chains = np.zeros(int(keep.sum()), dtype=np.int64) if chain_index is None else chain_index[i][keep]
        numbers = residue_index[i][keep].astype(np.int64)
        for c in np.unique(chains):
            sel = chains == c
            numbers[sel] = numbers[sel] - numbers[sel][0] + 1  # from 1 in each chain
        proteins.append(
            Protein(
                aatype=aatype[i][keep],
                atom_positions=positions[i][keep] * atom_mask[i][keep][..., None],
                atom_mask=atom_mask[i][keep],
                residue_index=numbers,
                b_factors=plddt[i][keep],
                chain_index=chains,
                ptm=None if ptm is None else float(ptm[i]),
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
    "auth_comp_id",
    "auth_asym_id",
    "auth_atom_id",
    "pdbx_PDB_model_num",
)

# The chemical components ESMFold writes (names as in the PDB's Chemical Component Dictionary).
_CHEM_COMP_NAMES = {
    "ALA": "ALANINE", "ARG": "ARGININE", "ASN": "ASPARAGINE", "ASP": "ASPARTIC ACID", "CYS": "CYSTEINE",
    "GLN": "GLUTAMINE", "GLU": "GLUTAMIC ACID", "GLY": "GLYCINE", "HIS": "HISTIDINE", "ILE": "ISOLEUCINE",
    "LEU": "LEUCINE", "LYS": "LYSINE", "MET": "METHIONINE", "PHE": "PHENYLALANINE", "PRO": "PROLINE",
    "SER": "SERINE", "THR": "THREONINE", "TRP": "TRYPTOPHAN", "TYR": "TYROSINE", "VAL": "VALINE",
    "UNK": "UNKNOWN",
}


def _cif_value(value: Any) -> str:
    """One CIF token: quoted when it holds blanks or starts like a CIF keyword or reserved character."""
    text = str(value)
    if text == "":
        return "."
    if any(c.isspace() for c in text) or text[0] in "_#$'\";[]" or text.lower().startswith(
        ("data_", "loop_", "save_", "global_", "stop_")
    ):
        if "\n" in text or ("'" in text and '"' in text):
            return f"\n;{text}\n;"
        return f'"{text}"' if "'" in text else f"'{text}'"
    return text


def _cif_text(text: str, width: int = 80) -> str:
    """A long value (a sequence) as a CIF text field, wrapped at ``width`` characters."""
    if len(text) <= width:
        return _cif_value(text)
    return "\n;" + "\n".join(text[i : i + width] for i in range(0, len(text), width)) + "\n;"


def _cif_loop(category: str, fields: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    if len(rows) == 1:  # a single row as key-value pairs, as the PDB writes it
        w = max(len(f) for f in fields)
        return [f"_{category}.{f}{v}" if str(v).startswith("\n") else f"_{category}.{f:<{w}} {v}"
                for f, v in zip(fields, rows[0])] + ["#"]
    out = ["loop_"] + [f"_{category}.{f}" for f in fields]
    for row in rows:  # a text field (a long sequence) ends with ';' alone on its line; the row goes on below it
        line = ""
        for v in map(str, row):
            line += v + ("\n" if v.startswith("\n;") else " ")
        out.append(line.rstrip())
    return out + ["#"]


def to_mmcif(prot: Protein, name: str = "esmfold_prediction") -> str:
    """mmCIF text that gemmi, biotite and the PDB's tools read completely.

    ``_entity`` / ``_entity_poly`` / ``_entity_poly_seq`` (one entity per distinct chain sequence, unknown
    residues kept as UNK / X), ``_struct_asym``, ``_chem_comp``, ``_atom_type``, ``_atom_site`` with label and
    auth columns (both numbered from 1 in each chain) and pLDDT as B_iso, and pLDDT as ModelCIF quality
    metrics: per residue (the CA atom's value) in ``_ma_qa_metric_local``, the model's mean over atoms in
    ``_ma_qa_metric_global`` (with pTM when ``prot.ptm`` is set).
    """
    block = "".join(c if c.isalnum() or c in "_-." else "_" for c in name) or "structure"
    chains = [int(c) for c in dict.fromkeys(prot.chain_index.tolist())]
    residues = {c: np.nonzero(prot.chain_index == c)[0] for c in chains}
    seqs = {c: "".join(rc.restypes_with_x[int(prot.aatype[i])] for i in residues[c]) for c in chains}
    entity_of_seq: dict[str, int] = {}
    for c in chains:
        entity_of_seq.setdefault(seqs[c], len(entity_of_seq) + 1)
    entity = {c: entity_of_seq[seqs[c]] for c in chains}
    strands = {e: [CHAIN_IDS[c] for c in chains if entity[c] == e] for e in entity_of_seq.values()}

    lines = [f"data_{block}", "#", f"_entry.id {block}", "#"]
    lines += _cif_loop("audit_conform", ("dict_name", "dict_version"),
                       [("mmcif_pdbx.dic", "5.384"), ("mmcif_ma.dic", "1.4.5")])
    lines += _cif_loop("entity", ("id", "type", "src_method", "pdbx_description"),
                       [(e, "polymer", "man", _cif_value(f"predicted chain {','.join(strands[e])}"))
                        for e in entity_of_seq.values()])
    poly_rows = []
    for seq, e in entity_of_seq.items():
        one_letter = "".join("(UNK)" if r == "X" else r for r in seq)
        poly_rows.append((e, "polypeptide(L)", "no", "no", _cif_text(one_letter), _cif_text(seq),
                          ",".join(strands[e])))
    lines += _cif_loop("entity_poly", ("entity_id", "type", "nstd_linkage", "nstd_monomer",
                                       "pdbx_seq_one_letter_code", "pdbx_seq_one_letter_code_can",
                                       "pdbx_strand_id"), poly_rows)
    lines += _cif_loop("entity_poly_seq", ("entity_id", "num", "mon_id", "hetero"),
                       [(e, k, rc.restype_1to3.get(r, rc.unk_restype), "n")
                        for seq, e in entity_of_seq.items() for k, r in enumerate(seq, start=1)])
    lines += _cif_loop("struct_asym", ("id", "entity_id"), [(CHAIN_IDS[c], entity[c]) for c in chains])
    comps = sorted({_res3(a) for a in prot.aatype})
    lines += _cif_loop("chem_comp", ("id", "type", "mon_nstd_flag", "name"),
                       [(r, _cif_value("peptide linking" if r == "GLY" else "L-peptide linking"),
                         "." if r == rc.unk_restype else "y", _cif_value(_CHEM_COMP_NAMES[r])) for r in comps])
    elements = sorted({a[0] for i in range(len(prot.aatype)) for a, m in zip(rc.atom_types, prot.atom_mask[i])
                       if m >= 0.5})
    if elements:
        lines += _cif_loop("atom_type", ("symbol",), [(e,) for e in elements])

    atom_rows = []
    local_rows = []
    for c in chains:
        asym = CHAIN_IDS[c]
        for seq_id, i in enumerate(residues[c], start=1):
            res_name = _res3(prot.aatype[i])
            auth_seq = int(prot.residue_index[i])
            for atom_name, pos, mask, b in zip(rc.atom_types, prot.atom_positions[i], prot.atom_mask[i],
                                               prot.b_factors[i]):
                if mask < 0.5:
                    continue
                atom_rows.append(
                    f"ATOM {len(atom_rows) + 1} {atom_name[0]} {atom_name} . {res_name} {asym} {entity[c]} "
                    f"{seq_id} ? {pos[0]:.3f} {pos[1]:.3f} {pos[2]:.3f} 1.00 {b:.2f} {auth_seq} {res_name} "
                    f"{asym} {atom_name} 1"
                )
            ca = rc.atom_order["CA"]
            if prot.atom_mask[i][ca] >= 0.5:
                local_rows.append((len(local_rows) + 1, 1, asym, seq_id, res_name, 1,
                                   f"{float(prot.b_factors[i][ca]):.2f}"))
    lines += ["loop_"] + [f"_atom_site.{f}" for f in _ATOM_SITE_FIELDS] + atom_rows + ["#"]

    # ModelCIF (mmcif_ma.dic) quality assessment: pLDDT per residue and overall, pTM when known.
    metrics = [(1, "pLDDT", "pLDDT", "local"), (2, "'mean pLDDT'", "pLDDT", "global")]
    exists = prot.atom_mask >= 0.5
    global_rows = [(1, 1, 2, f"{float(prot.b_factors[exists].mean()) if exists.any() else 0.0:.2f}")]
    if prot.ptm is not None:
        metrics.append((3, "pTM", "pTM", "global"))
        global_rows.append((2, 1, 3, f"{float(prot.ptm):.4f}"))
    lines += _cif_loop("ma_qa_metric", ("id", "name", "type", "mode"), metrics)
    lines += _cif_loop("ma_qa_metric_global", ("ordinal_id", "model_id", "metric_id", "metric_value"), global_rows)
    if local_rows:
        lines += _cif_loop("ma_qa_metric_local", ("ordinal_id", "model_id", "label_asym_id", "label_seq_id",
                                                  "label_comp_id", "metric_id", "metric_value"), local_rows)
    lines.append("")
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
