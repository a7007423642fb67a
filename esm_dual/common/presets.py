"""Known ESM checkpoints: name -> published ``config.json``, hub id, fair-esm file name, size.

Every ``Preset.config`` is exactly the ``config.json`` published in the ``facebook/<name>`` hub repo
(including bookkeeping keys such as ``_name_or_path``, ``torch_dtype`` and ``transformers_version``,
which ``EsmConfig`` keeps in ``extra`` and writes back unchanged). ``num_params`` is computed from the
architecture by :func:`count_parameters`; it matches fair-esm's own count of the model's parameters.

This module imports neither torch nor TensorFlow.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_VOCAB, EsmConfig

HUB_ORG = "facebook"
FAIR_ESM_MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
FAIR_ESM_REGRESSION_URL = "https://dl.fbaipublicfiles.com/fair-esm/regression/{name}-contact-regression.pt"

_FAMILIES = ("esm1b", "esm1v", "esm2", "esmfold")


@dataclass(frozen=True)
class Preset:
    """A published checkpoint.

    Attributes:
        name: canonical name (the hub repo name, e.g. ``"esm2_t33_650M_UR50D"``).
        hub_id: Hugging Face hub repo (``"facebook/esm2_t33_650M_UR50D"``).
        fair_esm_name: stem of the fair-esm ``.pt`` file (``"esm2_t33_650M_UR50D"``, ``"esmfold_3B_v1"``).
        family: ``"esm1b"``, ``"esm1v"``, ``"esm2"`` or ``"esmfold"``.
        num_params: parameters of the masked-LM model including the contact head (tied decoder counted
            once); for ESMFold, of its ESM-2 language-model stem only (the folding head is not counted).
        config: the published ``config.json`` of ``hub_id``.
        has_contact_regression: fair-esm publishes trained contact-regression weights
            (``<name>-contact-regression.pt``) for this model.
    """

    name: str
    hub_id: str
    fair_esm_name: str
    family: str
    num_params: int
    config: EsmConfig
    has_contact_regression: bool

    @property
    def fair_esm_url(self) -> str:
        return FAIR_ESM_MODEL_URL.format(name=self.fair_esm_name)

    @property
    def contact_regression_url(self) -> str | None:
        if not self.has_contact_regression:
            return None
        return FAIR_ESM_REGRESSION_URL.format(name=self.fair_esm_name)

    @property
    def hub_url(self) -> str:
        return f"https://huggingface.co/{self.hub_id}"


# ================================================================================================
# Parameter counts
# ================================================================================================


def count_parameters(
    config: EsmConfig, *, include_contact_head: bool = True, include_lm_head: bool = True
) -> int:
    """Number of parameters of the masked-LM model described by ``config``.

    Counts the word embeddings, the learned position table (absolute positions only: ESM-2 has none,
    although HF files carry an unused one), the embedding LayerNorm if present, every layer, the final
    LayerNorm, the LM head (dense + LayerNorm + output bias; the decoder is tied to the word embeddings
    and counted once) and the contact-regression head. This is what fair-esm's model has, so e.g.
    ``esm2_t6_8M_UR50D`` gives 7,512,474. Buffers (rotary ``inv_freq``) are not parameters.
    """
    v = config.vocab_size if config.vocab_size is not None else len(DEFAULT_VOCAB)
    d, n_layers, heads, f = (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
    )
    n = v * d
    if config.position_embedding_type == "absolute":
        n += config.max_position_embeddings * d
    if config.emb_layer_norm_before:
        n += 2 * d
    per_layer = (
        4 * (d * d + d)  # query, key, value, attention output
        + 2 * d  # attention LayerNorm
        + d * f
        + f  # intermediate
        + f * d
        + d  # output
        + 2 * d  # final LayerNorm of the block
    )
    n += n_layers * per_layer
    n += 2 * d  # emb_layer_norm_after
    if include_lm_head:
        n += d * d + d + 2 * d + v  # dense, layer_norm, bias (decoder tied)
    if include_contact_head:
        n += n_layers * heads + 1
    return n


# ================================================================================================
# Published configs
# ================================================================================================


def _mlm_config(
    *,
    hidden: int,
    layers: int,
    heads: int,
    position: str,
    emb_ln_before: bool,
    name_or_path: str | None,
    transformers_version: str,
) -> dict[str, Any]:
    """The ``config.json`` the facebook/esm* MLM repos publish (HF's conversion + save_pretrained)."""
    d: dict[str, Any] = {}
    if name_or_path is not None:
        d["_name_or_path"] = name_or_path
    d.update(
        {
            "architectures": ["EsmForMaskedLM"],
            "attention_probs_dropout_prob": 0.0,
            "classifier_dropout": None,
            "emb_layer_norm_before": emb_ln_before,
            "esmfold_config": None,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "hidden_size": hidden,
            "initializer_range": 0.02,
            "intermediate_size": 4 * hidden,
            "is_folding_model": False,
            "layer_norm_eps": 1e-05,
            "mask_token_id": 32,
            "max_position_embeddings": 1026,
            "model_type": "esm",
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "pad_token_id": 1,
            "position_embedding_type": position,
            "token_dropout": True,
            "torch_dtype": "float32",
            "transformers_version": transformers_version,
            "use_cache": True,
            "vocab_list": None,
            "vocab_size": 33,
        }
    )
    return d


def _esmfold_config() -> dict[str, Any]:
    """``facebook/esmfold_v1/config.json`` (2,102 bytes as published)."""
    return {
        "architectures": ["EsmForProteinFolding"],
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": None,
        "emb_layer_norm_before": False,
        "esmfold_config": {
            "bypass_lm": False,
            "embed_aa": True,
            "esm_ablate_pairwise": False,
            "esm_ablate_sequence": False,
            "esm_input_dropout": 0,
            "esm_type": "esm2_3B",
            "fp16_esm": True,
            "lddt_head_hid_dim": 128,
            "trunk": {
                "chunk_size": None,
                "cpu_grad_checkpoint": False,
                "dropout": 0,
                "layer_drop": 0,
                "max_recycles": 4,
                "num_blocks": 48,
                "pairwise_head_width": 32,
                "pairwise_state_dim": 128,
                "position_bins": 32,
                "sequence_head_width": 32,
                "sequence_state_dim": 1024,
                "structure_module": {
                    "dropout_rate": 0.1,
                    "epsilon": 1e-08,
                    "inf": 100000.0,
                    "ipa_dim": 16,
                    "num_angles": 7,
                    "num_blocks": 8,
                    "num_heads_ipa": 12,
                    "num_qk_points": 4,
                    "num_resnet_blocks": 2,
                    "num_transition_layers": 1,
                    "num_v_points": 8,
                    "pairwise_dim": 128,
                    "resnet_dim": 128,
                    "sequence_dim": 384,
                    "trans_scale_factor": 10,
                },
            },
            "use_esm_attn_map": False,
        },
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": 2560,
        "initializer_range": 0.02,
        "intermediate_size": 10240,
        "is_folding_model": True,
        "layer_norm_eps": 1e-05,
        "mask_token_id": 32,
        "max_position_embeddings": 1026,
        "model_type": "esm",
        "num_attention_heads": 40,
        "num_hidden_layers": 36,
        "pad_token_id": 1,
        "position_embedding_type": "rotary",
        "token_dropout": True,
        "torch_dtype": "float32",
        "transformers_version": "4.25.0.dev0",
        "use_cache": True,
        "vocab_list": list(DEFAULT_VOCAB),
        "vocab_size": 33,
    }


# name -> (family, hidden, layers, heads, _name_or_path, transformers_version)
# The hub configs went through HF's conversion (Sep/Oct 2022), an "Upload EsmForMaskedLM" that dropped
# `_name_or_path`, and an "Update TF weights" (Nov/Dec 2022) that wrote it back as /tmp/facebook/<name>.
_MLM_SPECS: dict[str, tuple[str, int, int, int, str | None, str]] = {
    "esm1b_t33_650M_UR50S": ("esm1b", 1280, 33, 20, "/tmp/facebook/esm1b_t33_650M_UR50S", "4.26.0.dev0"),
    **{
        f"esm1v_t33_650M_UR90S_{i}": (
            "esm1v",
            1280,
            33,
            20,
            f"/tmp/facebook/esm1v_t33_650M_UR90S_{i}",
            "4.25.0.dev0",
        )
        for i in range(1, 6)
    },
    "esm2_t6_8M_UR50D": ("esm2", 320, 6, 20, "/tmp/facebook/esm2_t6_8M_UR50D", "4.25.0.dev0"),
    "esm2_t12_35M_UR50D": ("esm2", 480, 12, 20, "/tmp/facebook/esm2_t12_35M_UR50D", "4.25.0.dev0"),
    "esm2_t30_150M_UR50D": ("esm2", 640, 30, 20, "/tmp/facebook/esm2_t30_150M_UR50D", "4.25.0.dev0"),
    "esm2_t33_650M_UR50D": ("esm2", 1280, 33, 20, "/tmp/facebook/esm2_t33_650M_UR50D", "4.25.0.dev0"),
    "esm2_t36_3B_UR50D": ("esm2", 2560, 36, 40, "/tmp/facebook/esm2_t36_3B_UR50D", "4.25.0.dev0"),
    # The 15B repo has PyTorch weights only (no TF round trip), so no `_name_or_path`.
    "esm2_t48_15B_UR50D": ("esm2", 5120, 48, 40, None, "4.25.0.dev0"),
}


def published_config_dict(name: str) -> dict[str, Any]:
    """The published ``config.json`` of preset ``name`` as a fresh dict."""
    if name == "esmfold_v1":
        return _esmfold_config()
    family, hidden, layers, heads, name_or_path, version = _MLM_SPECS[name]
    return _mlm_config(
        hidden=hidden,
        layers=layers,
        heads=heads,
        position="rotary" if family == "esm2" else "absolute",
        emb_ln_before=family == "esm1b",
        name_or_path=name_or_path,
        transformers_version=version,
    )


def _build_presets() -> dict[str, Preset]:
    out: dict[str, Preset] = {}
    for name, (family, *_rest) in _MLM_SPECS.items():
        cfg = EsmConfig.from_dict(published_config_dict(name))
        out[name] = Preset(
            name=name,
            hub_id=f"{HUB_ORG}/{name}",
            fair_esm_name=name,
            family=family,
            num_params=count_parameters(cfg),
            config=cfg,
            has_contact_regression=family != "esm1v",  # fair-esm: "all models except ESM-1v"
        )
    cfg = EsmConfig.from_dict(published_config_dict("esmfold_v1"))
    out["esmfold_v1"] = Preset(
        name="esmfold_v1",
        hub_id=f"{HUB_ORG}/esmfold_v1",
        fair_esm_name="esmfold_3B_v1",
        family="esmfold",
        num_params=count_parameters(cfg),
        config=cfg,
        has_contact_regression=False,
    )
    for p in out.values():
        assert p.family in _FAMILIES
    return out


PRESETS: dict[str, Preset] = _build_presets()


def _lookup_key(name: str) -> str:
    key = name.strip()
    if key.endswith(".pt"):
        key = key[: -len(".pt")]
    if key.startswith(HUB_ORG + "/"):
        key = key[len(HUB_ORG) + 1 :]
    return key


def get_preset(name: str, missing_ok: bool = False) -> Preset | None:
    """Look a preset up by name, hub id (``"facebook/esm2_t6_8M_UR50D"``), fair-esm name
    (``"esmfold_3B_v1"``) or fair-esm file name (``"esm2_t6_8M_UR50D.pt"``).

    Returns a copy (its config can be changed freely). Unknown names raise ``KeyError`` listing the
    known ones, or return ``None`` with ``missing_ok=True``.
    """
    if not isinstance(name, str):
        if missing_ok:
            return None
        raise TypeError(f"preset name must be a str, got {type(name).__name__}")
    key = _lookup_key(name)
    preset = PRESETS.get(key)
    if preset is None:
        for p in PRESETS.values():
            if p.fair_esm_name == key:
                preset = p
                break
    if preset is None:
        if missing_ok:
            return None
        raise KeyError(
            f"unknown ESM preset {name!r}; known presets: {', '.join(PRESETS)} "
            f"(also accepted: the hub id 'facebook/<name>', the fair-esm file name '<name>.pt', "
            f"and 'esmfold_3B_v1')"
        )
    return dataclasses.replace(preset, config=copy.deepcopy(preset.config))


def list_presets(family: str | None = None) -> list[str]:
    """Names of the known presets, optionally of one family."""
    if family is not None and family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {_FAMILIES}")
    return [n for n, p in PRESETS.items() if family is None or p.family == family]


__all__ = ["PRESETS", "Preset", "count_parameters", "get_preset", "list_presets", "published_config_dict"]
