"""Model output containers shared by both backends (they hold torch or TF tensors).

Dataclasses with HF's field names that behave like HF's ``ModelOutput``: attribute access, key access
(``out["logits"]``), index access over the fields that are not None (``out[0]``), ``to_tuple()``, and item
assignment (``out["logits"] = x``; a new key such as the ``input_ids`` HF's fill-mask pipeline stores is kept
beside the fields, in ``keys()`` and attribute access). The PyTorch package registers every class as a pytree
node (``esm_dual.pt.pytree``) so ``torch.export``/``torch.compile`` see through them; this module imports
neither torch nor TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class ModelOutput:
    def _present(self) -> list[tuple[str, Any]]:
        items = [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]
        extra = self.__dict__.get("_extra")
        if extra:
            items += [(k, v) for k, v in extra.items() if v is not None]
        return items

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return self.to_dict()[key]
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        """``out["logits"] = x`` sets the field; another string key is added beside the fields (HF's pipelines
        store ``input_ids`` this way)."""
        if not isinstance(key, str):
            raise TypeError(f"{type(self).__name__} keys are strings, got {type(key).__name__}")
        if key in self.field_names():
            setattr(self, key, value)
        else:
            self.__dict__.setdefault("_extra", {})[key] = value

    def __delitem__(self, key: str) -> None:
        raise TypeError(f"You cannot use ``__delitem__`` on a {type(self).__name__} instance.")

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields or methods: the extra keys set by item assignment.
        extra = self.__dict__.get("_extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        return self[key] if key in self.keys() else default

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
