"""Model output containers shared by both backends (they hold torch or TF tensors).

Dataclasses with HF's field names; attribute access, key access (``out["logits"]``) and index
access over the fields that are not None (``out[0]``) all work, as with HF's ``ModelOutput``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class ModelOutput:
    def _present(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._present())

    def keys(self) -> list[str]:
        return [k for k, _ in self._present()]

    def values(self) -> list[Any]:
        return [v for _, v in self._present()]

    def items(self) -> list[tuple[str, Any]]:
        return self._present()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in self.keys() else default

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for _, v in self._present())

    def to_dict(self) -> dict[str, Any]:
        return dict(self._present())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.keys())})"


@dataclass(repr=False)
class BaseModelOutputWithPooling(ModelOutput):
    """``last_hidden_state`` [B, L, D] (after the final LayerNorm); ``pooler_output`` [B, D] when the
    model has a pooler; ``hidden_states``: num_layers + 1 tensors [B, L, D] (embeddings, each layer,
    the last one after ``emb_layer_norm_after``); ``attentions``: num_layers tensors [B, H, L, L]."""

    last_hidden_state: Any = None
    pooler_output: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass(repr=False)
class _TaskOutput(ModelOutput):
    loss: Any = None
    logits: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


class MaskedLMOutput(_TaskOutput):
    """``loss`` scalar (labels given, -100 ignored); ``logits`` [B, L, V] ([T, V] packed)."""


class SequenceClassifierOutput(_TaskOutput):
    """``loss`` scalar (labels given); ``logits`` [B, num_labels]."""


class TokenClassifierOutput(_TaskOutput):
    """``loss`` scalar (labels given, -100 ignored); ``logits`` [B, L, num_labels]."""
