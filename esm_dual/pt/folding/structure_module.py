"""AlphaFold2's structure module (supplement Algorithms 20-24): invariant point attention, backbone
frame updates, torsion-angle prediction and all-atom (atom14) coordinates from rigid groups.

Runs in fp32 (autocast is switched off inside): rotations and coordinates need the precision.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ...common import residue_constants as rc
from ...common.config import StructureModuleConfig
from .rigid import Rigid, quat_multiply_by_vec, quat_to_rot, rot_vec_mul

# What the structure module returns per block, stacked to [S, *, ...] (S = num_blocks).
STRUCTURE_OUTPUTS = ("frames", "sidechain_frames", "unnormalized_angles", "angles", "positions", "states")

_CONSTANTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def residue_constant(name: str, device: torch.device) -> torch.Tensor:
    """A ``residue_constants`` table as a tensor on ``device`` (cached; never a module buffer, so it
    survives meta-device construction and is never saved)."""
    key = (name, torch.device(device))
    t = _CONSTANTS.get(key)
    if t is None:
        a = getattr(rc, name)
        t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
        if t.is_floating_point():
            t = t.float()
        _CONSTANTS[key] = t
    return t


class InvariantPointAttention(nn.Module):
    """Algorithm 22. Attention over residues from scalar queries/keys, 3-D query/key points placed in
    each residue's frame, and the pair representation; outputs mix values, value points (brought back
    into the local frame) and pair features."""

    def __init__(self, config: StructureModuleConfig):
        super().__init__()
        self.config = config
        c_s, c_z = config.sequence_dim, config.pairwise_dim
        self.c_hidden = config.ipa_dim
        self.no_heads = config.num_heads_ipa
        self.no_qk_points = config.num_qk_points
        self.no_v_points = config.num_v_points
        hc = self.c_hidden * self.no_heads
        self.linear_q = nn.Linear(c_s, hc)
        self.linear_kv = nn.Linear(c_s, 2 * hc)
        self.linear_q_points = nn.Linear(c_s, self.no_heads * self.no_qk_points * 3)
        self.linear_kv_points = nn.Linear(c_s, self.no_heads * (self.no_qk_points + self.no_v_points) * 3)
        self.linear_b = nn.Linear(c_z, self.no_heads)
        self.head_weights = nn.Parameter(torch.zeros(self.no_heads))
        concat_out_dim = self.no_heads * (c_z + self.c_hidden + self.no_v_points * 4)
        self.linear_out = nn.Linear(concat_out_dim, c_s)

    def _points(self, linear: nn.Linear, s: torch.Tensor, r: Rigid) -> torch.Tensor:
        """Project s [*, N, C_s] to points, in global coordinates: [*, N, H, P, 3]."""
        p = linear(s)
        # [*, N, H * P * 3] -> 3 x [*, N, H * P] -> [*, N, H * P, 3]: x, y, z come as three blocks
        p = torch.stack(torch.split(p, p.shape[-1] // 3, dim=-1), dim=-1)
        p = r.unsqueeze(-1).apply(p)
        # [*, N, H, P, 3]
        return p.view(p.shape[:-2] + (self.no_heads, -1, 3))

    def forward(self, s: torch.Tensor, z: torch.Tensor, r: Rigid, mask: torch.Tensor) -> torch.Tensor:
        """s [*, N, C_s]; z [*, N, N, C_z]; r: frames [*, N]; mask [*, N] -> update [*, N, C_s]."""
        # [*, N, H, C]
        q = self.linear_q(s).view(s.shape[:-1] + (self.no_heads, -1))
        # [*, N, H, 2C] -> 2 x [*, N, H, C]
        k, v = torch.split(self.linear_kv(s).view(s.shape[:-1] + (self.no_heads, -1)), self.c_hidden, dim=-1)
        q_pts = self._points(self.linear_q_points, s, r)
        kv_pts = self._points(self.linear_kv_points, s, r)
        # [*, N, H, P_qk, 3], [*, N, H, P_v, 3]
        k_pts, v_pts = torch.split(kv_pts, [self.no_qk_points, self.no_v_points], dim=-2)

        # [*, N, N, H]
        b = self.linear_b(z)
        # [*, H, N, N]
        a = torch.einsum("...qhc,...khc->...hqk", q, k) * math.sqrt(1.0 / (3 * self.c_hidden))
        # [*, N, N, H] -> [*, H, N, N]
        a = a + math.sqrt(1.0 / 3) * b.movedim(-1, -3)
        # Squared query-key point distances [*, N, N, H, P], summed coordinate by coordinate (x + y + z,
        # as a sum over a [*, N, N, H, P, 3] tensor would, without materialising it).
        pt_att = None
        for c in range(3):
            d = (q_pts[..., c].unsqueeze(-3) - k_pts[..., c].unsqueeze(-4)) ** 2
            pt_att = d if pt_att is None else pt_att + d
        head_weights = nn.functional.softplus(self.head_weights)
        head_weights = head_weights * math.sqrt(1.0 / (3 * (self.no_qk_points * 9.0 / 2)))
        # [*, N, N, H]
        pt_att = (pt_att * head_weights[:, None]).sum(dim=-1) * (-0.5)
        # [*, N, N]
        square_mask = self.config.inf * (mask.unsqueeze(-1) * mask.unsqueeze(-2) - 1)
        # [*, H, N, N] + [*, N, N, H] -> [*, H, N, N] + [*, 1, N, N]
        a = a + pt_att.movedim(-1, -3) + square_mask.unsqueeze(-3)
        a = torch.softmax(a, dim=-1)

        # [*, H, N, N] x [*, N, H, C] -> [*, N, H, C] -> [*, N, H * C]
        o = torch.einsum("...hqk,...khc->...qhc", a, v).flatten(-2)
        # [*, H, N, N] x [*, N, H, P_v, 3] -> [*, N, H, P_v, 3], then into the local frames
        o_pt = torch.einsum("...hqk,...khpx->...qhpx", a, v_pts)
        o_pt = r.unsqueeze(-1).unsqueeze(-1).invert_apply(o_pt)
        # [*, N, H * P_v]
        o_pt_norm = torch.sqrt((o_pt**2).sum(dim=-1) + self.config.epsilon).flatten(-2)
        # [*, N, H * P_v, 3]
        o_pt = o_pt.reshape(o_pt.shape[:-3] + (-1, 3))
        # [*, H, N, N] x [*, N, N, C_z] -> [*, N, H, C_z] -> [*, N, H * C_z]
        o_pair = torch.einsum("...hqk,...qkc->...qhc", a, z).flatten(-2)
        return self.linear_out(torch.cat((o, *torch.unbind(o_pt, dim=-1), o_pt_norm, o_pair), dim=-1))


class BackboneUpdate(nn.Module):
    """Algorithm 23, lines 1-2: a quaternion-vector (3) and translation (3) update per residue."""

    def __init__(self, config: StructureModuleConfig):
        super().__init__()
        self.linear = nn.Linear(config.sequence_dim, 6)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.linear(s)


class StructureModuleTransitionLayer(nn.Module):
    def __init__(self, config: StructureModuleConfig):
        super().__init__()
        c = config.sequence_dim
        self.linear_1 = nn.Linear(c, c)
        self.linear_2 = nn.Linear(c, c)
        self.linear_3 = nn.Linear(c, c)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s + self.linear_3(torch.relu(self.linear_2(torch.relu(self.linear_1(s)))))


class StructureModuleTransition(nn.Module):
    def __init__(self, config: StructureModuleConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            [StructureModuleTransitionLayer(config) for _ in range(config.num_transition_layers)]
        )
        self.dropout = nn.Dropout(config.dropout_rate)
        self.layer_norm = nn.LayerNorm(config.sequence_dim)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            s = layer(s)
        return self.layer_norm(self.dropout(s))


class AngleResnetBlock(nn.Module):
    def __init__(self, config: StructureModuleConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.resnet_dim, config.resnet_dim)
        self.linear_2 = nn.Linear(config.resnet_dim, config.resnet_dim)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a + self.linear_2(torch.relu(self.linear_1(torch.relu(a))))


class AngleResnet(nn.Module):
    """Algorithm 20, lines 11-14: torsion angles (sin, cos) for omega, phi, psi, chi1-4."""

    def __init__(self, config: StructureModuleConfig):
        super().__init__()
        self.eps = config.epsilon
        self.linear_in = nn.Linear(config.sequence_dim, config.resnet_dim)
        self.linear_initial = nn.Linear(config.sequence_dim, config.resnet_dim)
        self.layers = nn.ModuleList([AngleResnetBlock(config) for _ in range(config.num_resnet_blocks)])
        self.linear_out = nn.Linear(config.resnet_dim, config.num_angles * 2)

    def forward(self, s: torch.Tensor, s_initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s, s_initial [*, N, C_s] -> (unnormalized, normalized) angles [*, N, 7, 2]."""
        # The ReLUs on the inputs are in the AlphaFold source, not in the supplement's pseudocode.
        a = self.linear_in(torch.relu(s)) + self.linear_initial(torch.relu(s_initial))
        for layer in self.layers:
            a = layer(a)
        a = self.linear_out(torch.relu(a))
        # [*, N, 7 * 2] -> [*, N, 7, 2]
        unnormalized = a.view(a.shape[:-1] + (-1, 2))
        norm = torch.sqrt(torch.clamp(torch.sum(unnormalized**2, dim=-1, keepdim=True), min=self.eps))
        return unnormalized, unnormalized / norm


def torsion_angles_to_frames(r: Rigid, alpha: torch.Tensor, aatype: torch.Tensor) -> Rigid:
    """Algorithm 24. Backbone frames r [*, N], angles alpha [*, N, 7, 2] (sin, cos), aatype [*, N]
    -> global frames of the 8 rigid groups [*, N, 8]."""
    # [*, N, 8, 4, 4] literature frames of each group relative to its parent
    default = Rigid.from_tensor_4x4(
        residue_constant("restype_rigid_group_default_frame", alpha.device)[aatype]
    )
    # Prepend the (identity) backbone rotation: [*, N, 8, 2]
    bb_rot = alpha.new_zeros(alpha.shape[:-2] + (1, 2))
    bb_rot[..., 1] = 1
    alpha = torch.cat([bb_rot, alpha], dim=-2)
    # Rotations about x: [[1, 0, 0], [0, cos, -sin], [0, sin, cos]], [*, N, 8, 3, 3]
    sin, cos = alpha[..., 0], alpha[..., 1]
    rots = alpha.new_zeros(alpha.shape[:-1] + (3, 3))
    rots[..., 0, 0] = 1
    rots[..., 1, 1] = cos
    rots[..., 1, 2] = -sin
    rots[..., 2, 1] = sin
    rots[..., 2, 2] = cos
    all_frames = default.compose(Rigid(rots, torch.zeros_like(default.trans)))
    # chi2..chi4 frames hang off the previous chi frame: compose down to the backbone frame.
    chi2_to_bb = all_frames[..., 4].compose(all_frames[..., 5])
    chi3_to_bb = chi2_to_bb.compose(all_frames[..., 6])
    chi4_to_bb = chi3_to_bb.compose(all_frames[..., 7])
    to_bb = Rigid.cat(
        [all_frames[..., :5], chi2_to_bb.unsqueeze(-1), chi3_to_bb.unsqueeze(-1), chi4_to_bb.unsqueeze(-1)],
        dim=-1,
    )
    return r.unsqueeze(-1).compose(to_bb)


def frames_to_atom14_positions(frames: Rigid, aatype: torch.Tensor) -> torch.Tensor:
    """Global group frames [*, N, 8] -> atom14 coordinates [*, N, 14, 3] (zero where no atom)."""
    dev = aatype.device
    # [*, N, 14] group of each atom
    group = residue_constant("restype_atom14_to_rigid_group", dev)[aatype]
    # [*, N, 14, 3, 3], [*, N, 14, 3]: each atom's frame
    rot = torch.gather(frames.rot, -3, group[..., None, None].expand(group.shape + (3, 3)))
    trans = torch.gather(frames.trans, -2, group[..., None].expand(group.shape + (3,)))
    lit = residue_constant("restype_atom14_rigid_group_positions", dev)[aatype]
    mask = residue_constant("restype_atom14_mask", dev)[aatype]
    return (rot_vec_mul(rot, lit) + trans) * mask[..., None]


class StructureModule(nn.Module):
    """Algorithm 20: ``num_blocks`` rounds of IPA + transition + backbone update, starting from
    identity frames; every round also predicts torsions and all-atom positions."""

    def __init__(self, config: StructureModuleConfig):
        super().__init__()
        self.config = config
        c_s = config.sequence_dim
        self.layer_norm_s = nn.LayerNorm(c_s)
        self.layer_norm_z = nn.LayerNorm(config.pairwise_dim)
        self.linear_in = nn.Linear(c_s, c_s)
        self.ipa = InvariantPointAttention(config)
        self.ipa_dropout = nn.Dropout(config.dropout_rate)
        self.layer_norm_ipa = nn.LayerNorm(c_s)
        self.transition = StructureModuleTransition(config)
        self.bb_update = BackboneUpdate(config)
        self.angle_resnet = AngleResnet(config)

    def forward(self, evoformer_output: dict, aatype: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """evoformer_output: "single" [*, N, C_s], "pair" [*, N, N, C_z]; aatype, mask [*, N].

        Returns per-block stacks [S, *, N, ...]: frames (quaternion + translation, Angstrom),
        sidechain_frames [.., 8, 4, 4], unnormalized_angles / angles [.., 7, 2], positions [.., 14, 3],
        states [.., C_s]; and "single" (the last state).
        """
        with torch.autocast(device_type=aatype.device.type, enabled=False):
            s = evoformer_output["single"].float()
            z = evoformer_output["pair"].float()
            if mask is None:
                mask = s.new_ones(s.shape[:-1])
            s = self.layer_norm_s(s)
            z = self.layer_norm_z(z)
            s_initial = s
            s = self.linear_in(s)
            scale = self.config.trans_scale_factor
            # Backbone frames as unit quaternions [*, N, 4] and translations [*, N, 3] (nm / 10).
            quats = s.new_zeros(s.shape[:-1] + (4,))
            quats[..., 0] = 1
            trans = s.new_zeros(s.shape[:-1] + (3,))
            outputs: dict[str, list[torch.Tensor]] = {k: [] for k in STRUCTURE_OUTPUTS}
            for _ in range(self.config.num_blocks):
                s = s + self.ipa(s, z, Rigid(quat_to_rot(quats), trans), mask)
                s = self.layer_norm_ipa(self.ipa_dropout(s))
                s = self.transition(s)
                # Compose with the update: q <- normalize(q + q * (0, v)), t <- t + R(q) t_update.
                update = self.bb_update(s)
                trans = trans + rot_vec_mul(quat_to_rot(quats), update[..., 3:])
                quats = quats + quat_multiply_by_vec(quats, update[..., :3])
                quats = quats / torch.linalg.norm(quats, dim=-1, keepdim=True)
                backbone = Rigid(quat_to_rot(quats), trans * scale)
                unnormalized_angles, angles = self.angle_resnet(s, s_initial)
                all_frames = torsion_angles_to_frames(backbone, angles, aatype)
                outputs["frames"].append(torch.cat([quats, trans * scale], dim=-1))
                outputs["sidechain_frames"].append(all_frames.to_tensor_4x4())
                outputs["unnormalized_angles"].append(unnormalized_angles)
                outputs["angles"].append(angles)
                outputs["positions"].append(frames_to_atom14_positions(all_frames, aatype))
                outputs["states"].append(s)
                quats = quats.detach()  # stop the rotation gradient between blocks, as AlphaFold
            result = {k: torch.stack(v) for k, v in outputs.items()}
            result["single"] = s
            return result
