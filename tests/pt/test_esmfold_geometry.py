"""ESMFold geometry pieces against the OpenFold code shipped in HF transformers: residue constants,
quaternions and rigids, torsions -> frames -> atoms, confidence metrics, PDB writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esm_dual.common import protein as P
from esm_dual.common import residue_constants as rc

of = pytest.importorskip("transformers.models.esm.openfold_utils")
from transformers.models.esm.openfold_utils import feats as of_feats  # noqa: E402
from transformers.models.esm.openfold_utils import loss as of_loss  # noqa: E402
from transformers.models.esm.openfold_utils import protein as of_protein  # noqa: E402
from transformers.models.esm.openfold_utils import residue_constants as of_rc  # noqa: E402
from transformers.models.esm.openfold_utils import rigid_utils as of_rigid  # noqa: E402
from transformers.models.esm.openfold_utils.data_transforms import make_atom14_masks  # noqa: E402


def test_residue_constants_match_openfold():
    assert rc.restypes == of_rc.restypes and rc.atom_types == of_rc.atom_types
    assert rc.restype_name_to_atom14_names == of_rc.restype_name_to_atom14_names
    np.testing.assert_array_equal(
        rc.restype_rigid_group_default_frame, of_rc.restype_rigid_group_default_frame
    )
    np.testing.assert_array_equal(rc.restype_atom14_to_rigid_group, of_rc.restype_atom14_to_rigid_group)
    np.testing.assert_array_equal(rc.restype_atom14_mask, of_rc.restype_atom14_mask)
    np.testing.assert_array_equal(
        rc.restype_atom14_rigid_group_positions, of_rc.restype_atom14_rigid_group_positions
    )
    maps = make_atom14_masks({"aatype": torch.arange(21)})
    np.testing.assert_array_equal(rc.restype_atom14_to_atom37, maps["residx_atom14_to_atom37"].numpy())
    np.testing.assert_array_equal(rc.restype_atom37_to_atom14, maps["residx_atom37_to_atom14"].numpy())
    np.testing.assert_array_equal(rc.restype_atom37_mask, maps["atom37_atom_exists"].numpy())
    assert rc.sequence_to_aatype("ARNX-bz").tolist() == [0, 1, 2, 20, 20, 20, 20]


def _random_quats(shape, g):
    q = torch.randn(*shape, 4, generator=g)
    return q / q.norm(dim=-1, keepdim=True)


def test_quaternions_and_rigids_match_openfold():
    from esm_dual.pt.folding.rigid import Rigid, quat_multiply_by_vec, quat_to_rot

    g = torch.Generator().manual_seed(0)
    q = _random_quats((5, 7), g)
    v = torch.randn(5, 7, 3, generator=g)
    torch.testing.assert_close(quat_to_rot(q), of_rigid.quat_to_rot(q), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        quat_multiply_by_vec(q, v), of_rigid.quat_multiply_by_vec(q, v), atol=1e-6, rtol=0
    )
    t = torch.randn(5, 7, 3, generator=g)
    ours = Rigid(quat_to_rot(q), t)
    ref = of_rigid.Rigid(of_rigid.Rotation(quats=q), t)
    pts = torch.randn(5, 7, 3, generator=g)
    torch.testing.assert_close(ours.apply(pts), ref.apply(pts), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.invert_apply(pts), ref.invert_apply(pts), atol=1e-5, rtol=0)
    upd = torch.randn(5, 7, 6, generator=g) * 0.3
    ref2 = ref.compose_q_update_vec(upd)
    new_q = q + quat_multiply_by_vec(q, upd[..., :3])
    new_q = new_q / new_q.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(new_q, ref2.get_rots().get_quats(), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        t + ours.rot.matmul(upd[..., 3:, None])[..., 0], ref2.get_trans(), atol=1e-5, rtol=0
    )


def test_torsions_to_frames_to_atoms_match_openfold():
    from esm_dual.pt.folding.rigid import Rigid, quat_to_rot
    from esm_dual.pt.folding.structure_module import frames_to_atom14_positions, torsion_angles_to_frames

    g = torch.Generator().manual_seed(1)
    aatype = torch.randint(0, 21, (2, 11), generator=g)
    q = _random_quats((2, 11), g)
    t = torch.randn(2, 11, 3, generator=g) * 10
    alpha = torch.randn(2, 11, 7, 2, generator=g)
    alpha = alpha / alpha.norm(dim=-1, keepdim=True)
    ours = torsion_angles_to_frames(Rigid(quat_to_rot(q), t), alpha, aatype)
    rrgdf = torch.tensor(of_rc.restype_rigid_group_default_frame)
    ref = of_feats.torsion_angles_to_frames(
        of_rigid.Rigid(of_rigid.Rotation(rot_mats=quat_to_rot(q)), t), alpha, aatype, rrgdf
    )
    torch.testing.assert_close(ours.to_tensor_4x4(), ref.to_tensor_4x4(), atol=1e-5, rtol=0)
    pos = frames_to_atom14_positions(ours, aatype)
    ref_pos = of_feats.frames_and_literature_positions_to_atom14_pos(
        ref,
        aatype,
        rrgdf,
        torch.tensor(of_rc.restype_atom14_to_rigid_group),
        torch.tensor(of_rc.restype_atom14_mask),
        torch.tensor(of_rc.restype_atom14_rigid_group_positions),
    )
    torch.testing.assert_close(pos, ref_pos, atol=1e-4, rtol=0)
    # atom14 -> atom37 (numpy writer side and torch model side)
    from esm_dual.pt.folding.esmfold import atom14_to_atom37

    batch = make_atom14_masks({"aatype": aatype})
    ref37 = of_feats.atom14_to_atom37(pos, batch)
    torch.testing.assert_close(atom14_to_atom37(pos, aatype), ref37, atol=0, rtol=0)
    np.testing.assert_allclose(P.atom14_to_atom37(pos.numpy(), aatype.numpy()), ref37.numpy(), atol=0)


def test_confidence_metrics_match_openfold():
    from esm_dual.pt.folding.confidence import categorical_lddt, predicted_aligned_error, predicted_tm_score

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 13, 13, 64, generator=g)
    mask = torch.ones(3, 13)
    mask[1, 9:] = 0
    mask[2, 4:] = 0  # shorter than 19: d0 is clipped
    ours = predicted_tm_score(logits, mask)
    for b in range(3):
        n = int(mask[b].sum())
        ref = of_loss.compute_tm(logits[b, :n, :n][None], max_bin=31, no_bins=64)
        assert abs(float(ours[b]) - float(ref)) < 1e-6
    pae = predicted_aligned_error(logits)
    ref = of_loss.compute_predicted_aligned_error(logits, max_bin=31, no_bins=64)
    for k in ("predicted_aligned_error", "aligned_confidence_probs", "max_predicted_aligned_error"):
        torch.testing.assert_close(pae[k], ref[k], atol=1e-6, rtol=0)
    from transformers.models.esm.modeling_esmfold import categorical_lddt as hf_lddt

    lddt_logits = torch.randn(2, 5, 37, 50, generator=g)
    torch.testing.assert_close(categorical_lddt(lddt_logits), hf_lddt(lddt_logits), atol=1e-6, rtol=0)


def _random_protein(g: np.random.Generator, n: int = 12, chains=None) -> P.Protein:
    aatype = g.integers(0, 21, n)
    mask = rc.restype_atom37_mask[aatype]
    return P.Protein(
        aatype=aatype,
        atom_positions=g.normal(0, 20, (n, 37, 3)) * mask[..., None],
        atom_mask=mask,
        residue_index=np.arange(1, n + 1),
        b_factors=g.uniform(0, 100, (n, 37)),
        chain_index=None if chains is None else np.asarray(chains),
    )


@pytest.mark.parametrize("chains", [None, [0] * 5 + [1] * 4 + [2] * 3])
def test_pdb_text_matches_openfold_writer(chains):
    g = np.random.default_rng(3)
    prot = _random_protein(g, chains=chains)
    ref = of_protein.to_pdb(
        of_protein.Protein(
            aatype=prot.aatype,
            atom_positions=prot.atom_positions,
            atom_mask=prot.atom_mask,
            residue_index=prot.residue_index,
            b_factors=prot.b_factors,
            chain_index=None if chains is None else prot.chain_index,
        )
    )
    assert P.to_pdb(prot) == ref


def test_pdb_refuses_residue_numbers_beyond_its_columns():
    g = np.random.default_rng(5)
    prot = _random_protein(g, n=3)
    prot.residue_index = np.array([9998, 9999, 10000])
    with pytest.raises(ValueError, match=r"9998..10000 do not fit the PDB format"):
        P.to_pdb(prot)
    assert "10000" in P.to_mmcif(prot, "big")  # mmCIF has no such limit


def test_mmcif_round_trip():
    g = np.random.default_rng(4)
    prot = _random_protein(g, n=9, chains=[0] * 4 + [1] * 5)
    cif = P.to_mmcif(prot, "test prot")
    assert cif.startswith("data_test_prot\n")
    lines = cif.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("_atom_site."))
    fields = [line.split(".", 1)[1] for line in lines if line.startswith("_atom_site.")]
    rows = [dict(zip(fields, line.split())) for line in lines[start + 1 :] if line.startswith("ATOM")]
    pdb_atoms = P.read_pdb_atoms(P.to_pdb(prot))
    assert len(rows) == len(pdb_atoms) == int(prot.atom_mask.sum())
    for r, a in zip(rows, pdb_atoms):
        assert (r["label_atom_id"], r["label_comp_id"], r["auth_asym_id"], int(r["auth_seq_id"])) == (
            a["name"],
            a["res_name"],
            a["chain"],
            a["res_seq"],
        )
        assert max(abs(float(r[f"Cartn_{c}"]) - x) for c, x in zip("xyz", a["xyz"])) < 1e-6
        assert abs(float(r["B_iso_or_equiv"]) - a["b_factor"]) < 1e-6
    assert {r["label_seq_id"] for r in rows if r["auth_asym_id"] == "B"} <= {"1", "2", "3", "4", "5"}
