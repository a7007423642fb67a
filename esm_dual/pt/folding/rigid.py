"""Rigid transformations (rotation + translation) and unit quaternions, as AlphaFold2 uses them.

Shapes: ``rot`` [*, 3, 3], ``trans`` [*, 3], quaternions [*, 4] as (w, x, y, z). Everything here runs
in fp32: callers disable autocast around the structure module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def quat_to_rot(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [*, 4] (w, x, y, z) -> rotation matrices [*, 3, 3]."""
    a, b, c, d = q.unbind(-1)
    rows = [
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ]
    # [*, 3, 3]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def quat_multiply_by_vec(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hamilton product q * (0, v) of quaternions [*, 4] and pure-vector quaternions [*, 3] -> [*, 4]."""
    a, b, c, d = q.unbind(-1)
    x, y, z = v.unbind(-1)
    return torch.stack(
        [
            -b * x - c * y - d * z,
            a * x + c * z - d * y,
            a * y - b * z + d * x,
            a * z + b * y - c * x,
        ],
        dim=-1,
    )


def rot_vec_mul(r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [*, 3, 3] applied to vectors [*, 3] -> [*, 3] (written out: no AMP downcast)."""
    x, y, z = v.unbind(-1)
    return torch.stack([r[..., i, 0] * x + r[..., i, 1] * y + r[..., i, 2] * z for i in range(3)], dim=-1)


def rot_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Products of rotation matrices [*, 3, 3] @ [*, 3, 3] (written out: no AMP downcast)."""
    rows = [
        torch.stack([sum(a[..., i, k] * b[..., k, j] for k in range(3)) for j in range(3)], dim=-1)
        for i in range(3)
    ]
    return torch.stack(rows, dim=-2)


@dataclass
class Rigid:
    """A batch of rigid transforms x -> rot @ x + trans; ``rot`` [*, 3, 3], ``trans`` [*, 3]."""

    rot: torch.Tensor
    trans: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.trans.shape[:-1]

    def __getitem__(self, index) -> Rigid:
        if not isinstance(index, tuple):
            index = (index,)
        return Rigid(self.rot[index + (slice(None), slice(None))], self.trans[index + (slice(None),)])

    def unsqueeze(self, dim: int) -> Rigid:
        d = dim if dim >= 0 else dim - 1  # counted over the batch dims only
        return Rigid(self.rot.unsqueeze(d - 1 if dim < 0 else d), self.trans.unsqueeze(d))

    def compose(self, other: Rigid) -> Rigid:
        """self o other: first ``other``, then ``self``."""
        return Rigid(rot_matmul(self.rot, other.rot), rot_vec_mul(self.rot, other.trans) + self.trans)

    def apply(self, pts: torch.Tensor) -> torch.Tensor:
        """Points [*, 3] in local coordinates -> global."""
        return rot_vec_mul(self.rot, pts) + self.trans

    def invert_apply(self, pts: torch.Tensor) -> torch.Tensor:
        """Points [*, 3] in global coordinates -> local."""
        return rot_vec_mul(self.rot.transpose(-1, -2), pts - self.trans)

    def scale_translation(self, factor: float) -> Rigid:
        return Rigid(self.rot, self.trans * factor)

    def to_tensor_4x4(self) -> torch.Tensor:
        """[*, 4, 4] homogeneous matrices."""
        out = self.trans.new_zeros((*self.shape, 4, 4))
        out[..., :3, :3] = self.rot
        out[..., :3, 3] = self.trans
        out[..., 3, 3] = 1
        return out

    @staticmethod
    def from_tensor_4x4(t: torch.Tensor) -> Rigid:
        return Rigid(t[..., :3, :3], t[..., :3, 3])

    @staticmethod
    def cat(rigids: list[Rigid], dim: int) -> Rigid:
        d = dim if dim >= 0 else dim - 1
        return Rigid(
            torch.cat([r.rot for r in rigids], dim=d - 1 if dim < 0 else d),
            torch.cat([r.trans for r in rigids], dim=d),
        )
