"""Triangular updates of the pair representation (AlphaFold2 supplement, Algorithms 11-14).

All of them take an optional ``chunk_size``: the work is split over rows of the pair tensor so that
the large intermediates ([*, I, H, J, J] attention scores, the projections of the multiplicative
update) exist for ``chunk_size`` rows at a time. Chunked and unchunked results agree to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..fast.options import FastPathOptions
from .kernels import compute_dtype, cueq_triangle_attention, cueq_triangle_multiplication, pair_layer_norm, use_cueq
from .primitives import Attention, aligned_bias, aligned_empty, row_chunks, sdpa_bias_ok


class TriangleAttention(nn.Module):
    """Triangle self-attention around the starting node (Algorithm 13) or ending node (Algorithm 14)."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, starting: bool = True, inf: float = 1e9):
        super().__init__()
        self.starting = starting
        self.inf = inf
        self.layer_norm = nn.LayerNorm(c_in)
        self.linear = nn.Linear(c_in, no_heads, bias=False)
        self.mha = Attention(c_in, c_hidden, no_heads, gating=True)
        # "torch" | "sdpa" | "cueq" (kernels.py) and FastPathOptions.triangle_sdpa (None: the process
        # default); set from the model's options by FoldingTrunk.configure
        self.kernels = "torch"
        self.triangle_sdpa: bool | None = None
        # the fast mode's options where its LayerNorm writes the autocast dtype (kernels.pair_layer_norm)
        self.ln_options: FastPathOptions | None = None

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, chunk_size: int | None = None
    ) -> torch.Tensor:
        """x [*, I, J, C_z]; mask [*, I, J] (1 = valid pair; None: all valid) -> update [*, I, J, C_z]."""
        if not self.starting:
            # The ending-node variant is the starting-node one on the transposed pair tensor.
            x = x.transpose(-2, -3)
            mask = None if mask is None else mask.transpose(-1, -2)
        x = pair_layer_norm(self.layer_norm, x, self.ln_options)
        if x.dim() == 4 and use_cueq(self.kernels, x):
            # [B, J, J, H] -> [B, H, J, J]
            bias = self.linear(x).permute(0, 3, 1, 2)
            out = torch.cat([cueq_triangle_attention(self.mha, x[:, rows], bias,
                                                     None if mask is None else mask[:, rows])
                             for rows in row_chunks(x.shape[1], chunk_size)], dim=1)
            return out if self.starting else out.transpose(-2, -3)
        if sdpa_bias_ok(x, any_dtype=self.kernels != "torch", enabled=self.triangle_sdpa) and x.dim() == 4:
            out = self._forward_sdpa(x, mask, chunk_size)
            return out if self.starting else out.transpose(-2, -3)
        if mask is None:
            mask = x.new_ones(x.shape[:-1])
        # [*, I, 1, 1, J]
        mask_bias = (self.inf * (mask.float() - 1))[..., :, None, None, :]
        # [*, I, J, H] -> [*, H, I, J] -> [*, 1, H, I, J]
        triangle_bias = self.linear(x).permute(*range(x.dim() - 3), -1, -3, -2).unsqueeze(-4).float()
        out = torch.empty_like(x) if chunk_size is not None else None
        for rows in row_chunks(x.shape[-3], chunk_size):
            # Each row i attends over its own J positions; the triangle bias is shared by all rows.
            o = self.mha(x[..., rows, :, :], [mask_bias[..., rows, :, :, :], triangle_bias])
            if out is None:
                out = o
            else:
                out[..., rows, :, :] = o
        if not self.starting:
            out = out.transpose(-2, -3)
        return out

    def add_into(self, z: torch.Tensor, mask: torch.Tensor | None, chunk_size: int | None) -> None:
        """z += self(z, mask, chunk_size) in place (inference): with chunks, row block by row block
        with no full-size temporary. Row i's update reads only row i (LayerNormed) and the triangle
        bias, which is built from every row before any of them changes."""
        n = z.shape[-2]
        cueq = z.dim() == 4 and use_cueq(self.kernels, z)
        if not cueq and (chunk_size is None or chunk_size >= n or z.dim() != 4):
            z += self(z, mask, chunk_size)
            return
        zt = z if self.starting else z.transpose(-2, -3)
        mt = mask if (mask is None or self.starting) else mask.transpose(-1, -2)
        B = zt.shape[0]
        sdpa = sdpa_bias_ok(zt, any_dtype=self.kernels != "torch", enabled=self.triangle_sdpa)
        h = self.linear.out_features
        # [B, H, J, J], row block by row block: bias[b, h, j, k] = linear(LN(z))[b, j, k, h]
        bias = aligned_empty((B, h, n, n), zt, compute_dtype(zt) if (sdpa or cueq) else torch.float32)
        chunks = list(row_chunks(n, chunk_size))
        for rows in chunks:
            x = pair_layer_norm(self.layer_norm, zt[:, rows], self.ln_options)
            bias[:, :, rows] = self.linear(x).permute(0, 3, 1, 2)
        for rows in chunks:
            # One chunk: the LayerNorm of every row is at hand already (the rows are unchanged until the add).
            if len(chunks) > 1:
                x = pair_layer_norm(self.layer_norm, zt[:, rows], self.ln_options)
            m = None if mt is None else mt[:, rows]
            if cueq:
                zt[:, rows] += cueq_triangle_attention(self.mha, x, bias, m)
            else:
                zt[:, rows] += self._row_block(x, m, bias, sdpa)

    def _row_block(self, x: torch.Tensor, mask_rows: torch.Tensor | None, bias: torch.Tensor,
                   sdpa: bool) -> torch.Tensor:
        """The update of a block of rows. x [B, R, J, C] (LayerNormed); mask_rows [B, R, J] or None;
        bias [B, H, J, J], the triangle bias shared by all rows -> [B, R, J, C]."""
        if sdpa:
            if mask_rows is not None:
                # [B, R, 1, 1, J] + [B, 1, H, J, J] -> [B, R, H, J, J]
                key_bias = (self.inf * (mask_rows.to(bias.dtype) - 1))[:, :, None, None, :]
                bias = aligned_bias(bias.unsqueeze(1) + key_bias)
            return self.mha.forward_rows(x, bias)
        m = x.new_ones(x.shape[:-1]) if mask_rows is None else mask_rows
        mask_bias = (self.inf * (m.float() - 1))[:, :, None, None, :]
        return self.mha(x, [mask_bias, bias.unsqueeze(1)])

    def _forward_sdpa(self, x: torch.Tensor, mask: torch.Tensor | None, chunk_size: int | None) -> torch.Tensor:
        """x [B, I, J, C] (LayerNormed, starting-node orientation); the triangle bias [B, H, J, J] is
        the attention mask of every row, plus the pair mask's key bias where there is padding."""
        # [B, J, J, H] -> [B, H, J, J]
        triangle_bias = aligned_bias(self.linear(x).permute(0, 3, 1, 2))
        out = torch.empty_like(x) if chunk_size is not None and chunk_size < x.shape[1] else None
        for rows in row_chunks(x.shape[1], chunk_size):
            o = self._row_block(x[:, rows], None if mask is None else mask[:, rows], triangle_bias, True)
            if out is None:
                return o
            out[:, rows] = o
        return out


class TriangleMultiplicativeUpdate(nn.Module):
    """Triangle update using outgoing (Algorithm 11) or incoming (Algorithm 12) edges."""

    def __init__(self, c_z: int, outgoing: bool = True):
        super().__init__()
        self.outgoing = outgoing
        self.linear_a_p = nn.Linear(c_z, c_z)
        self.linear_a_g = nn.Linear(c_z, c_z)
        self.linear_b_p = nn.Linear(c_z, c_z)
        self.linear_b_g = nn.Linear(c_z, c_z)
        self.linear_g = nn.Linear(c_z, c_z)
        self.linear_z = nn.Linear(c_z, c_z)
        self.layer_norm_in = nn.LayerNorm(c_z)
        self.layer_norm_out = nn.LayerNorm(c_z)
        # "torch" | "cueq" (kernels.py; "sdpa" means "torch" here); set by FoldingTrunk.configure
        self.kernels = "torch"

    def _cueq_ok(self, z: torch.Tensor, chunk_size: int | None) -> bool:
        """cuEquivariance's kernel: on CUDA, channels a multiple of 32 (its tiles), and not where the
        caller asked for row chunks (the kernel holds full-size projections: long sequences keep the
        chunked, memory-bounded path)."""
        return (z.dim() == 4 and use_cueq(self.kernels, z) and z.shape[-1] % 32 == 0
                and (chunk_size is None or chunk_size >= z.shape[-3]))

    def _cueq(self, z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The update through cuEquivariance's fused kernel, with a float [B, N, N] mask (all ones where
        there is none). N is padded to a multiple of 16 with masked pairs (they add nothing to the sums;
        their outputs are dropped): bf16 contractions over a length that is not a multiple of 8 miss
        cuBLAS's aligned tensor-core kernels."""
        n = z.shape[-2]
        mask = z.new_ones(z.shape[:-1]) if mask is None else mask.to(z.dtype)
        pad = -n % 16
        if pad:
            z = nn.functional.pad(z, (0, 0, 0, pad, 0, pad))
            mask = nn.functional.pad(mask, (0, pad, 0, pad))
        out = cueq_triangle_multiplication(self, z.contiguous(), mask.contiguous())
        return out[:, :n, :n] if pad else out

    def _projections(self, z_ln: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_ln [*, R, N, C_z] (LayerNormed rows), mask [*, R, N, 1] -> gated projections a, b."""
        a = mask * torch.sigmoid(self.linear_a_g(z_ln)) * self.linear_a_p(z_ln)
        b = mask * torch.sigmoid(self.linear_b_g(z_ln)) * self.linear_b_p(z_ln)
        return a, b

    def forward(
        self, z: torch.Tensor, mask: torch.Tensor | None = None, chunk_size: int | None = None,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """z [*, N, N, C_z]; mask [*, N, N] -> update [*, N, N, C_z] (with ``accumulate`` and chunks:
        z + update, written into z)."""
        if not accumulate and self._cueq_ok(z, chunk_size):
            return self._cueq(z, mask)
        if mask is None:
            mask = z.new_ones(z.shape[:-1])
        mask = mask.unsqueeze(-1).to(z.dtype)
        nd = z.dim() - 3  # number of leading batch dims
        lead = tuple(range(nd))
        n = z.shape[-3]
        if chunk_size is None or chunk_size >= n:
            z_ln = self.layer_norm_in(z)
            a, b = self._projections(z_ln, mask)
            # outgoing: x_ij = sum_k a_ik b_jk ; incoming: x_ij = sum_k a_ki b_kj
            # [*, C, I, K] @ [*, C, K, J] -> [*, C, I, J]
            if self.outgoing:
                p = torch.matmul(a.permute(*lead, -1, -3, -2), b.permute(*lead, -1, -2, -3))
            else:
                p = torch.matmul(a.permute(*lead, -1, -2, -3), b.permute(*lead, -1, -3, -2))
            # [*, C, I, J] -> [*, I, J, C]
            x = p.permute(*lead, -2, -1, -3)
            x = self.linear_z(self.layer_norm_out(x))
            return x * torch.sigmoid(self.linear_g(z_ln))

        # Chunked: build the two projections row block by row block straight into the [*, C, N, N]
        # layouts the contraction wants, then produce the output row block by row block.
        c = self.linear_a_p.out_features
        dev = z.device.type
        # Under autocast the buffers hold the autocast dtype: half the memory, no per-chunk casts.
        buf = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else z.dtype
        # a_t: outgoing [*, C, I, K], incoming [*, C, K, I]; b_t: outgoing [*, C, J, K], incoming [*, C, K, J]
        a_t = z.new_empty(z.shape[:-3] + (c, n, n), dtype=buf)
        b_t = z.new_empty(z.shape[:-3] + (c, n, n), dtype=buf)
        for rows in row_chunks(n, chunk_size):
            a, b = self._projections(self.layer_norm_in(z[..., rows, :, :]), mask[..., rows, :, :])
            # [*, R, N, C] -> [*, C, R, N]
            a_t[..., rows, :] = a.permute(*lead, -1, -3, -2)
            b_t[..., rows, :] = b.permute(*lead, -1, -3, -2)
        out = z if accumulate else torch.empty_like(z)
        for rows in row_chunks(n, chunk_size):
            if self.outgoing:
                # [*, C, R, K] @ [*, C, K, J] -> [*, C, R, J]
                p = torch.matmul(a_t[..., rows, :], b_t.transpose(-1, -2))
            else:
                # [*, C, R, K] @ [*, C, K, J] -> [*, C, R, J]
                p = torch.matmul(a_t[..., rows].transpose(-1, -2), b_t)
            # [*, C, R, J] -> [*, R, J, C]
            x = self.linear_z(self.layer_norm_out(p.permute(*lead, -2, -1, -3)))
            g = torch.sigmoid(self.linear_g(self.layer_norm_in(z[..., rows, :, :])))
            if accumulate:
                # z's rows above this block are updated already; this block's gate read them unchanged.
                out[..., rows, :, :] += x * g
            else:
                out[..., rows, :, :] = x * g
        return out

    def add_into(self, z: torch.Tensor, mask: torch.Tensor | None, chunk_size: int | None) -> None:
        """z += self(z, mask, chunk_size) in place (inference). Chunked, the projections of every row
        are built first and each output row block is added into z right after its gate reads it, so
        no full-size output is held."""
        if chunk_size is None or chunk_size >= z.shape[-3] or self._cueq_ok(z, chunk_size):
            z += self(z, mask, chunk_size)
        else:
            self(z, mask, chunk_size, accumulate=True)
