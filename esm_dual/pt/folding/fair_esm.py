"""Reading fair-esm's ESMFold checkpoint (``esmfold_3B_v1.pt`` / ``esmfold_3B_v0.pt``).

The file is ``{"cfg": {"model": ESMFoldConfig}, "model": state_dict}`` with the folding head only: fair-esm
builds the ESM-2 3B stem from ``esm2_t36_3B_UR50D.pt`` and loads the rest with ``strict=False``. The
folding head's tensor names are already those of ``facebook/esmfold_v1`` (HF's port kept them), so the
mapping is the identity there; the stem comes from a separate ESM-2 checkpoint (fair-esm ``.pt`` or hub
layout) or, if the file has ``esm.*`` tensors, from fair-esm ESM-2 names mapped to hub names.

Files are read with ``torch.load(weights_only=True)`` and an allowlist (``esm_dual.io.torch_pickle``),
so the omegaconf config is read through inert stand-ins, never executed.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ...common.config import DEFAULT_VOCAB, EsmConfig
from ...io.base import CheckpointError
from ...io.fair_esm import fair_name_to_hf, strip_v2
from ...io.hub import load_checkpoint
from ...io.torch_pickle import stand_in, tensor_to_numpy, to_plain, torch_load

ESM_STEM_FILE = "esm2_t36_3B_UR50D.pt"
_FAIR_CONFIG_CLASSES = (
    "esm.esmfold.v1.esmfold.ESMFoldConfig",
    "esm.esmfold.v1.trunk.FoldingTrunkConfig",
    "esm.esmfold.v1.trunk.StructureModuleConfig",
)

# fair-esm StructureModuleConfig field -> our StructureModuleConfig field
_SM_FIELDS = {
    "c_s": "sequence_dim",
    "c_z": "pairwise_dim",
    "c_ipa": "ipa_dim",
    "c_resnet": "resnet_dim",
    "no_heads_ipa": "num_heads_ipa",
    "no_qk_points": "num_qk_points",
    "no_v_points": "num_v_points",
    "dropout_rate": "dropout_rate",
    "no_blocks": "num_blocks",
    "no_transition_layers": "num_transition_layers",
    "no_resnet_blocks": "num_resnet_blocks",
    "no_angles": "num_angles",
    "trans_scale_factor": "trans_scale_factor",
    "epsilon": "epsilon",
    "inf": "inf",
}
_TRUNK_FIELDS = (
    "num_blocks",
    "sequence_state_dim",
    "pairwise_state_dim",
    "sequence_head_width",
    "pairwise_head_width",
    "position_bins",
    "dropout",
    "layer_drop",
    "cpu_grad_checkpoint",
    "max_recycles",
    "chunk_size",
)


def _count(tensors: dict[str, np.ndarray], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in tensors if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def folding_config_from_tensors(
    t: dict[str, np.ndarray], cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``esmfold_config`` dict implied by the folding-head tensors (fair-esm's own config, when
    readable, fills what shapes cannot tell: structure-module blocks, recycles, dropout)."""
    cfg = cfg or {}
    trunk_cfg = dict(cfg.get("trunk") or {})
    sm_cfg = dict(trunk_cfg.pop("structure_module", None) or {})
    c_s = t["trunk.blocks.0.layernorm_1.weight"].shape[0]
    c_z = t["trunk.blocks.0.tri_mul_out.linear_z.weight"].shape[0]
    seq_heads = t["trunk.blocks.0.pair_to_sequence.linear.weight"].shape[0]
    pair_heads = t["trunk.blocks.0.tri_att_start.linear.weight"].shape[0]
    ipa = "trunk.structure_module.ipa."
    heads_ipa = t[ipa + "head_weights"].shape[0]
    c_ipa = t[ipa + "linear_q.weight"].shape[0] // heads_ipa
    qk = t[ipa + "linear_q_points.weight"].shape[0] // (heads_ipa * 3)
    v = t[ipa + "linear_kv_points.weight"].shape[0] // (heads_ipa * 3) - qk
    sm = {
        "num_blocks": 8,
        "dropout_rate": 0.1,
        "trans_scale_factor": 10,
        "epsilon": 1e-8,
        "inf": 1e5,
        **{_SM_FIELDS[k]: val for k, val in sm_cfg.items() if k in _SM_FIELDS},
        "sequence_dim": t["trunk.structure_module.linear_in.weight"].shape[0],
        "pairwise_dim": t["trunk.structure_module.layer_norm_z.weight"].shape[0],
        "ipa_dim": c_ipa,
        "resnet_dim": t["trunk.structure_module.angle_resnet.linear_in.weight"].shape[0],
        "num_heads_ipa": heads_ipa,
        "num_qk_points": qk,
        "num_v_points": v,
        "num_transition_layers": _count(t, r"^trunk\.structure_module\.transition\.layers\.(\d+)\."),
        "num_resnet_blocks": _count(t, r"^trunk\.structure_module\.angle_resnet\.layers\.(\d+)\."),
        "num_angles": t["trunk.structure_module.angle_resnet.linear_out.weight"].shape[0] // 2,
    }
    trunk = {
        "max_recycles": 4,
        "chunk_size": None,
        "dropout": 0,
        "layer_drop": 0,
        **{k: trunk_cfg[k] for k in _TRUNK_FIELDS if k in trunk_cfg},
        "num_blocks": _count(t, r"^trunk\.blocks\.(\d+)\."),
        "sequence_state_dim": c_s,
        "pairwise_state_dim": c_z,
        "sequence_head_width": c_s // seq_heads,
        "pairwise_head_width": c_z // pair_heads,
        "position_bins": (t["trunk.pairwise_positional_embedding.embedding.weight"].shape[0] - 2) // 2,
        "structure_module": sm,
    }
    return {
        "esm_type": "esm2_3B",
        "fp16_esm": True,
        "use_esm_attn_map": False,
        "esm_ablate_pairwise": False,
        "esm_ablate_sequence": False,
        "esm_input_dropout": 0,
        "embed_aa": "embedding.weight" in t,
        "bypass_lm": False,
        "lddt_head_hid_dim": t["lddt_head.1.weight"].shape[0],
        "trunk": trunk,
    }


def _default_stem(path: str) -> str:
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), ESM_STEM_FILE)
    if os.path.isfile(beside):
        return beside
    try:
        import torch

        cached = os.path.join(torch.hub.get_dir(), "checkpoints", ESM_STEM_FILE)
        if os.path.isfile(cached):
            return cached
    except Exception:  # pragma: no cover
        pass
    raise CheckpointError(
        f"{path}: a fair-esm ESMFold file holds the folding head only; the ESM-2 stem ({ESM_STEM_FILE}) "
        "was not found beside it or in torch's hub cache. Pass esm_checkpoint= (a fair-esm esm2 .pt file "
        "or the hub directory facebook/esm2_t36_3B_UR50D)"
    )


def read_fair_esmfold(
    path: str | os.PathLike, esm_checkpoint: str | os.PathLike | None = None
) -> tuple[EsmConfig, dict[str, np.ndarray]]:
    """(config, hub-named tensors) for a fair-esm ESMFold ``.pt`` file plus its ESM-2 stem."""
    import torch

    path = os.fspath(path)
    # fair-esm's config dataclasses may be named in the pickle (directly or as omegaconf object types):
    # inert stand-ins record their fields; nothing from the file is executed.
    with torch.serialization.safe_globals([stand_in(n) for n in _FAIR_CONFIG_CLASSES]):
        data = to_plain(torch_load(path))
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(
            f"{path}: not a fair-esm checkpoint (expected a dict with a 'model' state dict)"
        )
    cfg = data.get("cfg") if isinstance(data.get("cfg"), dict) else {}
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    folding: dict[str, np.ndarray] = {}
    stem_fair: dict[str, np.ndarray] = {}
    for name, value in data["model"].items():
        arr = tensor_to_numpy(value, name, path)
        if name.startswith("esm."):
            stem_fair[name[len("esm.") :]] = arr
        else:
            folding[name] = arr
    if "trunk.blocks.0.layernorm_1.weight" not in folding:
        raise CheckpointError(f"{path}: not an ESMFold checkpoint (no trunk.blocks.* tensors)")

    if stem_fair:
        stem: dict[str, np.ndarray] = {}
        unknown = []
        for name, arr in stem_fair.items():
            hf = fair_name_to_hf(strip_v2(name))
            if hf is None:
                unknown.append(name)
            elif not hf.startswith("lm_head."):
                stem[hf] = arr
        if unknown:
            raise CheckpointError(
                f"{path}: unsupported ESM stem tensor(s): esm.{', esm.'.join(unknown[:8])}"
            )
        emb = stem["esm.embeddings.word_embeddings.weight"]
        layers = 1 + max(int(k.split(".")[3]) for k in stem if k.startswith("esm.encoder.layer."))
        d = emb.shape[1]
        reg = stem.get("esm.contact_head.regression.weight")
        # Heads: from the contact regression (layers * heads inputs), else ESM-2's published widths.
        heads = reg.shape[1] // layers if reg is not None else {2560: 40, 5120: 40}.get(d, 20)
        stem_cfg = EsmConfig(
            vocab_size=emb.shape[0],
            mask_token_id=32,
            pad_token_id=1,
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=stem["esm.encoder.layer.0.intermediate.dense.weight"].shape[0],
            layer_norm_eps=1e-5,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            position_embedding_type="rotary",
            token_dropout=True,
            emb_layer_norm_before=False,
        )
    else:
        stem_path = os.fspath(esm_checkpoint) if esm_checkpoint is not None else _default_stem(path)
        stem_ckpt = load_checkpoint(stem_path)
        stem_cfg = stem_ckpt.config
        stem = {
            k if k.startswith("esm.") else "esm." + k: v
            for k, v in stem_ckpt.tensors.items()
            if not k.startswith(("lm_head.", "classifier."))
        }

    d = stem_cfg.to_dict()
    for k in ("architectures", "id2label", "label2id", "problem_type", "classifier_dropout"):
        d.pop(k, None)
    d.update(
        is_folding_model=True,
        vocab_list=list(DEFAULT_VOCAB),
        esmfold_config=folding_config_from_tensors(folding, model_cfg),
        architectures=["EsmForProteinFolding"],
    )
    config = EsmConfig.from_dict(d)
    return config, {**stem, **folding}
