"""FastPathOptions: read once from the ESM_DUAL_* environment, invalid values named, overridable per model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from esm_dual.pt import EsmForMaskedLM, EsmModel
from esm_dual.pt.fast import options as O
from esm_dual.pt.fast.options import ENV_VARIABLES, FastPathOptions
from tests.conftest import make_batch, tiny_config


def test_every_switch_from_the_environment():
    assert FastPathOptions.from_environment({}) == FastPathOptions()
    env = {"ESM_DUAL_ATTN": "packed", "ESM_DUAL_VARLEN": "Loop", "ESM_DUAL_FA4": "0", "ESM_DUAL_NO_TRITON": "1",
           "ESM_DUAL_FUSED_LOOP": "on", "ESM_DUAL_RESIDUAL_EPILOGUE": "false", "ESM_DUAL_EXACT_GELU": "yes",
           "ESM_DUAL_TRIANGLE_SDPA": "",  # empty: off, as these switches always read it
           "ESM_DUAL_FOLD_FAST": " Off ", "ESM_DUAL_FOLD_KERNELS": "CUEQ", "ESM_DUAL_FOLD_GRAPHS": "off"}
    assert FastPathOptions.from_environment(env) == FastPathOptions(
        attn_implementation="packed", varlen_backend="loop", fa4=False, triton=False, fused_loop="on",
        residual_epilogue=False, exact_gelu=True, triangle_sdpa=False, fold_fast="off", fold_kernels="cueq",
        fold_graphs="off")
    assert FastPathOptions.from_environment({"ESM_DUAL_NO_TRITON": "0"}).triton
    # one variable per field, each documented in the class docstring
    assert sorted(ENV_VARIABLES) == sorted(f.name for f in dataclasses.fields(FastPathOptions))
    for field, (var, _) in ENV_VARIABLES.items():
        assert field in FastPathOptions.__doc__ and var in FastPathOptions.__doc__


@pytest.mark.parametrize("var,value,accepted", [
    ("ESM_DUAL_FA4", "2", "1 or 0"),
    ("ESM_DUAL_RESIDUAL_EPILOGUE", "of", "1 or 0"),
    ("ESM_DUAL_VARLEN", "flash2", "auto, fa4, flash, dense, loop"),
    ("ESM_DUAL_ATTN", "eager", "auto, sdpa, packed"),
    ("ESM_DUAL_FUSED_LOOP", "1", "auto, on, off"),
    ("ESM_DUAL_FOLD_FAST", "1", "auto, on, off"),
    ("ESM_DUAL_FOLD_FAST", "bf16", "auto, on, off"),
    ("ESM_DUAL_FOLD_KERNELS", "flash", "auto, torch, sdpa, cueq"),
])
def test_an_invalid_value_names_the_variable_and_the_accepted_values(var, value, accepted):
    with pytest.raises(ValueError) as e:
        FastPathOptions.from_environment({var: value})
    assert var in str(e.value) and repr(value) in str(e.value) and accepted in str(e.value)


def test_field_values_are_checked():
    with pytest.raises(ValueError, match="varlen_backend must be one of"):
        FastPathOptions(varlen_backend="flash2")
    with pytest.raises(TypeError, match="fa4 must be True or False"):
        FastPathOptions(fa4="0")
    with pytest.raises(TypeError, match=r"unknown fast-path option\(s\) \['fa5'\]"):
        FastPathOptions().replace(fa5=False)
    with pytest.raises(ValueError, match="fold_fast must be one of"):
        FastPathOptions(fold_fast=True)
    with pytest.raises(ValueError, match="fold_kernels must be one of"):
        FastPathOptions().replace(fold_kernels="triton")


@pytest.mark.parametrize("fold_fast,fold_kernels,device,expected", [
    ("auto", "auto", "cuda", (True, "cueq")),  # the default on a GPU: the fast mode
    ("auto", "auto", "cpu", (False, "torch")),  # the default on the CPU: the fp32 trunk HF matches
    ("on", "auto", "cpu", (True, "cueq")),  # (cueq falls back to SDPA off CUDA, in kernels.py)
    ("on", "torch", "cuda", (True, "torch")),  # set_trunk_dtype(torch.bfloat16)
    ("off", "auto", "cuda", (False, "torch")),  # set_fast(False)
    ("off", "sdpa", "cuda", (False, "sdpa")),
    ("auto", "sdpa", "cuda", (True, "sdpa")),
])
def test_fold_mode_resolves_auto_per_device(fold_fast, fold_kernels, device, expected):
    options = FastPathOptions(fold_fast=fold_fast, fold_kernels=fold_kernels)
    assert options.fold_mode(device) == expected


def test_read_once_then_kept(monkeypatch):
    previous = O.set_default_options(None)
    try:
        monkeypatch.setenv("ESM_DUAL_FA4", "0")
        first = O.default_options()
        assert not first.fa4
        monkeypatch.setenv("ESM_DUAL_FA4", "1")  # later changes of the environment are not read
        assert O.default_options() is first
        monkeypatch.setenv("ESM_DUAL_FA4", "maybe")
        O.set_default_options(None)  # read again at the next use
        with pytest.raises(ValueError, match="ESM_DUAL_FA4='maybe'"):
            O.default_options()
        monkeypatch.delenv("ESM_DUAL_FA4")
        assert O.default_options().fa4
        with O.override_defaults(triangle_sdpa=False) as inside:
            assert O.default_options() is inside and not inside.triangle_sdpa
        assert O.default_options().triangle_sdpa
    finally:
        O.set_default_options(previous)


def test_per_model_options(fast_path_defaults):
    torch.manual_seed(0)
    model = EsmForMaskedLM(tiny_config("esm2")).eval()
    other = EsmModel(tiny_config("esm2")).eval()
    assert model.fast_path_options is O.default_options()
    opts = model.set_fast_path(attn_implementation="packed", fused_loop="on")
    assert model.fast_path_options is opts and model.esm.fast_path_options is opts  # the base model's
    assert model.attn_implementation == "packed"
    assert other.fast_path_options is O.default_options()  # other models keep the process default
    fast_path_defaults(fused_loop="off")
    assert model.fast_path_options.fused_loop == "on"  # a model's own options stay
    model.attn_implementation = "sdpa"  # short for set_fast_path(attn_implementation=...)
    assert model.fast_path_options == opts.replace(attn_implementation="sdpa")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        model.attn_implementation = "flash"
    with pytest.raises(TypeError):
        model.fast_path_options = {"fa4": False}
    model.fast_path_options = None
    assert model.fast_path_options is O.default_options()
    # the options decide the path: packed zeroes the padding, sdpa leaves it
    ids, mask = (torch.tensor(x) for x in make_batch())
    with torch.no_grad():
        other.set_fast_path(attn_implementation="packed")
        packed = other(ids, attention_mask=mask).last_hidden_state
        other.set_fast_path(attn_implementation="sdpa")
        padded = other(ids, attention_mask=mask).last_hidden_state
    assert torch.count_nonzero(packed[mask == 0]) == 0 and torch.count_nonzero(padded[mask == 0]) > 0
