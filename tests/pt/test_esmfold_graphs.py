"""CUDA graphs of the folding trunk's passes (esm_dual.pt.folding.graphs).

On the CPU the graph is replaced by a stand-in with the same contract (static input buffers, fixed output
tensors overwritten at each replay): the tests check that graph-mode folds equal eager ones, which fails if
the recycled states are not copied into the buffers, if outputs are handed out without copies, or if a
stale graph is replayed. The GPU test checks real captures against eager folds."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from esm_dual.pt.folding import graphs as graphs_mod
from esm_dual.pt.folding import trunk as trunk_mod
from tests.pt.test_esmfold import SEQS, one_thread  # noqa: F401 (autouse fixture)

KEYS = ("positions", "frames", "plddt", "ptm", "predicted_aligned_error", "distogram_logits", "s_z")


@pytest.fixture
def model(esmfold_dir):
    from esm_dual.pt import EsmForProteinFolding

    return EsmForProteinFolding.from_pretrained(esmfold_dir).eval()


@pytest.fixture
def cpu_graphs(monkeypatch):
    """Graph mode on the CPU, with the re-running stand-in for CUDA graphs."""
    real = graphs_mod.wants_graphs

    def wants(mode, device, pairs, training):
        return real(mode, torch.device("cuda"), pairs, training) if device.type == "cpu" else real(
            mode, device, pairs, training)

    monkeypatch.setattr(trunk_mod, "wants_graphs", wants)


def _stand_in(model) -> graphs_mod.PassGraphs:
    model.trunk.graphs = graphs_mod.PassGraphs(graph_type=graphs_mod.RerunGraph)
    return model.trunk.graphs


def _assert_same(a, b, tol=0.0):
    for k in KEYS:
        d = float((a[k] - b[k]).abs().max())
        assert d <= tol, (k, d)


def test_wants_graphs_decision():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with torch.no_grad():
        assert graphs_mod.wants_graphs("auto", cuda, 256 * 256, False)
        assert graphs_mod.wants_graphs("auto", cuda, graphs_mod.AUTO_MAX_PAIRS, False)
        assert not graphs_mod.wants_graphs("auto", cuda, graphs_mod.AUTO_MAX_PAIRS + 1, False)
        assert graphs_mod.wants_graphs("on", cuda, 4096 * 4096, False)
        assert not graphs_mod.wants_graphs("off", cuda, 16, False)
        assert not graphs_mod.wants_graphs("on", cpu, 16, False)  # CUDA only
        assert not graphs_mod.wants_graphs("on", cuda, 16, True)  # never in training
    assert not graphs_mod.wants_graphs("on", cuda, 16, False)  # never with gradients


@pytest.mark.parametrize("seqs", [SEQS[0], SEQS], ids=["single", "padded-batch"])
def test_graph_passes_equal_eager_passes(model, cpu_graphs, seqs):
    with torch.no_grad():
        model.set_fast_path(fold_graphs="off")
        ref = model.infer(seqs, num_recycles=3)
        model.set_fast_path(fold_graphs="auto")
        cache = _stand_in(model)
        first = model.infer(seqs, num_recycles=3)  # "auto": a shape's first fold stays eager
        assert cache.captures == 0
        second = model.infer(seqs, num_recycles=3)  # eager pass 0, capture, three replays
        assert cache.captures == 1 and len(cache) == 1
        third = model.infer(seqs, num_recycles=3)  # four replays of the cached graph
        assert cache.captures == 1
    for out in (first, second, third):
        _assert_same(out, ref)
    # what a fold hands out is its own: a later replay (other residues, same shape) does not change it
    kept = {k: third[k].clone() for k in KEYS}
    other = [s[::-1] for s in seqs] if isinstance(seqs, list) else seqs[::-1]
    with torch.no_grad():
        reversed_ = model.infer(other, num_recycles=3)
    assert cache.captures == 1
    assert float((reversed_["positions"] - kept["positions"]).abs().max()) > 0.1
    _assert_same(third, kept)


def test_on_captures_at_the_first_fold(model, cpu_graphs):
    cache = _stand_in(model)
    model.set_fast_path(fold_graphs="on")
    with torch.no_grad():
        model.infer(SEQS[0], num_recycles=2)
    assert cache.captures == 1


def test_one_graph_per_shape_and_the_cache_is_bounded(model, cpu_graphs):
    cache = _stand_in(model)
    cache.max_graphs = 2
    model.set_fast_path(fold_graphs="on")
    with torch.no_grad():
        for n in (12, 13, 12):
            model.infer("M" * n, num_recycles=1)
        assert cache.captures == 2  # 12 again: replayed
        model.infer("M" * 14, num_recycles=1)
        assert cache.captures == 3 and len(cache) == 2  # 13, the least recently used, is gone
        model.infer("M" * 13, num_recycles=1)
        assert cache.captures == 4
        # a single pass never captures (nothing to replay in that fold)
        model.infer("M" * 15, num_recycles=0)
        assert cache.captures == 4


def test_changed_options_and_replaced_parameters_capture_again(model, cpu_graphs):
    cache = _stand_in(model)
    model.set_fast_path(fold_graphs="on")
    seq = SEQS[0]
    with torch.no_grad():
        model.infer(seq, num_recycles=1)
        model.set_chunk_size(4)  # another pass: another graph
        chunked = model.infer(seq, num_recycles=1)
        assert cache.captures == 2
        model.set_chunk_size(None)
        # Parameters replaced (as .to(...) does): every graph is dropped, the next fold captures again.
        model.trunk.to(torch.float64).to(torch.float32)
        assert len(cache) == 2
        after = model.infer(seq, num_recycles=1)
        assert cache.captures == 3 and len(cache) == 1
        model.set_fast_path(fold_graphs="off")
        ref = model.infer(seq, num_recycles=1)
    _assert_same(after, ref)
    assert float((chunked["positions"] - ref["positions"]).abs().max()) < 1e-3


def test_copies_and_pickles_start_without_graphs(model, cpu_graphs):
    cache = _stand_in(model)
    model.set_fast_path(fold_graphs="on")
    with torch.no_grad():
        model.infer(SEQS[1], num_recycles=1)
    assert len(cache) == 1
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(other.trunk.graphs) == 0 and other.trunk.graphs is not cache
        with torch.no_grad():
            _assert_same(other.infer(SEQS[1], num_recycles=1), model.infer(SEQS[1], num_recycles=1))


def test_a_failed_capture_runs_that_shape_eagerly(model, cpu_graphs):
    class Broken:
        def __init__(self, fn, inputs, pool):
            raise RuntimeError("operation not permitted when stream is capturing")

    model.trunk.graphs = graphs_mod.PassGraphs(graph_type=Broken)
    with torch.no_grad():
        model.set_fast_path(fold_graphs="off")
        ref = model.infer(SEQS[0], num_recycles=2)
        model.set_fast_path(fold_graphs="on")
        with pytest.warns(RuntimeWarning, match="could not capture a CUDA graph.*runs eagerly"):
            out = model.infer(SEQS[0], num_recycles=2)
        again = model.infer(SEQS[0], num_recycles=2)  # no second attempt, no second warning
    assert model.trunk.graphs.captures == 0
    _assert_same(out, ref)
    _assert_same(again, ref)


def test_inference_mode_and_no_grad_keep_their_own_graphs(model, cpu_graphs):
    """A graph captured under ``torch.inference_mode()`` holds inference tensors, which cannot be written
    under ``no_grad``: each mode gets its own graph."""
    cache = _stand_in(model)
    model.set_fast_path(fold_graphs="on")
    aa = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.inference_mode():
        a = model(aa, num_recycles=2)
    with torch.no_grad():
        b = model(aa, num_recycles=2)
    assert cache.captures == 2
    _assert_same(a, b)
    # a caller's autocast is another graph too (it changes what the recorded kernels compute)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(aa, num_recycles=2)
    assert cache.captures == 3


def test_hooks_keep_the_passes_eager(model, cpu_graphs):
    """A hook on any trunk module must see every pass: no graph is captured or replayed while one is set."""
    cache = _stand_in(model)
    model.set_fast_path(fold_graphs="on")
    calls = []
    handle = model.trunk.blocks[0].tri_mul_out.register_forward_hook(lambda m, i, o: calls.append(1))
    with torch.no_grad():
        model.infer(SEQS[0], num_recycles=2)
        model.infer(SEQS[0], num_recycles=2)
    assert cache.captures == 0 and len(calls) == 6  # 3 passes x 2 folds
    handle.remove()
    with torch.no_grad():
        model.infer(SEQS[0], num_recycles=2)
    assert cache.captures == 1


def test_training_and_gradients_stay_eager(model, cpu_graphs):
    cache = _stand_in(model)
    out = model(torch.tensor([[1, 2, 3, 4, 5, 6]]), num_recycles=1)  # gradients on
    out["positions"].sum().backward()
    assert cache.captures == 0
    assert model.trunk.blocks[0].tri_mul_out.linear_z.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fast", [False, True], ids=["fp32-trunk", "fast"])
def test_cuda_graph_folds_match_eager_on_gpu(esmfold_dir, fast):
    from esm_dual.pt import EsmForProteinFolding

    m = EsmForProteinFolding.from_pretrained(esmfold_dir, device="cuda").eval()
    m.set_fast(fast)
    seqs = [SEQS, SEQS[0] * 7, "MKVLAAGIVG" * 20]
    with torch.no_grad():
        m.set_fast_path(fold_graphs="off")
        refs = [m.infer(s) for s in seqs]
        m.set_fast_path(fold_graphs="on")
        firsts = [m.infer(s) for s in seqs]
        agains = [m.infer(s) for s in seqs]
    assert m.trunk.graphs.captures == len(seqs)
    for ref, first, again in zip(refs, firsts, agains):
        for out in (first, again):
            for k in KEYS:
                assert torch.isfinite(out[k]).all(), k
            assert float((out["positions"] - ref["positions"]).abs().max()) < 1e-3
            assert float((out["plddt"] - ref["plddt"]).abs().max()) < 1e-3
