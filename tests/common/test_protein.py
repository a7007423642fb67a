"""mmCIF and PDB text of predicted structures, read back by gemmi and biotite (the test extra installs both):
entities and their full sequences (unknown residues kept), chemical components, atom types, label and auth
columns, pLDDT as ModelCIF local QA, residues numbered from 1 in each chain."""

from __future__ import annotations

import io

import numpy as np
import pytest

from esm_dual.common import protein as P
from esm_dual.common import residue_constants as rc

LINKER = 25


def _folding_output(chains: list[str], offset: int = 512, seed: int = 0) -> dict:
    """A batch of one as ``EsmForProteinFolding.infer`` lays it out (numpy): chains joined by a poly-G linker,
    residue_index jumping by ``offset`` per chain, linker atoms masked, X residues without atoms, then padding."""
    g = np.random.default_rng(seed)
    seq = ("G" * LINKER).join(chains)
    n = len(seq)
    pad = 3
    aatype = np.zeros((1, n + pad), dtype=np.int64)
    aatype[0, :n] = [rc.restype_order_with_x.get(c, rc.unk_restype_index) for c in seq]
    residx = np.zeros((1, n + pad), dtype=np.int64)
    chain_index = np.full((1, n + pad), -1, dtype=np.int64)
    linker = np.ones(n + pad)
    start = 0
    for i, ch in enumerate(chains):
        end = start + len(ch)
        span = end + (LINKER if i < len(chains) - 1 else 0)
        residx[0, start:span] = np.arange(start, span) + i * offset
        chain_index[0, start:span] = i
        linker[end:span] = 0
        start = span
    linker[n:] = 0
    exists = rc.restype_atom37_mask[aatype] * linker[None, :, None]
    positions = g.normal(0, 10, (1, n + pad, 37, 3)) * exists[..., None]
    plddt = g.uniform(20, 95, (1, n + pad, 37)).round(2)
    return {"aatype": aatype, "final_atom_positions": positions, "atom37_atom_exists": exists,
            "residue_index": residx, "plddt": plddt, "chain_index": chain_index, "ptm": np.array([0.4321])}


def test_chains_numbered_from_one_and_unknown_residues_kept():
    a, b = "MKXTAYIAKQ", "XGSHMLEX"
    (prot,) = P.from_folding_output(_folding_output([a, b]))
    assert prot.sequence == a + b
    assert prot.chain_index.tolist() == [0] * len(a) + [1] * len(b)
    assert prot.residue_index.tolist() == list(range(1, len(a) + 1)) + list(range(1, len(b) + 1))
    assert prot.ptm == pytest.approx(0.4321)
    atoms = P.read_pdb_atoms(P.to_pdb(prot))
    for c, s in (("A", a), ("B", b)):
        numbers = sorted({x["res_seq"] for x in atoms if x["chain"] == c})
        assert numbers == [i + 1 for i, r in enumerate(s) if r != "X"]  # X has no atoms, keeps its number


def _read_gemmi(text: str):
    gemmi = pytest.importorskip("gemmi")
    doc = gemmi.cif.read_string(text)
    block = doc.sole_block()
    st = gemmi.make_structure_from_block(block)
    return gemmi, block, st


@pytest.mark.parametrize("chains", [["MKXTAYIAKQRQISFVKSHFSRQLEERLGLX"], ["MKXTAYIAKQ", "XGSHMLEX", "MKXTAYIAKQ"]])
def test_mmcif_read_by_gemmi(chains):
    (prot,) = P.from_folding_output(_folding_output(chains))
    gemmi, block, st = _read_gemmi(P.to_mmcif(prot, "my prediction"))
    assert block.name == "my_prediction"
    # Entities: one per distinct sequence, X kept as UNK, strands listed.
    distinct = list(dict.fromkeys(chains))
    assert len(st.entities) == len(distinct)
    for ent, seq in zip(st.entities, distinct):
        assert ent.entity_type == gemmi.EntityType.Polymer
        assert ent.polymer_type == gemmi.PolymerType.PeptideL
        assert gemmi.one_letter_code(list(ent.full_sequence)) == seq  # UNK kept as X
        assert list(ent.subchains) == [P.CHAIN_IDS[i] for i, c in enumerate(chains) if c == seq]
    assert sorted(block.find_values("_atom_type.symbol")) == ["C", "N", "O"] + (["S"] if "M" in "".join(chains)
                                                                                else [])
    comps = set(block.find_values("_chem_comp.id"))
    assert comps == {rc.restype_1to3.get(r, "UNK") for r in "".join(chains)}
    # Atoms: the same coordinates, names and B-factors as the PDB text, label and auth numbering from 1.
    model = st[0]
    assert [ch.name for ch in model] == [P.CHAIN_IDS[i] for i in range(len(chains))]
    pdb_atoms = P.read_pdb_atoms(P.to_pdb(prot))
    ours = [(ch.name, r.seqid.num, r.name, a.name, a.pos.x, a.pos.y, a.pos.z, a.b_iso)
            for ch in model for r in ch for a in r]
    assert len(ours) == len(pdb_atoms) == int(prot.atom_mask.sum())
    for o, p in zip(ours, pdb_atoms):
        assert o[:4] == (p["chain"], p["res_seq"], p["res_name"], p["name"])
        assert np.allclose(o[4:7], p["xyz"], atol=1e-3) and abs(o[7] - p["b_factor"]) < 1e-2
    for ch in model:
        label = [r.label_seq for r in ch]
        assert label == [r.seqid.num for r in ch]  # auth and label numbering agree, from 1 per chain
    # ModelCIF quality: a local pLDDT per residue with atoms (its CA value), the mean and pTM globally.
    local = block.find("_ma_qa_metric_local.", ["label_asym_id", "label_seq_id", "label_comp_id", "metric_value"])
    ca = rc.atom_order["CA"]
    want = [(P.CHAIN_IDS[int(prot.chain_index[i])], int(prot.residue_index[i]), P._res3(prot.aatype[i]),
             float(prot.b_factors[i][ca])) for i in range(len(prot.aatype)) if prot.atom_mask[i][ca]]
    got = [(r[0], int(r[1]), r[2], float(r[3])) for r in local]
    assert [g[:3] for g in got] == [w[:3] for w in want]
    assert np.allclose([g[3] for g in got], [w[3] for w in want], atol=0.006)
    metrics = {tuple(r) for r in block.find("_ma_qa_metric.", ["id", "type", "mode"])}
    assert {("1", "pLDDT", "local"), ("3", "pTM", "global")} <= metrics
    glob = dict(block.find("_ma_qa_metric_global.", ["metric_id", "metric_value"]))
    assert float(glob["3"]) == pytest.approx(0.4321)
    assert float(glob["2"]) == pytest.approx(prot.b_factors[prot.atom_mask > 0.5].mean(), abs=0.006)


def test_mmcif_read_by_biotite():
    pdbx = pytest.importorskip("biotite.structure.io.pdbx")
    import biotite.structure as struc

    chains = ["MKXTAYIAKQ" * 12, "XGSHMLEX"]  # a sequence longer than one CIF line
    (prot,) = P.from_folding_output(_folding_output(chains))
    f = pdbx.CIFFile.read(io.StringIO(P.to_mmcif(prot, "pred")))
    seqs = pdbx.get_sequence(f)
    assert {k: str(v) for k, v in seqs.items()} == {"A": chains[0], "B": chains[1]}
    atoms = pdbx.get_structure(f, model=1, extra_fields=["b_factor"])
    assert atoms.array_length() == int(prot.atom_mask.sum())
    assert sorted(set(atoms.chain_id)) == ["A", "B"]
    for c, seq in zip("AB", chains):
        res_ids, res_names = struc.get_residues(atoms[atoms.chain_id == c])
        assert res_ids.tolist() == [i + 1 for i, r in enumerate(seq) if r != "X"]
        assert res_names.tolist() == [rc.restype_1to3[r] for r in seq if r != "X"]
    pdb_atoms = P.read_pdb_atoms(P.to_pdb(prot))
    assert np.allclose(atoms.coord, [a["xyz"] for a in pdb_atoms], atol=1e-3)
    assert np.allclose(atoms.b_factor, [a["b_factor"] for a in pdb_atoms], atol=1e-2)
    # label_* and auth_* both read (biotite switches with use_author_fields).
    label = pdbx.get_structure(f, model=1, use_author_fields=False)
    assert label.res_id.tolist() == atoms.res_id.tolist() and label.chain_id.tolist() == atoms.chain_id.tolist()


def test_cif_values_quoted():
    assert P._cif_value("plain") == "plain"
    assert P._cif_value("two words") == "'two words'"
    assert P._cif_value("it's here") == '"it\'s here"'
    assert P._cif_value("_starts") == "'_starts'"
    assert P._cif_value("data_x") == "'data_x'"
    assert P._cif_value("") == "."
