"""ESMFold in PyTorch: ``EsmForProteinFolding``.

ESM-2 stem (our ``EsmModel``) -> learned softmax combination of all its hidden states
(``esm_s_combine``) -> MLP to the trunk's sequence state (+ an amino-acid embedding) -> folding trunk
(triangular self-attention blocks, recycling) -> structure module -> distogram / pTM / lDDT / LM heads.

Tensor names are those of ``facebook/esmfold_v1`` (HF transformers' ``EsmForProteinFolding``), so hub
files load 1:1; fair-esm's ``esmfold_3B_v1.pt`` (folding head only) loads together with the ESM-2 3B
stem. ``infer`` / ``infer_pdb(s)`` / ``output_to_pdb`` follow fair-esm's ``ESMFold`` API, including
multimers written as ``:``-separated chains.

Numerics follow fair-esm: pLDDT on the 0-100 scale, pTM per sequence over its own length. The ESM stem
runs in fp16 on CUDA when ``esmfold_config.fp16_esm`` (fp32 on CPU). The trunk by default runs in the
fast mode on CUDA (bf16 with fused triangle kernels, ``set_fast``) and in fp32 on the CPU;
``set_trunk_dtype(None)`` / ``set_fast(False)`` keep the fp32 trunk everywhere. The structure module
always runs in fp32. These switches are fields of the model's ``FastPathOptions`` (``fold_fast``,
``fold_kernels``, ``triangle_sdpa``; ``ESM_DUAL_FOLD_FAST`` / ``ESM_DUAL_FOLD_KERNELS`` /
``ESM_DUAL_TRIANGLE_SDPA`` by default, ``model.set_fast_path(...)``), read by the trunk at each forward.

Intended differences from transformers' ``EsmForProteinFolding`` (everything else matches it to
float rounding): pLDDT x100 (HF: 0-1); ``ptm`` has one value per sequence (HF: one scalar for the
padded batch); ``masking_pattern`` masks the ESM input only, as fair-esm (HF also masks the trunk's
amino-acid embedding); padded ``residue_index`` is 0 (fair-esm; HF continues 0..N-1); ``infer``
handles ``:``-separated multimers and returns mean_plddt / chain_index / final_atom_positions; chunking
also covers the triangular multiplication and the pair transitions (HF: triangle attention only).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ...common import residue_constants as rc
from ...common.config import EsmConfig
from ...io.base import Checkpoint
from ...io.dtypes import torch_to_numpy
from ...io.schema import LoadingError, describe_mismatch
from ..integration import copy_numpy_into
from ..modeling_esm import EsmModel, EsmPreTrainedModel
from .batching import DEFAULT_MAX_TOKENS_PER_BATCH, fold_batches, folded_length
from .confidence import categorical_lddt, predicted_aligned_error, predicted_tm_score
from .inference import EsmForProteinFoldingOutput, atom14_to_atom37, encode_sequences, merge_outputs, take_rows
from .structure_module import STRUCTURE_OUTPUTS, residue_constant
from .trunk import FoldingTrunk

logger = logging.getLogger("esm_dual")

__all__ = ["EsmForProteinFolding", "EsmForProteinFoldingOutput", "atom14_to_atom37", "encode_sequences"]


class EsmForProteinFolding(EsmPreTrainedModel):
    """ESMFold. ``forward`` takes AlphaFold residue indices (``encode_sequences``), ``infer`` strings."""

    _tied = ()

    def _tied_keys(self) -> tuple[str, ...]:
        """Nothing is tied: ESMFold's ``lm_head`` is a plain Linear over the trunk's 23 tokens."""
        return ()

    def __init__(self, config: EsmConfig):
        super().__init__(config)
        if not config.is_folding_model or config.esmfold_config is None:
            raise ValueError(
                "EsmForProteinFolding needs a folding config (is_folding_model=True, esmfold_config)"
            )
        if config.vocab_list is None:
            raise ValueError("EsmForProteinFolding needs config.vocab_list")
        fold = config.esmfold_config
        trunk = fold.trunk
        self.distogram_bins = 64
        self.esm = EsmModel(config)
        self.esm.requires_grad_(False)
        self.esm_feats = config.hidden_size
        self.esm_layers = config.num_hidden_layers
        self.register_buffer("af2_to_esm", self._af2_to_esm_from_vocab_list(config.vocab_list))
        self.esm_s_combine = nn.Parameter(torch.zeros(self.esm_layers + 1))
        c_s, c_z = trunk.sequence_state_dim, trunk.pairwise_state_dim
        self.esm_s_mlp = nn.Sequential(
            nn.LayerNorm(self.esm_feats),
            nn.Linear(self.esm_feats, c_s),
            nn.ReLU(),
            nn.Linear(c_s, c_s),
        )
        # Amino-acid tokens of the trunk: 0 padding, 1..20 residues, 21 unknown (X), 22 mask.
        self.n_tokens_embed = rc.restype_num + 3
        self.pad_idx = 0
        self.unk_idx = self.n_tokens_embed - 2
        self.mask_idx = self.n_tokens_embed - 1
        vocab = config.vocab_list
        self.esm_dict_cls_idx = vocab.index("<cls>")
        self.esm_dict_mask_idx = vocab.index("<mask>")
        self.esm_dict_eos_idx = vocab.index("<eos>")
        self.esm_dict_padding_idx = vocab.index("<pad>")
        self.embedding = nn.Embedding(self.n_tokens_embed, c_s, padding_idx=0) if fold.embed_aa else None
        self.trunk = FoldingTrunk(trunk)
        self.distogram_head = nn.Linear(c_z, self.distogram_bins)
        self.ptm_head = nn.Linear(c_z, self.distogram_bins)
        self.lm_head = nn.Linear(c_s, self.n_tokens_embed)
        self.lddt_bins = 50
        c_sm = trunk.structure_module.sequence_dim
        self.lddt_head = nn.Sequential(
            nn.LayerNorm(c_sm),
            nn.Linear(c_sm, fold.lddt_head_hid_dim),
            nn.Linear(fold.lddt_head_hid_dim, fold.lddt_head_hid_dim),
            nn.Linear(fold.lddt_head_hid_dim, 37 * self.lddt_bins),
        )
        # None: automatic (fp16 on CUDA if esmfold_config.fp16_esm, else fp32).
        self._esm_dtype: torch.dtype | None = None
        self.post_init()

    @staticmethod
    def _af2_to_esm_from_vocab_list(vocab_list: list[str]) -> torch.Tensor:
        # Index 0 (padding) -> <pad>; AlphaFold residue r -> the ESM token of its letter (at r + 1).
        order = [vocab_list.index("<pad>")] + [vocab_list.index(v) for v in rc.restypes_with_x]
        return torch.tensor(order)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            with torch.no_grad():
                self.af2_to_esm.copy_(self._af2_to_esm_from_vocab_list(self.config.vocab_list))

    # ---- precision and memory ------------------------------------------------------------------
    def set_chunk_size(self, chunk_size: int | None) -> None:
        """Chunk the trunk's pair updates over rows (see ``FoldingTrunk.set_chunk_size``)."""
        self.trunk.set_chunk_size(chunk_size)

    def set_esm_dtype(self, dtype: torch.dtype | str | None) -> None:
        """Precision of the ESM stem: torch.float16 / bfloat16 / float32, or None / "auto" for the
        default (fp16 on CUDA when ``esmfold_config.fp16_esm``, fp32 on CPU). The stem's weights are cast
        when it next runs; casting down rounds them (as HF's fp16 stem always is): reload for exact fp32."""
        if isinstance(dtype, str):
            dtype = (
                None
                if dtype == "auto"
                else {
                    "fp16": torch.float16,
                    "float16": torch.float16,
                    "bf16": torch.bfloat16,
                    "bfloat16": torch.bfloat16,
                    "fp32": torch.float32,
                    "float32": torch.float32,
                }[dtype]
            )
        self._esm_dtype = dtype

    # The trunk's precision and kernels are the model's FastPathOptions (fold_fast, fold_kernels,
    # triangle_sdpa; set_fast_path / fast_path_options, the ESM_DUAL_* environment by default): the
    # methods below set them, and the trunk reads them at each forward.
    def set_trunk_dtype(self, dtype: torch.dtype | None) -> None:
        """Run the folding blocks under autocast in ``dtype`` (torch.bfloat16), or in fp32 (None), with
        the fp32 path's kernels: ``set_fast_path(fold_fast="on" / "off", fold_kernels="torch")``."""
        if dtype not in (None, torch.float32, torch.bfloat16):
            # fp16 overflows in the triangular multiplication's sums over N residues.
            raise ValueError(f"the trunk runs in fp32 or bf16, not {dtype}")
        self._set_fold(fold_fast="off" if dtype in (None, torch.float32) else "on", fold_kernels="torch")

    def set_kernels(self, kernels: str) -> None:
        """Kernels of the trunk's triangle updates: "torch", "sdpa" or "cueq" (cuEquivariance, the
        ``fold-gpu`` extra; falls back to "sdpa" where it is not installed or on the CPU), or "auto"
        ("cueq" in a bf16 trunk, "torch" in fp32): ``set_fast_path(fold_kernels=kernels)``."""
        self._set_fold(fold_kernels=kernels)

    def set_fast(self, enabled: bool | None = True, kernels: str = "auto") -> None:
        """The fast mode: the trunk in bf16 with fused triangle kernels (``kernels``; see
        ``set_kernels``). ``set_fast(False)`` (or ``set_trunk_dtype(None)``) is the fp32 trunk with
        the path tested against HF transformers. ``None``: automatic, the default: the fast mode on CUDA,
        the fp32 trunk elsewhere. The structure module stays fp32, the stem's precision is
        ``set_esm_dtype``'s. ``set_fast_path(fold_fast="on" / "off" / "auto", fold_kernels=kernels)``."""
        mode = "auto" if enabled is None else "on" if enabled else "off"
        self._set_fold(fold_fast=mode, fold_kernels=kernels if enabled is not False else "auto")

    def _set_fold(self, **changes) -> None:
        self.set_fast_path(**changes)
        self.trunk.configure(self.fast_path_options, self.device)  # visible on the trunk at once

    @property
    def fast(self) -> bool:
        """Whether the trunk runs in the fast mode on this model's device (bf16, kernels other than "torch")."""
        bf16, kernels = self.fast_path_options.fold_mode(self.device.type)
        return bf16 and kernels != "torch"

    def esm_dtype_for(self, device: torch.device) -> torch.dtype:
        if self._esm_dtype is not None:
            return self._esm_dtype
        if device.type == "cuda" and self.config.esmfold_config.fp16_esm:
            return torch.float16
        return torch.float32

    def _prepare_stem(self, device: torch.device) -> None:
        want = self.esm_dtype_for(device)
        if self.esm.embeddings.word_embeddings.weight.dtype != want:
            self.esm.to(want)
            for layer in self.esm.encoder.layer:  # rotary tables stay fp32 (they are loaded, not recomputed)
                rot = layer.attention.self.rotary_embeddings
                if rot is not None:
                    rot.inv_freq.data = rot.inv_freq.data.float()

    @property
    def device(self) -> torch.device:
        return self.esm_s_combine.device

    # ---- forward ---------------------------------------------------------------------------------
    def af2_idx_to_esm_idx(self, aa: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        aa = (aa + 1).masked_fill(mask != 1, 0)
        return self.af2_to_esm.to(aa.device)[aa]

    def compute_language_model_representations(self, esmaa: torch.Tensor) -> torch.Tensor:
        """ESM tokens [B, N] (padding = <pad>) -> hidden states [B, N, layers + 1, D] (BOS/EOS dropped)."""
        B = esmaa.shape[0]
        if self.config.esmfold_config.bypass_lm:
            return esmaa.new_zeros(
                (B, esmaa.shape[1], self.esm_layers + 1, self.esm_feats), dtype=torch.float32
            )
        bos = esmaa.new_full((B, 1), self.esm_dict_cls_idx)
        eos = esmaa.new_full((B, 1), self.esm_dict_padding_idx)
        # [B, N + 2]; the first padding position after each sequence becomes <eos>.
        esmaa = torch.cat([bos, esmaa, eos], dim=1)
        esmaa[torch.arange(B, device=esmaa.device), (esmaa != self.esm_dict_padding_idx).sum(1)] = (
            self.esm_dict_eos_idx
        )
        self._prepare_stem(esmaa.device)
        hidden = self.esm(
            esmaa, attention_mask=esmaa != self.esm_dict_padding_idx, output_hidden_states=True
        ).hidden_states
        # [B, N + 2, layers + 1, D] -> [B, N, layers + 1, D]
        return torch.stack(hidden, dim=2)[:, 1:-1]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        masking_pattern: torch.Tensor | None = None,
        num_recycles: int | None = None,
    ) -> EsmForProteinFoldingOutput:
        """input_ids: AlphaFold residue indices [B, N] (0..20, 20 = X); attention_mask [B, N] (1 = residue);
        position_ids: residue indices [B, N] (default 0..N-1); masking_pattern [B, N]: 1 where the ESM
        input gets <mask> (as fair-esm: the trunk's amino-acid embedding keeps the true residue)."""
        fold = self.config.esmfold_config
        aa = input_ids
        B, N = aa.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(aa)
        if position_ids is None:
            position_ids = torch.arange(N, device=aa.device).expand(B, N)
        mask = attention_mask

        esmaa = self.af2_idx_to_esm_idx(aa, mask)
        if masking_pattern is not None:
            esmaa = esmaa.masked_fill(masking_pattern == 1, self.esm_dict_mask_idx)
        with torch.no_grad():
            esm_s = self.compute_language_model_representations(esmaa)
        esm_s = esm_s.to(self.esm_s_combine.dtype).detach()
        if fold.esm_ablate_sequence:
            esm_s = esm_s * 0
        # [layers + 1] @ [B, N, layers + 1, D] -> [B, N, D]
        esm_s = (self.esm_s_combine.softmax(0).unsqueeze(0) @ esm_s).squeeze(2)
        s_s_0 = self.esm_s_mlp(esm_s)
        if self.embedding is not None:
            s_s_0 = s_s_0 + self.embedding(aa)

        # The initial pair state is zeros: None, so the trunk never holds it (HF passes a zero tensor).
        structure = self.trunk(s_s_0, None, aa, position_ids, mask, no_recycles=num_recycles,
                               options=self.fast_path_options)
        out = EsmForProteinFoldingOutput(**{k: structure[k] for k in STRUCTURE_OUTPUTS + ("s_s", "s_z")})

        disto = self.distogram_head(out.s_z)
        # symmetrised; (a + b) * 0.5 is (a + b) / 2 exactly, and in place: one [B, N, N, 64] less
        out.distogram_logits = (disto + disto.transpose(1, 2)).mul_(0.5)
        del disto
        out.lm_logits = self.lm_head(out.s_s)
        out.aatype = aa
        maskf = mask.to(torch.float32)
        out.atom14_atom_exists = residue_constant("restype_atom14_mask", aa.device)[aa] * maskf[..., None]
        out.atom37_atom_exists = residue_constant("restype_atom37_mask", aa.device)[aa] * maskf[..., None]
        out.residx_atom14_to_atom37 = residue_constant("restype_atom14_to_atom37", aa.device)[aa]
        out.residx_atom37_to_atom14 = residue_constant("restype_atom37_to_atom14", aa.device)[aa]
        out.residue_index = position_ids
        # [S, B, N, C] -> [S, B, N, 37, bins]
        out.lddt_head = self.lddt_head(out.states).reshape(out.states.shape[0], B, N, -1, self.lddt_bins)
        out.plddt = 100 * categorical_lddt(out.lddt_head[-1], bins=self.lddt_bins)
        out.ptm_logits = self.ptm_head(out.s_z)
        out.ptm = predicted_tm_score(out.ptm_logits, mask, max_bin=31, no_bins=self.distogram_bins)
        for k, v in predicted_aligned_error(out.ptm_logits, max_bin=31, no_bins=self.distogram_bins).items():
            out[k] = v
        return out

    # ---- fair-esm-style inference ------------------------------------------------------------------
    @torch.no_grad()
    def infer(
        self,
        seqs: str | list[str],
        num_recycles: int | None = None,
        residx: torch.Tensor | list | None = None,
        masking_pattern: torch.Tensor | None = None,
        chain_linker: str | None = "G" * 25,
        residue_index_offset: int | None = 512,
        max_tokens_per_batch: int | None = DEFAULT_MAX_TOKENS_PER_BATCH,
    ) -> EsmForProteinFoldingOutput:
        """Fold one sequence or a batch. Multimers: chains separated by ``:`` (joined by ``chain_linker``,
        residue index jumping by ``residue_index_offset``); linker residues are masked out of
        ``atom37_atom_exists`` / ``final_atom_mask``, ``mean_plddt`` and the PDB files.

        ``num_recycles=None`` uses ``trunk.max_recycles`` passes in all (fair-esm's default).

        A list is folded in length buckets (``batching.fold_batches``: at most ``max_tokens_per_batch``
        padded residues a batch, and never a batch that costs more than folding its members apart;
        ``None``: the cost rule alone, 1: one at a time), and the outputs are padded back into one
        batch in input order: the same numbers as folding each sequence alone. Every output is held at
        once, its pair tensors padded to the longest sequence: for long lists, ``infer_pdbs`` or
        ``esm-dual fold`` keep one bucket at a time.
        """
        seqs = self._check_seqs(seqs)
        batches = self._batches(seqs, max_tokens_per_batch, chain_linker)
        if len(batches) == 1:
            return self._infer_batch(seqs, num_recycles, residx, masking_pattern, chain_linker,
                                     residue_index_offset)
        parts = [out for _, out in self._infer_buckets(seqs, batches, num_recycles, residx, masking_pattern,
                                                       chain_linker, residue_index_offset)]
        return merge_outputs(parts, batches, len(seqs))

    @staticmethod
    def _check_seqs(seqs: str | list[str]) -> list[str]:
        if isinstance(seqs, str):
            seqs = [seqs]
        seqs = list(seqs)
        if not seqs:
            raise ValueError("infer() needs at least one sequence")
        for i, s in enumerate(seqs):
            if not isinstance(s, str) or not s or any(not c for c in s.split(":")):
                raise ValueError(f"sequence {i} is empty (or has an empty chain): {s!r}")
        return seqs

    @staticmethod
    def _batches(seqs: list[str], max_tokens_per_batch: int | None, chain_linker: str | None) -> list[list[int]]:
        """Length buckets of ``seqs`` (lengths as folded: chains joined by the linker)."""
        return fold_batches([folded_length(s, chain_linker) for s in seqs], max_tokens_per_batch)

    def _infer_buckets(
        self,
        seqs: list[str],
        batches: list[list[int]],
        num_recycles: int | None,
        residx: torch.Tensor | list | None,
        masking_pattern: torch.Tensor | None,
        chain_linker: str | None,
        residue_index_offset: int | None,
    ) -> Iterator[tuple[list[int], EsmForProteinFoldingOutput]]:
        """Fold the buckets ``batches`` (indices into ``seqs``) one at a time: yields (bucket, its output)."""
        if residx is not None and not isinstance(residx, torch.Tensor):
            residx = [residx[i] for i in range(len(seqs))]
        for batch in batches:
            yield batch, self._infer_batch(
                [seqs[i] for i in batch], num_recycles, take_rows(residx, batch),
                take_rows(masking_pattern, batch), chain_linker, residue_index_offset,
            )

    def _infer_batch(
        self,
        seqs: list[str],
        num_recycles: int | None,
        residx: torch.Tensor | list | None,
        masking_pattern: torch.Tensor | None,
        chain_linker: str | None,
        residue_index_offset: int | None,
    ) -> EsmForProteinFoldingOutput:
        """Fold ``seqs`` as one batch padded to the longest."""
        enc = encode_sequences(seqs, residue_index_offset, chain_linker)
        n = enc["aatype"].shape[1]
        if residx is None:
            residx = enc["residx"]
        elif not isinstance(residx, torch.Tensor):
            residx = torch.stack(
                [
                    torch.nn.functional.pad(torch.as_tensor(r, dtype=torch.long), (0, n - len(r)))
                    for r in residx
                ]
            )
        else:
            residx = residx[:, :n]
        if masking_pattern is not None:
            masking_pattern = masking_pattern[:, :n]
        device = self.device
        aatype, mask = enc["aatype"].to(device), enc["mask"].to(device)
        linker_mask = enc["linker_mask"].to(device)
        out = self.forward(
            aatype,
            mask,
            position_ids=residx.to(device),
            masking_pattern=None if masking_pattern is None else masking_pattern.to(device),
            num_recycles=num_recycles,
        )
        out.atom37_atom_exists = out.atom37_atom_exists * linker_mask.unsqueeze(2)
        exists = out.atom37_atom_exists
        out.mean_plddt = (out.plddt * exists).sum(dim=(1, 2)) / exists.sum(dim=(1, 2))
        out.chain_index = enc["chain_index"].to(device)
        out.final_atom_positions = atom14_to_atom37(out.positions[-1], aatype) * exists[..., None]
        out.final_atom_mask = exists
        return out

    @staticmethod
    def output_to_pdb(output: Any) -> list[str]:
        """PDB text per sequence (pLDDT in the B-factor column, chains A, B, ...)."""
        from ...common.protein import from_folding_output, to_pdb

        return [to_pdb(p) for p in from_folding_output(output)]

    @staticmethod
    def output_to_mmcif(output: Any, names: list[str] | None = None) -> list[str]:
        from ...common.protein import from_folding_output, to_mmcif

        prots = from_folding_output(output)
        names = names or [f"prediction_{i}" for i in range(len(prots))]
        return [to_mmcif(p, n) for p, n in zip(prots, names)]

    @torch.no_grad()
    def infer_pdbs(
        self,
        seqs: list[str],
        num_recycles: int | None = None,
        residx: torch.Tensor | list | None = None,
        masking_pattern: torch.Tensor | None = None,
        chain_linker: str | None = "G" * 25,
        residue_index_offset: int | None = 512,
        max_tokens_per_batch: int | None = DEFAULT_MAX_TOKENS_PER_BATCH,
    ) -> list[str]:
        """PDB text per sequence, in input order. Folded in the length buckets of ``infer``, one bucket
        at a time: only one bucket's outputs are held."""
        seqs = self._check_seqs(seqs)
        pdbs: list[str | None] = [None] * len(seqs)
        batches = self._batches(seqs, max_tokens_per_batch, chain_linker)
        for batch, out in self._infer_buckets(seqs, batches, num_recycles, residx, masking_pattern,
                                              chain_linker, residue_index_offset):
            for i, pdb in zip(batch, self.output_to_pdb(out)):
                pdbs[i] = pdb
            del out
        return pdbs  # type: ignore[return-value]

    def infer_pdb(self, seq: str, *args, **kwargs) -> str:
        return self.infer_pdbs([seq], *args, **kwargs)[0]

    # ---- loading / saving -----------------------------------------------------------------------------
    def _hub_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def load_hub_tensors(self, tensors: dict[str, np.ndarray], source: str = "checkpoint") -> list[str]:
        """Copy hub-named numpy tensors (``facebook/esmfold_v1`` names) into this model."""
        # The stem goes through match_state, which also reads transformers 5's gamma/beta and ``layer.*`` names.
        esm_part = {k: v for k, v in tensors.items() if k.startswith("esm.")}
        rest = {k: v for k, v in tensors.items() if not k.startswith("esm.")}
        messages = self.esm.load_hub_tensors(esm_part, source=source)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("esm.")}
        if "af2_to_esm" not in rest:  # a buffer derived from the vocabulary; some exports omit it
            rest["af2_to_esm"] = self._af2_to_esm_from_vocab_list(self.config.vocab_list).numpy()
        missing = sorted(set(own) - set(rest))
        unused = sorted(set(rest) - set(own))
        if missing or unused:
            raise LoadingError(f"{source} does not match the folding model: " + describe_mismatch(missing, unused))
        copy_numpy_into(own, rest, source)
        return messages

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        config: EsmConfig | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        esm_checkpoint: str | os.PathLike | None = None,
        **config_overrides: Any,
    ) -> EsmForProteinFolding:
        """Load ESMFold from a hub-layout directory (``facebook/esmfold_v1``), a preset name / hub id, or
        fair-esm's ``esmfold_3B_v1.pt``. A fair-esm file holds the folding head only: the ESM-2 stem
        comes from ``esm_checkpoint`` (a fair-esm ``esm2_t36_3B_UR50D.pt`` or a hub directory), by
        default ``esm2_t36_3B_UR50D.pt`` beside the ``.pt`` file or in torch's hub cache.

        The weights keep fp32 unless ``torch_dtype`` says otherwise; the stem's precision is chosen per
        device at run time (``set_esm_dtype``).
        """
        from ...io.hub import iter_checkpoint_tensors, read_checkpoint_config
        from ...io.resolve import resolve_checkpoint

        p = os.fspath(pretrained)
        if p.endswith(".pt"):
            from .fair_esm import read_fair_esmfold

            cfg, tensors = read_fair_esmfold(p, esm_checkpoint=esm_checkpoint)
            source = p
        else:
            # (load_checkpoint's shape check knows the MLM heads only: ESMFold's lm_head has 23 outputs.)
            source = resolve_checkpoint(p)
            cfg = read_checkpoint_config(source)
            tensors = dict(iter_checkpoint_tensors(source))
        if config is not None:
            cfg = config
        if config_overrides:
            cfg = EsmConfig.from_dict(cfg.to_dict(), **config_overrides)
        if not cfg.is_folding_model:
            raise LoadingError(f"{source}: not an ESMFold checkpoint (config.is_folding_model is false)")
        torch_dtype = torch_dtype if torch_dtype is not None else dtype
        return cls.from_checkpoint(Checkpoint(cfg, tensors, source, "esmfold"), config=cfg,
                                   dtype=None if torch_dtype == "auto" else torch_dtype, device=device)

    def _before_loading(self, device: torch.device) -> None:
        # Give the stem its run-time precision before the copy (fp16 on CUDA: no fp32 3B transient).
        self._prepare_stem(device)

    def save_pretrained(
        self, directory: str | os.PathLike, *, max_shard_size: int | str | None = None
    ) -> None:
        """Write ``config.json`` + ``model.safetensors`` in the ``facebook/esmfold_v1`` layout."""
        from ...io.hub import save_checkpoint

        cfg = self.config.copy(architectures=[type(self).__name__])
        tensors = {k: torch_to_numpy(v) for k, v in self.state_dict().items()}
        save_checkpoint(directory, cfg, tensors, max_shard_size=max_shard_size)
