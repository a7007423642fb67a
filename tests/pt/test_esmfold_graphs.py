"""CUDA graphs of the folding trunk's passes (esm_dual.pt.folding.graphs).

On the CPU the graph is replaced by a stand-in with the same contract (static input buffers, fixed output
tensors overwritten at each replay): the tests check that graph-mode folds equal eager ones, which fails if
the recycled states are not copied into the buffers, if outputs are handed out without copies, or if a
stale graph is replayed. The GPU test checks real captures against eager folds."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from esm_dual.pt.folding import graphs as graphs_mod
from esm_dual.pt.folding import trunk as trunk_mod
from tests.pt.test_esmfold import SEQS, one_thread  # noqa: F401 (autouse fixture)

# fp32 folds padded to the graph grid (masked) against unpadded ones
PADDED_TOL = 1e-4
KEYS = ("positions", "frames", "plddt", "ptm", "predicted_aligned_error", "distogram_logits", "s_z")


@pytest.fixture
def model(esmfold_dir):
    from esm_dual.pt import EsmForProteinFolding

    return EsmForProteinFolding.from_pretrained(esmfold_dir).eval()


@pytest.fixture
def cpu_graphs(monkeypatch):
    """Graph mode on the CPU, with the re-running stand-in for CUDA graphs. The CPU model's trunk is fp32;
    the decision is taken as for the fast trunk on CUDA (which "auto" graphs)."""
    real = graphs_mod.wants_graphs

    def wants(mode, device, pairs, training, fast):
        return real(mode, torch.device("cuda"), pairs, training, True) if device.type == "cpu" else real(
            mode, device, pairs, training, fast)

    monkeypatch.setattr(trunk_mod, "wants_graphs", wants)


def _stand_in(model) -> graphs_mod.PassGraphs:
    model.trunk.graphs = graphs_mod.PassGraphs(graph_type=graphs_mod.RerunGraph)
    return model.trunk.graphs


def _residues(x: torch.Tensor, key: str, b: int, n: int) -> torch.Tensor:
    """Output ``key`` of batch row ``b`` over its ``n`` residues (a padded batch's padding holds no result)."""
    if key in ("positions", "frames"):  # [S, B, N, ...]
        return x[:, b, :n]
    if key == "ptm":
        return x[b]
    return x[b, :n, :n] if key in ("predicted_aligned_error", "distogram_logits", "s_z") else x[b, :n]


def _assert_same(a, b, tol=0.0):
    has = [x["chain_index"] for x in (a, b) if "chain_index" in x.keys()]  # infer's outputs (-1: padding)
    lengths = (has[0] >= 0).sum(-1).tolist() if has else [a["positions"].shape[2]] * a["positions"].shape[1]
    assert all(lengths == (h >= 0).sum(-1).tolist() for h in has)
    for k in KEYS:
        d = max(float((_residues(a[k], k, i, n) - _residues(b[k], k, i, n)).abs().max())
                for i, n in enumerate(lengths))
        assert d <= tol, (k, d)


def test_wants_graphs_decision():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    wants = graphs_mod.wants_graphs
    with torch.no_grad():
        assert wants("auto", cuda, 256 * 256, False, fast=True)
        assert wants("auto", cuda, graphs_mod.AUTO_MAX_PAIRS, False, fast=True)
        assert not wants("auto", cuda, graphs_mod.AUTO_MAX_PAIRS + 1, False, fast=True)
        assert not wants("auto", cuda, 256 * 256, False, fast=False)  # "auto": the fast trunk only
        assert wants("on", cuda, 4096 * 4096, False, fast=False)  # "on": any size, the fp32 trunk too
        assert not wants("off", cuda, 16, False, fast=True)
        assert not wants("on", cpu, 16, False, fast=True)  # CUDA only
        assert not wants("on", cuda, 16, True, fast=True)  # never in training
    assert not wants("on", cuda, 16, False, fast=True)  # never with gradients


def test_the_trunk_tells_the_decision_which_trunk_runs(model, monkeypatch):
    seen = []

    def wants(mode, device, pairs, training, fast):
        seen.append((mode, fast))
        return False

    monkeypatch.setattr(trunk_mod, "wants_graphs", wants)
    with torch.no_grad():
        for fast in (False, True):
            model.set_fast(fast)
            model.infer(SEQS[0], num_recycles=0)
    assert seen == [("auto", False), ("auto", True)]


@pytest.mark.parametrize("seqs", [SEQS[0], SEQS], ids=["single", "padded-batch"])
def test_graph_passes_equal_eager_passes(model, cpu_graphs, seqs):
    with torch.no_grad():
        model.set_fast_path(fold_graphs="off")
        ref = model.infer(seqs, num_recycles=3)
        model.set_fast_path(fold_graphs="auto")
        cache = _stand_in(model)
        first = model.infer(seqs, num_recycles=3)  # a shape's first fold: eager pass 0, capture, three replays
        assert cache.captures == 1 and len(cache) == 1
        again = model.infer(seqs, num_recycles=3)  # four replays of the cached graph
        assert cache.captures == 1
    # 29 residues run padded to 32 (masked): equal to the unpadded eager fold up to fp32 rounding
    for out in (first, again):
        assert out["positions"].shape == ref["positions"].shape
        _assert_same(out, ref, PADDED_TOL)
    _assert_same(first, again)
    # what a fold hands out is its own: a later replay (other residues, same shape) does not change it
    kept = {k: again[k].clone() for k in KEYS}
    other = [s[::-1] for s in seqs] if isinstance(seqs, list) else seqs[::-1]
    with torch.no_grad():
        reversed_ = model.infer(other, num_recycles=3)
    assert cache.captures == 1
    assert float((reversed_["positions"] - kept["positions"]).abs().max()) > 0.1
    _assert_same(again, kept)


def test_lengths_on_one_grid_point_share_a_graph(model, cpu_graphs):
    """Graphed folds are padded to a multiple of 32 residues: 40 and 61 residues replay the 64-residue graph,
    each with outputs of its own length equal to its unpadded eager fold; 64 needs no padding."""
    seqs = [(SEQS[0] * 3)[:n] for n in (40, 61, 64)]
    with torch.no_grad():
        model.set_fast_path(fold_graphs="off")
        refs = [model.infer(s, num_recycles=2) for s in seqs]
        model.set_fast_path(fold_graphs="auto")
        cache = _stand_in(model)
        outs = [model.infer(s, num_recycles=2) for s in seqs]
    assert cache.captures == 1 and len(cache) == 1
    for seq, out, ref in zip(seqs, outs, refs):
        assert out["positions"].shape == ref["positions"].shape and out["s_z"].shape[1:3] == (len(seq), len(seq))
        _assert_same(out, ref, PADDED_TOL)
    assert [graphs_mod.graph_length(n) for n in (1, 32, 33, 64, 255, 256, 257)] == [32, 32, 64, 64, 256, 256, 288]


def test_one_graph_per_grid_point_and_the_cache_is_bounded(model, cpu_graphs):
    cache = _stand_in(model)
    cache.max_graphs = 2
    with torch.no_grad():
        for n in (12, 40, 20):
            model.infer("M" * n, num_recycles=1)
        assert cache.captures == 2  # 20 is on 12's grid point (32): replayed
        model.infer("M" * 70, num_recycles=1)
        assert cache.captures == 3 and len(cache) == 2  # 40's graph (64), the least recently used, is gone
        model.infer("M" * 50, num_recycles=1)
        assert cache.captures == 4
        # a new shape is captured at its first pass, also in a one-pass fold, whatever the warm-up policy
        model.infer("M" * 100, num_recycles=0)
        assert cache.captures == 5
        cache.warmup = "shape"
        assert copy.deepcopy(cache).warmup == "shape" and pickle.loads(pickle.dumps(cache)).warmup == "shape"
        model.infer("M" * 130, num_recycles=0)
        assert cache.captures == 6
    with pytest.raises(ValueError, match="warmup must be one of variant, shape, never"):
        cache.warmup = "once"


@pytest.mark.parametrize("warmup, events", [
    ("variant", [True, False, True]),
    ("shape", [True, True, True]),
    ("never", [False, False, False]),
])
def test_a_variants_first_capture_warms_up(model, cpu_graphs, monkeypatch, warmup, events):
    """Under "variant" only the first capture of a variant (the graph key without the shapes) runs what it
    records eagerly first (head, one block, tail); later grid points are captured straight away, and fold what
    eager folds do; another variant (here a chunk size) warms up again."""
    cache = _stand_in(model)
    cache.warmup = warmup
    runs: list[str] = []
    flags: list[bool] = []

    class Spy(graphs_mod.PassGraph):
        def __init__(self, head, block, tail, *rest):
            flags.append(rest[-1])
            super().__init__(head, lambda *a: (runs.append("block"), block(*a))[1], tail, *rest)

    monkeypatch.setattr(graphs_mod, "PassGraph", Spy)
    seqs = [SEQS[0], SEQS[0] * 2]  # grid points 32 and 64
    blocks = len(model.trunk.blocks)
    with torch.no_grad():
        for seq, chunk in ((seqs[0], None), (seqs[1], None), (seqs[1], 4)):
            model.set_chunk_size(chunk)
            runs.clear()
            out = model.infer(seq, num_recycles=2)
            # each of 3 passes replays the block once per block (recording runs nothing); + 1 to warm up
            assert len(runs) == 3 * blocks + flags[-1]
            model.set_fast_path(fold_graphs="off")
            _assert_same(out, model.infer(seq, num_recycles=2), PADDED_TOL)
            model.set_fast_path(fold_graphs="auto")
        model.set_chunk_size(None)
    assert flags == events and cache.captures == 3


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
    _assert_same(after, ref, PADDED_TOL)
    assert float((chunked["positions"] - ref["positions"]).abs().max()) < 1e-3


def test_one_block_graph_replays_every_block_with_its_own_weights(model, cpu_graphs):
    """A pass records one folding block and replays it for every block with that block's weights copied in:
    the copies are read from the parameters at each replay, so weights changed in place are seen (no new
    capture), and the staging block is not part of the model."""
    cache = _stand_in(model)
    assert len(model.trunk.blocks) >= 2  # else a missing weights copy could not show
    n_params = len(list(model.parameters()))
    with torch.no_grad():
        model.infer(SEQS[0], num_recycles=1)
        assert cache.captures == 1
        for block in model.trunk.blocks[1:]:
            block.mlp_pair.mlp[1].weight.mul_(1.5)  # in place: same addresses
        graphed = model.infer(SEQS[0], num_recycles=1)
        assert cache.captures == 1
        model.set_fast_path(fold_graphs="off")
        ref = model.infer(SEQS[0], num_recycles=1)
    _assert_same(graphed, ref, PADDED_TOL)
    assert len(list(model.parameters())) == n_params and "graphs" not in dict(model.named_modules())


def test_a_pass_records_each_graph_just_before_its_first_replay(model, cpu_graphs):
    """The three graphs are recorded at the shape's first pass, each right before it first runs (so recording
    the tail overlaps the GPU running the blocks), once; later passes and folds only replay."""
    events: list[str] = []

    class Logged(graphs_mod.RerunGraph):
        def __init__(self, fn, inputs, pool):
            events.append(f"record {fn.__name__}")
            super().__init__(fn, inputs, pool)

        def replay(self):
            events.append(self.fn.__name__)
            return super().replay()

    model.trunk.graphs = graphs_mod.PassGraphs(graph_type=Logged)
    model.set_fast_path(fold_graphs="on")
    blocks = len(model.trunk.blocks)
    one_pass = ["head_into_state"] + ["block_on_state"] * blocks + ["tail_on_state"]
    with torch.no_grad():
        model.infer(SEQS[0], num_recycles=1)
        model.infer(SEQS[0][:-1], num_recycles=0)  # the same grid point
    assert events == (["record head_into_state", "head_into_state", "record block_on_state"] + one_pass[1:-1]
                      + ["record tail_on_state", "tail_on_state"] + one_pass * 2)


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


@pytest.mark.parametrize("part", ["setup", "head_into_state", "block_on_state", "tail_on_state"])
def test_a_failed_capture_runs_that_shape_eagerly(model, cpu_graphs, monkeypatch, part):
    """Whether setting a pass up fails or recording one of its graphs at the first pass (the tail's after the head
    and the blocks have been replayed), that pass and the shape's later ones run eagerly, with one warning."""

    class Broken(graphs_mod.RerunGraph):
        def __init__(self, fn, inputs, pool):
            if fn.__name__ == part:
                raise RuntimeError("operation not permitted when stream is capturing")
            super().__init__(fn, inputs, pool)

    class BrokenSetup(graphs_mod.PassGraph):
        def __init__(self, *args):
            raise RuntimeError("CUDA error: out of memory")

    if part == "setup":
        monkeypatch.setattr(graphs_mod, "PassGraph", BrokenSetup)
    model.trunk.graphs = graphs_mod.PassGraphs(graph_type=Broken)
    with torch.no_grad():
        model.set_fast_path(fold_graphs="off")
        ref = model.infer(SEQS[0], num_recycles=2)
        model.set_fast_path(fold_graphs="on")
        with pytest.warns(RuntimeWarning, match="could not capture a CUDA graph.*runs eagerly"):
            out = model.infer(SEQS[0], num_recycles=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = model.infer(SEQS[0], num_recycles=2)  # no second attempt, no second warning
    assert model.trunk.graphs.captures == 0
    _assert_same(out, ref, PADDED_TOL)
    _assert_same(again, ref, PADDED_TOL)


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
    # three grid points: a padded batch of 29 (-> 32), 203 residues (-> 224), 256 (on the grid)
    seqs = [SEQS, SEQS[0] * 7, ("MKVLAAGIVG" * 26)[:256]]
    with torch.no_grad():
        m.set_fast_path(fold_graphs="off")
        refs = [m.infer(s) for s in seqs]
        m.set_fast_path(fold_graphs="auto" if fast else "on")  # "auto" graphs the fast trunk only
        firsts = [m.infer(s) for s in seqs]  # capture
        agains = [m.infer(s) for s in seqs]  # replay
    assert m.trunk.graphs.captures == len(seqs)
    for ref, first, again in zip(refs, firsts, agains):
        for out in (first, again):
            for k in KEYS:
                assert torch.isfinite(out[k]).all(), k
            assert out["positions"].shape == ref["positions"].shape
        # a replay computes what its capture fold computed
        _assert_same(again, first, 1e-3)
        if not fast:
            _assert_same(first, ref, 1e-3)  # fp32: padded graph folds equal the unpadded eager folds
        else:
            # bf16: the padded, masked shapes take other kernels than the eager fold, whose rounding the
            # trunk amplifies; hold them to the fast mode's own bound against the fp32 trunk
            for b, n in enumerate((ref["chain_index"] >= 0).sum(-1).tolist()):
                ca, ca_ref = first["positions"][-1, b, :n, 1], ref["positions"][-1, b, :n, 1]
                assert float((ca - ca_ref).square().sum(-1).mean().sqrt()) < 0.5
                assert abs(float(first["plddt"][b, :n].mean() - ref["plddt"][b, :n].mean())) < 1.0
