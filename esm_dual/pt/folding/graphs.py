"""CUDA graphs of the folding trunk's passes (inference).

One trunk pass (48 folding blocks, the structure module, the recycling inputs of the next pass) is
about 10,000 small kernels. At a few hundred residues the GPU finishes them faster than Python can
launch them, so an eager pass is bound by the CPU. :class:`PassGraphs` captures a pass once per input
shape and replays it.

A pass is recorded as three graphs (:class:`PassGraph`): its head (the recycled states embedded), one
folding block, replayed for each of the 48 blocks after a batched copy of that block's weights into the
recorded block's parameters, and its tail (the structure module, the next pass's recycling inputs). The
graphs hold ~1/40 of a whole pass's kernels, and a variant's warm-up (below) runs one block eagerly instead
of a whole pass (an eager fast-mode pass is 0.61-0.74 s at 256-512 residues on an H100). Replays cost what a
whole-pass graph's did (0.10 / 0.15 / 0.20 / 0.36 s a pass at 256 / 320 / 384 / 512 residues, H100, either
way).

Each graph is recorded at the shape's first pass, just before its first replay, on a side stream and without
what ``torch.cuda.graph`` does first (synchronise the device, empty the allocator's cache): the CPU records the
tail while the GPU runs the 48 replayed blocks. A grid point's first fold then costs little more than a later
one (H100, 256 residues: 0.46-0.56 s against 0.445 s; recording the three graphs up front behind the sync:
0.52-0.63 s), once the machine has compiled the shape's kernels: the first process on a machine pays 1-3 s more
per new shape (Triton's compilation, kept in its disk cache).

Shapes are padded to a grid (:func:`graph_length`: lengths rounded up to a multiple of 32, the padding
masked as in a padded batch), so a set of varied lengths shares a few graphs: every length from 225 to
256 replays one graph. Under "auto" a shape is captured at its first fold and replayed for its other passes;
later folds of any length on the same grid point replay every pass. The first capture in a variant
(precision, kernels, chunking, autocast, inference mode: everything in the graph key but the shapes) runs
what it records once eagerly before recording it (the head, one block, the tail), which compiles the Triton
kernels and initialises cuBLAS, cuDNN and cuEquivariance outside a capture; later shapes of that variant
are recorded straight away (``PassGraphs.warmup``). "auto" graphs the fast (bf16) trunk up to ``AUTO_MAX_PAIRS``; "on"
any size, the fp32 trunk too.

What a graph holds: static input buffers (the features and the recycled states) and the blocks' state
buffers (s and the pair state z, updated in place by each block), all outside the graphs' memory pool; the
recorded kernels, which read the parameters where they are (the head's and tail's directly, the blocks'
through the copies made at each replay: weights changed in place are seen, parameters replaced are not, so
the cache is keyed by the parameters' addresses and cleared when they change); and static outputs inside
the pool. All graphs of a trunk share one pool: they never run at once, a pass replays its graphs in the
order they were recorded, and each replay's outputs are copied out before another graph runs.

The decision (``FastPathOptions.fold_graphs``), the grid and the cache live here; ``trunk.FoldingTrunk``
says what a pass is and pads to the grid. Any failure to set up or record a pass falls back to eager passes
for that shape (the failed pass included), with one warning.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

# "auto" captures folds of at most this many pair entries (batch x length^2): 512 residues alone. Longer
# folds keep the GPU busy without graphs, and a graph keeps its pass's activations reserved.
AUTO_MAX_PAIRS = 512 * 512
# Shapes kept per trunk (least recently used first out): every grid point up to 512 residues.
MAX_GRAPHS = 16
# Graphed folds are padded to a multiple of this many residues (see graph_length).
GRAPH_LENGTH_STEP = 32
# PassGraphs.warmup: which captures run what they record eagerly once first ("variant": a variant's first).
WARMUP = ("variant", "shape", "never")

Tensors = dict[str, torch.Tensor]


def wants_graphs(mode: str, device: torch.device, pairs: int, training: bool, fast: bool) -> bool:
    """Whether a pass of ``pairs`` pair entries (batch x length^2) runs from a CUDA graph under the
    ``fold_graphs`` mode ("auto", "on", "off"): CUDA inference only (no training, no gradients). "auto"
    graphs the fast (bf16) trunk only (``fast``): the fp32 trunk's passes are longer and GPU-bound, and its
    capture fold measured twice an eager fold at 512 residues (10.1 against 5.5 s, H100)."""
    if mode == "off" or training or torch.is_grad_enabled() or device.type != "cuda":
        return False
    return mode == "on" or (fast and pairs <= AUTO_MAX_PAIRS)


def graph_length(n: int) -> int:
    """The length a graphed fold of ``n`` residues is padded to: the next multiple of
    ``GRAPH_LENGTH_STEP``. Padding costs GPU time (at most 31 rows and columns of the pair state) that
    replays win back many times over at the lengths graphs are used for, where an eager pass is bound by
    kernel launches."""
    return -(-n // GRAPH_LENGTH_STEP) * GRAPH_LENGTH_STEP


class GraphCaptureError(RuntimeError):
    """Recording a graph failed (raised by ``PassGraph.__call__``: the pass runs eagerly instead)."""


class _CudaGraph:
    """``fn(inputs)`` recorded once in a CUDA graph, replayed on the same buffers.

    Recorded on a side stream made to wait for the current one, without what ``torch.cuda.graph`` does first
    (synchronise the device, empty the allocator's cache: to hand memory back before a capture): the CPU then
    records while the GPU still runs what was enqueued before, such as the blocks of the pass being captured."""

    _streams: dict[int, torch.cuda.Stream] = {}  # per device: the side stream graphs are recorded on

    def __init__(self, fn: Callable[[Tensors], Tensors], inputs: Tensors, pool):
        self.graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream()
        side = self._streams.get(current.device_index)
        if side is None:
            side = self._streams[current.device_index] = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.graph.capture_begin(pool)
            try:
                self.outputs = fn(inputs)
            except BaseException:
                with contextlib.suppress(Exception):  # the capture is invalid anyway: the first error is the one
                    self.graph.capture_end()
                raise
            self.graph.capture_end()
        current.wait_stream(side)

    def replay(self) -> Tensors:
        self.graph.replay()
        return self.outputs


class RerunGraph:
    """Stand-in with a graph's contract that re-runs ``fn`` at each replay (no capture): the CPU tests exercise
    the static-buffer plumbing with it. Like a capture, making one runs nothing; its outputs are fixed tensors,
    made at the first replay and overwritten at later ones."""

    def __init__(self, fn: Callable[[Tensors], Tensors], inputs: Tensors, pool):
        self.fn, self.inputs = fn, inputs
        self.outputs: Tensors | None = None

    def replay(self) -> Tensors:
        out = self.fn(self.inputs)
        if self.outputs is None:
            self.outputs = out
        else:
            for k, v in out.items():
                self.outputs[k].copy_(v)
        return self.outputs


class PassGraph:
    """One trunk pass on static buffers, recorded as three graphs: ``head`` (the inputs -> the blocks' state
    buffers), one folding block (the state updated in place by a ``template`` block) and ``tail`` (the state
    -> the outputs). ``__call__`` copies new inputs into the buffers, replays the head, then for each of
    ``blocks`` copies that block's parameters into the template's and replays the block graph, and returns
    the tail's static outputs (valid until the next replay of any graph of the same pool: copy what you keep).

    The blocks share their shapes and kernels; only the weights differ, so one recorded block serves all of
    them. The weights copy is one batched device copy per block, read where the parameters are, so weights
    changed in place are seen as before.

    Each graph is recorded at the first call, just before its first replay: the tail is recorded while the GPU
    runs the 48 replayed blocks. A failure to record raises ``GraphCaptureError`` before anything of the pass
    reached the caller's tensors (the pass can run eagerly on the same inputs)."""

    def __init__(self, head: Callable[[Tensors], Tensors], block: Callable[[torch.nn.Module, Tensors, Tensors], None],
                 tail: Callable[[Tensors, Tensors], Tensors], blocks, template, example: Tensors, pool,
                 graph_type=None, warmup: bool = False):
        # The buffers are allocated before the captures, outside the pool; the state's shapes and dtypes are
        # the head's (run once eagerly here: a few small kernels).
        self.inputs = {k: v.clone() for k, v in example.items()}
        self.state = {k: torch.empty_like(v) for k, v in head(self.inputs).items()}
        self._sources = [list(b.parameters()) for b in blocks]
        self._staged = list(template.parameters()) if template is not None else []
        if any(len(src) != len(self._staged) for src in self._sources):
            raise ValueError("the folding blocks do not share the template block's parameters")

        def head_into_state(inputs: Tensors) -> Tensors:
            for k, v in head(inputs).items():
                self.state[k].copy_(v)
            return {}

        def block_on_state(st: Tensors) -> Tensors:
            block(template, st, self.inputs)
            return {}

        def tail_on_state(st: Tensors) -> Tensors:
            return tail(self.inputs, st)

        if warmup:
            # What is recorded runs once eagerly first (the head, one block, the tail: every kernel of a pass), so
            # Triton compiles and cuBLAS, cuDNN and cuEquivariance initialise outside a capture.
            head_into_state(self.inputs)
            if self._sources:
                block_on_state(self.state)
            tail_on_state(self.state)
        self._parts = {"head": (head_into_state, self.inputs), "block": (block_on_state, self.state),
                       "tail": (tail_on_state, self.state)}
        self._graph_type, self._pool = graph_type or _CudaGraph, pool
        self._graphs: dict[str, _CudaGraph | RerunGraph] = {}

    @property
    def recorded(self) -> bool:
        """Whether the pass's graphs have been recorded (at its first call)."""
        return len(self._graphs) == len(self._parts) - (not self._sources)

    def _replay(self, part: str) -> Tensors:
        graph = self._graphs.get(part)
        if graph is None:
            fn, inputs = self._parts[part]
            try:
                graph = self._graph_type(fn, inputs, self._pool)
            except Exception as exc:
                raise GraphCaptureError(f"{part}: {type(exc).__name__}: {exc}") from exc
            self._graphs[part] = graph
        return graph.replay()

    def __call__(self, inputs: Tensors) -> Tensors:
        for k, v in inputs.items():
            if v is not self.inputs[k]:
                self.inputs[k].copy_(v)
        self._replay("head")
        for src in self._sources:
            torch._foreach_copy_(self._staged, src)  # one batched copy of the block's weights
            self._replay("block")
        return self._replay("tail")


class PassGraphs:
    """The CUDA graphs of one trunk, by shape (``key``), least recently used first out. Not part of the
    model's state: copies and pickles of the model start with an empty cache."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, graph_type=None):
        self.max_graphs = max_graphs
        self.graph_type = graph_type  # None: CUDA graphs; tests pass RerunGraph
        self._graphs: OrderedDict[Hashable, PassGraph | None] = OrderedDict()
        self._params: tuple[int, ...] | None = None
        self._pool = None
        self.captures = 0  # how many graphs were captured (tests and benchmarks read it)
        # Which captures run the recorded parts (head, one block, tail) eagerly once first: "variant" (default)
        # only a variant's first, "shape" every one, "never" none.
        self.warmup = "variant"
        self._warm: set[Hashable] = set()  # variants that have been warmed up
        self._templates: dict[Hashable, torch.nn.Module] = {}  # per variant: the block graphs' staging block

    @property
    def warmup(self) -> str:
        return self._warmup

    @warmup.setter
    def warmup(self, value: str) -> None:
        if value not in WARMUP:
            raise ValueError(f"warmup must be one of {', '.join(WARMUP)}, not {value!r}")
        self._warmup = value

    def __deepcopy__(self, memo):
        new = PassGraphs(self.max_graphs, self.graph_type)
        new.warmup = self.warmup
        return new

    def __getstate__(self):
        return {"max_graphs": self.max_graphs, "graph_type": self.graph_type, "warmup": self.warmup}

    def __setstate__(self, state):
        self.__init__(state["max_graphs"], state["graph_type"])
        self.warmup = state.get("warmup", "variant")

    def __len__(self) -> int:
        return sum(g is not None for g in self._graphs.values())

    def clear(self) -> None:
        """Drop every graph (and, once nothing else holds it, the memory their pool reserved)."""
        self._graphs.clear()
        self._templates.clear()
        self._pool = None

    def check_parameters(self, params: tuple[int, ...]) -> None:
        """Graphs read the parameters at fixed addresses: when the addresses change (``model.to(...)``,
        replaced tensors), every graph is stale and is dropped."""
        if params != self._params:
            self.clear()
            self._params = params

    def lookup(self, key: Hashable) -> PassGraph | None | bool:
        """The graph of ``key``; None where a capture failed before (run eagerly); False if none yet."""
        if key not in self._graphs:
            return False
        self._graphs.move_to_end(key)
        return self._graphs[key]

    def capture(self, key: tuple[Hashable, Hashable], head, block, tail, blocks, example: Tensors) -> PassGraph | None:
        """Capture a pass (``PassGraph``: ``head``, ``block`` for each of ``blocks``, ``tail``) on buffers shaped
        like ``example`` and keep it under ``key`` = (shapes, variant); None (and one warning) if the capture
        fails: that shape runs eagerly. The block graph's template (a copy of the first block: its parameters are
        the staging buffers) is made once per variant."""
        if self._pool is None and self.graph_type is None:
            self._pool = torch.cuda.graph_pool_handle()
        variant = key[1]
        # the variant's kernels not yet compiled and initialised on this device (or "shape": warm up every capture)
        warmup = self.warmup == "shape" or (self.warmup == "variant" and variant not in self._warm)
        try:
            if variant not in self._templates and len(blocks):
                # (made in the variant's own mode: inference tensors under inference mode, written only there)
                self._templates[variant] = copy.deepcopy(blocks[0]).requires_grad_(False)
            graph = PassGraph(head, block, tail, blocks, self._templates.get(variant), example, self._pool,
                              self.graph_type, warmup)
        except Exception as exc:  # noqa: BLE001 - any failure means: run this shape eagerly
            self._graphs[key] = graph = None
            self._warn(exc)
        else:
            self.captures += 1
            if warmup:
                self._warm.add(variant)
            self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph

    def failed(self, key: Hashable, exc: BaseException) -> None:
        """Recording ``key``'s graphs failed at its first pass (``GraphCaptureError``): that shape runs eagerly
        from now on (one warning)."""
        if self._graphs.get(key) is not None:
            self.captures -= 1
        self._graphs[key] = None
        self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        warnings.warn(f"ESMFold: could not capture a CUDA graph of the trunk pass ({type(exc).__name__}: "
                      f"{exc}); this shape runs eagerly (FastPathOptions.fold_graphs='off' silences this)",
                      RuntimeWarning, stacklevel=4)
