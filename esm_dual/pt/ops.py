"""Framework idioms of the PyTorch model that sit beside the twin, as ``esm_dual/tf/ops.py`` does for Keras:
whether torch is compiling or tracing (data-dependent checks are skipped then), whether hooks observe a
module tree, the value check of an ``attention_mask`` row with no real token, and model inputs given as
numpy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def is_compiling() -> bool:
    """True under torch.compile / torch.export (dynamo), TorchScript or fx tracing: data-dependent checks
    (a device sync and a Python branch on tensor values) are skipped there."""
    try:
        if torch.compiler.is_compiling():
            return True
    except AttributeError:  # pragma: no cover - torch < 2.3
        pass
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    from torch.fx import _symbolic_trace

    symbolic = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None)
    return bool(symbolic()) if symbolic is not None else False


def observed_by_hooks(module: torch.nn.Module) -> bool:
    """True if a forward hook or pre-hook (global, or on ``module`` or any module below it) would see a
    call: paths that do not run the modules' forwards (a replayed CUDA graph) must not run then."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def check_attention_rows(attention_mask: torch.Tensor, name: str = "attention_mask") -> None:
    """A row with no real token (all zeros) would give NaN (token dropout divides by its length) or
    meaningless numbers: a ValueError naming the rows (one device sync; skipped while compiling)."""
    empty = ~attention_mask.bool().any(-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
        raise ValueError(f"{name}: row{'s' if len(rows) > 1 else ''} {shown} of the batch "
                         f"{'have' if len(rows) > 1 else 'has'} no real token (all padding); every sequence needs at "
                         "least one position with attention_mask 1 (<cls> and <eos> count)")


def as_tensor_input(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor | None:
    """A model input as a tensor: tensors pass, numpy arrays (what ``return_tensors="np"`` gives) are converted
    (onto ``device``); anything else is a TypeError naming the argument."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: a numpy array of objects (ragged rows?) cannot be a model input; pad the batch")
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(device) if device is not None else t
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")
