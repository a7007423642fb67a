"""ESMFold (esm_dual.pt.EsmForProteinFolding) against HF transformers' EsmForProteinFolding on tiny
random checkpoints written in the facebook/esmfold_v1 hub layout."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from esm_dual.common.config import DEFAULT_VOCAB, EsmConfig
from esm_dual.common.protein import read_pdb_atoms
from tests.conftest import TINY_CONFIGS

SEQS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGL", "GSHMLEDPVX", "MKVLAAGIVG"]
ATOL_ANGSTROM = 1e-3
ATOL = 1e-4


def tiny_esmfold_config_dict(stem_changes: dict | None = None, **fold_changes) -> dict:
    """ESM stem as the tiny ESM-2 of conftest (3 layers, 3 heads, odd widths), ESMFold vocabulary,
    2 trunk blocks (c_s 32, c_z 16, head widths 8/8), 2 structure-module blocks with small dims."""
    stem = {**TINY_CONFIGS["esm2"], **(stem_changes or {})}
    esmfold = dict(
        fp16_esm=False,
        lddt_head_hid_dim=8,
        trunk=dict(
            num_blocks=2,
            sequence_state_dim=32,
            pairwise_state_dim=16,
            sequence_head_width=8,
            pairwise_head_width=8,
            position_bins=8,
            max_recycles=2,
            chunk_size=None,
            structure_module=dict(
                sequence_dim=24,
                pairwise_dim=12,
                ipa_dim=6,
                resnet_dim=10,
                num_heads_ipa=3,
                num_qk_points=2,
                num_v_points=3,
                num_blocks=2,
            ),
        ),
    )
    esmfold.update(fold_changes)
    return dict(stem, is_folding_model=True, vocab_list=list(DEFAULT_VOCAB), esmfold_config=esmfold)


def hf_reference(seed: int = 0, stem_changes: dict | None = None, **fold_changes):
    """HF transformers' EsmForProteinFolding, random init then every weight perturbed (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.EsmConfig(**tiny_esmfold_config_dict(stem_changes, **fold_changes))
    hf = transformers.EsmForProteinFolding(cfg)
    hf = hf.float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return hf


def hub_tensors(hf) -> dict[str, np.ndarray]:
    """HF's state dict in the hub file layout: per-layer rotary tables (HF 5 keeps one model-level table)."""
    sd = {k: v.detach().cpu().numpy().copy() for k, v in hf.state_dict().items()}
    inv = sd.pop("esm.rotary_embeddings.inv_freq", None)
    if inv is not None:
        for i in range(hf.config.num_hidden_layers):
            sd[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = inv
    return sd


def write_tiny_esmfold(directory: str, seed: int = 0, **fold_changes):
    """Write config.json + model.safetensors (facebook/esmfold_v1 layout); returns the HF reference."""
    from esm_dual.io.hub import save_checkpoint

    hf = hf_reference(seed, **fold_changes)
    cfg = EsmConfig.from_dict(
        tiny_esmfold_config_dict(**fold_changes), architectures=["EsmForProteinFolding"]
    )
    save_checkpoint(directory, cfg, hub_tensors(hf))
    return hf


def _valid(x: torch.Tensor, lengths, res_dim: int) -> list[torch.Tensor]:
    """Per sequence, the slice of x over its own residues (res_dim counts from 0; batch is res_dim - 1)."""
    return [x.select(res_dim - 1, b).narrow(res_dim - 1, 0, n) for b, n in enumerate(lengths)]


def _max_diff(a: torch.Tensor, b: torch.Tensor, lengths, res_dim: int, pair: bool = False) -> float:
    out = 0.0
    for x, y, n in zip(_valid(a, lengths, res_dim), _valid(b, lengths, res_dim), lengths):
        if pair:
            x, y = x.narrow(res_dim, 0, n), y.narrow(res_dim, 0, n)
        out = max(out, float((x - y).abs().max()))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are dominated by per-op overhead: one intra-op thread is several times faster
    than oversubscribed threads on a busy 2-core CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("esmfold_tiny"))
    hf = write_tiny_esmfold(d)
    return d, hf


@pytest.fixture(scope="module")
def model(checkpoint):
    from esm_dual.pt import EsmForProteinFolding

    return EsmForProteinFolding.from_pretrained(checkpoint[0])


@pytest.fixture(scope="module")
def outputs(model, checkpoint):
    hf = checkpoint[1]
    with torch.no_grad():
        return model.infer(SEQS), hf.infer(SEQS)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def test_hub_names_load_one_to_one(checkpoint, model, caplog):
    from safetensors import safe_open

    d, hf = checkpoint
    with safe_open(os.path.join(d, "model.safetensors"), "np") as f:
        file_names = set(f.keys())
    assert set(model.state_dict()) == file_names
    assert set(hub_tensors(hf)) == file_names
    from esm_dual.pt import EsmForProteinFolding

    with caplog.at_level(logging.WARNING, logger="esm_dual"):
        EsmForProteinFolding.from_pretrained(d)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unknown_or_missing_tensor_is_named(tmp_path, checkpoint):
    from esm_dual.io.hub import load_checkpoint, save_checkpoint
    from esm_dual.io.schema import LoadingError
    from esm_dual.pt import EsmForProteinFolding

    ckpt_dir, _ = checkpoint
    cfg = EsmConfig.from_json_file(os.path.join(ckpt_dir, "config.json"))
    from esm_dual.io.hub import iter_checkpoint_tensors

    tensors = dict(iter_checkpoint_tensors(ckpt_dir))
    tensors.pop("trunk.blocks.1.tri_att_end.linear.weight")
    tensors["trunk.extra.weight"] = np.zeros(3, np.float32)
    save_checkpoint(str(tmp_path), cfg, tensors)
    with pytest.raises(
        LoadingError, match=r"trunk\.blocks\.1\.tri_att_end\.linear\.weight.*trunk\.extra\.weight"
    ):
        EsmForProteinFolding.from_pretrained(str(tmp_path))
    del load_checkpoint


def test_save_pretrained_round_trip_and_transformers_reads_it(tmp_path, model):
    import transformers

    from esm_dual.pt import EsmForProteinFolding

    model.save_pretrained(str(tmp_path))
    again = EsmForProteinFolding.from_pretrained(str(tmp_path))
    hf = transformers.EsmForProteinFolding.from_pretrained(str(tmp_path)).float().eval()
    with torch.no_grad():
        a, b, c = model.infer(SEQS[1]), again.infer(SEQS[1]), hf.infer(SEQS[1])
    assert torch.equal(a["positions"], b["positions"])
    assert float((a["positions"] - c["positions"]).abs().max()) < ATOL_ANGSTROM


def test_reads_what_transformers_save_pretrained_writes(tmp_path, checkpoint, model):
    """transformers 5 saves ESM LayerNorms as gamma/beta and one 'layer.*' rotary table."""
    from esm_dual.pt import EsmForProteinFolding

    hf = checkpoint[1]
    hf.save_pretrained(str(tmp_path))
    loaded = EsmForProteinFolding.from_pretrained(str(tmp_path))
    with torch.no_grad():
        a, b = loaded.infer(SEQS[1]), model.infer(SEQS[1])
    assert torch.equal(a["positions"], b["positions"])


def test_loading_hf_fp16_stem_checkpoint_is_exact(tmp_path):
    """HF's EsmForProteinFolding with fp16_esm (as facebook/esmfold_v1: its stem, rotary table included,
    is fp16 in memory and in the file) saved with save_pretrained: every tensor we load equals HF's
    in-memory value, the rotary table keeps HF's fp16-rounded frequencies (in an fp32 buffer, as HF
    computes the angles in fp32), and the fold equals HF's in-memory model's (both stems in fp32 on
    the CPU). The coordinate differences seen on GPU do not come from loading."""
    import transformers

    from esm_dual.pt import EsmForProteinFolding

    torch.manual_seed(0)
    hf = transformers.EsmForProteinFolding(transformers.EsmConfig(**tiny_esmfold_config_dict(fp16_esm=True)))
    hf = hf.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
    assert hf.esm.embeddings.word_embeddings.weight.dtype == torch.float16
    hf.save_pretrained(str(tmp_path))
    ours = EsmForProteinFolding.from_pretrained(str(tmp_path))
    ref = hf.state_dict()
    inv = ref.pop("esm.rotary_embeddings.inv_freq")
    assert inv.dtype == torch.float16
    compared = 0
    for name, t in ours.state_dict().items():
        if name.endswith("rotary_embeddings.inv_freq"):
            assert t.dtype == torch.float32 and torch.equal(t, inv.float()), name
            continue
        assert torch.equal(t.float(), ref[name].float()), name
        if not name.startswith("esm."):
            assert t.dtype == ref[name].dtype, name  # esm_s_combine and the trunk stay fp32
        compared += 1
    assert compared == len(ref)
    hf.esm.float()
    with torch.no_grad():
        a, b = ours.infer(SEQS), hf.infer(SEQS)
    assert _max_diff(a["positions"][-1], b["positions"][-1], [len(s) for s in SEQS], 1) < ATOL_ANGSTROM


# ------------------------------------------------------------------------------------------------
# Parity with HF transformers
# ------------------------------------------------------------------------------------------------


def test_output_keys_and_shapes(outputs, model):
    ours, _ = outputs
    B, N = len(SEQS), max(len(s) for s in SEQS)
    S = model.config.esmfold_config.trunk.structure_module.num_blocks
    shapes = {
        "positions": (S, B, N, 14, 3),
        "frames": (S, B, N, 7),
        "sidechain_frames": (S, B, N, 8, 4, 4),
        "angles": (S, B, N, 7, 2),
        "unnormalized_angles": (S, B, N, 7, 2),
        "states": (S, B, N, 24),
        "s_s": (B, N, 32),
        "s_z": (B, N, N, 16),
        "distogram_logits": (B, N, N, 64),
        "lm_logits": (B, N, 23),
        "plddt": (B, N, 37),
        "mean_plddt": (B,),
        "ptm": (B,),
        "predicted_aligned_error": (B, N, N),
        "aligned_confidence_probs": (B, N, N, 64),
        "ptm_logits": (B, N, N, 64),
        "lddt_head": (S, B, N, 37, 50),
        "atom37_atom_exists": (B, N, 37),
        "atom14_atom_exists": (B, N, 14),
        "residx_atom37_to_atom14": (B, N, 37),
        "residx_atom14_to_atom37": (B, N, 14),
        "final_atom_positions": (B, N, 37, 3),
        "final_atom_mask": (B, N, 37),
        "aatype": (B, N),
        "residue_index": (B, N),
        "chain_index": (B, N),
    }
    for k, shape in shapes.items():
        assert tuple(ours[k].shape) == shape, k
    assert float(ours["plddt"].min()) >= 0 and float(ours["plddt"].max()) <= 100
    assert float(ours["plddt"].max()) > 1  # the 0-100 scale, not 0-1


def test_parity_with_transformers(outputs):
    ours, hf = outputs
    lengths = [len(s) for s in SEQS]
    pos = _max_diff(ours["positions"], hf["positions"], lengths, 2)
    assert pos < ATOL_ANGSTROM, pos
    # HF has no final_atom_positions; build its atom37 from its last block the same way.
    from transformers.models.esm.openfold_utils import atom14_to_atom37

    hf_final = atom14_to_atom37(hf["positions"][-1], hf)
    assert _max_diff(ours["final_atom_positions"], hf_final, lengths, 1) < ATOL_ANGSTROM
    # HF's pLDDT is on 0-1, ours (fair-esm's) on 0-100.
    assert _max_diff(ours["plddt"] / 100, hf["plddt"], lengths, 1) < ATOL
    assert (
        _max_diff(ours["predicted_aligned_error"], hf["predicted_aligned_error"], lengths, 1, pair=True)
        < ATOL
    )
    assert _max_diff(ours["distogram_logits"], hf["distogram_logits"], lengths, 1, pair=True) < ATOL
    assert _max_diff(ours["frames"], hf["frames"], lengths, 2) < ATOL_ANGSTROM
    for k in ("s_s", "lm_logits"):
        assert _max_diff(ours[k], hf[k], lengths, 1) < ATOL, k
    assert _max_diff(ours["s_z"], hf["s_z"], lengths, 1, pair=True) < ATOL
    for k in ("angles", "states"):
        assert _max_diff(ours[k], hf[k], lengths, 2) < ATOL, k
    for k in (
        "atom37_atom_exists",
        "atom14_atom_exists",
        "residx_atom37_to_atom14",
        "residx_atom14_to_atom37",
        "aatype",
    ):
        assert torch.equal(ours[k].to(hf[k].dtype), hf[k]), k
    # Padding positions: fair-esm pads residue_index with 0, HF continues 0..N-1 (both masked out).
    for x, y in zip(_valid(ours["residue_index"], lengths, 1), _valid(hf["residue_index"], lengths, 1)):
        assert torch.equal(x, y)


def test_ptm_is_per_sequence(outputs, checkpoint, model):
    """HF computes one pTM for the whole padded batch (a scalar); ours is per sequence over its own
    length, as fair-esm: equal to HF's value for each sequence folded alone."""
    ours, hf_batch = outputs
    hf = checkpoint[1]
    assert hf_batch["ptm"].dim() == 0
    with torch.no_grad():
        for b, seq in enumerate(SEQS):
            alone = hf.infer(seq)["ptm"]
            assert abs(float(ours["ptm"][b]) - float(alone)) < ATOL
    # Padding does not change a sequence's pTM.
    assert abs(float(model.infer(SEQS[2])["ptm"][0]) - float(ours["ptm"][2])) < ATOL


def test_batch_equals_single(outputs, model):
    ours, _ = outputs
    with torch.no_grad():
        for b, seq in enumerate(SEQS):
            one = model.infer(seq)
            n = len(seq)
            assert float((one["positions"][:, 0] - ours["positions"][:, b, :n]).abs().max()) < ATOL_ANGSTROM
            assert float((one["plddt"][0] - ours["plddt"][b, :n]).abs().max()) < 100 * ATOL
            pae = ours["predicted_aligned_error"][b, :n, :n]
            assert float((one["predicted_aligned_error"][0] - pae).abs().max()) < ATOL
            assert abs(float(one["mean_plddt"][0] - ours["mean_plddt"][b])) < 100 * ATOL


def test_fold_batches_never_cost_more_than_one_by_one():
    from esm_dual.pt.folding import fold_batches
    from esm_dual.pt.folding.batching import FOLD_OVERHEAD_PAIRS, fold_cost

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(270), 0.6, 200).astype(int), 30, 1022).tolist()
    for budget in (None, 1, 512, 1024, 4096):
        batches = fold_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(lengths)  # shortest first
        for b in batches:
            ns = [lengths[i] for i in b]
            assert fold_cost(ns) <= sum(fold_cost([n]) for n in ns)
            if budget is not None and len(b) > 1:
                assert max(ns) * len(ns) <= budget
        if budget == 1:
            assert all(len(b) == 1 for b in batches)
    # A short and a long sequence are never padded together; equal short ones are.
    assert fold_batches([100, 1000], None) == [[0], [1]]
    assert fold_batches([300, 250, 300], None) == [[1, 0, 2]]
    assert fold_batches([300, 40, 300], None) == [[1], [0, 2]]
    assert fold_batches([300, 300], 512) == [[0], [1]]  # fair-esm's budget
    assert fold_cost([]) == 0 and fold_cost([10]) == 100 + FOLD_OVERHEAD_PAIRS
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        fold_batches([10], -1)


def test_infer_list_in_buckets_matches_one_by_one(model, monkeypatch):
    """A list in several buckets: the same outputs as folding each sequence alone, in input order."""
    from esm_dual.pt.folding import EsmForProteinFolding

    seqs = ["MKVLAAGIVG", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "GSHMLEDPVX", "MKTAY:GSHML"]
    calls = []
    real = EsmForProteinFolding._infer_batch

    def spy(self, batch, *args):
        calls.append(len(batch))
        return real(self, batch, *args)

    monkeypatch.setattr(EsmForProteinFolding, "_infer_batch", spy)
    with torch.no_grad():
        many = model.infer(seqs, max_tokens_per_batch=40)
        pdbs = model.infer_pdbs(seqs, max_tokens_per_batch=40)
    assert sorted(calls) == [1, 1, 1, 1, 2, 2]  # the two 10-residue sequences share a bucket, each time
    calls.clear()
    N = max(len(s.replace(":", "")) + 25 * s.count(":") for s in seqs)
    assert tuple(many["positions"].shape[1:3]) == (len(seqs), N)
    assert tuple(many["s_z"].shape[:3]) == (len(seqs), N, N)
    for b, seq in enumerate(seqs):
        with torch.no_grad():
            one = model.infer(seq)
        n = one["aatype"].shape[1]
        assert float((one["positions"][:, 0] - many["positions"][:, b, :n]).abs().max()) < ATOL_ANGSTROM
        assert float((one["final_atom_positions"][0] - many["final_atom_positions"][b, :n]).abs().max()) < ATOL_ANGSTROM
        assert torch.equal(one["aatype"][0], many["aatype"][b, :n])
        assert torch.equal(one["residue_index"][0], many["residue_index"][b, :n])
        assert torch.equal(one["chain_index"][0], many["chain_index"][b, :n])
        assert (many["chain_index"][b, n:] == -1).all() and (many["final_atom_mask"][b, n:] == 0).all()
        pae = many["predicted_aligned_error"][b, :n, :n]
        assert float((one["predicted_aligned_error"][0] - pae).abs().max()) < ATOL
        assert abs(float(one["ptm"][0] - many["ptm"][b])) < ATOL
        assert abs(float(one["mean_plddt"][0] - many["mean_plddt"][b])) < 100 * ATOL
        atoms, ref = read_pdb_atoms(pdbs[b]), read_pdb_atoms(model.infer_pdb(seq))
        names = [(x["name"], x["res_seq"], x["chain"]) for x in atoms]
        assert names == [(x["name"], x["res_seq"], x["chain"]) for x in ref]
        assert max(abs(p - q) for x, y in zip(atoms, ref) for p, q in zip(x["xyz"], y["xyz"])) <= 2e-3
    # residx and masking_pattern follow their sequences into the buckets.
    residx = [list(range(5, 5 + len(s.replace(":", "")) + 25 * s.count(":"))) for s in seqs]
    pattern = torch.zeros(len(seqs), N, dtype=torch.long)
    pattern[1, 3] = 1
    with torch.no_grad():
        many = model.infer(seqs, residx=residx, masking_pattern=pattern, max_tokens_per_batch=40)
        one = model.infer(seqs[1], residx=[residx[1]], masking_pattern=pattern[1:2, : len(seqs[1])])
    n = len(seqs[1])
    assert float((one["positions"][:, 0] - many["positions"][:, 1, :n]).abs().max()) < ATOL_ANGSTROM
    assert many["residue_index"][1, 0] == 5


def test_num_recycles_matches_transformers(model, checkpoint):
    hf = checkpoint[1]
    with torch.no_grad():
        for r in (0, 3):
            a = model.infer(SEQS[2], num_recycles=r)
            b = hf(hf.infer(SEQS[2])["aatype"], num_recycles=r)
            assert float((a["positions"] - b["positions"]).abs().max()) < ATOL_ANGSTROM


# ------------------------------------------------------------------------------------------------
# Memory: chunking
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_matches_unchunked(model, outputs, chunk):
    ours, _ = outputs
    model.set_chunk_size(chunk)
    try:
        with torch.no_grad():
            c = model.infer(SEQS)
    finally:
        model.set_chunk_size(None)
    for k in ("positions", "s_z", "s_s", "plddt", "predicted_aligned_error", "distogram_logits", "ptm"):
        tol = 100 * ATOL if k == "plddt" else ATOL
        assert float((c[k] - ours[k]).abs().max()) < tol, k


@pytest.mark.parametrize("sdpa", ["0", "1"])
def test_chunking_bounds_the_largest_intermediate(monkeypatch, fast_path_defaults, sdpa):
    """Every tensor a folding block creates stays within the size of the pair state when chunked;
    unchunked, the triangle-attention scores and the pair transition are several times larger.
    (Updates under primitives.WHOLE_OP_ELEMENTS are not split: set to 0 here, so the tiny block is.)"""
    from torch.overrides import TorchFunctionMode

    from esm_dual.pt.folding import primitives
    from esm_dual.pt.folding.trunk import TriangularSelfAttentionBlock

    monkeypatch.setattr(primitives, "WHOLE_OP_ELEMENTS", 0)
    fast_path_defaults(triangle_sdpa=sdpa == "1")  # ESM_DUAL_TRIANGLE_SDPA

    class LargestTensor(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    cfg = EsmConfig.from_dict(tiny_esmfold_config_dict()).esmfold_config.trunk
    block = TriangularSelfAttentionBlock(cfg).eval()
    n = 24
    g = torch.Generator().manual_seed(0)
    s, z = torch.randn(1, n, 32, generator=g), torch.randn(1, n, n, 16, generator=g)
    mask = torch.ones(1, n)
    largest = {}
    with torch.no_grad():
        for chunk in (None, 4):
            with LargestTensor() as mode:
                block(s, z, mask=mask, chunk_size=chunk)
            largest[chunk] = mode.numel
    assert largest[4] <= z.numel() < 3 * z.numel() <= largest[None]


@pytest.mark.parametrize("sdpa", ["0", "1"])
def test_inplace_block_matches_out_of_place(monkeypatch, fast_path_defaults, sdpa):
    """Inference updates z in place, row block by row block (no full-size update tensors); the sums
    must be those of the out-of-place block, padded or not, chunked or not."""
    from esm_dual.pt.folding import primitives
    from esm_dual.pt.folding.trunk import TriangularSelfAttentionBlock

    monkeypatch.setattr(primitives, "WHOLE_OP_ELEMENTS", 0)  # so the tiny pair updates are chunked too
    fast_path_defaults(triangle_sdpa=sdpa == "1")  # ESM_DUAL_TRIANGLE_SDPA
    cfg = EsmConfig.from_dict(tiny_esmfold_config_dict()).esmfold_config.trunk
    torch.manual_seed(6)
    block = TriangularSelfAttentionBlock(cfg).eval()
    s, z = torch.randn(2, 10, 32), torch.randn(2, 10, 10, 16)
    mask = torch.ones(2, 10)
    mask[1, 7:] = 0
    with torch.no_grad():
        for m in (mask, None):
            ref_s, ref_z = block(s, z.clone(), mask=m, chunk_size=None)
            for chunk in (None, 1, 3):
                z_in = z.clone()
                got_s, got_z = block(s, z_in, mask=m, chunk_size=chunk, inplace=True)
                assert got_z.data_ptr() == z_in.data_ptr()  # updated in place
                assert float((got_s - ref_s).abs().max()) < 1e-5
                assert float((got_z - ref_z).abs().max()) < 1e-5, (m is None, chunk)
    # With gradients the block never writes into its input.
    z_in = z.clone().requires_grad_()
    _, out = block(s, z_in, mask=mask, chunk_size=3, inplace=True)
    assert out.data_ptr() != z_in.data_ptr()


def test_small_pair_updates_are_not_split():
    from esm_dual.pt.folding.primitives import wide_op_rows

    assert wide_op_rows(None, 300, 512) is None
    assert wide_op_rows(64, 300, 512) >= 300  # 300 x 300 x 512 floats: one piece
    assert 64 < wide_op_rows(64, 600, 512) < 600  # two to three pieces
    assert wide_op_rows(64, 4096, 512) == 64  # large: the chunk size bounds it
    assert wide_op_rows(8, 4096, 512) == 32  # but never below 256 MB pieces


def test_gradients_flow_and_match_when_chunked(model):
    """Fine-tuning: the trunk and heads get gradients (the ESM stem is frozen), chunked or not."""
    from esm_dual.pt.folding import encode_sequences

    enc = encode_sequences(SEQS[1:])
    grads = {}
    for chunk in (None, 3):
        model.set_chunk_size(chunk)
        model.zero_grad()
        try:
            out = model(enc["aatype"], enc["mask"], num_recycles=1)
            loss = out.positions[-1].pow(2).mean() + out.plddt.mean() + out.ptm.sum() + out.lm_logits.mean()
            loss.backward()
        finally:
            model.set_chunk_size(None)
        grads[chunk] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("esm.") for n in trainable)
    assert set(grads[None]) == trainable - {"distogram_head.weight", "distogram_head.bias"}
    for n, g in grads[None].items():
        assert torch.isfinite(g).all(), n
        assert float((g - grads[3][n]).abs().max()) <= 1e-4 * (1 + float(g.abs().max())), n


def test_chunked_modules_match_transformers_modules():
    """Triangle attention / multiplication / pair transition, module by module against HF's, chunked."""
    from transformers.models.esm import modeling_esmfold as H

    from esm_dual.pt.folding.trunk import TriangularSelfAttentionBlock

    cfg = EsmConfig.from_dict(tiny_esmfold_config_dict()).esmfold_config.trunk
    hf = hf_reference().trunk.blocks[0]
    ours = TriangularSelfAttentionBlock(cfg).eval()
    ours.load_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 9, 9, 16, generator=g)
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    pair_mask = mask[:, :, None] * mask[:, None, :]
    with torch.no_grad():
        for name in ("tri_mul_out", "tri_mul_in"):
            ref = getattr(hf, name)(z, mask=pair_mask)
            for chunk in (None, 2, 4):
                got = getattr(ours, name)(z, pair_mask, chunk)
                assert float((got - ref).abs().max()) < ATOL, (name, chunk)
        for name in ("tri_att_start", "tri_att_end"):
            ref = getattr(hf, name)(z, mask=pair_mask, chunk_size=None)
            for chunk in (None, 1, 4):
                got = getattr(ours, name)(z, pair_mask, chunk)
                assert float((got - ref).abs().max()) < ATOL, (name, chunk)
        ref = hf.mlp_pair(z)
        for chunk in (None, 3):
            assert float((ours.mlp_pair(z, chunk) - ref).abs().max()) < ATOL
        s = torch.randn(2, 9, 32, generator=g)
        ref_s, ref_z = hf(s, z, mask=mask)
        got_s, got_z = ours(s, z, mask=mask, chunk_size=2)
        assert float((got_s - ref_s).abs().max()) < ATOL and float((got_z - ref_z).abs().max()) < ATOL
    assert isinstance(hf, H.EsmFoldTriangularSelfAttentionBlock)


@pytest.mark.parametrize("starting", [True, False])
def test_triangle_attention_sdpa_matches_explicit_scores(starting, monkeypatch, fast_path_defaults):
    """The fused path (biases as SDPA's mask, no [*, H, N, N] scores) against the explicit softmax
    path, with and without padding, chunked and not; it is the path fp32 takes."""
    from esm_dual.pt.folding import primitives
    from esm_dual.pt.folding.triangular import TriangleAttention

    torch.manual_seed(4)
    att = TriangleAttention(16, 8, 2, starting=starting).eval()
    with torch.no_grad():
        att.linear.weight.normal_()
    z = torch.randn(2, 11, 11, 16)
    mask = torch.ones(2, 11)
    mask[1, 7:] = 0
    pair_mask = mask[:, :, None] * mask[:, None, :]
    calls = []
    real = primitives.Attention.forward_rows
    monkeypatch.setattr(primitives.Attention, "forward_rows", lambda self, x, b: calls.append(1) or real(self, x, b))
    with torch.no_grad():
        for m in (None, pair_mask):
            fast_path_defaults(triangle_sdpa=False)
            ref = att(z, m, None)
            assert not calls
            fast_path_defaults(triangle_sdpa=True)
            for chunk in (None, 1, 4):
                got = att(z, m, chunk)
                assert calls, "the SDPA path was not taken"
                assert float((got - ref).abs().max()) < 1e-5, (m is None, chunk)
                calls.clear()
        # No mask and an all-ones mask are the same attention.
        assert float((att(z, None, 4) - att(z, torch.ones(2, 11, 11), 4)).abs().max()) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [37, 160])
def test_triangle_attention_sdpa_on_gpu(n, fast_path_defaults):
    """On CUDA the fused path runs SDPA's memory-efficient fp32 kernel with a broadcast, padded-stride
    mask; it must agree with the explicit scores (N not a multiple of 16, padding, chunks)."""
    from esm_dual.pt.folding.triangular import TriangleAttention

    torch.manual_seed(5)
    att = TriangleAttention(128, 32, 4, starting=False).cuda().eval()
    z = torch.randn(2, n, n, 128, device="cuda")
    mask = torch.ones(2, n, device="cuda")
    mask[1, n - 9:] = 0
    pair_mask = mask[:, :, None] * mask[:, None, :]
    with torch.no_grad():
        for m in (None, pair_mask):
            fast_path_defaults(triangle_sdpa=False)
            ref = att(z, m, None)
            fast_path_defaults(triangle_sdpa=True)
            for chunk in (None, 16):
                assert float((att(z, m, chunk) - ref).abs().max()) < 1e-4, (m is None, chunk)


# ------------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------------


def test_esm_stem_fp32_on_cpu_even_with_fp16_weights(checkpoint):
    """fp16_esm=True (as facebook/esmfold_v1) and fp16 stem weights: CPU runs the stem in fp32."""
    from esm_dual.pt import EsmForProteinFolding

    m = EsmForProteinFolding.from_pretrained(checkpoint[0])
    m.config.esmfold_config.fp16_esm = True
    m.esm.half()
    assert m.esm_dtype_for(torch.device("cpu")) == torch.float32
    assert m.esm_dtype_for(torch.device("cuda")) == torch.float16
    with torch.no_grad():
        out = m.infer(SEQS[1])
    assert m.esm.embeddings.word_embeddings.weight.dtype == torch.float32
    assert torch.isfinite(out["positions"]).all()


def test_bf16_trunk_is_finite_and_close(model, outputs):
    ours, _ = outputs
    model.set_trunk_dtype(torch.bfloat16)
    try:
        with torch.no_grad():
            c = model.infer(SEQS)
    finally:
        model.set_trunk_dtype(None)
    for k in ("positions", "plddt", "ptm", "predicted_aligned_error"):
        assert torch.isfinite(c[k]).all(), k
    assert c["positions"].dtype == torch.float32
    # bf16 and chunked: the same bf16 result up to bf16 rounding.
    model.set_trunk_dtype(torch.bfloat16)
    model.set_chunk_size(4)
    try:
        with torch.no_grad():
            cc = model.infer(SEQS)
    finally:
        model.set_trunk_dtype(None)
        model.set_chunk_size(None)
    assert torch.isfinite(cc["positions"]).all()
    assert float((cc["s_z"] - c["s_z"]).abs().max()) < 0.1 * (1 + float(c["s_z"].abs().max()))


def test_fast_mode_switches_and_sdpa_kernels_on_cpu(model, outputs):
    """set_fast: bf16 trunk + fused kernels (on the CPU cuEquivariance is skipped: SDPA in bf16); the
    result stays close to the fp32 trunk and set_fast(False) restores it exactly."""
    from esm_dual.pt.folding.kernels import check_kernels

    ours, _ = outputs
    assert not model.fast
    model.set_fast(True)
    try:
        assert model.fast and model.trunk.block_dtype == torch.bfloat16
        assert {b.tri_att_end.kernels for b in model.trunk.blocks} == {"cueq"}
        with torch.no_grad():
            fast = model.infer(SEQS)
        model.set_chunk_size(4)
        with torch.no_grad():
            fast_chunked = model.infer(SEQS)
    finally:
        model.set_fast(False)
        model.set_chunk_size(None)
    assert not model.fast and {b.tri_mul_in.kernels for b in model.trunk.blocks} == {"torch"}
    for k in ("positions", "plddt", "ptm", "predicted_aligned_error"):
        assert torch.isfinite(fast[k]).all(), k
    lengths = [len(s) for s in SEQS]
    assert _max_diff(fast["positions"][-1], ours["positions"][-1], lengths, 1) < 1.0
    assert float((fast["mean_plddt"] - ours["mean_plddt"]).abs().max()) < 2.0
    assert float((fast_chunked["s_z"] - fast["s_z"]).abs().max()) < 0.1 * (1 + float(fast["s_z"].abs().max()))
    with torch.no_grad():
        again = model.infer(SEQS)
    assert torch.equal(again["positions"], ours["positions"])
    # Automatic (a loaded model's default): the fp32 trunk on the CPU.
    model.set_fast(None)
    try:
        with torch.no_grad():
            auto = model.infer(SEQS)
        assert not model.fast and model.trunk.block_dtype is None
    finally:
        model.set_fast(False)
    assert torch.equal(auto["positions"], ours["positions"])
    with pytest.raises(ValueError, match="kernels"):
        check_kernels("flash")


def _kernel_modules(device):
    """HF's block 0 weights in our triangle modules (on device), a pair tensor with padding."""
    from esm_dual.pt.folding.trunk import TriangularSelfAttentionBlock

    cfg = EsmConfig.from_dict(tiny_esmfold_config_dict(trunk=dict(
        num_blocks=1, sequence_state_dim=64, pairwise_state_dim=64, sequence_head_width=16,
        pairwise_head_width=32, position_bins=8, max_recycles=1, chunk_size=None,
        structure_module=dict(sequence_dim=24, pairwise_dim=12, ipa_dim=6, resnet_dim=10, num_heads_ipa=3,
                              num_qk_points=2, num_v_points=3, num_blocks=1)))).esmfold_config.trunk
    torch.manual_seed(0)
    block = TriangularSelfAttentionBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return block.to(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", ["sdpa", "cueq"])
def test_fused_triangle_kernels_match_fp32_on_gpu(kernels):
    """Each triangle update in bf16 with the fused kernels against the fp32 module, with padding; the
    in-place (add_into) and chunked forms too. cuEquivariance is checked only where installed."""
    from esm_dual.pt.folding.kernels import cueq_available

    if kernels == "cueq" and not cueq_available():
        pytest.skip("cuequivariance_torch is not installed")
    block = _kernel_modules("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    n = 200
    z = torch.randn(2, n, n, 64, generator=g, device="cuda")
    mask = torch.ones(2, n, device="cuda")
    mask[1, 150:] = 0
    pm = mask[:, :, None] * mask[:, None, :]
    valid = pm.bool()
    with torch.no_grad():
        for name in ("tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end"):
            m = getattr(block, name)
            m.kernels = "torch"
            ref = m(z, pm, None)
            m.kernels = kernels
            with torch.autocast("cuda", dtype=torch.bfloat16):
                for chunk in (None, 64):
                    got = m(z, pm, chunk).float()
                    zz = z.clone()
                    m.add_into(zz, pm, chunk)
                    for out in (got, zz - z):
                        assert torch.isfinite(out).all(), (name, chunk)
                        err = (out - ref)[valid].norm() / ref[valid].norm()
                        assert float(err) < 2e-2, (name, chunk, float(err))
            m.kernels = "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_mode_finite_and_close_on_gpu(checkpoint):
    from esm_dual.pt import EsmForProteinFolding

    m = EsmForProteinFolding.from_pretrained(checkpoint[0], device="cuda")
    seqs = SEQS + ["MKTAYIAKQRQISFVKSHFSRQLEERLGL" * 11]
    with torch.no_grad():
        ref = m.infer(seqs)
        m.set_fast(True)
        fast = m.infer(seqs)
        m.set_chunk_size(32)
        chunked = m.infer(seqs)
    for out in (fast, chunked):
        for k in ("positions", "plddt", "ptm", "predicted_aligned_error", "final_atom_positions"):
            assert torch.isfinite(out[k]).all(), k
    assert float((fast["mean_plddt"] - ref["mean_plddt"]).abs().max()) < 2.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("esm_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu(checkpoint, esm_dtype):
    from esm_dual.pt import EsmForProteinFolding

    m = EsmForProteinFolding.from_pretrained(checkpoint[0], device="cuda")
    m.set_esm_dtype(esm_dtype)
    m.set_trunk_dtype(torch.bfloat16)
    m.set_chunk_size(4)
    with torch.no_grad():
        out = m.infer(SEQS + ["M" * 300])
    assert m.esm.embeddings.word_embeddings.weight.dtype == esm_dtype
    for k in ("positions", "plddt", "ptm", "predicted_aligned_error", "final_atom_positions"):
        assert torch.isfinite(out[k]).all(), k
    # Automatic precision with fp16_esm (as facebook/esmfold_v1): fp16 stem on CUDA, fast (bf16) trunk.
    m = EsmForProteinFolding.from_pretrained(checkpoint[0], device="cuda")
    m.config.esmfold_config.fp16_esm = True
    with torch.no_grad():
        full = m.infer(SEQS)
    ref = EsmForProteinFolding.from_pretrained(checkpoint[0]).infer(SEQS)
    assert m.esm.embeddings.word_embeddings.weight.dtype == torch.float16
    assert torch.isfinite(full["positions"]).all()
    assert float((full["ptm"].cpu() - ref["ptm"]).abs().max()) < 0.1


# ------------------------------------------------------------------------------------------------
# Sequences, multimers, PDB
# ------------------------------------------------------------------------------------------------


def test_unknown_residues_are_x(model):
    with torch.no_grad():
        out = model.infer("MKBZUOXJ")
    assert out["aatype"][0].tolist()[:2] == [12, 11]
    assert (out["aatype"][0, 2:] == 20).all()
    assert out["atom37_atom_exists"][0, 2:].sum() == 0
    pdb = model.output_to_pdb(out)[0]
    assert {a["res_seq"] for a in read_pdb_atoms(pdb)} == {1, 2}


def test_multimer_chains_linker_and_offsets(model):
    a, b = "MKTAYIAKQ", "GSHMLEDPV"
    with torch.no_grad():
        out = model.infer(f"{a}:{b}")
    n = len(a) + 25 + len(b)
    assert tuple(out["aatype"].shape) == (1, n)
    expected_residx = list(range(len(a) + 25)) + [512 + i for i in range(len(a) + 25, n)]
    assert out["residue_index"][0].tolist() == expected_residx
    assert out["chain_index"][0].tolist() == [0] * (len(a) + 25) + [1] * len(b)
    exists = out["atom37_atom_exists"][0].sum(-1)
    assert (exists[len(a) : len(a) + 25] == 0).all() and (exists[: len(a)] > 0).all()
    mean = (out["plddt"][0] * out["atom37_atom_exists"][0]).sum() / out["atom37_atom_exists"][0].sum()
    assert abs(float(mean - out["mean_plddt"][0])) < 1e-4
    atoms = read_pdb_atoms(model.output_to_pdb(out)[0])
    chains = {c: sorted({x["res_seq"] for x in atoms if x["chain"] == c}) for c in "AB"}
    assert chains["A"] == list(range(1, len(a) + 1))
    assert chains["B"] == list(range(1, len(b) + 1))  # files number each chain from 1 (residue_index jumps)
    assert {x["chain"] for x in atoms} == {"A", "B"}
    # Custom linker and offset
    with torch.no_grad():
        out2 = model.infer(f"{a}:{b}", chain_linker="G" * 5, residue_index_offset=100)
    assert out2["aatype"].shape[1] == len(a) + 5 + len(b)
    assert out2["residue_index"][0, -1] == len(a) + 5 + len(b) - 1 + 100


def _fair_esm_encoder():
    """fair-esm's own ``batch_encode_sequences`` (esm/esmfold/v1/misc.py). That module imports openfold at
    the top, so the three functions are taken from its source and run with OpenFold's residue constants
    (as shipped in transformers)."""
    import ast
    import importlib.util
    import typing

    from transformers.models.esm.openfold_utils import residue_constants as of_rc

    spec = importlib.util.find_spec("esm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fair-esm is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "esmfold", "v1", "misc.py")
    tree = ast.parse(open(path).read())
    wanted = {"encode_sequence", "batch_encode_sequences", "collate_dense_tensors"}
    module = ast.Module(
        body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted], type_ignores=[]
    )
    namespace = {"torch": torch, "T": typing, "residue_constants": of_rc}
    exec(compile(module, path, "exec"), namespace)
    return namespace["batch_encode_sequences"]


@pytest.mark.parametrize("linker,offset", [("G" * 25, 512), ("GGG", 100), (None, None)])
def test_sequence_encoding_matches_fair_esm(linker, offset):
    from esm_dual.pt.folding.esmfold import encode_sequences

    seqs = ["MKTAYIAKQ:GSHMLEDPV:MKV", "MKBZX", "AC:DE"]
    aatype, mask, residx, linker_mask, chain_index = _fair_esm_encoder()(seqs, offset, linker)
    ours = encode_sequences(seqs, offset, linker)
    assert torch.equal(ours["aatype"], aatype)
    assert torch.equal(ours["mask"], mask)
    assert torch.equal(ours["residx"], residx)
    assert torch.equal(ours["linker_mask"], linker_mask)
    assert torch.equal(ours["chain_index"], chain_index)


def test_pdb_matches_transformers_writer(model, checkpoint):
    hf = checkpoint[1]
    with torch.no_grad():
        ours = model.infer(SEQS[0])
        ref = hf.infer(SEQS[0])
    ref["plddt"] = ref["plddt"] * 100
    mine = read_pdb_atoms(model.output_to_pdb(ours)[0])
    theirs = read_pdb_atoms(hf.output_to_pdb(ref)[0])
    assert len(mine) == len(theirs) > 0
    for x, y in zip(mine, theirs):
        assert (x["name"], x["res_name"], x["res_seq"], x["chain"], x["element"]) == (
            y["name"],
            y["res_name"],
            y["res_seq"],
            y["chain"],
            y["element"],
        )
        assert max(abs(p - q) for p, q in zip(x["xyz"], y["xyz"])) <= 2e-3
        assert abs(x["b_factor"] - y["b_factor"]) <= 0.011
    assert model.infer_pdb(SEQS[0]) == model.output_to_pdb(ours)[0]
    assert len(model.infer_pdbs(SEQS[:2])) == 2


def test_empty_sequence_refused(model):
    with pytest.raises(ValueError, match="empty"):
        model.infer("")
    with pytest.raises(ValueError, match="empty"):
        model.infer("MKV::GG")


def test_masking_pattern_masks_esm_input_only(model):
    seq = SEQS[2]
    with torch.no_grad():
        base = model.infer(seq)
        none = model.infer(seq, masking_pattern=torch.zeros(1, len(seq), dtype=torch.long))
        pattern = torch.zeros(1, len(seq), dtype=torch.long)
        pattern[0, 3] = 1
        masked = model.infer(seq, masking_pattern=pattern)
    assert torch.equal(base["positions"], none["positions"])
    assert not torch.allclose(base["positions"], masked["positions"])
    assert torch.equal(masked["aatype"], base["aatype"])


def _fair_esmfold_cfg(cfg: EsmConfig) -> dict:
    trunk = cfg.esmfold_config.trunk
    sm = trunk.structure_module
    return {
        "model": {
            "lddt_head_hid_dim": 8,
            "trunk": {
                "num_blocks": 2,
                "sequence_state_dim": 32,
                "pairwise_state_dim": 16,
                "sequence_head_width": 8,
                "pairwise_head_width": 8,
                "position_bins": 8,
                "max_recycles": trunk.max_recycles,
                "chunk_size": None,
                "structure_module": {
                    "c_s": sm.sequence_dim,
                    "c_z": sm.pairwise_dim,
                    "c_ipa": sm.ipa_dim,
                    "c_resnet": sm.resnet_dim,
                    "no_heads_ipa": sm.num_heads_ipa,
                    "no_qk_points": sm.num_qk_points,
                    "no_v_points": sm.num_v_points,
                    "no_blocks": sm.num_blocks,
                },
            },
        }
    }


def test_fair_esm_checkpoint(tmp_path):
    """fair-esm's layout: an esmfold .pt with the folding head only (+ cfg) and the ESM-2 stem in its own
    fair-esm .pt file; or the stem inside the esmfold file under fair-esm ESM-2 names."""
    from esm_dual.io import fair_esm as ck
    from esm_dual.io.base import CheckpointError
    from esm_dual.pt import EsmForProteinFolding

    stem_changes = {"intermediate_size": 72}  # fair-esm's ESM-2 hard-codes 4 * hidden
    hf = hf_reference(5, stem_changes)
    tensors = hub_tensors(hf)
    cfg = EsmConfig.from_dict(tiny_esmfold_config_dict(stem_changes))
    stem_cfg = EsmConfig(**{**TINY_CONFIGS["esm2"], **stem_changes})
    stem = {k: v for k, v in tensors.items() if k.startswith("esm.")}
    d = stem_cfg.hidden_size
    lm_head = {
        "lm_head.dense.weight": np.eye(d, dtype=np.float32),
        "lm_head.dense.bias": np.zeros(d, np.float32),
        "lm_head.layer_norm.weight": np.ones(d, np.float32),
        "lm_head.layer_norm.bias": np.zeros(d, np.float32),
        "lm_head.bias": np.zeros(33, np.float32),
    }
    stem_path = ck.save_fair_esm(str(tmp_path / "esm2_t3_tiny.pt"), stem_cfg, {**stem, **lm_head})
    head = {k: torch.from_numpy(v.copy()) for k, v in tensors.items() if not k.startswith("esm.")}
    pt = tmp_path / "esmfold_tiny.pt"
    torch.save({"cfg": _fair_esmfold_cfg(cfg), "model": head}, str(pt))
    loaded = EsmForProteinFolding.from_pretrained(str(pt), esm_checkpoint=stem_path)
    c, want = loaded.config.esmfold_config.trunk, cfg.esmfold_config.trunk
    assert (c.num_blocks, c.structure_module.num_blocks, c.max_recycles) == (
        2,
        want.structure_module.num_blocks,
        want.max_recycles,
    )
    with torch.no_grad():
        ref = hf.infer(SEQS[1])
        a = loaded.infer(SEQS[1])
    assert float((a["positions"] - ref["positions"]).abs().max()) < ATOL_ANGSTROM

    # The stem inside the esmfold file, fair-esm ESM-2 names under "esm.".
    inside = dict(head)
    for k, v in stem.items():
        fair = ck.hf_name_to_fair(k)
        if fair is not None:
            inside["esm." + fair] = torch.from_numpy(v.copy())
    pt2 = tmp_path / "esmfold_full.pt"
    torch.save({"cfg": _fair_esmfold_cfg(cfg), "model": inside}, str(pt2))
    with torch.no_grad():
        b = EsmForProteinFolding.from_pretrained(str(pt2)).infer(SEQS[1])
    assert float((b["positions"] - ref["positions"]).abs().max()) < ATOL_ANGSTROM

    # fair-esm's config as its dataclasses (named in the pickle; read through inert stand-ins).
    import dataclasses
    import sys
    import types

    mod = types.ModuleType("esm.esmfold.v1.esmfold")
    fields = [(k, object) for k in ("trunk", "lddt_head_hid_dim")]
    ESMFoldConfig = dataclasses.make_dataclass("ESMFoldConfig", fields)
    ESMFoldConfig.__module__ = mod.__name__
    mod.ESMFoldConfig = ESMFoldConfig
    fair = _fair_esmfold_cfg(cfg)["model"]
    saved = sys.modules.get(mod.__name__)
    sys.modules[mod.__name__] = mod
    try:
        torch.save({"cfg": {"model": ESMFoldConfig(**fair)}, "model": inside}, str(pt2))
    finally:
        if saved is None:
            del sys.modules[mod.__name__]
        else:
            sys.modules[mod.__name__] = saved
    again = EsmForProteinFolding.from_pretrained(str(pt2))
    assert again.config.esmfold_config.trunk.structure_module.num_blocks == want.structure_module.num_blocks

    # Without a stem beside it (or in torch's hub cache), the error says what to pass.
    os.environ["TORCH_HOME"] = str(tmp_path / "no_cache")
    try:
        with pytest.raises(CheckpointError, match="esm_checkpoint"):
            EsmForProteinFolding.from_pretrained(str(pt))
    finally:
        del os.environ["TORCH_HOME"]


def test_cueq_call_plumbing_on_cpu(monkeypatch):
    """The cuEquivariance calls' plumbing (weights as the kernels take them, the q/k/v/bias/mask layouts,
    N padded to a multiple of 16 for the multiplication, row chunks, the ending-node transpose), checked
    on the CPU by standing in for the two kernels with their documented formulas in plain torch."""
    import types

    from esm_dual.pt.folding import kernels, triangular

    def tri_att(q, k, v, bias, mask=None, scale=None, return_aux=False, **_):
        # (B, N, H, Q, D) q/k/v; bias (B, 1, H, Q, K); mask (B, N, 1, 1, K): softmax_k(s q.k + b), -1e9 masked
        s = torch.einsum("bnhqd,bnhkd->bnhqk", q.float(), k.float()) * scale + bias.float()
        if mask is not None:
            s = s.masked_fill(~mask.bool(), -1e9)
        return torch.einsum("bnhqk,bnhkd->bnhqd", s.softmax(-1), v.float()).to(q.dtype)

    def tri_mul(x, direction, mask, norm_in_weight, norm_in_bias, p_in_weight, p_in_bias, g_in_weight, g_in_bias,
                norm_out_weight, norm_out_bias, p_out_weight, p_out_bias, g_out_weight, g_out_bias, eps, **_):
        f = torch.nn.functional
        xn = f.layer_norm(x, x.shape[-1:], norm_in_weight, norm_in_bias, eps)
        ab = torch.sigmoid(f.linear(xn, g_in_weight, g_in_bias)) * f.linear(xn, p_in_weight, p_in_bias)
        ab = ab * mask.unsqueeze(-1)
        a, b = ab.chunk(2, dim=-1)
        eq = "bikc,bjkc->bijc" if direction == "outgoing" else "bkic,bkjc->bijc"
        p = torch.einsum(eq, a, b)
        p = f.linear(f.layer_norm(p, p.shape[-1:], norm_out_weight, norm_out_bias, eps), p_out_weight, p_out_bias)
        return p * torch.sigmoid(f.linear(xn, g_out_weight, g_out_bias))

    fake = types.ModuleType("cuequivariance_torch")
    fake.triangle_attention, fake.triangle_multiplicative_update = tri_att, tri_mul
    monkeypatch.setitem(__import__("sys").modules, "cuequivariance_torch", fake)
    monkeypatch.setattr(triangular, "use_cueq", lambda k, x: k == "cueq")
    seen = []
    real_mul = kernels.cueq_triangle_multiplication
    monkeypatch.setattr(triangular, "cueq_triangle_multiplication",
                        lambda m, z, mask: seen.append(tuple(z.shape)) or real_mul(m, z, mask))
    block = _kernel_modules("cpu")
    g = torch.Generator().manual_seed(2)
    n = 37
    z = torch.randn(2, n, n, 64, generator=g)
    mask = torch.ones(2, n)
    mask[1, 30:] = 0
    pm = mask[:, :, None] * mask[:, None, :]
    valid = pm.bool()
    with torch.no_grad():
        for name in ("tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end"):
            m = getattr(block, name)
            ref = m(z, pm, None)
            m.kernels = "cueq"
            for chunk in (None, 16):
                got = m(z, pm, chunk)
                zz = z.clone()
                m.add_into(zz, pm, chunk)
                for out in (got, zz - z):
                    assert float((out - ref)[valid].abs().max()) < 1e-4, (name, chunk)
            m.kernels = "torch"
    # the multiplication went through the stand-in, N padded to 48 (unchunked calls only)
    assert seen and set(seen) == {(2, 48, 48, 64)}
