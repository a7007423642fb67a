"""fair-esm ``.pt`` files (ESM-2 "v2" files with ``cfg``, ESM-1b/ESM-1v "v1" files with ``args``) and
``<stem>-contact-regression.pt`` beside them: one reader, one writer.

Names map to the HF hub names of ``EsmForMaskedLM`` (``encoder.sentence_encoder.layers.0.self_attn.q_proj``
<-> ``esm.encoder.layer.0.attention.self.query``). Files are read through the allowlisted unpickler
(:mod:`esm_dual.io.torch_pickle`); nothing in them is executed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..common.config import ConfigError, EsmConfig
from .base import LAYOUT_FAIR_ESM, Checkpoint, CheckpointError, format_names
from .dtypes import import_torch, numpy_to_torch
from .schema import LAYER_RE, rotary_inv_freq, validate_shapes
from .torch_pickle import tensor_to_numpy, to_plain, torch_load

ESM_MASK_IDX = 32
ESM_PAD_IDX = 1
ESM_VOCAB_SIZE = 33

# fair-esm (prefix-stripped) name -> HF name; {i} is the layer index
_FAIR_TO_HF_LAYER = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "self_attn_layer_norm": "attention.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "final_layer_norm": "LayerNorm",
}
_FAIR_TO_HF_TOP = {
    "embed_tokens.weight": "esm.embeddings.word_embeddings.weight",
    "embed_positions.weight": "esm.embeddings.position_embeddings.weight",
    "emb_layer_norm_before.weight": "esm.embeddings.layer_norm.weight",
    "emb_layer_norm_before.bias": "esm.embeddings.layer_norm.bias",
    "emb_layer_norm_after.weight": "esm.encoder.emb_layer_norm_after.weight",
    "emb_layer_norm_after.bias": "esm.encoder.emb_layer_norm_after.bias",
    "contact_head.regression.weight": "esm.contact_head.regression.weight",
    "contact_head.regression.bias": "esm.contact_head.regression.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
    "lm_head.weight": "lm_head.decoder.weight",
}
_HF_TO_FAIR_TOP = {v: k for k, v in _FAIR_TO_HF_TOP.items()}
_HF_TO_FAIR_LAYER = {v: k for k, v in _FAIR_TO_HF_LAYER.items()}
_FAIR_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_FAIR_ROT_RE = re.compile(r"^layers\.(\d+)\.self_attn\.rot_emb\.inv_freq$")


def fair_name_to_hf(name: str) -> str | None:
    if name in _FAIR_TO_HF_TOP:
        return _FAIR_TO_HF_TOP[name]
    m = _FAIR_ROT_RE.match(name)
    if m:
        return f"esm.encoder.layer.{m.group(1)}.attention.self.rotary_embeddings.inv_freq"
    m = _FAIR_LAYER_RE.match(name)
    if m and m.group(2) in _FAIR_TO_HF_LAYER:
        return f"esm.encoder.layer.{m.group(1)}.{_FAIR_TO_HF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def hf_name_to_fair(name: str) -> str | None:
    if name in _HF_TO_FAIR_TOP:
        return _HF_TO_FAIR_TOP[name]
    m = LAYER_RE.match(name)
    if not m:
        return None
    i, sub = m.group(1), m.group(2)
    if sub == "attention.self.rotary_embeddings.inv_freq":
        return f"layers.{i}.self_attn.rot_emb.inv_freq"
    module, _, leaf = sub.rpartition(".")
    if module in _HF_TO_FAIR_LAYER and leaf in ("weight", "bias"):
        return f"layers.{i}.{_HF_TO_FAIR_LAYER[module]}.{leaf}"
    return None


def strip_v2(name: str) -> str:
    """fair-esm ``_load_model_and_alphabet_core_v2``: drop 'encoder.sentence_encoder.' or 'encoder.'."""
    return re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", name)


def strip_v1(name: str) -> str:
    """fair-esm ``_load_model_and_alphabet_core_v1`` for roberta_large (same string surgery)."""
    if "sentence_encoder" in name:
        name = "".join(name.split("sentence_encoder.")[1:])
    if "encoder" in name:
        name = "".join(name.split("encoder.")[1:])
    return name


def strip_arg_v1(name: str) -> str:
    return "".join(name.split("encoder_")[1:]) if "encoder" in name else name


def regression_path(path: str) -> str:
    return os.path.splitext(path)[0] + "-contact-regression.pt"


def _get(cfg: Mapping[str, Any], key: str, source: str, default: Any = ...) -> Any:
    if key in cfg:
        return cfg[key]
    if default is not ...:
        return default
    raise CheckpointError(f"{source}: the fair-esm model config has no {key!r}")


def _get_int(cfg: Mapping[str, Any], key: str, source: str) -> int:
    """A positive integer field of a fair-esm model config; ``CheckpointError`` naming the field otherwise."""
    value = _get(cfg, key, source)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (number > 0 and number.is_integer()):
        raise CheckpointError(
            f"{source}: the fair-esm model config's {key!r} must be a positive integer, got {value!r}"
        )
    return int(number)


def read_fair_esm(path: str | os.PathLike) -> Checkpoint:
    """Read a fair-esm ``.pt`` file (ESM-2, ESM-1b, ESM-1v) and ``<stem>-contact-regression.pt`` beside it.

    Names are mapped to the HF hub names of ``EsmForMaskedLM``; the tied ``lm_head.weight`` is dropped
    (kept as ``lm_head.decoder.weight`` only if it differs from the embeddings). For ESM-1b/1v files the
    ``<mask>`` row of the embeddings is zeroed, as fair-esm does when loading. The config is built the way
    HF's conversion did (vocab 33, pad 1, mask 32, eps 1e-5, no dropout, 1026 positions).
    """
    path = os.fspath(path)
    data = to_plain(torch_load(path))
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(
            f"{path}: not a fair-esm checkpoint (expected a dict with a 'model' state dict)"
        )
    state: dict[str, Any] = dict(data["model"])
    reg_path = regression_path(path)
    if os.path.isfile(reg_path):
        reg = to_plain(torch_load(reg_path))
        if not isinstance(reg, dict) or not isinstance(reg.get("model"), dict):
            raise CheckpointError(f"{reg_path}: not a fair-esm contact-regression file (no 'model' dict)")
        state.update(reg["model"])

    cfg = data.get("cfg")
    args = data.get("args")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        model_cfg = cfg["model"]
        if "trunk" in model_cfg or "esm_type" in model_cfg:
            raise CheckpointError(
                f"{path}: an ESMFold checkpoint; reading fair-esm ESMFold .pt files is not "
                "supported yet (use the hub directory facebook/esmfold_v1)"
            )
        version = 2
        state = {strip_v2(k): v for k, v in state.items()}
        n_layers = _get_int(model_cfg, "encoder_layers", path)
        d = _get_int(model_cfg, "encoder_embed_dim", path)
        heads = _get_int(model_cfg, "encoder_attention_heads", path)
        token_dropout = bool(_get(model_cfg, "token_dropout", path))
    elif isinstance(args, dict):
        version = 1
        model_args = {strip_arg_v1(k): v for k, v in args.items()}
        arch = model_args.get("arch")
        if arch != "roberta_large":
            raise CheckpointError(
                f"{path}: fair-esm architecture {arch!r} is not supported (ESM-1b/ESM-1v files "
                "have arch 'roberta_large'; ESM-1, MSA Transformer and ESM-IF are not read)"
            )
        state = {strip_v1(k): v for k, v in state.items()}
        n_layers = _get_int(model_args, "layers", path)
        d = _get_int(model_args, "embed_dim", path)
        heads = _get_int(model_args, "attention_heads", path)
        token_dropout = bool(model_args.get("token_dropout", False))
    else:
        raise CheckpointError(
            f"{path}: not a fair-esm checkpoint (neither 'cfg' with a 'model' config nor 'args')"
        )

    tensors: dict[str, np.ndarray] = {}
    unknown = []
    for name, value in state.items():
        hf = fair_name_to_hf(name)
        if hf is None:
            unknown.append(name)
            continue
        tensors[hf] = tensor_to_numpy(value, name, path)
    if unknown:
        raise CheckpointError(f"{path}: unsupported fair-esm tensor(s): {format_names(unknown)}")

    emb_name = "esm.embeddings.word_embeddings.weight"
    if emb_name not in tensors:
        raise CheckpointError(f"{path}: missing tensor 'embed_tokens.weight'")
    emb = tensors[emb_name]
    decoder = tensors.pop("lm_head.decoder.weight", None)
    if decoder is not None and not (decoder.shape == emb.shape and np.array_equal(decoder, emb)):
        tensors["lm_head.decoder.weight"] = decoder  # untied (never the case in released files)
    if emb.shape[0] != ESM_VOCAB_SIZE:
        raise CheckpointError(
            f"{path}: tensor 'embed_tokens.weight' has {emb.shape[0]} rows; the ESM alphabet "
            f"has {ESM_VOCAB_SIZE}"
        )
    if version == 1:
        emb[ESM_MASK_IDX] = 0  # fair-esm: model_state["embed_tokens.weight"][alphabet.mask_idx].zero_()

    fc1 = tensors.get("esm.encoder.layer.0.intermediate.dense.weight")
    ffn = int(fc1.shape[0]) if fc1 is not None else 4 * d
    if version == 1:
        pos = tensors.get("esm.embeddings.position_embeddings.weight")
        if pos is None:
            raise CheckpointError(f"{path}: missing tensor 'embed_positions.weight' of an ESM-1b/1v model")
        max_pos = int(pos.shape[0])
    else:
        max_pos = 1026
    try:
        config = EsmConfig(
            vocab_size=ESM_VOCAB_SIZE,
            mask_token_id=ESM_MASK_IDX,
            pad_token_id=ESM_PAD_IDX,
            hidden_size=d,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=max_pos,
            layer_norm_eps=1e-5,  # PyTorch default used in fairseq
            attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
            emb_layer_norm_before="esm.embeddings.layer_norm.weight" in tensors,
            token_dropout=token_dropout,
            position_embedding_type="rotary" if version == 2 else "absolute",
            architectures=["EsmForMaskedLM"],
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: the fair-esm model config does not make a valid ESM config ({e})") from None
    validate_shapes(config, tensors, path)
    return Checkpoint(config=config, tensors=tensors, source=path, layout=LAYOUT_FAIR_ESM)


def check_fair_esm_config(path: str, config: EsmConfig) -> None:
    """Raise ``CheckpointError`` unless fair-esm can hold ``config`` in a file named ``path``.

    fair-esm picks the file format from the stem (``esm2*`` is ESM-2) and hard-codes the alphabet,
    LayerNorm eps and, for ESM-2, the FFN width, rotary base and the absence of an embedding LayerNorm.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    rotary = config.position_embedding_type == "rotary"
    if not path.endswith(".pt"):
        raise CheckpointError(f"{path}: fair-esm files end in .pt")
    if rotary != stem.startswith("esm2"):
        want = "start with 'esm2'" if rotary else "not start with 'esm2'"
        raise CheckpointError(
            f"{path}: fair-esm picks the file format from the name: the stem of an "
            f"{'ESM-2' if rotary else 'ESM-1b/1v'} file must {want}"
        )
    problems = []
    if (
        config.vocab_size != ESM_VOCAB_SIZE
        or config.pad_token_id != ESM_PAD_IDX
        or config.mask_token_id != ESM_MASK_IDX
    ):
        problems.append("the ESM alphabet (vocab_size 33, pad_token_id 1, mask_token_id 32)")
    if not math.isclose(config.layer_norm_eps, 1e-5):
        problems.append("layer_norm_eps 1e-5")
    if rotary and config.intermediate_size != 4 * config.hidden_size:
        problems.append(
            f"intermediate_size = 4 * hidden_size = {4 * config.hidden_size} (hard-coded in ESM2)"
        )
    if rotary and config.emb_layer_norm_before:
        problems.append("no emb_layer_norm_before (ESM2 has none)")
    if rotary and not math.isclose(config.rope_theta, 10000.0):
        problems.append("rope_theta 10000")
    if not config.tie_word_embeddings:
        problems.append("tie_word_embeddings=True (fair-esm ties lm_head.weight to embed_tokens)")
    if problems:
        raise CheckpointError(
            f"{path}: fair-esm cannot represent this config; it needs " + "; ".join(problems)
        )


def save_fair_esm(
    path: str | os.PathLike,
    config: EsmConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    source: str | None = None,
    check_mask_row: bool = False,
    dropped: list[str] | None = None,
    notes: list[str] | None = None,
) -> str:
    """Write a fair-esm ``.pt`` file that ``esm.pretrained.load_model_and_alphabet_local`` loads.

    ESM-2 (rotary) configs give a v2 file (``cfg={"model": Namespace(...)}``; the stem must start with
    ``"esm2"``, which is how fair-esm picks the format); ESM-1b/1v (learned positions) give a v1 file
    (``args=Namespace(arch="roberta_large", ...)``; the stem must not start with ``"esm2"``). Contact
    regression tensors, when present, go to ``<stem>-contact-regression.pt`` beside it (fair-esm reads
    that file for every stem not containing ``"esm1v"``). Tensor names: HF MLM names, with or without
    the ``esm.`` prefix. Returns the path.

    ``tensors`` is read once, in order, one tensor at a time (a lazy mapping works: the converter passes one
    over its source), and each array becomes a torch tensor without a copy, so the weights are in memory
    once. ``source`` names the input in messages; ``check_mask_row`` refuses an ESM-1b/1v embedding whose
    ``<mask>`` row is not zero (fair-esm zeroes it when loading, so the file would compute something else);
    ``dropped`` receives the names with no place in the file (the unused position table of ESM-2 hub files,
    ``position_ids``); ``notes`` receives the missing-regression notice instead of a warning.
    """
    torch = import_torch()
    path = os.fspath(path)
    source = source or path
    stem = os.path.splitext(os.path.basename(path))[0]
    check_fair_esm_config(path, config)
    rotary = config.position_embedding_type == "rotary"
    prefix = "encoder.sentence_encoder."
    emb_key = prefix + "embed_tokens.weight"

    model: OrderedDict[str, Any] = OrderedDict()
    regression: OrderedDict[str, Any] = OrderedDict()
    unknown = []
    decoder_name = None
    for name in tensors:
        key = name
        if not key.startswith(("esm.", "lm_head.")) and key.startswith(("embeddings.", "encoder.", "contact_head.")):
            key = "esm." + key
        if key == "lm_head.decoder.weight":
            decoder_name = name  # compared with the embeddings once both are read
            continue
        if (key == "esm.embeddings.position_embeddings.weight" and rotary) or key.endswith("position_ids"):
            if dropped is not None:
                dropped.append(name)  # ESM-2 has no learned positions (hub files carry an unused table)
            continue
        if key in ("esm.rotary_embeddings.inv_freq", "esm.encoder.rotary_embeddings.inv_freq"):
            continue  # a model-level table: fair-esm's per-layer buffers are written below
        fair = hf_name_to_fair(key)
        if fair is None:
            unknown.append(name)
            continue
        arr = np.asarray(tensors[name])
        validate_shapes(config, {key: arr}, source)
        t = numpy_to_torch(arr)
        if fair.startswith("contact_head."):
            regression[fair] = t
        elif fair.startswith("lm_head."):
            model["encoder." + fair] = t
        else:
            model[prefix + fair] = t
            if fair == "embed_tokens.weight" and check_mask_row and not rotary and bool(t[ESM_MASK_IDX].any()):
                raise CheckpointError(
                    f"{source}: the <mask> row (32) of the word embeddings is non-zero, but fair-esm zeroes it "
                    "when it loads an ESM-1b/1v file, so the converted model would compute different logits "
                    "(released ESM-1b/1v checkpoints have it zeroed)")
    if unknown:
        raise CheckpointError(f"{path}: tensor(s) with no fair-esm equivalent: {format_names(unknown)}")
    required = [emb_key, "encoder.lm_head.dense.weight", "encoder.lm_head.bias"]
    missing = [k for k in required if k not in model]
    if missing:
        raise CheckpointError(
            f"{path}: fair-esm needs the full masked-LM model; missing {', '.join(missing)}"
        )
    emb = model[emb_key]
    if decoder_name is not None:
        decoder = np.asarray(tensors[decoder_name])
        validate_shapes(config, {"lm_head.decoder.weight": decoder}, source)
        if not torch.equal(numpy_to_torch(decoder), emb):
            raise CheckpointError(
                f"{path}: fair-esm ties lm_head.weight to embed_tokens, but tensor "
                "'lm_head.decoder.weight' differs from 'esm.embeddings.word_embeddings.weight'"
            )
    model["encoder.lm_head.weight"] = emb  # tied: the same tensor, as in released files
    if rotary:
        inv = torch.from_numpy(rotary_inv_freq(config.head_dim, 10000.0))  # check_fair_esm_config: rope_theta 1e4
        for i in range(config.num_hidden_layers):
            model.setdefault(f"{prefix}layers.{i}.self_attn.rot_emb.inv_freq", inv.clone())

    fields = dict(
        encoder_layers=config.num_hidden_layers,
        encoder_embed_dim=config.hidden_size,
        encoder_ffn_embed_dim=config.intermediate_size,
        encoder_attention_heads=config.num_attention_heads,
        max_positions=config.max_position_embeddings - ESM_PAD_IDX - 1,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        token_dropout=bool(config.token_dropout),
    )
    if rotary:
        data: dict[str, Any] = {"cfg": {"model": argparse.Namespace(_name="esm2", arch="esm2", **fields)},
                                "model": model}
    else:
        data = {"args": argparse.Namespace(arch="roberta_large", **fields), "model": model}
    reg_path = regression_path(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".pt.tmp", dir=parent)
    os.close(fd)
    tmp_reg = None
    try:
        torch.save(data, tmp)
        if regression:
            fd, tmp_reg = tempfile.mkstemp(prefix=f".{stem}.", suffix=".reg.tmp", dir=parent)
            os.close(fd)
            torch.save({"model": regression}, tmp_reg)
            os.replace(tmp_reg, reg_path)
            tmp_reg = None
        os.replace(tmp, path)
        if not regression and os.path.lexists(reg_path):
            os.remove(reg_path)  # a stale head of an earlier save would be read back with this file
    finally:
        for t in (tmp, tmp_reg):
            if t is not None and os.path.exists(t):
                os.remove(t)
    if not regression and "esm1v" not in stem:
        note = (f"no contact-regression tensors: fair-esm's load_model_and_alphabet_local expects "
                f"{os.path.basename(reg_path)} beside the file")
        if notes is not None:
            notes.append(note)
        else:
            warnings.warn(f"{path}: {note} for this name", stacklevel=2)
    return path


__all__ = [
    "ESM_MASK_IDX",
    "ESM_PAD_IDX",
    "ESM_VOCAB_SIZE",
    "check_fair_esm_config",
    "fair_name_to_hf",
    "hf_name_to_fair",
    "read_fair_esm",
    "regression_path",
    "save_fair_esm",
    "strip_arg_v1",
    "strip_v1",
    "strip_v2",
]
