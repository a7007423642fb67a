"""Test helpers: tiny random checkpoints written in the real hub layout, by HF transformers itself.

The files look like the published ``facebook/esm*`` repos: ``config.json`` + ``model.safetensors``
with per-layer ``...attention.self.rotary_embeddings.inv_freq`` (ESM-2), no tied
``lm_head.decoder.weight``, and the unused ``esm.embeddings.position_embeddings.weight`` that
ESM-2 files carry.
"""

from __future__ import annotations

import json
import os

import numpy as np

from esm_dual.common.config import EsmConfig

HEADS = ("base", "mlm", "seq", "tok")


def random_hub_tensors(config: EsmConfig, head: str = "mlm", seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with every tensor (LayerNorms and biases included) non-trivial, hub names."""
    import torch
    import transformers

    cls = {
        "base": transformers.EsmModel,
        "mlm": transformers.EsmForMaskedLM,
        "seq": transformers.EsmForSequenceClassification,
        "tok": transformers.EsmForTokenClassification,
    }[head]
    hf_cfg = transformers.EsmConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    torch.manual_seed(seed)
    model = cls(hf_cfg)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        if "inv_freq" in name or name.endswith("position_ids"):
            continue
        a = rng.normal(0.0, 0.2, size=tuple(t.shape)).astype(np.float32)
        if name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight") or \
                name.endswith("emb_layer_norm_after.weight"):
            a = 1.0 + a
        out[name] = a
    prefix = "" if head == "base" else "esm."
    if head == "mlm":
        out.pop("lm_head.decoder.weight", None)  # tied to the word embeddings; absent from hub files
    if config.position_embedding_type == "rotary":
        k = config.head_dim
        inv = (1.0 / (config.rope_theta ** (np.arange(0, k, 2, dtype=np.float32) / k))).astype(np.float32)
        for i in range(config.num_hidden_layers):
            out[f"{prefix}encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = inv.copy()
        out.pop(f"{prefix}rotary_embeddings.inv_freq", None)
        # ESM-2 hub files carry an unused learned-position table.
        out[f"{prefix}embeddings.position_embeddings.weight"] = rng.normal(
            0, 0.2, size=(config.max_position_embeddings, config.hidden_size)).astype(np.float32)
    return out


def write_hub_checkpoint(directory: str, config: EsmConfig, head: str = "mlm", seed: int = 0,
                         architectures: list[str] | None = None) -> dict[str, np.ndarray]:
    """Write ``config.json`` + ``model.safetensors`` as the hub has them; returns the tensors."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = random_hub_tensors(config, head, seed)
    arch = {"base": "EsmModel", "mlm": "EsmForMaskedLM", "seq": "EsmForSequenceClassification",
            "tok": "EsmForTokenClassification"}[head]
    d = config.to_dict()
    d["architectures"] = architectures or [arch]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return tensors


def hf_model(directory: str, head: str = "mlm", attn: str = "eager"):
    """The HF transformers reference model for a hub-layout directory (fp32, eval mode).

    HF 5 keeps one model-level rotary table and recomputes it, so the per-layer tables in the file are
    ignored there; our test files store exactly the computed values, so both sides agree.
    """
    import transformers

    cls = {
        "base": transformers.EsmModel,
        "mlm": transformers.EsmForMaskedLM,
        "seq": transformers.EsmForSequenceClassification,
        "tok": transformers.EsmForTokenClassification,
    }[head]
    model = cls.from_pretrained(directory, attn_implementation=attn)
    return model.eval()


def load_benchmark(name: str):
    """A script of ``benchmarks/`` (``"encoder_gpu"``) imported as a module, for its CPU smoke tests."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
