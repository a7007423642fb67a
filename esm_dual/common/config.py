"""Framework-neutral configuration: HF-compatible ``EsmConfig`` and the ESMFold sub-configs.

The classes read and write the HF hub ``config.json`` unchanged: keys we do not model are kept in
``extra`` and written back; keys that the source file did not have are not added on write unless
their value was changed. A config built in Python (not read from a file) writes every field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

CONFIG_NAME = "config.json"

_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
_POSITION_TYPES = ("absolute", "rotary")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# Preset names and hub ids: this module imports nothing of the package, so ``EsmConfig.from_pretrained`` asks
# the resolver that ``esm_dual.io.resolve`` registers when imported (``import esm_dual`` imports it).
_name_resolver: Callable[[str], dict[str, Any] | str] | None = None


def register_name_resolver(resolver: Callable[[str], dict[str, Any] | str]) -> None:
    """Set what ``EsmConfig.from_pretrained`` calls for a name that is not a local path: it returns a
    config dict or the local directory the name stands for."""
    global _name_resolver
    _name_resolver = resolver


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(eq=False)
class _Config:
    """Dataclass config with round-trippable unknown keys and tracked source keys."""

    # key -> nested config class, for sub-configs stored as dicts in JSON
    _sub_configs: ClassVar[dict[str, type]] = {}
    _field_prefix: ClassVar[str] = ""  # how messages name this config's fields ("trunk.", ...)
    # sub-configs that are always present: None (absent from the source) becomes the defaults
    _default_sub_configs: ClassVar[tuple[str, ...]] = ()

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # None: built in Python, write every field. Else: the keys the source dict held.
        self._source_keys: set[str] | None = None
        # For a loaded config: the values, as loaded, of the fields the source did not hold (filled in
        # by defaults or __post_init__). Such a field is written only once its value differs from these.
        self._loaded: dict[str, Any] = {}
        self._normalise()
        self._validate_all()

    def _normalise(self) -> None:
        """Coerce values to their canonical types (sub-config dicts to objects, a missing always-present
        sub-config to its defaults); run on init and copy."""
        for key, cls in self._sub_configs.items():
            val = getattr(self, key)
            if val is None and key in self._default_sub_configs:
                setattr(self, key, cls())
            elif isinstance(val, dict):
                setattr(self, key, cls.from_dict(val))

    def _validate_all(self) -> None:
        """``validate()`` this config, check the sub-config types and validate the sub-configs."""
        self._check_booleans()
        self.validate()
        for key, cls in self._sub_configs.items():
            val = getattr(self, key)
            _check(val is None or isinstance(val, cls), key,
                   f"must be a dict or a {cls.__name__}, got {type(val).__name__}")
            if val is not None:
                val._validate_all()

    def _check_positive_ints(self, names: tuple[str, ...]) -> None:
        for name in names:
            v = getattr(self, name)
            _check(_is_int(v) and v > 0, self._field_prefix + name, f"must be a positive int, got {v!r}")

    def _check_booleans(self) -> None:
        """A ``bool`` field holds True or False (a JSON ``true``/``false``), never ``"false"`` or 0: a string
        would be truthy and silently turn a feature on."""
        for f in dataclasses.fields(self):
            if f.type not in ("bool", "bool | None"):
                continue
            v = getattr(self, f.name)
            if v is None and f.type == "bool | None":
                continue
            _check(isinstance(v, bool), self._field_prefix + f.name,
                   f"must be true or false (a JSON boolean), got {type(v).__name__} {v!r}")

    # ---- field helpers -------------------------------------------------------------------------
    @classmethod
    def _field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    # ---- dict / json ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a dict, got {type(d).__name__}")
        d = {**copy.deepcopy(d), **overrides}
        names = set(cls._field_names())
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        known = cls._normalise_known(known, extra)
        obj = cls(**known, extra=extra)
        obj._source_keys = set(known)  # incl. keys _normalise_known derived (id2label from num_labels)
        obj._loaded = {n: _snapshot(getattr(obj, n)) for n in cls._field_names() if n not in obj._source_keys}
        return obj

    @classmethod
    def _normalise_known(cls, known: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        return known

    def to_dict(self) -> dict[str, Any]:
        defaults = self._defaults()
        out: dict[str, Any] = {}
        for name in self._field_names():
            val = getattr(self, name)
            keep = (
                self._source_keys is None
                or name in self._source_keys
                or not _equal(_snapshot(val), self._loaded.get(name, defaults.get(name, dataclasses.MISSING)))
            )
            if not keep:
                continue
            out[name] = val.to_dict() if isinstance(val, _Config) else copy.deepcopy(val)
        out = self._extra_to_dict(out)
        for k, v in self.extra.items():
            out[k] = copy.deepcopy(v)
        return out

    def _extra_to_dict(self, out: dict[str, Any]) -> dict[str, Any]:
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def copy(self, **changes: Any):
        new = copy.deepcopy(self)
        for k, v in changes.items():
            if k not in self._field_names():
                raise ConfigError(f"{type(self).__name__} has no field {k!r}")
            setattr(new, k, copy.deepcopy(v))
        new._normalise()
        new._validate_all()
        return new

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()  # type: ignore[union-attr]


def _snapshot(v: Any) -> Any:
    return v.to_dict() if isinstance(v, _Config) else copy.deepcopy(v)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, _Config):
        return False  # sub-configs are always written when present
    return a == b and (type(a) is type(b) or (_is_num(a) and _is_num(b)))


# ================================================================================================
# ESMFold sub-configs
# ================================================================================================


@dataclass(eq=False)
class StructureModuleConfig(_Config):
    """Structure module (IPA) hyperparameters, as in HF's ``StructureModuleConfig``."""

    _field_prefix: ClassVar[str] = "structure_module."

    sequence_dim: int = 384
    pairwise_dim: int = 128
    ipa_dim: int = 16
    resnet_dim: int = 128
    num_heads_ipa: int = 12
    num_qk_points: int = 4
    num_v_points: int = 8
    dropout_rate: float = 0.1
    num_blocks: int = 8
    num_transition_layers: int = 1
    num_resnet_blocks: int = 2
    num_angles: int = 7
    trans_scale_factor: int = 10
    epsilon: float = 1e-8
    inf: float = 1e5

    def validate(self) -> None:
        self._check_positive_ints((
            "sequence_dim", "pairwise_dim", "ipa_dim", "resnet_dim", "num_heads_ipa", "num_qk_points",
            "num_v_points", "num_blocks", "num_transition_layers", "num_resnet_blocks", "num_angles",
        ))
        _check(
            _is_num(self.dropout_rate) and 0 <= self.dropout_rate < 1,
            "structure_module.dropout_rate", f"must be in [0, 1), got {self.dropout_rate!r}",
        )
        _check(_is_num(self.trans_scale_factor) and self.trans_scale_factor > 0,
               "structure_module.trans_scale_factor", f"must be > 0, got {self.trans_scale_factor!r}")
        _check(_is_num(self.epsilon) and self.epsilon > 0, "structure_module.epsilon",
               f"must be > 0, got {self.epsilon!r}")
        _check(_is_num(self.inf) and self.inf > 0, "structure_module.inf", f"must be > 0, got {self.inf!r}")


@dataclass(eq=False)
class TrunkConfig(_Config):
    """Folding trunk hyperparameters, as in HF's ``TrunkConfig``."""

    _sub_configs: ClassVar[dict[str, type]] = {"structure_module": StructureModuleConfig}
    _default_sub_configs: ClassVar[tuple[str, ...]] = ("structure_module",)
    _field_prefix: ClassVar[str] = "trunk."

    num_blocks: int = 48
    sequence_state_dim: int = 1024
    pairwise_state_dim: int = 128
    sequence_head_width: int = 32
    pairwise_head_width: int = 32
    position_bins: int = 32
    dropout: float = 0.0
    layer_drop: float = 0.0
    cpu_grad_checkpoint: bool = False
    max_recycles: int = 4
    chunk_size: int | None = 128
    structure_module: StructureModuleConfig | None = None

    def validate(self) -> None:
        self._check_positive_ints(("num_blocks", "sequence_state_dim", "pairwise_state_dim", "sequence_head_width",
                                   "pairwise_head_width", "position_bins"))
        _check(self.pairwise_state_dim % 2 == 0, "trunk.pairwise_state_dim",
               f"must be even, got {self.pairwise_state_dim}")
        _check(self.sequence_state_dim % self.sequence_head_width == 0, "trunk.sequence_state_dim",
               f"must be a multiple of sequence_head_width ({self.sequence_head_width}), "
               f"got {self.sequence_state_dim}")
        _check(self.pairwise_state_dim % self.pairwise_head_width == 0, "trunk.pairwise_state_dim",
               f"must be a multiple of pairwise_head_width ({self.pairwise_head_width}), "
               f"got {self.pairwise_state_dim}")
        _check(_is_num(self.dropout) and 0 <= self.dropout <= 0.4, "trunk.dropout",
               f"must be in [0, 0.4], got {self.dropout!r}")
        _check(_is_num(self.layer_drop) and 0 <= self.layer_drop < 1, "trunk.layer_drop",
               f"must be in [0, 1), got {self.layer_drop!r}")
        _check(_is_int(self.max_recycles) and self.max_recycles >= 0, "trunk.max_recycles",
               f"must be an int >= 0, got {self.max_recycles!r}")
        _check(self.chunk_size is None or (_is_int(self.chunk_size) and self.chunk_size > 0),
               "trunk.chunk_size", f"must be None or a positive int, got {self.chunk_size!r}")

    @property
    def sequence_num_heads(self) -> int:
        return self.sequence_state_dim // self.sequence_head_width

    @property
    def pairwise_num_heads(self) -> int:
        return self.pairwise_state_dim // self.pairwise_head_width


@dataclass(eq=False)
class EsmFoldConfig(_Config):
    """ESMFold head configuration, as in HF's ``EsmFoldConfig``."""

    _sub_configs: ClassVar[dict[str, type]] = {"trunk": TrunkConfig}
    _default_sub_configs: ClassVar[tuple[str, ...]] = ("trunk",)
    _field_prefix: ClassVar[str] = "esmfold_config."

    esm_type: str | None = None
    fp16_esm: bool = True
    use_esm_attn_map: bool = False
    esm_ablate_pairwise: bool = False
    esm_ablate_sequence: bool = False
    esm_input_dropout: float = 0.0
    embed_aa: bool = True
    bypass_lm: bool = False
    lddt_head_hid_dim: int = 128
    trunk: TrunkConfig | None = None

    def validate(self) -> None:
        _check(not self.use_esm_attn_map, "esmfold_config.use_esm_attn_map",
               "True is not supported (the released ESMFold does not use ESM attention maps)")
        _check(_is_num(self.esm_input_dropout) and 0 <= self.esm_input_dropout < 1,
               "esmfold_config.esm_input_dropout", f"must be in [0, 1), got {self.esm_input_dropout!r}")
        _check(_is_int(self.lddt_head_hid_dim) and self.lddt_head_hid_dim > 0,
               "esmfold_config.lddt_head_hid_dim", f"must be a positive int, got {self.lddt_head_hid_dim!r}")


# ================================================================================================
# EsmConfig
# ================================================================================================

# The 33-token ESM alphabet (ESM-1b / ESM-1v / ESM-2 / ESMFold), in id order.
DEFAULT_VOCAB: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
)


@dataclass(eq=False)
class EsmConfig(_Config):
    """Configuration of an ESM encoder (ESM-1b, ESM-1v, ESM-2) and of ESMFold.

    Every field and default of ``transformers.EsmConfig``; reads and writes ``config.json``.
    """

    _sub_configs: ClassVar[dict[str, type]] = {"esmfold_config": EsmFoldConfig}

    vocab_size: int | None = None
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 1026
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    use_cache: bool = True
    emb_layer_norm_before: bool | None = None
    token_dropout: bool = False
    is_folding_model: bool = False
    esmfold_config: EsmFoldConfig | None = None
    vocab_list: list[str] | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = 2
    # From HF's PretrainedConfig, used by the task heads.
    classifier_dropout: float | None = None
    problem_type: str | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    architectures: list[str] | None = None
    model_type: str = "esm"
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.is_folding_model and self.esmfold_config is None:
            self.esmfold_config = EsmFoldConfig()
        if self.is_folding_model and self.vocab_list is None:
            self.vocab_list = list(DEFAULT_VOCAB)
        super().__post_init__()

    def _normalise(self) -> None:
        # JSON object keys are strings: id2label {"0": "A"} -> {0: "A"}; label2id values -> int.
        if self.id2label is not None:
            _check(isinstance(self.id2label, dict), "id2label",
                   f"must be a dict, got {type(self.id2label).__name__}")
            try:
                self.id2label = {int(k): v for k, v in self.id2label.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"id2label: keys must be integers, got {list(self.id2label)}") from None
        if self.label2id is not None:
            _check(isinstance(self.label2id, dict), "label2id",
                   f"must be a dict, got {type(self.label2id).__name__}")
            try:
                self.label2id = {k: int(v) for k, v in self.label2id.items()}
            except (TypeError, ValueError):
                raise ConfigError(
                    f"label2id: values must be integers, got {list(self.label2id.values())}"
                ) from None
        if isinstance(self.vocab_list, tuple):  # HF's default vocab is a tuple; JSON holds a list
            self.vocab_list = list(self.vocab_list)
        super()._normalise()

    # JSON keys of id2label are strings; HF writes them that way.
    def _extra_to_dict(self, out: dict[str, Any]) -> dict[str, Any]:
        if out.get("id2label") is not None:
            out["id2label"] = {str(k): v for k, v in out["id2label"].items()}
        return out

    @classmethod
    def _normalise_known(cls, known: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        # `num_labels` may be given instead of id2label (HF's kwargs); it is not a JSON key of its own.
        # If the dict also has id2label, id2label wins (as in HF's PretrainedConfig.__init__).
        if "num_labels" in extra:
            n = extra.pop("num_labels")
            _check(_is_int(n) and n > 0, "num_labels", f"must be a positive int, got {n!r}")
            if known.get("id2label") is None:
                known["id2label"] = {i: f"LABEL_{i}" for i in range(n)}
                known["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        return known

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> EsmConfig:
        # An explicit num_labels override beats the dict's id2label (as HF's from_pretrained kwargs do).
        num_labels = overrides.pop("num_labels", None)
        obj = super().from_dict(d, **overrides)
        if num_labels is not None:
            obj.num_labels = num_labels
        return obj

    # ---- derived ------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return 2 if self.id2label is None else len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        _check(_is_int(n) and n > 0, "num_labels", f"must be a positive int, got {n!r}")
        if self.id2label is None or len(self.id2label) != n:  # as HF: same count keeps the names
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
            self.label2id = {f"LABEL_{i}": i for i in range(n)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_rotary(self) -> bool:
        return self.position_embedding_type == "rotary"

    @property
    def max_sequence_positions(self) -> int | None:
        """Longest token sequence (incl. BOS/EOS) a learned-position model accepts; None for rotary."""
        if self.position_embedding_type != "absolute":
            return None
        return self.max_position_embeddings - (self.pad_token_id or 0) - 1

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        _check(self.vocab_size is None or (_is_int(self.vocab_size) and self.vocab_size > 0),
               "vocab_size", f"must be a positive int, got {self.vocab_size!r}")
        self._check_positive_ints(("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "max_position_embeddings"))
        _check(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
               f"{self.hidden_size} is not a multiple of num_attention_heads ({self.num_attention_heads})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            v = getattr(self, name)
            _check(_is_num(v) and 0 <= v < 1, name, f"must be in [0, 1), got {v!r}")
        _check(self.classifier_dropout is None or (_is_num(self.classifier_dropout)
                                                   and 0 <= self.classifier_dropout < 1),
               "classifier_dropout", f"must be None or in [0, 1), got {self.classifier_dropout!r}")
        _check(_is_num(self.layer_norm_eps) and self.layer_norm_eps > 0, "layer_norm_eps",
               f"must be > 0, got {self.layer_norm_eps!r}")
        _check(_is_num(self.initializer_range) and self.initializer_range >= 0, "initializer_range",
               f"must be >= 0, got {self.initializer_range!r}")
        _check(self.position_embedding_type in _POSITION_TYPES, "position_embedding_type",
               f"must be one of {_POSITION_TYPES}, got {self.position_embedding_type!r}")
        if self.position_embedding_type == "rotary":
            _check(_is_num(self.rope_theta) and self.rope_theta > 0, "rope_theta",
                   f"must be > 0, got {self.rope_theta!r}")
            _check(self.head_dim % 2 == 0, "hidden_size",
                   f"rotary embeddings need an even head dim, got {self.hidden_size}/"
                   f"{self.num_attention_heads} = {self.head_dim}")
        for name in ("pad_token_id", "mask_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is None:
                continue
            # HF allows a list of ids for eos_token_id only.
            ids = v if name == "eos_token_id" and isinstance(v, list) else [v]
            for i in ids:
                _check(_is_int(i) and i >= 0, name, f"must be a non-negative int, got {v!r}")
                if self.vocab_size is not None:
                    _check(i < self.vocab_size, name,
                           f"{i} is outside the vocabulary (vocab_size={self.vocab_size})")
        if self.token_dropout:
            _check(self.mask_token_id is not None, "token_dropout", "needs mask_token_id to be set")
        if self.position_embedding_type == "absolute" and self.pad_token_id is not None:
            _check(self.max_position_embeddings > self.pad_token_id + 1, "max_position_embeddings",
                   f"must exceed pad_token_id + 1 = {self.pad_token_id + 1} for learned positions, "
                   f"got {self.max_position_embeddings}")
        if self.vocab_list is not None:
            _check(isinstance(self.vocab_list, (list, tuple))
                   and all(isinstance(t, str) for t in self.vocab_list)
                   and len(set(self.vocab_list)) == len(self.vocab_list),
                   "vocab_list", f"must be a list of distinct token strings, got {self.vocab_list!r}")
            if self.vocab_size is not None:
                _check(len(self.vocab_list) == self.vocab_size, "vocab_list",
                       f"has {len(self.vocab_list)} tokens but vocab_size is {self.vocab_size}")
        _check(self.problem_type is None or self.problem_type in _PROBLEM_TYPES, "problem_type",
               f"must be None or one of {_PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.id2label is not None:
            _check(sorted(self.id2label) == list(range(len(self.id2label))), "id2label",
                   f"keys must be 0..n-1, got {sorted(self.id2label)}")
        _check(self.hidden_act == "gelu", "hidden_act",
               f"ESM uses the exact erf GELU; got {self.hidden_act!r}")
        _check(not self.is_decoder, "is_decoder", "ESM is an encoder; True is not supported")
        _check(not self.add_cross_attention, "add_cross_attention", "not supported by ESM")
        _check(self.model_type == "esm", "model_type", f"expected 'esm', got {self.model_type!r}")
        if self.is_folding_model:
            _check(isinstance(self.esmfold_config, EsmFoldConfig), "esmfold_config",
                   "a folding model needs an esmfold_config")

    # ---- files --------------------------------------------------------------------------------
    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> EsmConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config file at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> EsmConfig:
        """Read ``config.json`` from a directory, a file path, a preset name or a hub id."""
        p = os.fspath(path)
        if os.path.isdir(p):
            return cls.from_json_file(os.path.join(p, CONFIG_NAME), **overrides)
        if os.path.isfile(p):
            return cls.from_json_file(p, **overrides)
        if _name_resolver is None:  # esm_dual.io.resolve registers it; `import esm_dual` imports that
            raise FileNotFoundError(f"no config file or directory at {p}")
        found = _name_resolver(p)  # a preset's config (dict) or the local directory of a hub id
        if isinstance(found, dict):
            return cls.from_dict(found, **overrides)
        return cls.from_json_file(os.path.join(found, CONFIG_NAME), **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path


# ================================================================================================
# The weights' dtype recorded in config.json (transformers 5: "dtype"; older files: "torch_dtype")
# ================================================================================================

_RECORDED_DTYPES = ("float32", "float16", "bfloat16", "float64")


def recorded_dtype(config: EsmConfig) -> str | None:
    """The weights' dtype that ``config.json`` records (``"dtype"``, else the older ``"torch_dtype"``), as
    ``"float32"`` / ``"float16"`` / ``"bfloat16"`` / ``"float64"``; None when absent or not one of those."""
    for key in ("dtype", "torch_dtype"):
        value = config.extra.get(key)
        if isinstance(value, str) and value.replace("torch.", "") in _RECORDED_DTYPES:
            return value.replace("torch.", "")
    return None


def with_recorded_dtype(config: EsmConfig, dtype: str) -> EsmConfig:
    """A copy of ``config`` that records ``dtype`` as transformers 5's ``save_pretrained`` does (key
    ``"dtype"``; an older ``"torch_dtype"`` key is dropped so that the two cannot disagree)."""
    out = config.copy()
    out.extra.pop("torch_dtype", None)
    out.extra["dtype"] = dtype
    return out
