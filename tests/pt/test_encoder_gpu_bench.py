"""benchmarks/encoder_gpu.py in its CPU smoke mode: HF at several batch budgets, ours packed, the speed-of-light
bounds (parts of the inference loop taken out), and the library unchanged afterwards."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from esm_dual.pt.fast.kernels import triton_available  # noqa: E402
from tests.utils import load_benchmark  # noqa: E402


def test_cpu_smoke_with_bounds(tmp_path, one_torch_thread, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # interpreted kernels on 16k tokens would take minutes
    bench = load_benchmark("encoder_gpu")
    out = tmp_path / "r.json"
    assert bench.main(["--device", "cpu", "--shapes", "tiny", "--modes", "inference,training", "--bounds",
                       "--reps", "1", "--variants", "", "--hf-budgets", "2048,4096", "--budget", "4096",
                       "--our-budgets", "4096", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    sh = report["shapes"]["tiny"]
    assert sh["errors"] == [], sh["errors"]
    inf = sh["inference"]
    for key in ("hf_sorted_budget2048", "hf_sorted_budget4096", "ours_packed_budget4096"):
        assert inf[key]["tokens_per_s"] > 0, (key, inf[key])
    # fewer padded tokens in smaller sorted batches; the best HF run is the one the ratio divides by
    assert inf["padded_tokens_sorted_budget2048"] <= inf["padded_tokens_sorted_budget4096"]
    hf_best = max(inf[k]["tokens_per_s"] for k in ("hf_sorted_budget2048", "hf_sorted_budget4096",
                                                  "hf_padded16_file_order"))
    assert inf[inf["hf_best"]]["tokens_per_s"] == hf_best
    # On the CPU without Triton the layers run as modules: the bounds say so instead of timing the unchanged
    # model. (They are measured in the fused loop: test_bound_patch_changes_the_loop_and_restores_it.)
    assert inf["bounds_error"].startswith("not applicable")
    assert "bounds_vs_hf_best" not in inf and not any(k.startswith("bound_") for k in inf)
    assert not any(k.startswith("bound") for k in sh["training"])
    assert {"hf_sorted_budget2048", "hf_sorted_budget4096"} <= set(sh["training"])


def test_bound_patch_changes_the_loop_and_restores_it():
    """On a GPU with the Triton kernels; on the CPU with the inference loop forced on (torch fallbacks)."""
    bench = load_benchmark("encoder_gpu")
    from esm_dual.common.config import EsmConfig
    from esm_dual.pt import EsmModel, fast
    from esm_dual.pt.fast import epilogues
    from esm_dual.pt.fast.packing import pack_sequences

    cfg = EsmConfig.from_dict(dict(bench.COMMON, **bench.SHAPES["tiny"]))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = EsmModel(cfg).eval().to(device)
    if not (torch.cuda.is_available() and triton_available()):
        model.set_fast_path(fused_loop="on")
    p = pack_sequences(bench.make_sequences(5, seed=3, median=12.0)).to(device)
    originals = (fast.packed_self_attention, epilogues.pending_layer_norm)

    def run():
        with torch.inference_mode():
            return model.forward_packed(p.input_ids, p.cu_seqlens, p.max_seqlen).last_hidden_state.clone()

    ref = run()
    outs = {}
    for name in bench.BOUNDS:
        with bench.bound_patch(torch, name) as calls:
            outs[name] = run()
        assert calls[0] == 2 * cfg.num_hidden_layers, (name, calls)  # every LayerNorm of the loop reused
        assert torch.isfinite(outs[name]).all()
        assert (fast.packed_self_attention, epilogues.pending_layer_norm) == originals
    # each bound computes something else than the model, and something else than the previous bound
    assert not torch.allclose(outs["no_layernorm"], ref)
    assert not torch.allclose(outs["no_layernorm_rotary"], outs["no_layernorm"])
    assert not torch.allclose(outs["gemms_only"], outs["no_layernorm_rotary"])
    assert torch.equal(run(), ref)
