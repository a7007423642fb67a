"""EsmConfig and the ESMFold sub-configs: validation, HF parity of fields/defaults, JSON round trips."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esm_dual.common.config import (
    CONFIG_NAME,
    DEFAULT_VOCAB,
    ConfigError,
    EsmConfig,
    EsmFoldConfig,
    StructureModuleConfig,
    TrunkConfig,
)

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
EXPECTED_FIXTURES = (
    "esm1b_t33_650M_UR50S.json",
    "esm1v_t33_650M_UR90S_1.json",
    "esm2_t6_8M_UR50D.json",
    "esm2_t12_35M_UR50D.json",
    "esm2_t30_150M_UR50D.json",
    "esm2_t33_650M_UR50D.json",
    "esm2_t36_3B_UR50D.json",
    "esm2_t48_15B_UR50D.json",
    "esmfold_v1.json",
)
FIXTURE_FILES = sorted(FIXTURE_DIR.glob("*.json")) if FIXTURE_DIR.is_dir() else []

# Tiny configs in the three flavours (odd sizes: 3 heads, head dim 6).
_TINY = dict(
    vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=18, num_hidden_layers=3,
    num_attention_heads=3, intermediate_size=37, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5, max_position_embeddings=1026,
)
ESM2_LIKE = dict(_TINY, position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False)
ESM1B_LIKE = dict(_TINY, position_embedding_type="absolute", token_dropout=True, emb_layer_norm_before=True)
FOLDING_LIKE = dict(
    ESM2_LIKE,
    is_folding_model=True,
    vocab_list=list(DEFAULT_VOCAB),
    esmfold_config=dict(
        esm_type="esm2_tiny", fp16_esm=False, lddt_head_hid_dim=16,
        trunk=dict(
            num_blocks=2, sequence_state_dim=24, pairwise_state_dim=16, sequence_head_width=8,
            pairwise_head_width=8, position_bins=8, max_recycles=1, chunk_size=None,
            structure_module=dict(sequence_dim=24, pairwise_dim=16, ipa_dim=6, num_blocks=2, num_heads_ipa=3),
        ),
    ),
)
FLAVOURS = {"esm2": ESM2_LIKE, "esm1b": ESM1B_LIKE, "folding": FOLDING_LIKE}


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.name != "extra"}


def _read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _err(field: str) -> str:
    """Regex for a ConfigError message that starts by naming ``field``."""
    return rf"^{re.escape(field)}: "


# ================================================================================================
# Validation: one case per rule
# ================================================================================================

# (id, field named in the message, changes to ESM2_LIKE). Every rule of EsmConfig.validate / _normalise.
ESM_BAD = [
    ("vocab_size", "vocab_size", dict(vocab_size=0)),
    ("hidden_size-positive", "hidden_size", dict(hidden_size=0)),
    ("num_hidden_layers", "num_hidden_layers", dict(num_hidden_layers=0)),
    ("num_attention_heads", "num_attention_heads", dict(num_attention_heads=-3)),
    ("intermediate_size", "intermediate_size", dict(intermediate_size=0)),
    ("max_position_embeddings-positive", "max_position_embeddings", dict(max_position_embeddings=0)),
    ("int-not-bool", "num_hidden_layers", dict(num_hidden_layers=True)),
    ("hidden_size-multiple-of-heads", "hidden_size", dict(hidden_size=20)),
    ("hidden_dropout_prob", "hidden_dropout_prob", dict(hidden_dropout_prob=1.0)),
    ("attention_probs_dropout_prob", "attention_probs_dropout_prob", dict(attention_probs_dropout_prob=-0.1)),
    ("classifier_dropout", "classifier_dropout", dict(classifier_dropout=1.0)),
    ("layer_norm_eps", "layer_norm_eps", dict(layer_norm_eps=0.0)),
    ("initializer_range", "initializer_range", dict(initializer_range=-0.02)),
    ("position_embedding_type", "position_embedding_type", dict(position_embedding_type="relative_key")),
    ("rope_theta", "rope_theta", dict(rope_theta=0.0)),
    ("rotary-even-head-dim", "hidden_size", dict(hidden_size=15)),
    ("pad_token_id-negative", "pad_token_id", dict(pad_token_id=-1)),
    ("mask_token_id-negative", "mask_token_id", dict(mask_token_id=-1)),
    ("bos_token_id-not-int", "bos_token_id", dict(bos_token_id="0")),
    ("eos_token_id-negative", "eos_token_id", dict(eos_token_id=-1)),
    ("pad_token_id-outside-vocab", "pad_token_id", dict(pad_token_id=33)),
    ("mask_token_id-outside-vocab", "mask_token_id", dict(mask_token_id=40)),
    ("bos_token_id-outside-vocab", "bos_token_id", dict(bos_token_id=33)),
    ("eos_token_id-outside-vocab", "eos_token_id", dict(eos_token_id=33)),
    ("eos_token_id-list-outside-vocab", "eos_token_id", dict(eos_token_id=[2, 33])),
    ("token_dropout-needs-mask", "token_dropout", dict(token_dropout=True, mask_token_id=None)),
    ("max_position_embeddings-vs-pad", "max_position_embeddings",
     dict(position_embedding_type="absolute", pad_token_id=1, max_position_embeddings=2)),
    ("vocab_list-distinct", "vocab_list", dict(vocab_size=None, vocab_list=["A", "A"])),
    ("vocab_list-type", "vocab_list", dict(vocab_size=None, vocab_list="ACDE")),
    ("vocab_list-length", "vocab_list", dict(vocab_list=list(DEFAULT_VOCAB)[:-1])),
    ("problem_type", "problem_type", dict(problem_type="ranking")),
    ("id2label-keys-range", "id2label", dict(id2label={0: "a", 2: "b"})),
    ("id2label-keys-int", "id2label", dict(id2label={"x": "a"})),
    ("id2label-type", "id2label", dict(id2label=["a", "b"])),
    ("label2id-values-int", "label2id", dict(label2id={"a": "first"})),
    ("hidden_act", "hidden_act", dict(hidden_act="relu")),
    ("is_decoder", "is_decoder", dict(is_decoder=True)),
    ("add_cross_attention", "add_cross_attention", dict(add_cross_attention=True)),
    ("model_type", "model_type", dict(model_type="bert")),
    ("esmfold_config-type", "esmfold_config", dict(esmfold_config="not a config")),
]

STRUCTURE_BAD = [
    *[(f"{n}-positive-int", f"structure_module.{n}", {n: 0}) for n in (
        "sequence_dim", "pairwise_dim", "ipa_dim", "resnet_dim", "num_heads_ipa", "num_qk_points",
        "num_v_points", "num_blocks", "num_transition_layers", "num_resnet_blocks", "num_angles")],
    ("ipa_dim-float", "structure_module.ipa_dim", dict(ipa_dim=16.0)),
    ("dropout_rate", "structure_module.dropout_rate", dict(dropout_rate=1.0)),
    ("trans_scale_factor", "structure_module.trans_scale_factor", dict(trans_scale_factor=0)),
    ("epsilon", "structure_module.epsilon", dict(epsilon=0.0)),
    ("inf", "structure_module.inf", dict(inf=-1.0)),
]

TRUNK_BAD = [
    *[(f"{n}-positive-int", f"trunk.{n}", {n: 0}) for n in (
        "num_blocks", "sequence_state_dim", "pairwise_state_dim", "sequence_head_width",
        "pairwise_head_width", "position_bins")],
    ("pairwise_state_dim-even", "trunk.pairwise_state_dim",
     dict(pairwise_state_dim=33, pairwise_head_width=11)),
    ("sequence_state_dim-multiple", "trunk.sequence_state_dim", dict(sequence_state_dim=1001)),
    ("pairwise_state_dim-multiple", "trunk.pairwise_state_dim", dict(pairwise_state_dim=130)),
    ("dropout", "trunk.dropout", dict(dropout=0.41)),
    ("layer_drop", "trunk.layer_drop", dict(layer_drop=1.0)),
    ("max_recycles", "trunk.max_recycles", dict(max_recycles=-1)),
    ("chunk_size", "trunk.chunk_size", dict(chunk_size=0)),
    ("structure_module-type", "structure_module", dict(structure_module=3)),
]

FOLD_BAD = [
    ("use_esm_attn_map", "esmfold_config.use_esm_attn_map", dict(use_esm_attn_map=True)),
    ("esm_input_dropout", "esmfold_config.esm_input_dropout", dict(esm_input_dropout=1.0)),
    ("lddt_head_hid_dim", "esmfold_config.lddt_head_hid_dim", dict(lddt_head_hid_dim=0)),
    ("trunk-type", "trunk", dict(trunk="big")),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("_id,field,changes", ESM_BAD, ids=_ids(ESM_BAD))
@pytest.mark.parametrize("how", ["init", "from_dict"])
def test_esm_config_rule(_id, field, changes, how):
    kwargs = {**ESM2_LIKE, **changes}
    with pytest.raises(ConfigError, match=_err(field)):
        EsmConfig(**kwargs) if how == "init" else EsmConfig.from_dict(kwargs)


DIRECT_BAD = (
    [(StructureModuleConfig, *c) for c in STRUCTURE_BAD]
    + [(TrunkConfig, *c) for c in TRUNK_BAD]
    + [(EsmFoldConfig, *c) for c in FOLD_BAD]
)


@pytest.mark.parametrize(
    "cls,_id,field,changes", DIRECT_BAD, ids=[f"{c[0].__name__}-{c[1]}" for c in DIRECT_BAD]
)
def test_subconfig_rule_direct(cls, _id, field, changes):
    with pytest.raises(ConfigError, match=_err(field)):
        cls(**changes)
    with pytest.raises(ConfigError, match=_err(field)):
        cls.from_dict(changes)


def _nested(level: str, changes: dict) -> dict:
    """A folding-model dict with ``changes`` placed at ``level`` of esmfold_config."""
    d = copy.deepcopy(FOLDING_LIKE)
    fold = d["esmfold_config"]
    trunk = fold["trunk"]
    target = {"esmfold": fold, "trunk": trunk, "structure_module": trunk["structure_module"]}[level]
    target.update(changes)
    return d


NESTED_BAD = (
    [("structure_module", *c) for c in STRUCTURE_BAD]
    + [("trunk", *c) for c in TRUNK_BAD]
    + [("esmfold", *c) for c in FOLD_BAD]
)


@pytest.mark.parametrize("level,_id,field,changes", NESTED_BAD, ids=[f"{c[0]}-{c[1]}" for c in NESTED_BAD])
def test_subconfig_rule_nested_in_esm_from_dict(level, _id, field, changes, tmp_path):
    d = _nested(level, changes)
    with pytest.raises(ConfigError, match=_err(field)):
        EsmConfig.from_dict(d)
    with pytest.raises(ConfigError, match=_err(field)):
        EsmConfig(**d)
    # Read from a file, the message names the file and the field.
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        EsmConfig.from_pretrained(tmp_path)
    assert str(path) in str(e.value) and f"{field}: " in str(e.value)


def test_folding_model_needs_esmfold_config():
    cfg = EsmConfig(**FOLDING_LIKE)
    with pytest.raises(ConfigError, match=_err("esmfold_config")):
        cfg.copy(esmfold_config=None)
    cfg.esmfold_config = None
    with pytest.raises(ConfigError, match=_err("esmfold_config")):
        cfg.validate()


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


ESM_VALID_EDGES = [
    dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.999),
    dict(classifier_dropout=0.0),
    dict(classifier_dropout=0.999),
    dict(initializer_range=0),
    dict(layer_norm_eps=1e-12),
    dict(vocab_size=None, vocab_list=None),
    dict(pad_token_id=0, mask_token_id=32, bos_token_id=0, eos_token_id=32),
    dict(eos_token_id=None),
    dict(eos_token_id=[2, 32]),
    dict(position_embedding_type="absolute", pad_token_id=1, max_position_embeddings=3),
    dict(position_embedding_type="rotary", max_position_embeddings=1),
    dict(position_embedding_type="absolute", hidden_size=15),  # odd head dim is fine without rotary
    dict(hidden_size=6, num_attention_heads=3, rope_theta=1e-3),  # head dim 2
    dict(token_dropout=False, mask_token_id=None),
    dict(vocab_list=list(DEFAULT_VOCAB)),
    dict(vocab_list=tuple(DEFAULT_VOCAB)),
    dict(problem_type="regression"),
    dict(problem_type="single_label_classification"),
    dict(problem_type="multi_label_classification"),
    dict(id2label={0: "only"}, label2id={"only": 0}),
    dict(id2label={"0": "neg", "1": "pos"}, label2id={"neg": "0", "pos": 1}),
    dict(hidden_size=1, num_attention_heads=1, num_hidden_layers=1, intermediate_size=1,
         position_embedding_type="absolute"),
    dict(emb_layer_norm_before=None, is_folding_model=False, esmfold_config=None),
]


@pytest.mark.parametrize("changes", ESM_VALID_EDGES, ids=lambda c: ",".join(c))
def test_esm_config_valid_edges(changes):
    cfg = EsmConfig(**{**ESM2_LIKE, **changes})
    assert EsmConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "cls,changes",
    [
        (StructureModuleConfig, dict(dropout_rate=0.0, trans_scale_factor=1, epsilon=1e-30, inf=1.0)),
        (StructureModuleConfig, dict(dropout_rate=0.999, ipa_dim=1, num_angles=1)),
        (TrunkConfig, dict(dropout=0.4, layer_drop=0.0, max_recycles=0, chunk_size=None)),
        (TrunkConfig, dict(dropout=0, layer_drop=0.999, chunk_size=1)),
        (TrunkConfig, dict(pairwise_state_dim=2, pairwise_head_width=2, sequence_state_dim=5,
                           sequence_head_width=5, num_blocks=1, position_bins=1)),
        (EsmFoldConfig, dict(esm_input_dropout=0.0, lddt_head_hid_dim=1)),
        (EsmFoldConfig, dict(esm_input_dropout=0.999, esm_type=None)),
    ],
)
def test_subconfig_valid_edges(cls, changes):
    cfg = cls(**changes)
    assert cls.from_dict(cfg.to_dict()) == cfg


# ================================================================================================
# HF parity: every field and default of transformers' classes
# ================================================================================================

try:
    import transformers
    from transformers.models.esm import configuration_esm as hf_esm
except ImportError:  # a test dependency; only the tests below that compare with it are skipped
    transformers = hf_esm = None

needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers")
_HF_BASE = None if transformers is None else (
    getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
)
_OURS = (EsmConfig, EsmFoldConfig, TrunkConfig, StructureModuleConfig)
HF_PAIRS = [
    pytest.param(ours, None if hf_esm is None else getattr(hf_esm, ours.__name__), id=ours.__name__)
    for ours in _OURS
]
# PretrainedConfig fields that our EsmConfig models because the task heads use them.
HEAD_FIELDS = ("problem_type", "id2label", "label2id", "architectures")


def _dataclass_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = dataclasses.MISSING
    return out


def _hf_own_defaults(hf_cls) -> dict:
    """Fields (name -> default) that the HF class declares beyond PretrainedConfig's generic ones."""
    if dataclasses.is_dataclass(hf_cls):  # transformers >= 5 (and the v4 ESMFold sub-configs)
        out = _dataclass_defaults(hf_cls)
        if dataclasses.is_dataclass(_HF_BASE) and issubclass(hf_cls, _HF_BASE):
            for name in _dataclass_defaults(_HF_BASE):
                out.pop(name, None)
        return out
    params = inspect.signature(hf_cls.__init__).parameters  # transformers 4.x EsmConfig
    return {
        n: p.default for n, p in params.items()
        if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def _norm(v):
    if isinstance(v, tuple):
        return list(v)
    return v


def _same_value(ours, hf) -> bool:
    ours, hf = _norm(ours), _norm(hf)
    if isinstance(ours, bool) or isinstance(hf, bool):
        return type(ours) is type(hf) and ours == hf
    return ours == hf


def _assert_matches_hf(ours, hf, prefix: str = "") -> None:
    """Every HF-declared field of ``hf`` has the same value in ``ours`` (recursing into sub-configs)."""
    for name in _hf_own_defaults(type(hf)):
        assert hasattr(ours, name), f"{prefix}{name} missing in ours"
        ov, hv = getattr(ours, name), getattr(hf, name)
        if dataclasses.is_dataclass(ov) and not isinstance(ov, type):
            assert hv is not None, f"{prefix}{name}: ours has a sub-config, HF has None"
            _assert_matches_hf(ov, hv, f"{prefix}{name}.")
        else:
            assert _same_value(ov, hv), f"{prefix}{name}: ours {ov!r} != HF {hv!r}"


@needs_hf
@pytest.mark.parametrize("ours_cls,hf_cls", HF_PAIRS)
def test_every_hf_field_exists_with_same_default(ours_cls, hf_cls):
    hf_defaults = _hf_own_defaults(hf_cls)
    assert hf_defaults, f"could not read {hf_cls.__name__}'s fields"
    ours_defaults = _dataclass_defaults(ours_cls)
    missing = sorted(set(hf_defaults) - set(ours_defaults))
    assert not missing, f"{ours_cls.__name__} lacks HF fields {missing}"
    for name, hv in hf_defaults.items():
        ov = ours_defaults[name]
        assert _same_value(ov, hv) and (type(ov) is type(hv) or hv is None or ov is None), (
            f"{ours_cls.__name__}.{name}: default {ov!r} != HF {hv!r}"
        )


def test_hf_known_defaults_spot_check():
    # Belt and braces for the generic comparison above.
    assert EsmConfig().layer_norm_eps == 1e-12
    assert EsmConfig().max_position_embeddings == 1026
    assert EsmConfig().eos_token_id == 2
    assert EsmConfig().position_embedding_type == "absolute"
    assert TrunkConfig().num_blocks == 48 and TrunkConfig().chunk_size == 128
    assert StructureModuleConfig().inf == 1e5 and StructureModuleConfig().epsilon == 1e-8


@needs_hf
def test_head_fields_from_pretrained_config():
    ours = _dataclass_defaults(EsmConfig)
    hf_base = _dataclass_defaults(_HF_BASE) if dataclasses.is_dataclass(_HF_BASE) else {}
    for name in HEAD_FIELDS:
        assert ours[name] is None
        if name in hf_base:
            assert hf_base[name] is None
    assert ours["classifier_dropout"] is None
    assert ours["model_type"] == hf_esm.EsmConfig.model_type == "esm"
    assert ours["hidden_act"] == "gelu"


@needs_hf
@pytest.mark.parametrize("ours_cls,hf_cls", HF_PAIRS)
def test_instantiated_defaults_match_hf(ours_cls, hf_cls):
    _assert_matches_hf(ours_cls(), hf_cls())


@needs_hf
def test_folding_instantiated_defaults_match_hf():
    hf = hf_esm.EsmConfig(is_folding_model=True, vocab_list=hf_esm.get_default_vocab_list())
    ours = EsmConfig(is_folding_model=True)
    _assert_matches_hf(ours, hf)
    assert ours.vocab_list == list(hf_esm.get_default_vocab_list())
    assert isinstance(ours.esmfold_config.trunk.structure_module, StructureModuleConfig)


# ================================================================================================
# Round trips
# ================================================================================================


def _with_unknown_keys(flavour: str) -> dict:
    d = copy.deepcopy(FLAVOURS[flavour])
    d.update({
        "transformers_version": "4.25.0.dev0", "torch_dtype": "float32", "architectures": ["EsmForMaskedLM"],
        "my_custom_key": {"nested": [1, 2.5, None, "x"]}, "id2label": {"0": "neg", "1": "pos"},
        "label2id": {"neg": 0, "pos": 1},
    })
    if d.get("esmfold_config"):
        fold = d["esmfold_config"]
        fold["unknown_fold_key"] = [1, 2]
        fold["trunk"]["unknown_trunk_key"] = "kept"
        fold["trunk"]["structure_module"]["unknown_sm_key"] = {"a": None}
    return d


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_from_dict_to_dict_round_trip_with_unknown_keys(flavour):
    d = _with_unknown_keys(flavour)
    before = copy.deepcopy(d)
    cfg = EsmConfig.from_dict(d)
    assert d == before, "from_dict must not mutate its input"
    assert cfg.to_dict() == d
    assert json.loads(cfg.to_json_string()) == d
    assert cfg.extra["my_custom_key"] == {"nested": [1, 2.5, None, "x"]}
    if flavour == "folding":
        assert cfg.esmfold_config.extra == {"unknown_fold_key": [1, 2]}
        assert cfg.esmfold_config.trunk.extra == {"unknown_trunk_key": "kept"}
        assert cfg.esmfold_config.trunk.structure_module.extra == {"unknown_sm_key": {"a": None}}
        assert cfg.esmfold_config.trunk.structure_module.ipa_dim == 6


def test_to_dict_does_not_alias_internal_state():
    cfg = EsmConfig.from_dict(_with_unknown_keys("folding"))
    out = cfg.to_dict()
    out["my_custom_key"]["nested"].append("changed")
    out["vocab_list"].append("<new>")
    out["esmfold_config"]["trunk"]["num_blocks"] = 99
    assert cfg.to_dict() == _with_unknown_keys("folding")


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("loaded", [False, True], ids=["fresh", "loaded"])
def test_save_pretrained_from_pretrained(flavour, loaded, tmp_path):
    cfg = EsmConfig.from_dict(_with_unknown_keys(flavour)) if loaded else EsmConfig(**FLAVOURS[flavour])
    path = cfg.save_pretrained(tmp_path / "model")
    assert Path(path) == tmp_path / "model" / CONFIG_NAME
    from_dir = EsmConfig.from_pretrained(tmp_path / "model")
    from_file = EsmConfig.from_pretrained(path)
    from_str = EsmConfig.from_pretrained(str(tmp_path / "model"))
    assert from_dir == from_file == from_str == cfg
    assert from_dir.to_dict() == from_file.to_dict() == cfg.to_dict() == _read_json(path)
    # Saving again gives the same file.
    from_dir.save_pretrained(tmp_path / "again")
    assert _read_json(tmp_path / "again" / CONFIG_NAME) == _read_json(path)


def test_fresh_config_writes_every_field():
    cfg = EsmConfig(is_folding_model=True)
    d = cfg.to_dict()
    assert set(d) == _field_names(EsmConfig)
    assert set(d["esmfold_config"]) == _field_names(EsmFoldConfig)
    assert set(d["esmfold_config"]["trunk"]) == _field_names(TrunkConfig)
    assert set(d["esmfold_config"]["trunk"]["structure_module"]) == _field_names(StructureModuleConfig)
    assert set(EsmConfig().to_dict()) == _field_names(EsmConfig)
    assert EsmConfig().to_dict()["esmfold_config"] is None


def test_loaded_config_writes_only_its_keys_plus_changes():
    src = {"hidden_size": 18, "num_attention_heads": 3, "layer_norm_eps": 1e-12, "foo": 1}
    cfg = EsmConfig.from_dict(src)
    assert cfg.to_dict() == src  # layer_norm_eps equals the default but was in the file: kept
    cfg.num_hidden_layers = 2
    assert cfg.to_dict() == {**src, "num_hidden_layers": 2}
    cfg.num_hidden_layers = 12  # back to the default: not written
    assert cfg.to_dict() == src
    cfg.hidden_size = 768  # in the file: written even at the default
    assert cfg.to_dict() == {**src, "hidden_size": 768}
    # The same holds inside nested sub-configs; sub-configs and the vocabulary that were filled in by
    # default are not written either until they change.
    src = {"is_folding_model": True, "esmfold_config": {"trunk": {"num_blocks": 2}}}
    fold = EsmConfig.from_dict(src)
    assert fold.vocab_list == list(DEFAULT_VOCAB)
    assert fold.esmfold_config.trunk.structure_module == StructureModuleConfig()
    assert fold.to_dict() == src
    fold.esmfold_config.trunk.max_recycles = 0
    assert fold.to_dict()["esmfold_config"] == {"trunk": {"num_blocks": 2, "max_recycles": 0}}
    fold.esmfold_config.trunk.structure_module.ipa_dim = 8
    written = fold.to_dict()["esmfold_config"]["trunk"]["structure_module"]
    assert written == StructureModuleConfig(ipa_dim=8).to_dict()
    fold.vocab_list = fold.vocab_list[:-1] + ["<extra>"]
    assert fold.to_dict()["vocab_list"][-1] == "<extra>"


def test_loaded_folding_model_without_esmfold_config():
    cfg = EsmConfig.from_dict({"is_folding_model": True})
    assert isinstance(cfg.esmfold_config, EsmFoldConfig) and cfg.vocab_list == list(DEFAULT_VOCAB)
    assert cfg.to_dict() == {"is_folding_model": True}
    cfg.esmfold_config.trunk.num_blocks = 3
    d = cfg.to_dict()
    assert set(d) == {"is_folding_model", "esmfold_config"}
    assert d["esmfold_config"] == EsmFoldConfig(trunk=TrunkConfig(num_blocks=3)).to_dict()
    # transformers fills in the same defaults from the short file.
    assert EsmConfig.from_dict(d).esmfold_config == cfg.esmfold_config


def test_equality_follows_written_json():
    cfg = EsmConfig(**ESM2_LIKE)
    assert cfg == EsmConfig(**ESM2_LIKE)
    assert cfg == cfg.copy()
    assert cfg != cfg.copy(num_hidden_layers=4)
    assert EsmConfig.from_dict({"foo": 1}) != EsmConfig.from_dict({})  # unknown keys count
    assert EsmConfig.from_dict({"hidden_size": 768}) != EsmConfig.from_dict({})  # source keys count
    assert EsmConfig() != TrunkConfig()
    assert TrunkConfig(num_blocks=2) == TrunkConfig.from_dict(TrunkConfig(num_blocks=2).to_dict())


# ---- interoperability with transformers --------------------------------------------------------


@needs_hf
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_our_json_reads_in_transformers(flavour, tmp_path):
    cfg = EsmConfig(**FLAVOURS[flavour], problem_type="single_label_classification")
    cfg.num_labels = 3
    cfg.save_pretrained(tmp_path)
    hf = transformers.EsmConfig.from_pretrained(tmp_path)
    _assert_matches_hf(cfg, hf)
    assert hf.num_labels == 3 and hf.id2label == cfg.id2label and hf.label2id == cfg.label2id
    assert hf.problem_type == cfg.problem_type
    if flavour == "folding":
        assert hf.esmfold_config.trunk.structure_module.ipa_dim == 6
        assert hf.esmfold_config.trunk.chunk_size is None


@needs_hf
def test_our_default_json_reads_in_transformers(tmp_path):
    cfg = EsmConfig()
    cfg.save_pretrained(tmp_path)
    hf = transformers.EsmConfig.from_pretrained(tmp_path)
    _assert_matches_hf(cfg, hf)
    assert hf.num_labels == cfg.num_labels == 2


HF_WRITTEN = {
    "esm2": dict(ESM2_LIKE),
    "esm2-labels": dict(ESM2_LIKE, num_labels=4, problem_type="regression"),
    "folding": dict(FOLDING_LIKE),
    "folding-defaults": dict(ESM2_LIKE, is_folding_model=True, vocab_list=list(DEFAULT_VOCAB)),
}


@needs_hf
@pytest.mark.parametrize("name", sorted(HF_WRITTEN))
def test_transformers_written_config_loads_and_round_trips(name, tmp_path):
    hf = transformers.EsmConfig(**copy.deepcopy(HF_WRITTEN[name]))
    hf.save_pretrained(tmp_path / "hf")
    on_disk = _read_json(tmp_path / "hf" / CONFIG_NAME)
    ours = EsmConfig.from_pretrained(tmp_path / "hf")
    _assert_matches_hf(ours, hf)
    assert ours.to_dict() == on_disk
    ours.save_pretrained(tmp_path / "ours")
    assert _read_json(tmp_path / "ours" / CONFIG_NAME) == on_disk
    assert ours.num_labels == hf.num_labels
    if name == "esm2-labels":
        assert ours.num_labels == 4 and ours.problem_type == "regression"
        assert all(isinstance(k, int) for k in ours.id2label)
    if name.startswith("folding"):
        assert isinstance(ours.esmfold_config.trunk.structure_module, StructureModuleConfig)


# ---- published configs ---------------------------------------------------------------------------


def test_published_fixture_configs_present():
    found = {p.name for p in FIXTURE_FILES}
    missing = sorted(set(EXPECTED_FIXTURES) - found)
    assert not missing, f"missing published configs in {FIXTURE_DIR}: {missing}"


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_published_config_round_trips(path, tmp_path):
    original = _read_json(path)
    cfg = EsmConfig.from_pretrained(path)
    assert cfg.to_dict() == original
    cfg.save_pretrained(tmp_path)
    assert _read_json(tmp_path / CONFIG_NAME) == original
    assert EsmConfig.from_pretrained(tmp_path) == cfg
    # Loading the directory form gives the same config.
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / CONFIG_NAME).write_text(path.read_text())
    assert EsmConfig.from_pretrained(tmp_path / "dir").to_dict() == original
    # transformers reads the same values from the file.
    if transformers is not None:
        _assert_matches_hf(cfg, transformers.EsmConfig.from_pretrained(path))


# ================================================================================================
# Labels, copy, overrides, errors
# ================================================================================================


def test_num_labels_property_and_setter():
    cfg = EsmConfig(**ESM2_LIKE)
    assert cfg.num_labels == 2 and cfg.id2label is None
    cfg.num_labels = 3
    assert cfg.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert cfg.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    assert cfg.num_labels == 3
    d = cfg.to_dict()
    assert d["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert "num_labels" not in d
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ConfigError, match=_err("num_labels")):
            cfg.num_labels = bad
    assert cfg.num_labels == 3


def test_num_labels_setter_keeps_names_when_count_unchanged():
    cfg = EsmConfig(id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    cfg.num_labels = 2
    assert cfg.id2label == {0: "neg", 1: "pos"}
    cfg.num_labels = 1
    assert cfg.id2label == {0: "LABEL_0"}


def test_id2label_int_keys_after_json_and_string_keys_written(tmp_path):
    src = dict(ESM2_LIKE, id2label={"0": "neg", "1": "neutral", "2": "pos"},
               label2id={"neg": 0, "neutral": 1, "pos": 2})
    (tmp_path / CONFIG_NAME).write_text(json.dumps(src))
    cfg = EsmConfig.from_pretrained(tmp_path)
    assert cfg.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert all(isinstance(k, int) for k in cfg.id2label)
    assert cfg.num_labels == 3
    cfg.save_pretrained(tmp_path / "out")
    written = _read_json(tmp_path / "out" / CONFIG_NAME)
    assert written["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert written == src


def test_num_labels_key_in_dict():
    cfg = EsmConfig.from_dict(dict(ESM2_LIKE, num_labels=3))
    assert cfg.num_labels == 3 and cfg.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert "num_labels" not in cfg.to_dict() and "num_labels" not in cfg.extra
    # Both in one dict: id2label wins (HF's PretrainedConfig.__init__ does the same).
    both = EsmConfig.from_dict(dict(ESM2_LIKE, num_labels=5, id2label={"0": "a", "1": "b"}))
    assert both.id2label == {0: "a", 1: "b"}
    with pytest.raises(ConfigError, match=_err("num_labels")):
        EsmConfig.from_dict(dict(ESM2_LIKE, num_labels=0))


def test_from_pretrained_overrides(tmp_path):
    labels = dict(id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    EsmConfig(**ESM2_LIKE, **labels).save_pretrained(tmp_path)
    cfg = EsmConfig.from_pretrained(tmp_path, num_labels=3)
    assert cfg.num_labels == 3 and cfg.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    same = EsmConfig.from_pretrained(tmp_path, num_labels=2)  # same count keeps the names
    assert same.id2label == {0: "neg", 1: "pos"}
    cfg = EsmConfig.from_pretrained(
        tmp_path, problem_type="multi_label_classification", hidden_dropout_prob=0.2
    )
    assert cfg.problem_type == "multi_label_classification" and cfg.hidden_dropout_prob == 0.2
    assert cfg.to_dict()["problem_type"] == "multi_label_classification"
    # Overrides are validated, and the message names the file and the field.
    with pytest.raises(ConfigError) as e:
        EsmConfig.from_pretrained(tmp_path, problem_type="ranking")
    assert str(tmp_path / CONFIG_NAME) in str(e.value) and "problem_type: " in str(e.value)
    with pytest.raises(ConfigError, match="num_labels"):
        EsmConfig.from_pretrained(tmp_path, num_labels=0)
    # Overrides on a loaded minimal file are written back (they are in its keys now).
    (tmp_path / "min").mkdir()
    (tmp_path / "min" / CONFIG_NAME).write_text(json.dumps({"hidden_size": 18, "num_attention_heads": 3}))
    cfg = EsmConfig.from_pretrained(tmp_path / "min", num_labels=3, problem_type="regression")
    assert cfg.to_dict() == {
        "hidden_size": 18, "num_attention_heads": 3, "problem_type": "regression",
        "id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"},
        "label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2},
    }


def test_copy_validates_and_is_independent():
    cfg = EsmConfig(**FOLDING_LIKE)
    new = cfg.copy(hidden_size=24, num_attention_heads=4)
    assert (new.hidden_size, new.num_attention_heads) == (24, 4)
    assert (cfg.hidden_size, cfg.num_attention_heads) == (18, 3)
    new.esmfold_config.trunk.num_blocks = 7
    assert cfg.esmfold_config.trunk.num_blocks == 2
    with pytest.raises(ConfigError, match=_err("hidden_size")):
        cfg.copy(hidden_size=20)
    with pytest.raises(ConfigError, match=_err("problem_type")):
        cfg.copy(problem_type="ranking")
    with pytest.raises(ConfigError, match="no_such_field"):
        cfg.copy(no_such_field=1)
    # Values are normalised as on construction.
    assert cfg.copy(id2label={"0": "a"}, label2id={"a": 0}).id2label == {0: "a"}
    fold = cfg.copy(esmfold_config={"trunk": {"num_blocks": 3}})
    assert isinstance(fold.esmfold_config, EsmFoldConfig) and fold.esmfold_config.trunk.num_blocks == 3
    with pytest.raises(ConfigError, match=_err("trunk.dropout")):
        cfg.copy(esmfold_config={"trunk": {"dropout": 0.9}})
    # Sub-config copies validate too, and a parent copy re-validates mutated sub-configs.
    with pytest.raises(ConfigError, match=_err("trunk.max_recycles")):
        cfg.esmfold_config.trunk.copy(max_recycles=-1)
    cfg.esmfold_config.trunk.dropout = 0.9
    with pytest.raises(ConfigError, match=_err("trunk.dropout")):
        cfg.copy()


def test_missing_file_names_the_path(tmp_path):
    for path in (tmp_path / "nope", tmp_path / "nope" / CONFIG_NAME, tmp_path / "missing.json"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
            EsmConfig.from_pretrained(path)
    # An existing directory without config.json names the file it looked for.
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / CONFIG_NAME))):
        EsmConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "x.json"))):
        EsmConfig.from_json_file(tmp_path / "x.json")


def test_malformed_json_names_the_path(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text('{"hidden_size": 18,')
    for arg in (tmp_path, path):
        with pytest.raises(ConfigError, match=re.escape(str(path))):
            EsmConfig.from_pretrained(arg)
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        EsmConfig.from_pretrained(path)
    path.write_text(json.dumps({"hidden_size": 18}))  # 768 heads default: 18 % 12 != 0
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*hidden_size"):
        EsmConfig.from_pretrained(path)


def test_from_dict_rejects_non_dict():
    for cls in (EsmConfig, EsmFoldConfig, TrunkConfig, StructureModuleConfig):
        with pytest.raises(ConfigError, match=cls.__name__):
            cls.from_dict([("hidden_size", 18)])


def test_derived_properties():
    esm2 = EsmConfig(**ESM2_LIKE)
    assert esm2.head_dim == 6 and esm2.use_rotary and esm2.max_sequence_positions is None
    esm1b = EsmConfig(**ESM1B_LIKE)
    assert not esm1b.use_rotary and esm1b.max_sequence_positions == 1026 - 1 - 1
    trunk = TrunkConfig()
    assert trunk.sequence_num_heads == 32 and trunk.pairwise_num_heads == 4


# ================================================================================================
# import esm_dual stays light
# ================================================================================================


def test_import_is_light():
    code = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import esm_dual, esm_dual.common\n"
        "dt = time.perf_counter() - t\n"
        "heavy = sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules)\n"
        "print(json.dumps({'seconds': dt, 'heavy': heavy}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == [], f"`import esm_dual` imported {res['heavy']}"
    assert res["seconds"] < 2.0, f"`import esm_dual` took {res['seconds']:.2f} s"


@pytest.mark.parametrize("field,value", [("token_dropout", "false"), ("token_dropout", 0), ("use_cache", "yes"),
                                         ("tie_word_embeddings", None), ("emb_layer_norm_before", "false")])
def test_a_boolean_field_takes_only_json_booleans(tmp_path, field, value):
    """'"token_dropout": "false"' would be truthy: refused naming the file and the field, as is any non-bool."""
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({**ESM2_LIKE, field: value}))
    with pytest.raises(ConfigError, match=re.escape(str(path)) + f".*{field}: must be true or false") as e:
        EsmConfig.from_pretrained(path)
    assert repr(value) in str(e.value)
    with pytest.raises(ConfigError, match=field):
        EsmConfig(**{**ESM2_LIKE, field: value})
    assert EsmConfig.from_dict({**ESM2_LIKE, field: False}).to_dict()[field] is False
    assert EsmConfig(**{**ESM2_LIKE, "emb_layer_norm_before": None}).emb_layer_norm_before is None  # bool | None


def test_a_boolean_field_of_a_sub_config_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"trunk\.cpu_grad_checkpoint: must be true or false"):
        TrunkConfig(cpu_grad_checkpoint="no")
    with pytest.raises(ConfigError, match=r"esmfold_config\.fp16_esm: must be true or false"):
        EsmConfig(is_folding_model=True, vocab_size=33, esmfold_config={"fp16_esm": "true"})


def test_config_imports_nothing_of_the_package():
    import ast

    import esm_dual.common.config as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or
                (n.module or "").startswith("esm_dual"))]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                 if a.name.startswith("esm_dual")]
    assert imported == [], imported
