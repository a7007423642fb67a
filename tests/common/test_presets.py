"""Presets: published configs (fixtures), parameter counts, name lookup."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from esm_dual.common.config import EsmConfig
from esm_dual.common.presets import PRESETS, count_parameters, get_preset, list_presets, published_config_dict
from tests.conftest import tiny_config

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "configs")
FIXTURE_NAMES = [
    "esm1b_t33_650M_UR50S",
    "esm1v_t33_650M_UR90S_1",
    "esm2_t6_8M_UR50D",
    "esm2_t12_35M_UR50D",
    "esm2_t30_150M_UR50D",
    "esm2_t33_650M_UR50D",
    "esm2_t36_3B_UR50D",
    "esm2_t48_15B_UR50D",
    "esmfold_v1",
]

# Sizes of config.json on the hub "main" branch as listed by the hub's file browser.
PUBLISHED_BYTES = {
    "esm2_t6_8M_UR50D": 775,
    "esm2_t30_150M_UR50D": 779,
    "esm2_t36_3B_UR50D": 779,
    "esmfold_v1": 2102,
}

# Exact counts (fair-esm's model.parameters()) and the advertised size in the model names.
EXPECTED_PARAMS = {
    "esm2_t6_8M_UR50D": (7_512_474, 8e6),
    "esm2_t12_35M_UR50D": (33_501_394, 35e6),
    "esm2_t30_150M_UR50D": (148_140_154, 150e6),
    "esm2_t33_650M_UR50D": (651_043_254, 650e6),
    "esm2_t36_3B_UR50D": (2_839_005_634, 3e9),
    "esm2_t48_15B_UR50D": (15_129_100_194, 15e9),
    "esm1b_t33_650M_UR50S": (652_359_094, 650e6),
    "esm1v_t33_650M_UR90S_1": (652_356_534, 650e6),
    "esmfold_v1": (2_839_005_634, 3e9),  # the ESM-2 3B stem
}


def _fixture(name: str) -> tuple[str, dict]:
    with open(os.path.join(FIXTURES, f"{name}.json"), encoding="utf-8") as f:
        text = f.read()
    return text, json.loads(text)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_equals_preset_config(name):
    text, data = _fixture(name)
    preset = PRESETS[name]
    assert preset.config.to_dict() == data
    assert published_config_dict(name) == data
    assert EsmConfig.from_json_file(os.path.join(FIXTURES, f"{name}.json")) == preset.config
    # written back unchanged, in HF's own serialisation
    assert json.loads(preset.config.to_json_string()) == data
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    if name in PUBLISHED_BYTES:
        assert len(text.encode("utf-8")) == PUBLISHED_BYTES[name]


def test_every_preset_has_a_consistent_config():
    assert set(PRESETS) == set(FIXTURE_NAMES[:2]) | {f"esm1v_t33_650M_UR90S_{i}" for i in range(2, 6)} | set(
        FIXTURE_NAMES[2:]
    )
    for name, p in PRESETS.items():
        c = p.config
        assert p.name == name and p.hub_id == f"facebook/{name}"
        assert c.vocab_size == 33 and c.pad_token_id == 1 and c.mask_token_id == 32
        assert c.layer_norm_eps == 1e-5 and c.hidden_dropout_prob == 0.0 and c.attention_probs_dropout_prob == 0.0
        assert c.intermediate_size == 4 * c.hidden_size
        assert c.max_position_embeddings == 1026 and c.token_dropout is True
        assert c.use_rotary == (p.family in ("esm2", "esmfold"))
        assert c.emb_layer_norm_before == (p.family == "esm1b")
        assert c.is_folding_model == (p.family == "esmfold")
        # the layer count in the name is the config's
        assert f"_t{c.num_hidden_layers}_" in name or p.family == "esmfold"
    # the five ESM-1v configs differ only in the bookkeeping path
    v1 = published_config_dict("esm1v_t33_650M_UR90S_1")
    for i in range(2, 6):
        vi = published_config_dict(f"esm1v_t33_650M_UR90S_{i}")
        assert vi.pop("_name_or_path") == f"/tmp/facebook/esm1v_t33_650M_UR90S_{i}"
        assert vi == {k: v for k, v in v1.items() if k != "_name_or_path"}


def test_esmfold_preset():
    p = get_preset("esmfold_v1")
    assert p.hub_id == "facebook/esmfold_v1" and p.fair_esm_name == "esmfold_3B_v1" and p.family == "esmfold"
    c = p.config
    assert c.esmfold_config.esm_type == "esm2_3B" and c.esmfold_config.fp16_esm is True
    assert c.esmfold_config.trunk.num_blocks == 48 and c.esmfold_config.trunk.structure_module.num_blocks == 8
    assert c.vocab_list[0] == "<cls>" and c.vocab_list[-1] == "<mask>" and len(c.vocab_list) == 33
    assert not p.has_contact_regression and p.contact_regression_url is None
    assert p.fair_esm_url == "https://dl.fbaipublicfiles.com/fair-esm/models/esmfold_3B_v1.pt"


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_match_published_sizes(name):
    exact, advertised = EXPECTED_PARAMS[name]
    p = PRESETS[name]
    assert p.num_params == count_parameters(p.config) == exact
    assert abs(exact - advertised) / advertised < 0.08, (name, exact, advertised)


def test_all_esm1v_have_the_same_size():
    assert {PRESETS[f"esm1v_t33_650M_UR90S_{i}"].num_params for i in range(1, 6)} == {652_356_534}


@pytest.mark.parametrize("flavour", ["esm2", "esm1b", "esm1v"])
def test_count_parameters_matches_fair_esm_and_transformers(flavour):
    torch = pytest.importorskip("torch")
    esm = pytest.importorskip("esm")
    transformers = pytest.importorskip("transformers")
    from argparse import Namespace

    changes = {"intermediate_size": 72} if flavour == "esm2" else {}
    cfg = tiny_config(flavour, **changes)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    if flavour == "esm2":
        ref = esm.model.esm2.ESM2(num_layers=3, embed_dim=18, attention_heads=3, alphabet=alphabet)
    else:
        args = Namespace(arch="roberta_large", layers=3, embed_dim=18, ffn_embed_dim=37, attention_heads=3,
                         max_positions=1024, emb_layer_norm_before=cfg.emb_layer_norm_before)
        ref = esm.model.esm1.ProteinBertModel(args, alphabet)
    assert count_parameters(cfg) == sum(p.numel() for p in ref.parameters())

    hf_cfg = transformers.EsmConfig(**{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
    torch.manual_seed(0)
    hf = transformers.EsmForMaskedLM(hf_cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in hf.parameters())  # tied decoder counted once
    assert count_parameters(cfg, include_contact_head=False, include_lm_head=False) == sum(
        p.numel() for n, p in hf.named_parameters() if n.startswith("esm.") and "contact_head" not in n
    )


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("esm2_t6_8M_UR50D", "esm2_t6_8M_UR50D"),
        ("facebook/esm2_t6_8M_UR50D", "esm2_t6_8M_UR50D"),
        ("esm2_t6_8M_UR50D.pt", "esm2_t6_8M_UR50D"),
        ("  esm1b_t33_650M_UR50S ", "esm1b_t33_650M_UR50S"),
        ("esm1v_t33_650M_UR90S_5.pt", "esm1v_t33_650M_UR90S_5"),
        ("facebook/esmfold_v1", "esmfold_v1"),
        ("esmfold_v1", "esmfold_v1"),
        ("esmfold_3B_v1", "esmfold_v1"),
        ("esmfold_3B_v1.pt", "esmfold_v1"),
        ("facebook/esm2_t48_15B_UR50D", "esm2_t48_15B_UR50D"),
    ],
)
def test_get_preset_spellings(spelling, expected):
    assert get_preset(spelling).name == expected


def test_get_preset_unknown():
    with pytest.raises(KeyError) as e:
        get_preset("esm2_t99_1T_UR50D")
    msg = str(e.value)
    assert "esm2_t99_1T_UR50D" in msg
    for name in PRESETS:
        assert name in msg
    assert get_preset("esm2_t99_1T_UR50D", missing_ok=True) is None
    assert get_preset("someone/esm2_t6_8M_UR50D", missing_ok=True) is None  # other orgs are not presets
    assert get_preset(None, missing_ok=True) is None


def test_get_preset_returns_a_copy():
    p = get_preset("esm2_t6_8M_UR50D")
    p.config.hidden_size = 4
    assert PRESETS["esm2_t6_8M_UR50D"].config.hidden_size == 320
    assert get_preset("esm2_t6_8M_UR50D").config.hidden_size == 320


def test_preset_urls_and_regression():
    p = get_preset("esm2_t33_650M_UR50D")
    assert p.fair_esm_url == "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t33_650M_UR50D.pt"
    assert p.contact_regression_url == (
        "https://dl.fbaipublicfiles.com/fair-esm/regression/esm2_t33_650M_UR50D-contact-regression.pt")
    assert p.hub_url == "https://huggingface.co/facebook/esm2_t33_650M_UR50D"
    assert not get_preset("esm1v_t33_650M_UR90S_2").has_contact_regression
    assert get_preset("esm1b_t33_650M_UR50S").has_contact_regression
    assert list_presets("esm1v") == [f"esm1v_t33_650M_UR90S_{i}" for i in range(1, 6)]
    assert len(list_presets()) == len(PRESETS) == 13
    with pytest.raises(ValueError):
        list_presets("esm3")


def test_esm_config_from_pretrained_accepts_presets():
    assert EsmConfig.from_pretrained("facebook/esm2_t12_35M_UR50D") == PRESETS["esm2_t12_35M_UR50D"].config
    cfg = EsmConfig.from_pretrained("esm2_t12_35M_UR50D", num_hidden_layers=2)
    assert cfg.num_hidden_layers == 2 and PRESETS["esm2_t12_35M_UR50D"].config.num_hidden_layers == 12


def test_presets_configs_build_transformers_models_of_the_same_size():
    """The published configs describe what transformers builds (checked on the small ones)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in ("esm2_t6_8M_UR50D",):
        cfg = PRESETS[name].config
        hf_cfg = transformers.EsmConfig(**{k: v for k, v in cfg.to_dict().items() if k != "model_type"})
        with torch.device("meta"):
            model = transformers.EsmForMaskedLM(hf_cfg)
        n = sum(p.numel() for p in model.parameters())
        assert n == PRESETS[name].num_params
        assert np.isclose(n, 7.5e6, rtol=0.01)
