"""The GPU fast path of the PyTorch encoder: packed (unpadded) execution with varlen attention, Triton
kernels and GEMM epilogues, all with torch fallbacks.

- ``options``: :class:`FastPathOptions`, the switches (read once from the ``ESM_DUAL_*`` environment,
  overridable per model with ``model.set_fast_path(**changes)``), ESMFold's trunk's among them.
- ``attention``: varlen attention (FlashAttention-2/-4, SDPA). ``kernels``: rotary, q/k/v, add +
  LayerNorm (Triton). ``epilogues``: bias + GELU and residual adds in GEMM epilogues. ``packing``: packs,
  cu_seqlens, padded <-> packed. ``encoder``: the packed encoder and the checks that let it bypass modules.

``modeling_esm`` calls in through :func:`forward_padded`, :func:`packed_model_forward` and
:func:`packed_self_attention`, imported when first used (this package imports ``modeling_esm``).
"""

from .attention import VarlenInfo, varlen_attention
from .encoder import (
    bypassed_module,
    forward_padded,
    packed_encoder_inference,
    packed_model_forward,
    packed_self_attention,
)
from .options import FastPathOptions, default_options, override_defaults, set_default_options
from .packing import Pack, pack_by_token_budget, pack_sequences, repad, unpad

__all__ = [
    "FastPathOptions",
    "Pack",
    "VarlenInfo",
    "bypassed_module",
    "default_options",
    "forward_padded",
    "override_defaults",
    "pack_by_token_budget",
    "pack_sequences",
    "packed_encoder_inference",
    "packed_model_forward",
    "packed_self_attention",
    "repad",
    "set_default_options",
    "unpad",
    "varlen_attention",
]
