"""The ESMFold folding trunk: triangular self-attention blocks over a sequence and a pair state,
with recycling, followed by the structure module (Lin et al. 2023, Science; supplement section A)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...common.config import TrunkConfig
from ..fast.options import FastPathOptions, default_options
from ..ops import is_compiling, observed_by_hooks
from .graphs import GraphCaptureError, PassGraphs, graph_length, wants_graphs
from .kernels import check_kernels, pair_layer_norm
from .primitives import chunked_rows, row_chunks, softmax_fp32, wide_op_rows
from .structure_module import STRUCTURE_OUTPUTS, StructureModule
from .triangular import TriangleAttention, TriangleMultiplicativeUpdate


def _pad_residues(t: torch.Tensor, extra: int, pair: bool = False) -> torch.Tensor:
    """``t`` [B, N, ...] (``pair``: [B, N, N, ...]) with ``extra`` zero residues appended."""
    dims = (1, 2) if pair else (1,)
    for d in dims:
        t = torch.cat([t, t.new_zeros(t.shape[:d] + (extra,) + t.shape[d + 1:])], dim=d)
    return t


class SequenceToPair(nn.Module):
    """Outer product and difference of projected sequence states -> pair update."""

    def __init__(self, sequence_state_dim: int, inner_dim: int, pairwise_state_dim: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(sequence_state_dim)
        self.proj = nn.Linear(sequence_state_dim, inner_dim * 2)
        self.o_proj = nn.Linear(2 * inner_dim, pairwise_state_dim)

    def forward(self, s: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """s [B, N, C_s] -> [B, N, N, C_z]."""
        q, k = self.proj(self.layernorm(s)).chunk(2, dim=-1)
        return chunked_rows(lambda k_rows: self._rows(q, k_rows), k, chunk_size, dim=1)

    def _rows(self, q: torch.Tensor, k_rows: torch.Tensor) -> torch.Tensor:
        """q [B, N, inner], k_rows [B, R, inner] -> rows [B, R, N, C_z]: (i, j) combines q_j and k_i."""
        prod = q[:, None, :, :] * k_rows[:, :, None, :]
        diff = q[:, None, :, :] - k_rows[:, :, None, :]
        # [B, R, N, 2 * inner] -> [B, R, N, C_z]
        return self.o_proj(torch.cat([prod, diff], dim=-1))

    def add_into(self, z: torch.Tensor, s: torch.Tensor, chunk_size: int | None) -> None:
        """z += self(s, chunk_size) in place, row block by row block (inference)."""
        q, k = self.proj(self.layernorm(s)).chunk(2, dim=-1)
        for r in row_chunks(z.shape[1], chunk_size):
            z[:, r] += self._rows(q, k[:, r])


class PairToSequence(nn.Module):
    """Pair state -> per-head attention bias for the sequence attention."""

    def __init__(self, pairwise_state_dim: int, num_heads: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(pairwise_state_dim)
        self.linear = nn.Linear(pairwise_state_dim, num_heads, bias=False)
        self.ln_options: FastPathOptions | None = None  # see kernels.pair_layer_norm

    def forward(self, z: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """z [B, N, N, C_z] -> bias [B, N, N, H]."""
        return chunked_rows(lambda x: self.linear(pair_layer_norm(self.layernorm, x, self.ln_options)), z,
                            chunk_size)


class ResidueMLP(nn.Module):
    """Residual LayerNorm -> Linear -> ReLU -> Linear (-> Dropout) transition."""

    def __init__(self, embed_dim: int, inner_dim: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, inner_dim),
            nn.ReLU(),
            nn.Linear(inner_dim, embed_dim),
            nn.Dropout(dropout),
        )
        self.ln_options: FastPathOptions | None = None  # pair transitions: see kernels.pair_layer_norm

    def forward(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """x [B, N, C] or [B, N, N, C]; pair inputs are chunked over rows."""
        if x.dim() == 4:
            return chunked_rows(lambda r: r + self.mlp(r), x, chunk_size)
        return x + self.mlp(x)

    def add_into(self, z: torch.Tensor, chunk_size: int | None) -> None:
        """z = self(z) in place, row block by row block (inference; pair inputs)."""
        ln, *rest = self.mlp
        for r in row_chunks(z.shape[1], chunk_size):
            h = pair_layer_norm(ln, z[:, r], self.ln_options)
            for layer in rest:
                h = layer(h)
            z[:, r] += h


class SequenceAttention(nn.Module):
    """Gated multi-head self-attention over residues with an additive pair bias."""

    def __init__(self, embed_dim: int, num_heads: int, head_width: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_width = head_width
        self.proj = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.o_proj = nn.Linear(embed_dim, embed_dim)
        self.g_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
        """x [B, N, C_s]; mask [B, N] (1 = residue); bias [B, N, N, H] -> [B, N, C_s]."""
        B, N, _ = x.shape
        # [B, N, H, 3K] -> [B, H, N, 3K]
        t = self.proj(x).view(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = t.chunk(3, dim=-1)
        q = q * self.head_width**-0.5
        # [B, H, N, N]
        a = torch.einsum("bhqc,bhkc->bhqk", q, k).float() + bias.permute(0, 3, 1, 2).float()
        if mask is not None:
            a = a.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        a = softmax_fp32(a).to(v.dtype)
        # [B, H, N, K] -> [B, N, H, K] -> [B, N, H * K]
        y = torch.einsum("bhqk,bhkc->bqhc", a, v).reshape(B, N, -1)
        y = torch.sigmoid(self.g_proj(x)) * y
        return self.o_proj(y)


class TriangularSelfAttentionBlock(nn.Module):
    """One folding block: sequence attention biased by the pair state, sequence -> pair, triangular
    multiplicative updates (outgoing, incoming), triangular attention (starting, ending), MLPs."""

    def __init__(self, config: TrunkConfig):
        super().__init__()
        c_s, c_z = config.sequence_state_dim, config.pairwise_state_dim
        self.layernorm_1 = nn.LayerNorm(c_s)
        self.sequence_to_pair = SequenceToPair(c_s, c_z // 2, c_z)
        self.pair_to_sequence = PairToSequence(c_z, config.sequence_num_heads)
        self.seq_attention = SequenceAttention(c_s, config.sequence_num_heads, config.sequence_head_width)
        self.tri_mul_out = TriangleMultiplicativeUpdate(c_z, outgoing=True)
        self.tri_mul_in = TriangleMultiplicativeUpdate(c_z, outgoing=False)
        self.tri_att_start = TriangleAttention(
            c_z, config.pairwise_head_width, config.pairwise_num_heads, starting=True, inf=1e9
        )
        self.tri_att_end = TriangleAttention(
            c_z, config.pairwise_head_width, config.pairwise_num_heads, starting=False, inf=1e9
        )
        self.mlp_seq = ResidueMLP(c_s, 4 * c_s, dropout=config.dropout)
        self.mlp_pair = ResidueMLP(c_z, 4 * c_z, dropout=config.dropout)
        self.drop = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def _shared_dropout(self, x: torch.Tensor, shared_dim: int) -> torch.Tensor:
        """Dropout at twice the block rate with one mask shared along ``shared_dim`` (row/column)."""
        if not self.training or self.dropout == 0:
            return x
        shape = list(x.shape)
        shape[shared_dim] = 1
        return x * nn.functional.dropout(x.new_ones(shape), 2 * self.dropout, True)

    def forward(
        self,
        s: torch.Tensor,
        z: torch.Tensor,
        mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
        inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """s [B, N, C_s]; z [B, N, N, C_z]; mask [B, N] -> updated (s, z). ``inplace``: in eval mode
        without gradients, z is updated in place and returned (the caller gives it up)."""
        n, c_z = z.shape[-2], z.shape[-1]
        # Row chunks of the other pair updates (see wide_op_rows); their widest per-pair
        # intermediates: 4 C_z (transition, triangle multiplication), C_z (pair <-> sequence).
        wide = wide_op_rows(chunk_size, n, 4 * c_z)
        narrow = wide_op_rows(chunk_size, n, c_z)
        bias = self.pair_to_sequence(z, narrow)
        y = self.seq_attention(self.layernorm_1(s), mask=mask, bias=bias)
        s = self.mlp_seq(s + self.drop(y))
        # [B, N, N]
        tri_mask = mask.unsqueeze(2) * mask.unsqueeze(1) if mask is not None else None
        if inplace and not self.training and not torch.is_grad_enabled():
            # Inference: each update is added into z as it is produced (no full-size update and no
            # second pair tensor; the caller hands z over). Same sums as below.
            self.sequence_to_pair.add_into(z, s, narrow)
            self.tri_mul_out.add_into(z, tri_mask, wide)
            self.tri_mul_in.add_into(z, tri_mask, wide)
            self.tri_att_start.add_into(z, tri_mask, chunk_size)
            self.tri_att_end.add_into(z, tri_mask, chunk_size)
            self.mlp_pair.add_into(z, wide)
            return s, z

        z = z + self.sequence_to_pair(s, narrow)
        z = z + self._shared_dropout(self.tri_mul_out(z, tri_mask, wide), 2)
        z = z + self._shared_dropout(self.tri_mul_in(z, tri_mask, wide), 1)
        z = z + self._shared_dropout(self.tri_att_start(z, tri_mask, chunk_size), 2)
        z = z + self._shared_dropout(self.tri_att_end(z, tri_mask, chunk_size), 1)
        z = self.mlp_pair(z, wide)
        return s, z


class RelativePosition(nn.Module):
    """Clipped relative residue-index embedding; index 0 is reserved for pairs involving padding."""

    def __init__(self, bins: int, pairwise_state_dim: int):
        super().__init__()
        self.bins = bins
        self.embedding = nn.Embedding(2 * bins + 2, pairwise_state_dim)

    def forward(self, residue_index: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """residue_index [B, N] (long); mask [B, N] -> [B, N, N, C_z]."""
        # [B, N, N]: diff[b, i, j] = r_j - r_i
        diff = residue_index[:, None, :] - residue_index[:, :, None]
        diff = diff.clamp(-self.bins, self.bins) + self.bins + 1
        if mask is not None:
            pair_mask = mask[:, None, :] * mask[:, :, None]
            diff = diff.masked_fill(pair_mask == 0, 0)
        return self.embedding(diff)


def recycle_distogram(coords: torch.Tensor, min_bin: float, max_bin: float, num_bins: int) -> torch.Tensor:
    """Bin the distances between virtual C-beta atoms. coords [B, N, 3 (N, CA, C), 3] -> bins [B, N, N]."""
    boundaries = torch.linspace(min_bin, max_bin, num_bins - 1, device=coords.device) ** 2
    n, ca, c = coords.unbind(-2)
    b = ca - n
    c = c - ca
    a = torch.cross(b, c, dim=-1)
    cb = -0.58273431 * a + 0.56802827 * b - 0.54067466 * c + ca
    # [B, N, N, 1]
    dists = (cb[..., None, :, :] - cb[..., :, None, :]).pow(2).sum(dim=-1, keepdim=True)
    return torch.sum(dists > boundaries, dim=-1)


class FoldingTrunk(nn.Module):
    def __init__(self, config: TrunkConfig):
        super().__init__()
        self.config = config
        c_s, c_z = config.sequence_state_dim, config.pairwise_state_dim
        self.pairwise_positional_embedding = RelativePosition(config.position_bins, c_z)
        self.blocks = nn.ModuleList([TriangularSelfAttentionBlock(config) for _ in range(config.num_blocks)])
        self.recycle_bins = 15
        self.recycle_s_norm = nn.LayerNorm(c_s)
        self.recycle_z_norm = nn.LayerNorm(c_z)
        self.recycle_disto = nn.Embedding(self.recycle_bins, c_z)
        sm = config.structure_module
        self.structure_module = StructureModule(sm)
        self.trunk2sm_s = nn.Linear(c_s, sm.sequence_dim)
        self.trunk2sm_z = nn.Linear(c_z, sm.pairwise_dim)
        self.chunk_size = config.chunk_size
        # None: the blocks run in the parameters' dtype (fp32); torch.bfloat16: under autocast
        # (set by configure from the options, at each forward)
        self.block_dtype: torch.dtype | None = None
        self.kernels = "torch"
        # FastPathOptions.fold_graphs (set by configure) and the captured passes (graphs.py; not state)
        self.graphs_mode = "auto"
        self.graphs = PassGraphs()

    def set_chunk_size(self, chunk_size: int | None) -> None:
        """Split triangle attention, triangle multiplication and the pair transitions into row
        chunks of this size (None: no chunking); updates whose whole working set is under 256 MB
        are not split (``primitives.wide_op_rows``). In fp32 the triangle attention runs through
        SDPA's fused kernels and never holds its [chunk, H, N, N] scores; with ``set_trunk_dtype``
        bf16 it does, and chunking bounds them."""
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def configure(self, options: FastPathOptions | None, device: torch.device | str) -> None:
        """Take the trunk's precision and kernels from ``options`` (the model's ``FastPathOptions``; None:
        the process default) for ``device``: ``fold_fast`` gives the blocks' dtype (``block_dtype``: bf16
        under autocast, or None for the parameters' fp32), ``fold_kernels`` the triangle updates' kernels
        ("torch", "sdpa" or "cueq"; see ``kernels.py``), ``triangle_sdpa`` the triangle attention's SDPA
        path, ``fold_graphs`` whether inference passes replay CUDA graphs (``graphs.py``). ``forward`` calls it
        with the options it is given; ``block_dtype``, ``kernels`` and ``graphs_mode`` say what the last call
        chose."""
        options = default_options() if options is None else options
        bf16, kernels = options.fold_mode(torch.device(device).type)
        self.block_dtype = torch.bfloat16 if bf16 else None
        self.kernels = check_kernels(kernels)
        self.graphs_mode = options.fold_graphs
        # The fast mode's pair LayerNorms write bf16 through Triton (kernels.pair_layer_norm).
        fast_ln = options if (bf16 and kernels != "torch" and options.triton) else None
        for block in self.blocks:
            for m in (block.tri_mul_out, block.tri_mul_in, block.tri_att_start, block.tri_att_end):
                m.kernels = kernels
            for m in (block.tri_att_start, block.tri_att_end):
                m.triangle_sdpa = options.triangle_sdpa
            for m in (block.tri_att_start, block.tri_att_end, block.pair_to_sequence, block.mlp_pair):
                m.ln_options = fast_ln

    def _autocast(self, device: torch.device):
        if self.block_dtype is None or self.block_dtype == torch.float32:
            return contextlib.nullcontext()
        # No cast cache: each weight is cast once per pass anyway, and a CUDA graph must not keep casts
        # made during its capture.
        return torch.autocast(device_type=device.type, dtype=self.block_dtype, cache_enabled=False)

    def _head(self, feats: dict, state: dict) -> dict:
        """A pass's start: the recycled states (``state``: s [B, N, C_s], z [B, N, N, C_z], bins [B, N, N]) are
        embedded and added to the features (``feats``: s_s_0, s_z_0 if any, true_aa, residx, mask) -> the
        blocks' inputs {"s", "z"}. ``state`` is consumed: z is dropped from it as soon as it is used (one pair
        tensor fewer)."""
        mask = feats["mask"]
        s_z_0 = feats.get("s_z_0")
        recycle_s = self.recycle_s_norm(state.pop("s").detach())
        recycle_z = self.recycle_z_norm(state.pop("z").detach())
        recycle_z = recycle_z + self.recycle_disto(state.pop("bins").detach())
        s = feats["s_s_0"] + recycle_s
        pos = self.pairwise_positional_embedding(feats["residx"], mask=mask)
        z = (recycle_z if s_z_0 is None else s_z_0 + recycle_z) + pos
        return {"s": s, "z": z}

    def _block(self, block: nn.Module, s: torch.Tensor, z: torch.Tensor, feats: dict, masked: bool):
        """One folding block in the trunk's precision; z is this pass's own tensor: updated in place in
        inference."""
        with self._autocast(s.device):
            return block(s, z, mask=feats["mask"] if masked else None, chunk_size=self.chunk_size, inplace=True)

    def _tail(self, feats: dict, s: torch.Tensor, z: torch.Tensor) -> dict:
        """A pass's end: the blocks' (s, z) -> the next pass's states (s, z as fp32; bins of the C-beta
        distances) and ``structure`` (the structure module's outputs)."""
        s_s, s_z = s.float(), z.float()
        del s, z
        structure = self.structure_module(
            {"single": self.trunk2sm_s(s_s), "pair": self.trunk2sm_z(s_z)}, feats["true_aa"], feats["mask"].float()
        )
        # [B, N, 3 (N, CA, C), 3] of the last structure module block
        bins = recycle_distogram(structure["positions"][-1][:, :, :3], 3.375, 21.375, self.recycle_bins)
        return {"s": s_s, "z": s_z, "bins": bins, "structure": structure}

    def _recycle_pass(self, feats: dict, state: dict, masked: bool) -> dict:
        """One trunk pass, eagerly: ``_head``, the blocks, ``_tail``. ``state`` is consumed."""
        x = self._head(feats, state)
        s, z = x.pop("s"), x.pop("z")  # no other reference to z: the blocks update it in place
        for block in self.blocks:
            s, z = self._block(block, s, z, feats, masked)
        return self._tail(feats, s, z)

    def _pass_parts(self, masked: bool):
        """The pass as ``PassGraph`` records it: (head, block, tail) on one flat dict of inputs (the features and
        the recycled states) and the blocks' state buffers {"s", "z"}, updated in place by each block."""
        feat_names = ("s_s_0", "s_z_0", "true_aa", "residx", "mask")

        def split(inputs: dict) -> tuple[dict, dict]:
            return ({k: v for k, v in inputs.items() if k in feat_names},
                    {k: v for k, v in inputs.items() if k not in feat_names})

        def head(inputs: dict) -> dict:
            return self._head(*split(inputs))

        def block(module: nn.Module, st: dict, inputs: dict) -> None:
            s, z = self._block(module, st["s"], st["z"], split(inputs)[0], masked)
            st["s"].copy_(s)
            if z is not st["z"]:
                st["z"].copy_(z)

        def tail(inputs: dict, st: dict) -> dict:
            out = self._tail(split(inputs)[0], st["s"], st["z"])
            flat = {k: out[k] for k in ("s", "z", "bins")}
            flat.update({f"structure.{k}": v for k, v in out["structure"].items()})
            return flat

        return head, block, tail

    def _graph_key(self, feats: dict, masked: bool) -> tuple[tuple, tuple]:
        """What a captured pass depends on besides the inputs' values, as (shapes, variant): the inputs' shapes
        and dtypes; the padding, the precision and kernels, the chunking, the caller's autocast, inference mode.
        The parameters' addresses are checked here too (the cache is dropped when they change)."""
        self.graphs.check_parameters(tuple(p.data_ptr() for p in self.parameters()))
        shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(feats.items()))
        kernels = tuple((m.kernels, getattr(m, "triangle_sdpa", None), getattr(m, "ln_options", None) is not None)
                        for m in (self.blocks[0].tri_mul_out, self.blocks[0].tri_att_start)) if len(self.blocks) else ()
        dev = feats["s_s_0"].device
        # A caller's autocast changes what the recorded kernels compute; buffers made under inference mode
        # cannot be written outside it (and the other way round).
        autocast = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        return shapes, (masked, self.block_dtype, kernels, self.chunk_size, dev, autocast,
                        torch.is_inference_mode_enabled())

    def forward(
        self,
        seq_feats: torch.Tensor,
        pair_feats: torch.Tensor | None,
        true_aa: torch.Tensor,
        residx: torch.Tensor,
        mask: torch.Tensor,
        no_recycles: int | None = None,
        options: FastPathOptions | None = None,
    ) -> dict:
        """seq_feats [B, N, C_s]; pair_feats [B, N, N, C_z] or None (zeros, never stored: ESMFold's
        case, one pair tensor less); true_aa, residx, mask [B, N]. ``options``: the model's
        ``FastPathOptions`` (None: the process default), see ``configure``.

        ``no_recycles=None`` runs ``max_recycles`` trunk passes in all; an integer r runs r + 1
        (the same convention as fair-esm and transformers).
        """
        self.configure(options, seq_feats.device)
        if no_recycles is None:
            no_recycles = self.config.max_recycles
        else:
            if no_recycles < 0:
                raise ValueError("Number of recycles must not be negative.")
            no_recycles += 1  # the first pass is the ordinary forward pass
        B, N = seq_feats.shape[:2]
        # Graphs replay kernels only: not where hooks want to see the modules run, nor inside torch.compile.
        # A graphed fold is padded to the length grid (graphs.graph_length), so nearby lengths share a graph.
        padded = graph_length(N)
        graphs = (wants_graphs(self.graphs_mode, seq_feats.device, B * padded * padded, self.training,
                               fast=self.block_dtype is not None)
                  and not is_compiling() and not observed_by_hooks(self))
        feats = {"s_s_0": seq_feats, "true_aa": true_aa, "residx": residx, "mask": mask}
        if pair_feats is not None:
            feats["s_z_0"] = pair_feats
        if graphs and padded != N:
            # Padding as a padded batch's (zeros, mask 0): the blocks and the structure module mask it out.
            feats = {k: _pad_residues(v, padded - N, pair=k == "s_z_0") for k, v in feats.items()}
        else:
            padded = N
        s_0 = feats["s_s_0"]
        pair_shape = (B, padded, padded, self.recycle_z_norm.normalized_shape[0])
        state = {
            "s": torch.zeros_like(s_0),
            "z": s_0.new_zeros(pair_shape) if pair_feats is None else torch.zeros_like(feats["s_z_0"]),
            "bins": torch.zeros(pair_shape[:-1], device=s_0.device, dtype=torch.int64),
        }
        # No padding (a single sequence, or equal lengths): the blocks need no mask at all. A graphed fold
        # always takes the mask, so that a grid point has one graph whether or not it was padded.
        masked = graphs or not bool(feats["mask"].bool().all())
        key = self._graph_key(feats, masked) if graphs else None

        structure: dict = {}
        graph = None
        for i in range(no_recycles):
            with contextlib.nullcontext() if i == no_recycles - 1 else torch.no_grad():
                graph = self.graphs.lookup(key) if graphs else None
                if graph is False:
                    # A shape's first pass: capture (warmed up first where the variant has not been).
                    graph = self.graphs.capture(key, *self._pass_parts(masked), self.blocks, {**feats, **state})
                flat = None
                if graph:
                    try:
                        flat = graph({**feats, **state})
                    except GraphCaptureError as exc:  # recording failed: this pass (and shape) runs eagerly
                        self.graphs.failed(key, exc)
                        graph = None
                if flat is not None:
                    state = {k: flat[k] for k in ("s", "z", "bins")}
                    structure = {k[len("structure."):]: v for k, v in flat.items() if k.startswith("structure.")}
                    del flat
                else:
                    # state is consumed by the pass (it drops the old pair state as soon as it is used)
                    state = self._recycle_pass(feats, state, masked)
                    structure = state.pop("structure")
        s_s, s_z = state["s"], state["z"]
        del state
        if padded != N:
            # Back to the caller's length: [S, B, N, ...] per structure block, [B, N, ...] and [B, N, N, C].
            structure = {k: v[:, :, :N] if k in STRUCTURE_OUTPUTS else v[:, :N] for k, v in structure.items()}
            s_s, s_z = s_s[:, :N], s_z[:, :N, :N]
        if graph or padded != N:
            # The outputs live in the graphs' pool until the next replay (and slices would keep the padded
            # tensors alive): hand out copies.
            structure = {k: v.clone() for k, v in structure.items()}
            s_s, s_z = s_s.clone(), s_z.clone()
        structure["s_s"] = s_s
        structure["s_z"] = s_z
        return structure
