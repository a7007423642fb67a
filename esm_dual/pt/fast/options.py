"""The switches of the GPU fast path and of ESMFold's folding trunk, as one typed object.

:class:`FastPathOptions` is read once from the environment (the ``ESM_DUAL_*`` variables below, at the
first use) and is the process default; a model can carry its own (``model.set_fast_path(**changes)``,
``model.fast_path_options``). The code that chooses a kernel takes an options object as an argument; it
never reads the environment itself.

This module imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "packed")
VARLEN_BACKENDS = ("auto", "fa4", "flash", "dense", "loop")
FUSED_LOOP_MODES = ("auto", "on", "off")
FOLD_FAST_MODES = ("auto", "on", "off")
FOLD_KERNELS = ("auto", "torch", "sdpa", "cueq")
FOLD_GRAPHS_MODES = ("auto", "on", "off")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")  # an empty value is "off", as it always was


@dataclass(frozen=True)
class FastPathOptions:
    """Switches of the PyTorch fast path and of ESMFold's trunk. Each field has an environment variable
    (read once, at the first use); a boolean variable takes 1/0, true/false, yes/no, on/off (empty: off), and
    any other value is an error naming the variable.

    - ``attn_implementation`` (``ESM_DUAL_ATTN``: auto, sdpa, packed): how ``EsmModel.forward`` runs.
      "auto": packed (unpadded tokens, varlen attention) on CUDA when the compute dtype is fp16/bf16 (half
      weights or autocast) and the flash kernels take the head size, padded SDPA otherwise; "sdpa": always
      padded; "packed": always packed (off CUDA through block-diagonal SDPA). ``output_attentions`` always
      takes the padded path.
    - ``varlen_backend`` (``ESM_DUAL_VARLEN``: auto, fa4, flash, dense, loop): the varlen attention kernels
      (see :mod:`esm_dual.pt.fast.attention`) wherever a caller asks for "auto".
    - ``fa4`` (``ESM_DUAL_FA4``, default on): "auto" may take FlashAttention-4's kernels (the optional
      ``flash-attn-4`` package, Hopper GPUs).
    - ``triton`` (``ESM_DUAL_NO_TRITON=1`` turns it off; default on): the Triton kernels (rotary, the fused
      q/k/v projection, residual add + LayerNorm). Off, their torch fallbacks run.
    - ``fused_loop`` (``ESM_DUAL_FUSED_LOOP``: auto, on, off): the packed inference loop
      (:func:`esm_dual.pt.fast.encoder.packed_encoder_inference`) instead of the layer modules, in eval mode
      without gradients. "auto": where the Triton kernels run; "on": also elsewhere, through the kernels'
      torch fallbacks (CPU tests); "off": never.
    - ``residual_epilogue`` (``ESM_DUAL_RESIDUAL_EPILOGUE``, default on): in the inference loop, each
      residual add runs in the epilogue of the projection that makes it (``h += x W^T`` in place).
    - ``exact_gelu`` (``ESM_DUAL_EXACT_GELU``, default off): keep the separate exact-erf GELU in half
      precision too, instead of the tanh-form GELU in the FFN GEMM's epilogue.
    - ``triangle_sdpa`` (``ESM_DUAL_TRIANGLE_SDPA``, default on): ESMFold's triangle attention through
      SDPA with the triangle bias as its mask (fp32 outside autocast); off, the explicit scores / softmax.
    - ``fold_fast`` (``ESM_DUAL_FOLD_FAST``: auto, on, off): ESMFold's folding trunk in bf16 under autocast
      ("on"), or in fp32 ("off": the path that matches HF transformers); "auto": bf16 on CUDA, fp32
      elsewhere. The structure module always runs in fp32. ``model.set_fast(True / False / None)``.
    - ``fold_kernels`` (``ESM_DUAL_FOLD_KERNELS``: auto, torch, sdpa, cueq): the kernels of the trunk's
      triangle updates (:mod:`esm_dual.pt.folding.kernels`): "torch" (the fp32 path's), "sdpa" (triangle
      attention through SDPA in any dtype), "cueq" (cuEquivariance's fused kernels on CUDA where installed,
      else "sdpa"); "auto": "cueq" in a bf16 trunk, "torch" in fp32. ``model.set_kernels(...)``.
      The fast mode is a bf16 trunk with kernels other than "torch"; ``model.set_trunk_dtype(torch.bfloat16)``
      is ``fold_fast="on", fold_kernels="torch"``.
    - ``fold_graphs`` (``ESM_DUAL_FOLD_GRAPHS``: auto, on, off): each trunk pass of an ESMFold inference
      fold (blocks, structure module, recycling) replayed from a CUDA graph captured once per input shape
      (:mod:`esm_dual.pt.folding.graphs`), which removes the ~10k kernel launches a pass costs on the CPU.
      "auto": on CUDA, the fast (bf16) trunk's folds of at most ``graphs.AUTO_MAX_PAIRS`` pair entries
      (batch x length^2; longer folds, and the fp32 trunk's, keep the GPU busy without graphs); "on": every
      CUDA inference fold; "off": never. Graphed folds are
      padded to a multiple of 32 residues (``graphs.graph_length``), so nearby lengths share one graph,
      captured at the first fold on that grid point. Training,
      gradients and the CPU always run eagerly.

    ESMFold and the encoder read the options of the model that runs (``model.fast_path_options``); a
    module used on its own (a ``TriangleAttention``) reads the process default (:func:`default_options`).
    """

    attn_implementation: str = "auto"
    varlen_backend: str = "auto"
    fa4: bool = True
    triton: bool = True
    fused_loop: str = "auto"
    residual_epilogue: bool = True
    exact_gelu: bool = False
    triangle_sdpa: bool = True
    fold_fast: str = "auto"
    fold_kernels: str = "auto"
    fold_graphs: str = "auto"

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"FastPathOptions.{name} must be one of {allowed}, got {value!r}")
        for f in fields(self):
            if f.name not in _CHOICES and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"FastPathOptions.{f.name} must be True or False, got {getattr(self, f.name)!r}")

    def replace(self, **changes) -> FastPathOptions:
        """A copy with ``changes`` (field names; an unknown name is an error that lists the fields)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown fast-path option(s) {unknown}; the options are "
                            f"{[f.name for f in fields(self)]}")
        return dataclasses.replace(self, **changes)

    def fold_mode(self, device_type: str) -> tuple[bool, str]:
        """What ESMFold's trunk runs with on a device type ("cuda", "cpu", ...): (bf16 trunk, kernels),
        ``fold_fast`` and ``fold_kernels`` with "auto" resolved."""
        bf16 = self.fold_fast == "on" or (self.fold_fast == "auto" and device_type == "cuda")
        kernels = self.fold_kernels if self.fold_kernels != "auto" else ("cueq" if bf16 else "torch")
        return bf16, kernels

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line: ``attn_implementation=auto, varlen_backend=auto, fa4=on, ...``."""
        def fmt(v):
            return ("on" if v else "off") if isinstance(v, bool) else str(v)

        return ", ".join(f"{k}={fmt(v)}" for k, v in self.as_dict().items())

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> FastPathOptions:
        """The options the ``ESM_DUAL_*`` variables give (unset ones keep their defaults)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, (var, inverted) in ENV_VARIABLES.items():
            raw = env.get(var)
            if raw is None:
                continue
            value = raw.strip().lower()
            if name in _CHOICES:
                if value not in _CHOICES[name]:
                    raise ValueError(f"environment variable {var}={raw!r} is not valid; use one of "
                                     f"{', '.join(_CHOICES[name])}")
                values[name] = value
                continue
            if value in _TRUE:
                flag = True
            elif value in _FALSE:
                flag = False
            else:
                raise ValueError(f"environment variable {var}={raw!r} is not valid; use 1 or 0 "
                                 f"(also true/false, yes/no, on/off)")
            values[name] = (not flag) if inverted else flag
        return cls(**values)


_CHOICES = {"attn_implementation": ATTN_IMPLEMENTATIONS, "varlen_backend": VARLEN_BACKENDS,
            "fused_loop": FUSED_LOOP_MODES, "fold_fast": FOLD_FAST_MODES, "fold_kernels": FOLD_KERNELS,
            "fold_graphs": FOLD_GRAPHS_MODES}
# field -> (environment variable, whether the variable says the opposite of the field)
ENV_VARIABLES = {
    "attn_implementation": ("ESM_DUAL_ATTN", False),
    "varlen_backend": ("ESM_DUAL_VARLEN", False),
    "fa4": ("ESM_DUAL_FA4", False),
    "triton": ("ESM_DUAL_NO_TRITON", True),
    "fused_loop": ("ESM_DUAL_FUSED_LOOP", False),
    "residual_epilogue": ("ESM_DUAL_RESIDUAL_EPILOGUE", False),
    "exact_gelu": ("ESM_DUAL_EXACT_GELU", False),
    "triangle_sdpa": ("ESM_DUAL_TRIANGLE_SDPA", False),
    "fold_fast": ("ESM_DUAL_FOLD_FAST", False),
    "fold_kernels": ("ESM_DUAL_FOLD_KERNELS", False),
    "fold_graphs": ("ESM_DUAL_FOLD_GRAPHS", False),
}

_defaults: FastPathOptions | None = None


def default_options() -> FastPathOptions:
    """The process default: read from the environment at the first call, then kept."""
    global _defaults
    if _defaults is None:
        _defaults = FastPathOptions.from_environment()
    return _defaults


def set_default_options(options: FastPathOptions | None) -> FastPathOptions | None:
    """Replace the process default (None: read the environment again at the next use); returns the
    previous one (None if it was not read yet). Models with their own options keep them."""
    global _defaults
    if options is not None and not isinstance(options, FastPathOptions):
        raise TypeError(f"expected FastPathOptions or None, got {type(options).__name__}")
    previous, _defaults = _defaults, options
    return previous


@contextlib.contextmanager
def override_defaults(**changes) -> Iterator[FastPathOptions]:
    """``with override_defaults(triangle_sdpa=False): ...``: the process default with ``changes``
    inside the block, restored after it."""
    previous = set_default_options(default_options().replace(**changes))
    try:
        yield default_options()
    finally:
        set_default_options(previous)
