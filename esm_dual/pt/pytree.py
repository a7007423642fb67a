"""The output dataclasses of ``esm_dual.common.outputs`` as torch pytree nodes.

Registered when ``esm_dual.pt`` is imported, so ``torch.export.export``, ``torch.onnx.export(dynamo=True)``,
``torch.compile`` and DDP's ``static_graph`` see the tensors inside a model's output (as for HF's
``ModelOutput``). A node flattens to the fields that are not None (and keys added by item assignment); the
context is their names.
"""

from __future__ import annotations

from typing import Any

import torch.utils._pytree as pytree

from ..common import outputs as _outputs

_REGISTERED: set[type] = set()


def _flatten(out: _outputs.ModelOutput) -> tuple[list[Any], list[str]]:
    items = out.items()
    return [v for _, v in items], [k for k, _ in items]


def _flatten_with_keys(out: _outputs.ModelOutput) -> tuple[list[tuple[Any, Any]], list[str]]:
    values, context = _flatten(out)
    return [(pytree.MappingKey(k), v) for k, v in zip(context, values)], context


def _unflatten(cls: type, values: list[Any], context: list[str]) -> _outputs.ModelOutput:
    names = set(cls.field_names())
    out = cls(**{k: v for k, v in zip(context, values) if k in names})
    for k, v in zip(context, values):
        if k not in names:
            out[k] = v
    return out


def register_output(cls: type) -> None:
    """Register ``cls`` (a dataclass subclass of ``ModelOutput``) as a pytree node; idempotent."""
    if cls in _REGISTERED:
        return
    pytree.register_pytree_node(
        cls,
        _flatten,
        lambda values, context, cls=cls: _unflatten(cls, values, context),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=_flatten_with_keys,
    )
    _REGISTERED.add(cls)


for _cls in (_outputs.BaseModelOutputWithPooling, _outputs.MaskedLMOutput, _outputs.SequenceClassifierOutput,
             _outputs.TokenClassifierOutput):
    register_output(_cls)
