"""End-to-end embedding speed: ``esm-dual embed`` vs fair-esm's extract script vs HF transformers.

Each tool goes from a FASTA file to one fair-esm ``<label>.pt`` per record on disk (``label``,
``representations`` {L: [N, D]}, ``mean_representations`` {L: [D]} of the last layer L), on the same
random ESM-2 weights of one shape (``--shape``, default 650M) and the same FASTA files, one after the
other in this one process, on one GPU. The clock runs from the call to the last file written: model
loading, reading and tokenising the FASTA, batching, the forward passes and the writes are all in it.

- ``esm_dual``: ``esm_dual.cli.main.main(["embed", FASTA, OUT, "-m", HUB_DIR, "--format", "pt",
  "--include", "mean", "per_tok", "--repr-layers", "-1", "-q"])``, ``--dtype auto`` (fp16 on GPU,
  fp32 on CPU), at fair-esm's token budget (4096) and again with ``--toks-per-batch --big-budget``
  (``esm_dual_big``, default 16384: esm-dual's own default on a GPU).
- ``fair_esm``: fair-esm 2.0's extract script (``esm.scripts.extract``: ``create_parser()`` +
  ``run(args)``, or ``--fair-esm-extract PATH`` to a copy of its ``scripts/extract.py``), in-process, on a
  fair-esm ``.pt`` of the same weights, ``--include mean per_tok --repr_layers <last>``, default
  ``--toks_per_batch 4096``, fp32 as shipped (it calls ``model.cuda()``). The fair-esm 2.0.0 wheel on PyPI
  ships no ``esm.scripts``; then the same steps are run through fair-esm's API (``driver`` in the JSON says
  which: load_model_and_alphabet, FastaBatchedDataset.get_batch_indices(extra_toks_per_seq=1), a DataLoader
  with 2 workers and the batch converter, one batch at a time to the CPU, a cloned slice per record).
- ``hf``: ``transformers.EsmModel`` (``attn_implementation="sdpa"``, the dtype esm-dual picked) written as a
  competent user would: ``transformers.EsmTokenizer`` (the hub directory's ``vocab.txt``), sequences cut to
  1022 residues and sorted by length, batches of at most the same padded-token budget as esm-dual's (4096),
  the last hidden state to the CPU once per batch (fp32), per-residue states without BOS/EOS and their mean,
  ``torch.save`` per record in fair-esm's format; again at ``--big-budget`` (``hf_big``), so the big-budget
  ratio ``esm_dual_big/hf_best`` compares against HF's faster budget.

Weights: a seeded random HF ``EsmForMaskedLM`` of the shape (LayerNorms perturbed), saved before any clock
starts as a hub-layout directory (config.json + model.safetensors + vocab.txt) and as a fair-esm ``.pt``
(``esm_dual.io.fair_esm.save_fair_esm``). Every tool first runs once, untimed, on a small warm-up FASTA.

Datasets (``--fasta``, repeatable; default ``some_proteins.fasta`` and ``P62593.fasta`` from ``--data-dir``,
default the repository's ``tests/data``; missing files are skipped with a note) plus
``--lognormal N`` random UniRef50-like sequences (log-normal lengths, median 270, sigma 0.75, clipped to
30..1022, seeded). ``--max-records N`` keeps the first N records of each. Per dataset and tool: records,
residues (after truncation to 1022), seconds and residues/s, the ratios esm-dual / fair-esm and esm-dual /
HF, and the largest absolute difference of the mean embeddings of the first ``--check-records`` records
(esm-dual vs fair-esm and vs HF; fp16 vs fp32 on GPU, so differences of ~1e-2 relative are expected).
A line per dataset goes to stderr as it finishes, and ``--out`` is rewritten after every dataset.

    PYTHONUNBUFFERED=1 python benchmarks/embed_gpu.py [--shape 650M] [--data-dir .bench_data] [--out r.json]
    python benchmarks/embed_gpu.py --device cpu --shape tiny --lognormal 20 --fasta FILE   # CPU smoke test

Figures (with the card and software they were measured on): docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np

# The real shapes are the project's presets (their published config.json); "tiny" is the smoke test's.
PRESETS = {"650M": "esm2_t33_650M_UR50D", "150M": "esm2_t30_150M_UR50D", "35M": "esm2_t12_35M_UR50D",
           "8M": "esm2_t6_8M_UR50D"}
TINY = dict(vocab_size=33, mask_token_id=32, pad_token_id=1, position_embedding_type="rotary", token_dropout=True,
            emb_layer_norm_before=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            max_position_embeddings=1026, layer_norm_eps=1e-5, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=256)
SHAPES = (*PRESETS, "tiny")


def shape_config(shape: str) -> dict:
    """The HF config dict of ``shape`` (metadata keys of the published file left out)."""
    if shape == "tiny":
        return dict(TINY)
    from esm_dual.common.presets import published_config_dict

    d = published_config_dict(PRESETS[shape])
    return {k: v for k, v in d.items()
            if k not in ("_name_or_path", "architectures", "torch_dtype", "transformers_version")}


TRUNC = 1022  # residues kept per sequence (fair-esm's --truncation_seq_length default)
DEFAULT_BUDGET = 4096  # esm-dual's and fair-esm's default --toks-per-batch
AMINO = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
DEFAULT_FASTAS = ("some_proteins.fasta", "P62593.fasta")
ALL_TOOLS = ("esm_dual", "fair_esm", "hf")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _dims(shape: str) -> dict:
    c = shape_config(shape)
    return {k: c[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}


# ---- data ------------------------------------------------------------------------------------------


def read_fasta(path: str) -> tuple[list[str], list[str]]:
    """(labels, sequences); a label is the whole header line without '>' (fair-esm's label)."""
    from esm_dual.common.fasta import read_fasta as records

    recs = list(records(path, check_duplicates=False, allow_empty=True))
    return [r.description for r in recs], [r.sequence for r in recs]


def write_fasta(path: str, labels, seqs) -> None:
    """One line per sequence, through the library's writer."""
    from esm_dual.common.fasta import write_fasta as write

    write(path, zip(labels, seqs), width=None)


def lognormal_records(n: int, seed: int, prefix: str = "lognormal", lengths=None):
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = np.clip(np.round(rng.lognormal(math.log(270.0), 0.75, size=n)).astype(int), 30, TRUNC)
    labels = [f"{prefix}_{i}" for i in range(len(lengths))]
    return labels, ["".join(rng.choice(AMINO, size=int(m))) for m in lengths]


def default_data_dir(repo_root: str) -> str:
    """The real FASTA files shipped with the repository (tests/data)."""
    return os.path.join(repo_root, "tests", "data")


# ---- weights ---------------------------------------------------------------------------------------


def build_weights(shape: str, workdir: str, device: str, seed: int) -> tuple[str, str, int]:
    """Random ESM-2 weights of ``shape`` as a hub directory and a fair-esm .pt; (hub_dir, pt_path, layers)."""
    import torch
    import transformers

    from esm_dual.common.config import EsmConfig
    from esm_dual.common.tokenizer import EsmTokenizer
    from esm_dual.io.fair_esm import save_fair_esm
    from esm_dual.io.hub import save_checkpoint

    cfg = shape_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it is fast
        hf = transformers.EsmForMaskedLM(transformers.EsmConfig(**cfg))
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial LayerNorms, so that a mix-up of them would show in the check
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                noise = torch.randn(p.shape, generator=gen, device=device)
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.02 * noise)
    tensors = {k: v.detach().float().cpu().numpy() for k, v in hf.state_dict().items()
               if "inv_freq" not in k and k != "lm_head.decoder.weight"}  # hub files carry neither
    del hf
    config = EsmConfig.from_dict(dict(cfg, architectures=["EsmForMaskedLM"]))
    hub = os.path.join(workdir, f"esm2_{shape}_random")
    save_checkpoint(hub, config, tensors)
    EsmTokenizer().save_pretrained(hub)
    L = cfg["num_hidden_layers"]
    pt = save_fair_esm(os.path.join(workdir, f"esm2_t{L}_{shape}_random.pt"), config, tensors)
    return hub, pt, L


# ---- the three tools -------------------------------------------------------------------------------


def run_esm_dual(fasta: str, outdir: str, hub: str, device: str, budget: int | None) -> None:
    from esm_dual.cli.main import main

    argv = ["embed", fasta, outdir, "-m", hub, "--format", "pt", "--include", "mean", "per_tok",
            "--repr-layers", "-1", "-q", "--device", device]
    if budget is not None:
        argv += ["--toks-per-batch", str(budget)]
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"esm-dual embed exited with status {rc}")


def _fair_esm_extract_module(path: str | None):
    """fair-esm's extract script as a module: ``--fair-esm-extract PATH``, else ``esm.scripts.extract``,
    else None (the fair-esm 2.0.0 wheel does not ship it)."""
    import importlib
    import importlib.util

    if path:
        spec = importlib.util.spec_from_file_location("_fair_esm_extract", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module("esm.scripts.extract")
    except ImportError:
        return None


def run_fair_esm(fasta: str, outdir: str, pt: str, layer: int, device: str, extract_mod) -> None:
    import torch

    argv = [pt, fasta, outdir, "--include", "mean", "per_tok", "--repr_layers", str(layer)]
    if device == "cpu":
        argv.append("--nogpu")
    # fair-esm's loader calls torch.load without weights_only; torch >= 2.6 refuses argparse.Namespace
    # (our own file, so allow that one class). Its per-batch prints go nowhere (stdout is for the JSON).
    with torch.serialization.safe_globals([argparse.Namespace]), contextlib.redirect_stdout(io.StringIO()):
        if extract_mod is not None:
            extract_mod.run(extract_mod.create_parser().parse_args(argv))
        else:
            _fair_esm_extract_steps(pt, fasta, outdir, layer, use_gpu=device != "cpu")


def _fair_esm_extract_steps(pt: str, fasta: str, outdir: str, layer: int, use_gpu: bool) -> None:
    """What fair-esm's scripts/extract.py does for ``--include mean per_tok`` with its defaults, through
    fair-esm's public API, for installs without ``esm.scripts``."""
    import esm
    import torch

    model, alphabet = esm.pretrained.load_model_and_alphabet(pt)
    model.eval()
    gpu = use_gpu and torch.cuda.is_available()
    if gpu:
        model = model.cuda()
    dataset = esm.FastaBatchedDataset.from_file(fasta)
    sampler = dataset.get_batch_indices(DEFAULT_BUDGET, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(TRUNC),
                                         batch_sampler=sampler, num_workers=2)
    os.makedirs(outdir, exist_ok=True)
    with torch.no_grad():
        for labels, strs, toks in loader:
            if gpu:
                toks = toks.to(device="cuda", non_blocking=True)
            out = model(toks, repr_layers=[layer], return_contacts=False)
            out["logits"].to(device="cpu")  # the script copies the logits to the host too
            reps = {k: t.to(device="cpu") for k, t in out["representations"].items()}
            for i, label in enumerate(labels):
                n = min(TRUNC, len(strs[i]))
                result = {"label": label,
                          "representations": {k: t[i, 1:n + 1].clone() for k, t in reps.items()},
                          "mean_representations": {k: t[i, 1:n + 1].mean(0).clone() for k, t in reps.items()}}
                torch.save(result, os.path.join(outdir, f"{label}.pt"))


def run_hf(fasta: str, outdir: str, hub: str, layer: int, device: str, dtype, budget: int) -> None:
    """HF transformers as a competent user writes it (see the module docstring)."""
    import torch
    import transformers

    tokenizer = transformers.EsmTokenizer.from_pretrained(hub)
    model = transformers.EsmModel.from_pretrained(hub, dtype=dtype, attn_implementation="sdpa",
                                                  add_pooling_layer=False).to(device).eval()
    labels, seqs = read_fasta(fasta)
    seqs = [s[:TRUNC] for s in seqs]
    from esm_dual.cli._common import token_batches

    # length-sorted batches of at most `budget` padded tokens, BOS/EOS included: esm-dual's own grouping
    batches = token_batches([len(s) for s in seqs], budget)
    os.makedirs(outdir, exist_ok=True)
    with torch.inference_mode():
        for b in batches:
            enc = tokenizer([seqs[i] for i in b], padding=True, return_tensors="pt")
            h = model(input_ids=enc["input_ids"].to(device, non_blocking=True),
                      attention_mask=enc["attention_mask"].to(device, non_blocking=True)).last_hidden_state
            h = h.float().cpu()
            for j, i in enumerate(b):
                r = h[j, 1:len(seqs[i]) + 1].clone()
                torch.save({"label": labels[i], "representations": {layer: r},
                            "mean_representations": {layer: r.mean(0)}}, os.path.join(outdir, f"{labels[i]}.pt"))


# ---- measuring -------------------------------------------------------------------------------------


def read_means(outdir: str, labels, layer: int) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for label in labels:
        path = os.path.join(outdir, f"{label}.pt")
        if os.path.exists(path):
            d = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            out[label] = d["mean_representations"][layer].float().numpy().copy()
    return out


def diff(a: dict, b: dict) -> dict:
    common = [k for k in a if k in b]
    if not common:
        return {"records": 0}
    x = np.stack([a[k] for k in common]).astype(np.float64)
    y = np.stack([b[k] for k in common]).astype(np.float64)
    d = np.abs(x - y).max()
    return {"records": len(common), "max_abs": float(d), "max_rel": float(d / max(np.abs(y).max(), 1e-30))}


class Bench:
    def __init__(self, args, hub, pt, layers, workdir):
        import torch

        self.args, self.hub, self.pt, self.layer, self.workdir = args, hub, pt, layers, workdir
        self.torch = torch
        self.cuda = args.device.startswith("cuda")
        self.dtype = torch.float16 if self.cuda else torch.float32  # esm-dual's --dtype auto
        self.extract_mod = _fair_esm_extract_module(args.fair_esm_extract) if "fair_esm" in args.tools else None
        self.runs = []  # (name, fn(fasta, outdir)), in order
        if "esm_dual" in args.tools:
            self.runs.append(("esm_dual", lambda f, o: run_esm_dual(f, o, hub, args.device, DEFAULT_BUDGET)))
            if args.big_budget:
                self.runs.append(("esm_dual_big", lambda f, o: run_esm_dual(f, o, hub, args.device, args.big_budget)))
        if "fair_esm" in args.tools:
            self.runs.append(("fair_esm", lambda f, o: run_fair_esm(f, o, pt, layers, args.device, self.extract_mod)))
        if "hf" in args.tools:
            self.runs.append(("hf", lambda f, o: run_hf(f, o, hub, layers, args.device, self.dtype, DEFAULT_BUDGET)))
            if args.big_budget:
                self.runs.append(("hf_big", lambda f, o: run_hf(f, o, hub, layers, args.device, self.dtype,
                                                                args.big_budget)))
        self.n = 0

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def cleanup(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def warm_up(self):
        labels, seqs = lognormal_records(0, self.args.seed + 7, "warmup", lengths=[30, 64, 128, 250, 500, TRUNC] * 2)
        fasta = os.path.join(self.workdir, "warmup.fasta")
        write_fasta(fasta, labels, seqs)
        for name, fn in self.runs:
            out = os.path.join(self.workdir, f"warmup_{name}")
            t0 = time.perf_counter()
            try:
                fn(fasta, out)
                log(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s")
            except Exception as e:
                log(f"  warm-up {name} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            shutil.rmtree(out, ignore_errors=True)
            self.cleanup()

    def dataset(self, name: str, fasta: str) -> dict:
        labels, seqs = read_fasta(fasta)
        residues = sum(min(len(s), TRUNC) for s in seqs)
        res = {"name": name, "records": len(labels), "residues": residues, "tools": {}, "check": {}}
        check_labels = labels[: self.args.check_records]
        means = {}
        for tool, fn in self.runs:
            self.n += 1
            out = os.path.join(self.workdir, f"out{self.n}_{tool}")
            self.cleanup()
            self.sync()
            t0 = time.perf_counter()
            try:
                fn(fasta, out)
                self.sync()
                dt = time.perf_counter() - t0
            except Exception as e:
                res["tools"][tool] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(f"  {name} {tool} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                shutil.rmtree(out, ignore_errors=True)
                continue
            missing = sum(not os.path.exists(os.path.join(out, f"{label}.pt")) for label in labels)
            r = {"records": len(labels), "residues": residues, "seconds": round(dt, 3),
                 "residues_per_s": round(residues / dt, 1)}
            r["toks_per_batch"] = self.args.big_budget if tool.endswith("_big") else DEFAULT_BUDGET
            if missing:
                r["missing_files"] = missing
            means[tool] = read_means(out, check_labels, self.layer)
            shutil.rmtree(out, ignore_errors=True)
            res["tools"][tool] = r
            log(f"  {name} {tool}: {r['seconds']} s, {r['residues_per_s']:.0f} res/s")
        rate = {t: r["residues_per_s"] for t, r in res["tools"].items() if "residues_per_s" in r}
        ratios = {}
        for ours in ("esm_dual", "esm_dual_big"):
            for ref in ("fair_esm", "hf", "hf_big"):
                if ours in rate and ref in rate:
                    ratios[f"{ours}/{ref}"] = round(rate[ours] / rate[ref], 3)
        hf_best = max((rate[t] for t in ("hf", "hf_big") if t in rate), default=None)
        if "esm_dual_big" in rate and hf_best:
            ratios["esm_dual_big/hf_best"] = round(rate["esm_dual_big"] / hf_best, 3)
        res["ratios"] = ratios
        for ours, ref in (("esm_dual", "fair_esm"), ("esm_dual", "hf"), ("esm_dual", "esm_dual_big"),
                          ("hf", "hf_big")):
            if ours in means and ref in means:
                res["check"][f"{ours}_vs_{ref}"] = diff(means[ours], means[ref])
        return res


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod, key in (("transformers", "transformers"), ("esm_dual", "esm_dual")):
        try:
            out[key] = __import__(mod).__version__
        except Exception:
            out[key] = None
    try:
        import esm

        out["fair_esm"] = getattr(esm, "__version__", None)
    except Exception:
        out["fair_esm"] = None
    return out


def main(argv=None) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="650M")
    p.add_argument("--fasta", action="append", default=None, metavar="FASTA",
                   help="a dataset (repeatable); default: some_proteins.fasta and P62593.fasta from --data-dir")
    p.add_argument("--data-dir", default=None,
                   help="where the default FASTAs are (default: the repository's tests/data)")
    p.add_argument("--lognormal", type=int, default=2000, metavar="N",
                   help="also N random UniRef50-like sequences (0: none; default 2000)")
    p.add_argument("--max-records", type=int, default=2000, metavar="N",
                   help="first N records of each dataset (0: all; default 2000)")
    p.add_argument("--tools", default=",".join(ALL_TOOLS), help="comma-separated subset of esm_dual,fair_esm,hf")
    p.add_argument("--big-budget", type=int, default=16384, metavar="N",
                   help="second esm-dual run with --toks-per-batch N (0: none; default 16384)")
    p.add_argument("--check-records", type=int, default=64, metavar="N",
                   help="records per dataset whose mean embeddings are compared (default 64)")
    p.add_argument("--fair-esm-extract", default=None, metavar="PATH",
                   help="fair-esm's scripts/extract.py, when esm.scripts.extract is not installed")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="parent of the temporary directory (weights, outputs)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--out", default=None, help="also write the JSON here (rewritten after every dataset)")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in args.tools if t not in ALL_TOOLS]
    if bad:
        p.error(f"--tools: unknown {bad}; choose from {','.join(ALL_TOOLS)}")

    import torch

    try:
        import transformers

        transformers.logging.set_verbosity_error()  # the unused lm_head.* of the MLM file, at every load
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    result = {
        "benchmark": "embed_gpu", "shape": args.shape, "config": _dims(args.shape), "device": args.device,
        "card": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "versions": versions(), "tools": args.tools, "dtype": {"esm_dual": "fp16" if cuda else "fp32",
                                                               "hf": "fp16" if cuda else "fp32", "fair_esm": "fp32"},
        "toks_per_batch": {"default": DEFAULT_BUDGET, "esm_dual_big": args.big_budget, "hf_big": args.big_budget},
        "hf_tokenizer": "transformers.EsmTokenizer (the hub directory's vocab.txt)",
        "truncation": TRUNC, "datasets": [], "notes": [],
    }

    def dump():
        text = json.dumps(result, indent=2)
        if args.out:
            with open(args.out + ".tmp", "w") as f:
                f.write(text + "\n")
            os.replace(args.out + ".tmp", args.out)
        return text

    workdir = tempfile.mkdtemp(prefix="embed_gpu_", dir=args.work_dir)
    try:
        # datasets: copies (first --max-records records) in the work dir, so that every tool reads the same file
        data_dir = args.data_dir or default_data_dir(repo)
        paths = args.fasta or [os.path.join(data_dir, f) for f in DEFAULT_FASTAS]
        datasets = []
        for path in paths:
            if not os.path.isfile(path):
                result["notes"].append(f"skipped {path}: not found")
                log(f"skipped {path}: not found")
                continue
            labels, seqs = read_fasta(path)
            if args.max_records:
                labels, seqs = labels[: args.max_records], seqs[: args.max_records]
            name = os.path.splitext(os.path.basename(path))[0]
            copy = os.path.join(workdir, f"data_{len(datasets)}_{name}.fasta")
            write_fasta(copy, labels, seqs)
            datasets.append((name, copy))
        if args.lognormal:
            labels, seqs = lognormal_records(args.lognormal, args.seed)
            copy = os.path.join(workdir, f"data_{len(datasets)}_lognormal.fasta")
            write_fasta(copy, labels, seqs)
            datasets.append((f"lognormal{args.lognormal}", copy))

        t0 = time.perf_counter()
        hub, pt, layers = build_weights(args.shape, workdir, args.device, args.seed)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        bench = Bench(args, hub, pt, layers, workdir)
        if "fair_esm" in args.tools:
            result["fair_esm_driver"] = ("esm.scripts.extract" if bench.extract_mod is not None and
                                         not args.fair_esm_extract else args.fair_esm_extract or
                                         "extract.py's steps through fair-esm's API (no esm.scripts installed)")
        log(f"{args.shape} on {result['card']}: weights built and saved in {result['build_s']} s; warming up")
        bench.warm_up()
        for name, fasta in datasets:
            log(f"dataset {name} ...")
            r = bench.dataset(name, fasta)
            result["datasets"].append(r)
            rates = ", ".join(f"{t} {v.get('residues_per_s', 'FAILED')}" for t, v in r["tools"].items())
            checks = ", ".join(f"{k} {v.get('max_abs', float('nan')):.3g}" for k, v in r["check"].items())
            log(f"RESULT {name}: {r['records']} records, {r['residues']} residues; res/s: {rates}; "
                f"ratios {r['ratios']}; max|d mean| {checks}")
            dump()
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(dump(), flush=True)
    return result


if __name__ == "__main__":
    main()
