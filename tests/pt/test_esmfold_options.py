"""ESMFold's switches are fields of the model's FastPathOptions (fold_fast, fold_kernels, triangle_sdpa):
set_fast / set_kernels / set_trunk_dtype set them, and the trunk reads the model's options, not only the
process default."""

from __future__ import annotations

import pytest
import torch

from esm_dual.pt.fast.options import default_options
from tests.pt.test_esmfold import SEQS, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture
def model(esmfold_dir):
    from esm_dual.pt import EsmForProteinFolding

    return EsmForProteinFolding.from_pretrained(esmfold_dir).eval()


def _fold_fields(model) -> tuple[str, str]:
    o = model.fast_path_options
    return o.fold_fast, o.fold_kernels


def test_set_fast_set_kernels_set_trunk_dtype_are_the_models_options(model, esmfold_dir, fast_path_defaults):
    from esm_dual.pt import EsmForProteinFolding

    other = EsmForProteinFolding.from_pretrained(esmfold_dir)
    before = default_options()
    assert model.fast_path_options is before and _fold_fields(model) == ("auto", "auto")
    assert not model.fast  # auto on the CPU: the fp32 trunk
    model.set_fast(True)
    assert _fold_fields(model) == ("on", "auto") and model.fast
    assert model.trunk.block_dtype == torch.bfloat16 and model.trunk.kernels == "cueq"
    model.set_kernels("sdpa")
    assert _fold_fields(model) == ("on", "sdpa") and model.fast
    assert {b.tri_att_start.kernels for b in model.trunk.blocks} == {"sdpa"}
    model.set_trunk_dtype(torch.bfloat16)  # bf16 with the fp32 path's kernels: not the fast mode
    assert _fold_fields(model) == ("on", "torch") and not model.fast
    assert model.trunk.block_dtype == torch.bfloat16
    model.set_trunk_dtype(None)
    assert _fold_fields(model) == ("off", "torch") and model.trunk.block_dtype is None
    model.set_fast(False)
    assert _fold_fields(model) == ("off", "auto") and not model.fast
    model.set_fast(None)
    assert _fold_fields(model) == ("auto", "auto")
    with pytest.raises(ValueError, match="fold_kernels must be one of"):
        model.set_kernels("flash")
    with pytest.raises(ValueError, match="the trunk runs in fp32 or bf16"):
        model.set_trunk_dtype(torch.float16)
    # the stem and the trunk share the one object; other models and the process default are untouched
    assert model.esm.fast_path_options is model.fast_path_options
    assert other.fast_path_options is before and default_options() is before
    # the process default (the ESM_DUAL_FOLD_* environment) holds for models without their own
    fast_path_defaults(fold_fast="on")
    assert other.fast and not model.fast


def test_the_trunk_reads_the_models_fold_fast(model, fast_path_defaults):
    """The trunk's precision comes from the model's options at each forward: set directly with
    set_fast_path (no set_fast), or as the process default, and a model's own options win over it."""
    seq = SEQS[0]
    with torch.no_grad():
        fp32 = model.infer(seq)["positions"]
        assert model.trunk.block_dtype is None
        model.set_fast_path(fold_fast="on", fold_kernels="torch")
        bf16 = model.infer(seq)["positions"]
        assert model.trunk.block_dtype == torch.bfloat16
        assert 0 < float((bf16 - fp32).abs().max()) < 1.0  # bf16 rounding, and only that
        model.fast_path_options = None  # back to the process default ...
        fast_path_defaults(fold_fast="on", fold_kernels="torch")  # ... which now says bf16
        assert torch.equal(model.infer(seq)["positions"], bf16)
        model.set_fast(False)  # the model's own choice wins over the process default
        assert torch.equal(model.infer(seq)["positions"], fp32)
        assert model.trunk.block_dtype is None


@pytest.mark.parametrize("own", [False, True])
def test_per_model_triangle_sdpa_is_honoured(model, fast_path_defaults, monkeypatch, own):
    """triangle_sdpa off vs on folds to the same coordinates, and the model's own value (not the process
    default, set to the opposite) picks the path: SDPA (Attention.forward_rows) or the explicit scores."""
    from esm_dual.pt.folding import primitives

    calls = {"sdpa": 0, "explicit": 0}
    sdpa, explicit = primitives.Attention.forward_rows, primitives.Attention.forward

    def spy_sdpa(self, *args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(self, *args, **kwargs)

    def spy_explicit(self, *args, **kwargs):
        calls["explicit"] += 1
        return explicit(self, *args, **kwargs)

    monkeypatch.setattr(primitives.Attention, "forward_rows", spy_sdpa)
    monkeypatch.setattr(primitives.Attention, "forward", spy_explicit)
    positions = {}
    for on in (False, True):
        if own:
            fast_path_defaults(triangle_sdpa=not on)
            model.set_fast_path(triangle_sdpa=on)
        else:
            fast_path_defaults(triangle_sdpa=on)
        calls.update(sdpa=0, explicit=0)
        with torch.no_grad():
            positions[on] = model.infer(SEQS)["final_atom_positions"]
        blocks = len(model.trunk.blocks) * model.config.esmfold_config.trunk.max_recycles
        # two triangle attentions per block and pass (starting, ending node), each one call
        assert calls == ({"sdpa": 2 * blocks, "explicit": 0} if on else {"sdpa": 0, "explicit": 2 * blocks})
        assert {b.tri_att_end.triangle_sdpa for b in model.trunk.blocks} == {on}
    assert float((positions[True] - positions[False]).abs().max()) < 1e-4


def test_an_invalid_fold_option_is_refused_by_name(model):
    before = model.fast_path_options
    with pytest.raises(ValueError, match="fold_fast must be one of"):
        model.set_fast_path(fold_fast="bf16")
    with pytest.raises(TypeError, match="unknown fast-path option"):
        model.set_fast_path(trunk_dtype="bf16")
    with pytest.raises(TypeError, match="fast_path_options takes FastPathOptions"):
        model.fast_path_options = {"fold_fast": "on"}
    assert model.fast_path_options is before  # unchanged


def test_cueq_import_error_says_why(monkeypatch):
    """Where cuEquivariance does not import, the reason is kept (the GPU benchmark records it)."""
    import sys

    from esm_dual.pt.folding import kernels

    kernels.cueq_import_error.cache_clear()
    monkeypatch.setitem(sys.modules, "cuequivariance_ops_torch", None)  # as if not installed
    try:
        reason = kernels.cueq_import_error()
        assert reason is not None and "cuequivariance_ops_torch" in reason and not kernels.cueq_available()
        assert not kernels.use_cueq("cueq", torch.zeros(1))
    finally:
        kernels.cueq_import_error.cache_clear()


def test_the_fast_modes_pair_layer_norms_write_the_autocast_dtype(model, monkeypatch):
    """In the fast mode (bf16 trunk, fused kernels, Triton on) the pair LayerNorms that feed only projections
    go through fast.kernels.layer_norm_rows into bf16, one per update and block (the triangle attention's
    LayerNorm, needed for its bias and its rows, is computed once when the rows are not chunked); the fp32
    trunk, the bf16 trunk with the fp32 path's kernels and Triton switched off keep torch's LayerNorm. On the
    CPU the function falls back to the module and the cast the projections would make: the same folds."""
    from esm_dual.pt.folding import kernels

    calls = []
    real = kernels.layer_norm_rows

    def spy(x, ln, out_dtype, options=None):
        calls.append((tuple(x.shape), out_dtype))
        return real(x, ln, out_dtype, options)

    monkeypatch.setattr(kernels, "layer_norm_rows", spy)
    seq = SEQS[0]
    passes = model.config.esmfold_config.trunk.max_recycles
    blocks = len(model.trunk.blocks)
    folds = {}
    for name, changes in (("fast", dict(fold_fast="on", fold_kernels="sdpa", triton=True)),
                          ("no_triton", dict(fold_fast="on", fold_kernels="sdpa", triton=False)),
                          ("bf16_torch", dict(fold_fast="on", fold_kernels="torch", triton=True)),
                          ("fp32", dict(fold_fast="off", triton=True))):
        model.set_fast_path(**changes)
        calls.clear()
        with torch.no_grad():
            folds[name] = model.infer(seq)["positions"]
        on = {b.mlp_pair.ln_options is not None for b in model.trunk.blocks}
        n, c_z = len(seq), model.config.esmfold_config.trunk.pairwise_state_dim
        if name == "fast":
            # pair -> sequence, starting and ending triangle attention, pair transition
            assert calls == [((1, n, n, c_z), torch.bfloat16)] * (4 * blocks * passes)
            assert on == {True}
        else:
            assert calls == [] and on == {False}, name
    assert torch.equal(folds["fast"], folds["no_triton"])
    # with gradients (training) and outside autocast the fast mode's modules keep torch's LayerNorm
    ln, x = model.trunk.blocks[0].mlp_pair.mlp[0], torch.randn(1, 5, 5, c_z)
    model.set_fast_path(fold_fast="on", fold_kernels="sdpa", triton=True)
    options = model.fast_path_options
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.pair_layer_norm(ln, x, options)
        assert y.dtype == torch.float32 and torch.equal(y, ln(x))
        with torch.no_grad():
            assert kernels.pair_layer_norm(ln, x, options).dtype == torch.bfloat16
    with torch.no_grad():
        assert kernels.pair_layer_norm(ln, x, options).dtype == torch.float32
    assert len(calls) == 1
