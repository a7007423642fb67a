"""Test helpers: tiny random checkpoints written in the real hub layout, by HF transformers itself.

The files look like the published ``facebook/esm*`` repos: ``config.json`` + ``model.safetensors``
with per-layer ``...attention.self.rotary_embeddings.inv_freq`` (ESM-2), no tied
``lm_head.decoder.weight``, and the unused ``esm.embeddings.position_embeddings.weight`` that
ESM-2 files carry.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np

from esm_dual.common.config import EsmConfig

HEADS = ("base", "mlm", "seq", "tok")
ARCH = {"base": "EsmModel", "mlm": "EsmForMaskedLM", "seq": "EsmForSequenceClassification",
        "tok": "EsmForTokenClassification"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# Small real FASTA files shipped with the repository (tests/data/README.md names their source).
DATA_DIR = os.path.join(ROOT, "tests", "data")


def hf_class(head: str):
    """HF transformers' class for a head ("base", "mlm", "seq", "tok")."""
    import transformers

    return getattr(transformers, ARCH[head])


def hf_config(config: EsmConfig):
    """transformers.EsmConfig with the same fields as ours."""
    import transformers

    return transformers.EsmConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})


def random_hub_tensors(config: EsmConfig, head: str = "mlm", seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with every tensor (LayerNorms and biases included) non-trivial, hub names."""
    import torch

    torch.manual_seed(seed)
    model = hf_class(head)(hf_config(config))
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
    d = config.to_dict()
    d["architectures"] = architectures or [ARCH[head]]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return tensors


def write_hub_heads(directory, config: EsmConfig, seed: int = 0, heads=HEADS) -> dict[str, str]:
    """One hub checkpoint per head, same config and seed, in ``directory/<head>``: {head: path}."""
    out = {}
    for head in heads:
        out[head] = os.path.join(str(directory), head)
        write_hub_checkpoint(out[head], config, head, seed=seed)
    return out


def hf_model(directory: str, head: str = "mlm", attn: str = "eager"):
    """The HF transformers reference model for a hub-layout directory (fp32, eval mode).

    HF 5 keeps one model-level rotary table and recomputes it, so the per-layer tables in the file are
    ignored there; our test files store exactly the computed values, so both sides agree.
    """
    return hf_class(head).from_pretrained(directory, attn_implementation=attn).eval()


def hf_untied_mlm(directory: str, seed: int = 0):
    """transformers' own EsmForMaskedLM with tie_word_embeddings=False and random weights, saved by it."""
    import torch
    import transformers

    from tests.conftest import tiny_config

    cfg = tiny_config("esm2", tie_word_embeddings=False, architectures=["EsmForMaskedLM"])
    torch.manual_seed(seed)
    ref = transformers.EsmForMaskedLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    ref.save_pretrained(directory)
    return ref


def esm_warnings(caplog) -> list[str]:
    """The messages logged by the ``esm_dual`` logger (capture them with ``caplog.at_level(..., "esm_dual")``)."""
    return [r.getMessage() for r in caplog.records if r.name == "esm_dual"]


def maxdiff(a, b) -> float:
    """max |a - b| of two torch tensors, Keras/TF tensors or arrays of the same shape; of two dicts of them with the
    same keys, the largest over the keys."""
    if isinstance(a, dict):
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        return max((maxdiff(a[k], b[k]) for k in a), default=0.0)
    a, b = as_numpy(a), as_numpy(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def as_numpy(x) -> np.ndarray:
    """A float64 numpy copy of a torch tensor (any dtype, any device), a Keras variable/tensor or an array."""
    if isinstance(x, (np.ndarray, np.generic, int, float, list, tuple)):
        return np.asarray(x, dtype=np.float64)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor) and type(x).__module__.split(".")[0] == "torch":
        return x.detach().float().cpu().numpy().astype(np.float64)
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def random_labels(head: str, ids: np.ndarray, mask: np.ndarray, num_labels: int = 2, kind: str = "int", seed: int = 0):
    """Seeded numpy labels for a head: MLM (~30% of positions, -100 elsewhere), token classes (-100 on padding),
    sequence labels of ``kind`` "int" (classes), "float1" ([B] regression), "float" ([B, num_labels] regression),
    "binary" (multi-label 0/1); None for the base model."""
    rng = np.random.default_rng(seed)
    B, L = ids.shape
    if head == "mlm":
        labels = np.where(rng.random((B, L)) < 0.3, ids, -100)
        labels[:, 1] = ids[:, 1]
        return labels
    if head == "tok":
        return np.where(mask == 0, -100, rng.integers(0, num_labels, (B, L)))
    if head == "seq":
        if kind == "float1":
            return rng.normal(size=(B,)).astype(np.float32)
        if kind == "float":
            return rng.normal(size=(B, num_labels)).astype(np.float32)
        if kind == "binary":
            return (rng.random((B, num_labels)) > 0.5).astype(np.float32)
        return rng.integers(0, num_labels, (B,))
    return None


@contextlib.contextmanager
def small_disk(tmp_path, size: str):
    """A tmpfs of ``size`` ("200k") mounted at ``tmp_path/disk`` (skips the test without root)."""
    import pytest

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                          capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


AMINO_ACIDS = np.array(list("LAGVSERTIDPKQNFYMHWC"))


def random_sequences(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` random protein sequences of lengths ``lo..hi`` (seeded)."""
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(AMINO_ACIDS, size=int(k))) for k in rng.integers(lo, hi + 1, size=n)]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``esm-dual ARGV...`` in this process: (exit code, stdout, stderr)."""
    from esm_dual.cli.main import main

    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def write_fasta(path, seqs: dict[str, str], newline: str = "\n", bom: bool = False, headers=None,
                wrap: int | None = None) -> str:
    """Write ``{id: sequence}`` as FASTA: ``headers`` {id: header text} instead of the id alone, sequence lines
    cut every ``wrap`` residues, another line end (``"\\r\\n"``, ``"\\r"``) and a UTF-8 byte-order mark."""
    def lines(seq):
        step = wrap or max(len(seq), 1)
        return "".join(f"{seq[i:i + step]}\n" for i in range(0, max(len(seq), 1), step))

    text = "".join(f">{(headers or {}).get(k, k)}\n{lines(v)}" for k, v in seqs.items())
    with open(path, "wb") as f:
        f.write((b"\xef\xbb\xbf" if bom else b"") + text.replace("\n", newline).encode())
    return str(path)


def load_benchmark(name: str):
    """A script of ``benchmarks/`` (``"encoder_gpu"``) imported as a module, for its CPU smoke tests."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
