"""ESMFold on GPU: esm_dual.pt.EsmForProteinFolding vs HF transformers' EsmForProteinFolding.

Both models get the same random weights of the real ``facebook/esmfold_v1`` shape (ESM-2 3B stem in
fp16, 48-block trunk and structure module in fp32; nothing is downloaded) and fold the same random
sequences, one structure at a time, interleaved, after a warm-up. Lengths: the real sequences of
tests/data/some_proteins.fasta (UniRef50 representatives) or ``--lognormal N`` draws from a
UniRef50-like log-normal (median ~270, clipped to 30..1022). The JSON lists, per length, seconds per
structure and peak GPU memory (total and above the resident weights) for both, the ratio
(HF / esm-dual: > 1 means esm-dual is faster or leaner), and the largest coordinate difference.

``--max-length-search`` instead finds, for each implementation alone on the card, the longest
sequence that folds with ``--chunk-size``: ascending lengths until the first out-of-memory, then
bisection; every attempt is printed as it ends. ``--profile-length N`` prints the top CUDA kernels
of one fold of N residues for each model.

    python benchmarks/esmfold_gpu.py [--chunk-size 128] [--num-recycles 3] [--lognormal 20]
    python benchmarks/esmfold_gpu.py --max-length-search --chunk-size 64 [--impl ours|hf|both] \\
        [--search-lengths 1024,2048,3072,4096] [--budget-s 420] [--attempts-out attempts.jsonl]
    python benchmarks/esmfold_gpu.py --profile-length 300 --num-recycles 3 --chunk-size 64 [--profile-dir DIR]
    python benchmarks/esmfold_gpu.py --tiny        # CPU smoke test with a tiny config

Needs torch and transformers (no TensorFlow). Record the card with every figure (it is in the JSON).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
DEFAULT_FASTA = os.path.join(HERE, "..", "tests", "data", "some_proteins.fasta")
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def read_lengths(path: str) -> list[int]:
    lengths, cur = [], 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if cur:
                    lengths.append(cur)
                cur = 0
            elif line:
                cur += len(line)
    if cur:
        lengths.append(cur)
    return lengths


def config_dict(tiny: bool) -> dict:
    from esm_dual.common.config import DEFAULT_VOCAB
    from esm_dual.common.presets import published_config_dict

    if not tiny:
        d = published_config_dict("esmfold_v1")
        return {k: v for k, v in d.items() if k not in ("transformers_version", "torch_dtype")}
    return dict(
        vocab_size=33,
        pad_token_id=1,
        mask_token_id=32,
        hidden_size=18,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=37,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-5,
        position_embedding_type="rotary",
        token_dropout=True,
        emb_layer_norm_before=False,
        is_folding_model=True,
        vocab_list=list(DEFAULT_VOCAB),
        esmfold_config=dict(
            fp16_esm=True,
            lddt_head_hid_dim=8,
            trunk=dict(
                num_blocks=2,
                sequence_state_dim=32,
                pairwise_state_dim=16,
                sequence_head_width=8,
                pairwise_head_width=8,
                position_bins=8,
                max_recycles=4,
                chunk_size=None,
                structure_module=dict(
                    sequence_dim=24,
                    pairwise_dim=12,
                    ipa_dim=6,
                    resnet_dim=10,
                    num_heads_ipa=3,
                    num_qk_points=2,
                    num_v_points=3,
                    num_blocks=2,
                ),
            ),
        ),
    )


def build_hf(cfg: dict, device, seed: int = 0):
    """HF's model with random weights (trunk perturbed so no layer is the zero-initialised identity)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.EsmForProteinFolding(transformers.EsmConfig(**cfg))
    g = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.startswith("esm.") and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * 0.02)
    if torch.device(device).type == "cpu":
        hf.esm.float()  # HF's fp16 stem cannot run on CPU
    return hf.eval()


def build_ours(cfg: dict, device, source_state: dict | None = None, seed: int = 0):
    """esm-dual's model: with ``source_state`` (HF's state dict) the same weights, else HF-like random."""
    import torch

    from esm_dual.common.config import EsmConfig
    from esm_dual.pt import EsmForProteinFolding

    config = EsmConfig.from_dict(cfg)
    if source_state is None:
        hf = build_hf(cfg, device, seed)
        source_state = hf.state_dict()
        del hf
        gc.collect()
    with torch.device("meta"):
        model = EsmForProteinFolding(config)
    model = model.to_empty(device=device)
    model._prepare_stem(torch.device(device))  # fp16 stem on CUDA before the copy: no fp32 3B transient
    rotary = source_state.get("esm.rotary_embeddings.inv_freq")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            src = (
                rotary
                if name.endswith("rotary_embeddings.inv_freq") and rotary is not None
                else source_state[name]
            )
            t.copy_(src.to(t.dtype))
    return model.eval()


def set_trunk(model, trunk_dtype: str) -> None:
    import torch

    if trunk_dtype in ("fast", "auto"):
        model.set_fast(True if trunk_dtype == "fast" else None)
    else:
        model.set_trunk_dtype(torch.bfloat16 if trunk_dtype == "bf16" else None)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def fold(model, seq: str, num_recycles, device, full: bool = False):
    """(seconds, peak GB, peak GB above the memory held before the call, positions); with ``full`` the
    positions are replaced by (final positions [N, 14, 3], mean pLDDT (0-100), pTM) on the CPU."""
    import torch

    cuda = torch.device(device).type == "cuda"
    gc.collect()  # a model dropped earlier (the HF reference) may sit in a reference cycle until now
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        if num_recycles is None:
            out = model.infer(seq)
        elif hasattr(model, "set_trunk_dtype"):  # esm-dual
            out = model.infer(seq, num_recycles=num_recycles)
        else:
            out = _hf_infer(model, seq, num_recycles)
    sync(device)
    dt = time.perf_counter() - t
    pos = out["positions"][-1].float().cpu()
    if full:
        plddt = out["plddt"].float()
        if plddt.max() <= 1.0:  # HF: 0-1
            plddt = plddt * 100
        exists = out["atom37_atom_exists"].float()
        mean_plddt = float((plddt * exists).sum() / exists.sum())
        ptm = float(out["ptm"].float().reshape(-1)[0])
        pos = (pos[0], mean_plddt, ptm)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        return dt, peak / 2**30, (peak - base) / 2**30, pos
    return dt, None, None, pos


def _hf_infer(hf, seq: str, num_recycles):
    """HF's infer() takes no num_recycles; its forward does."""
    import torch
    from transformers.models.esm.openfold_utils import residue_constants as of_rc

    device = next(hf.parameters()).device
    aatype = torch.tensor([[of_rc.restype_order_with_x.get(c, 20) for c in seq]], device=device)
    return hf(aatype, torch.ones_like(aatype), num_recycles=num_recycles)


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def random_seq(n: int, rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(AMINO), size=n))


def _emit(line: dict, out_path: str | None) -> None:
    """One JSON line to stderr (flushed) and appended to ``out_path``: a timeout keeps what was done."""
    text = json.dumps(line)
    print(text, file=sys.stderr, flush=True)
    if out_path:
        with open(out_path, "a") as f:
            f.write(text + "\n")


def _search_one(args, model, impl: str, rng, t_start: float, device) -> dict:
    import torch

    best, first_fail, trials, stopped = None, None, [], None
    last = None  # (length, seconds) of the last attempt that folded

    def attempt(n: int) -> bool | None:
        nonlocal best, first_fail, last
        if last is not None:
            predicted = last[1] * (n / last[0]) ** 3
            if time.perf_counter() - t_start + predicted > args.budget_s:
                return None
        try:
            dt, peak, _, _ = fold(model, random_seq(n, rng), args.num_recycles or 0, device)
            trial = {"impl": impl, "length": n, "ok": True, "seconds": round(dt, 2),
                     "peak_gb": None if peak is None else round(peak, 2)}
            best, last = max(best or 0, n), (n, dt)
            ok = True
        except Exception as e:
            if not is_oom(e):
                raise
            trial = {"impl": impl, "length": n, "ok": False, "error": str(e).split("\n")[0][:200]}
            first_fail = n if first_fail is None else min(first_fail, n)
            ok = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trials.append(trial)
        _emit(trial, args.attempts_out)
        return ok

    for n in args.search_lengths:
        ok = attempt(n)
        if ok is None:
            stopped = f"time budget: {n} not tried"
            break
        if not ok:
            break
    for _ in range(args.refine):
        if best is None or first_fail is None or first_fail - best <= args.resolution:
            break
        mid = (best + first_fail) // 2
        if attempt(mid) is None:
            stopped = f"time budget: {mid} not tried"
            break
    return {"max_length": best, "first_oom": first_fail, "stopped": stopped, "trials": trials}


def max_length_search(args, cfg: dict, device) -> dict:
    """Longest sequence that folds, for each implementation alone on the card.

    Lengths of ``--search-lengths`` are tried in ascending order until the first out-of-memory; then
    ``--refine`` bisection steps between the longest success and the first failure. Each attempt is
    printed (and appended to ``--attempts-out``) as it ends. An attempt whose predicted time (the last
    one's, scaled by the cube of the lengths: the triangle updates are O(N^3)) would overrun
    ``--budget-s`` is not started; the result then says so.
    """
    import torch

    rng = np.random.default_rng(args.seed)
    results = {}
    impls = ["ours", "hf"] if args.impl == "both" else [args.impl]
    t_start = time.perf_counter()
    for impl in impls:
        model = (
            build_ours(cfg, device, seed=args.seed) if impl == "ours" else build_hf(cfg, device, args.seed)
        )
        if impl == "ours":
            model.set_chunk_size(args.chunk_size)
            set_trunk(model, args.trunk_dtype)
        else:
            model.trunk.set_chunk_size(args.chunk_size)
        verify = None
        if args.trunk_blocks:
            # Inference runs the blocks one after another on the same tensors, so the peak memory of a
            # fold does not depend on how many there are; fewer blocks make long folds fit the time
            # limit. --verify-length checks that claim: the full and the cut trunk on one length.
            full = model.trunk.blocks
            if args.verify_length:
                seq = random_seq(args.verify_length, rng)
                verify = {"length": args.verify_length}
                for name, blocks in (("full", full), ("cut", full[: args.trunk_blocks])):
                    model.trunk.blocks = blocks
                    dt, peak, _, _ = fold(model, seq, 0, device)
                    verify[name] = {"blocks": len(blocks), "seconds": round(dt, 2),
                                    "peak_gb": None if peak is None else round(peak, 3)}
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                _emit({"impl": impl, "verify": verify}, args.attempts_out)
            model.trunk.blocks = full[: args.trunk_blocks]
        results[impl] = _search_one(args, model, impl, rng, t_start, device)
        results[impl]["trunk_blocks"] = len(model.trunk.blocks)
        results[impl]["verify_cut_trunk"] = verify
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def profile_fold(args, cfg: dict, device) -> dict:
    """Top CUDA kernels of one fold (``--profile-length`` residues, ``--num-recycles``) for each model."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    rng = np.random.default_rng(args.seed)
    hf = build_hf(cfg, device, args.seed)
    ours = build_ours(cfg, device, hf.state_dict())
    ours.set_chunk_size(args.chunk_size)
    set_trunk(ours, args.trunk_dtype)
    ours.set_fast_path(fold_graphs="off")  # a replayed graph hides its kernels from the profiler
    hf.trunk.set_chunk_size(args.chunk_size)
    seq = random_seq(args.profile_length, rng)
    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    res = {}
    for name, m in (("esm_dual", ours), ("hf", hf)):
        fold(m, seq, args.num_recycles, device)
        with profile(activities=acts) as prof:
            dt, _, _, _ = fold(m, seq, args.num_recycles, device)
        table = prof.key_averages().table(
            sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40, max_name_column_width=90
        )
        res[name] = {"seconds": round(dt, 3)}
        if args.profile_dir:
            with open(os.path.join(args.profile_dir, f"esmfold_profile_{name}.txt"), "w") as f:
                f.write(table)
        print(f"== {name} ({dt:.3f} s)\n{table}", file=sys.stderr, flush=True)
    return res


def _rmsd(a, b) -> tuple[float, float]:
    """(RMSD, max deviation) in Angstrom of two [N, 14, 3] coordinate sets (atom14 slots as folded)."""
    d = (a - b).norm(dim=-1)
    return float(d.pow(2).mean().sqrt()), float(d.max())


def _compare(a, b) -> dict:
    """Two `fold(..., full=True)` results: RMSD / max deviation of the coordinates, pLDDT and pTM diffs."""
    rmsd, mx = _rmsd(a[0], b[0])
    return {"rmsd_angstrom": round(rmsd, 4), "max_dev_angstrom": round(mx, 4),
            "mean_plddt_diff": round(a[1] - b[1], 3), "ptm_diff": round(a[2] - b[2], 4),
            "finite": bool(a[0].isfinite().all())}


def _timed(model, seq, num_recycles, device) -> tuple[dict, tuple]:
    dt, peak, act, res = fold(model, seq, num_recycles, device, full=True)
    return ({"seconds": round(dt, 3), "peak_gb": None if peak is None else round(peak, 3),
             "activation_peak_gb": None if act is None else round(act, 3)}, res)


def _timed_profiled(model, seq, num_recycles, device, path: str) -> tuple[dict, tuple]:
    """``_timed`` under torch.profiler (CPU, and CUDA on a GPU): where a fold's host time goes. Writes the ops by
    self CPU time and the longest single top-level calls (a stall: a compilation, a library's set-up, an
    allocation) to ``path``; the result's "profile" holds the first lines of both."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as prof:
        r, o = _timed(model, seq, num_recycles, device)
    by_self = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    longest = sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: -e.cpu_time_total)
    ops = [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count} for e in by_self]
    calls = [{"op": e.name, "cpu_ms": round(e.cpu_time_total / 1e3, 2)} for e in longest]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"fold {r['seconds']} s (profiled)\n\nops by self CPU time:\n")
        f.writelines(f"{x['self_cpu_ms']:10.2f} ms {x['calls']:7d}  {x['op']}\n" for x in ops[:60])
        f.write("\nlongest top-level calls:\n")
        f.writelines(f"{x['cpu_ms']:10.2f} ms  {x['op']}\n" for x in calls[:60])
    r["profiled"] = True
    r["profile"] = {"ops_by_self_cpu": ops[:12], "longest_calls": calls[:12]}
    return r, o


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_pair(cfg: dict, device, seed: int):
    """(HF's model, esm-dual's model with the same weights)."""
    hf = build_hf(cfg, device, seed)
    return hf, build_ours(cfg, device, hf.state_dict())


# Suite model names -> esm-dual's trunk modes (fold_fast, fold_kernels, fold_graphs). "esm_dual" is the fp32
# trunk (set_fast(False)); "esm_dual_fast" the fast mode, the default on CUDA; "_eager": without CUDA graphs.
MODES = {"esm_dual": ("off", "auto", "auto"), "esm_dual_fast": ("on", "auto", "auto"),
         "esm_dual_eager": ("off", "auto", "off"), "esm_dual_fast_eager": ("on", "auto", "off")}


def mode(ours, name: str) -> None:
    if name in MODES:
        fast, kernels, graphs = MODES[name]
        ours.set_fast_path(fold_fast=fast, fold_kernels=kernels, fold_graphs=graphs)


def suite(args, cfg: dict, device, models=None) -> dict:
    """The issue-22 table: per length, HF's ``infer`` (defaults), esm-dual's ``infer`` defaults and its
    fast mode (``set_fast``), same weights and sequences; fast-vs-fp32-trunk numerics; optionally the
    drift of each model's fp16 stem against an fp32-stem fold of the same weights and a set of
    ``--set N`` UniRef-like sequences (``infer_pdbs`` against an HF ``infer_pdb`` loop)."""
    import torch

    rng = np.random.default_rng(args.seed)
    hf, ours = models if models is not None else build_pair(cfg, device, args.seed)
    ours.set_chunk_size(args.chunk_size)
    if args.hf_chunk_size:
        hf.trunk.set_chunk_size(args.hf_chunk_size)
    warm = random_seq(48, rng)
    for m, fast in ((ours, False), (ours, True), (hf, False)):
        if m is ours:
            ours.set_fast(fast)
        # Whole folds (all passes): the fast mode's warm-up then captures a graph too, so the process's one-time
        # capture costs do not land on the first measured length (4.05 s at 256 on an H100 after a one-pass
        # warm-up, against 1.47 s for a grid point's first fold after a whole one).
        fold(m, warm, args.num_recycles, device)
    mode(ours, "esm_dual")
    res: dict = {"per_length": [], "kernels": {"cueq_available": _cueq_available(), "cueq_error": _cueq_error()}}
    lengths = [int(x) for x in args.lengths.split(",") if x]
    for n in lengths:
        # --repeats folds per model, each of another random sequence of this length (CUDA graphs capture a
        # shape at its first fold and replay it in later ones); "seconds" is the median of the folds
        # after the first (all of them if there is one), "first_seconds" the first fold's; "runs" all.
        seqs = [random_seq(n, rng) for _ in range(max(1, args.repeats))]
        recycles = args.num_recycles if n <= args.full_recycles_max else 0
        row: dict = {"length": n, "num_recycles": recycles, "repeats": len(seqs)}
        outs = {}
        for name in args.suite_impls.split(","):
            if name == "hf" and n > args.hf_max_len:
                continue
            if name == "esm_dual_cli":
                # `esm-dual fold` with its defaults over a FASTA of this length's sequences, its own model loaded
                # from a saved checkpoint (fresh graphs: the first record captures); "seconds" per structure, from
                # the folding time it reports; "command_seconds" the whole command, loading included.
                r = fold_cli(ours, seqs, args, recycles)
                if "fold_seconds" in r:
                    r = {"seconds": round(r["fold_seconds"] / len(seqs), 3), "command_seconds": r["seconds"],
                         "records": len(seqs), "rc": r["rc"], "pdbs": r["pdbs"]}
                else:  # no folding time reported (a failed command): no per-structure time, no ratio
                    r = {"command_seconds": r.pop("seconds"), "records": len(seqs), **r}
                row[name] = r
                continue
            mode(ours, name)
            m = hf if name == "hf" else ours
            try:
                times = []
                k = args.hf_repeats if name == "hf" else args.fp32_repeats if name == "esm_dual" else 0
                for i, seq in enumerate(seqs[:k] if k else seqs):
                    if i == 0 and name == "esm_dual_fast" and args.first_fold_profile:
                        path = os.path.join(args.first_fold_profile, f"first_fold_{n}.txt")
                        r, o = _timed_profiled(m, seq, recycles, device, path)
                    else:
                        r, o = _timed(m, seq, recycles, device)
                    times.append(r["seconds"])
                    if i == 0:
                        row[name], outs[name] = r, o
                        row[name]["first_seconds"] = r["seconds"]
                later = times[1:] or times
                row[name]["seconds"] = round(float(np.median(later)), 3)
                row[name]["runs"] = times
                if name.startswith("esm_dual"):
                    row[name]["graph_captures"] = ours.trunk.graphs.captures
            except Exception as e:
                if not is_oom(e):
                    raise
                row[name] = {"oom": True}
            _free()
        mode(ours, "esm_dual")
        for name in [k for k in outs if k != "hf"]:
            if "hf" in outs:
                row[f"time_ratio_hf_over_{name}"] = round(row["hf"]["seconds"] / row[name]["seconds"], 3)
                row[f"{name}_vs_hf"] = _compare(outs[name], outs["hf"])
        if "hf" in outs and row.get("esm_dual_cli", {}).get("seconds"):
            row["time_ratio_hf_over_esm_dual_cli"] = round(row["hf"]["seconds"] / row["esm_dual_cli"]["seconds"], 3)
        if "esm_dual" in outs and "esm_dual_fast" in outs:
            row["fast_vs_fp32_trunk"] = _compare(outs["esm_dual_fast"], outs["esm_dual"])
        res["per_length"].append(row)
        _emit(row, args.attempts_out)

    if args.drift_lengths:
        # Each model's fp16 stem against its own fp32-stem fold of the same (fp16-rounded) weights.
        drift = []
        for n in [int(x) for x in args.drift_lengths.split(",") if x]:
            seq = random_seq(n, rng)
            row = {"length": n}
            _, o16 = _timed(ours, seq, args.num_recycles, device)
            ours.set_esm_dtype(torch.float32)
            _, o32 = _timed(ours, seq, args.num_recycles, device)
            ours.set_esm_dtype(None)
            ours._prepare_stem(torch.device(device))
            _free()
            _, h16 = _timed(hf, seq, args.num_recycles, device)
            hf.esm.float()
            _, h32 = _timed(hf, seq, args.num_recycles, device)
            hf.esm.half()
            _free()
            row["esm_dual_fp16_stem_vs_fp32_stem"] = _compare(o16, o32)
            row["hf_fp16_stem_vs_fp32_stem"] = _compare(h16, h32)
            row["fp32_stems_esm_dual_vs_hf"] = _compare(o32, h32)
            row["fp16_stems_esm_dual_vs_hf"] = _compare(o16, h16)
            drift.append(row)
            _emit({"drift": row}, args.attempts_out)
        res["drift"] = drift

    if args.set:
        # The set has its own random stream: the same sequences whatever else this run folds (a later call
        # can time `esm-dual fold` on the set another call timed HF on).
        set_rng = np.random.default_rng([args.seed, 64])
        lengths = np.clip(set_rng.lognormal(np.log(270), 0.6, args.set).astype(int), 30, args.max_len).tolist()
        seqs = [random_seq(n, set_rng) for n in lengths]
        row = {"sequences": len(seqs), "residues": int(sum(lengths)), "max_length": int(max(lengths)),
               "median_length": float(np.median(lengths))}
        # "esm_dual_fast_one_by_one": infer_pdbs with max_tokens_per_batch=0 (each sequence alone, CUDA graphs on
        # the length grid) against the default length buckets.
        for name in ("hf", "esm_dual_fast_one_by_one", "esm_dual_fast", "esm_dual_fast_eager", "esm_dual",
                     "esm_dual_cli"):
            if name in args.set_skip.split(",") or (name == "esm_dual_cli" and not args.set_cli):
                continue
            if name == "esm_dual_cli":
                row[name] = fold_cli(ours, seqs, args)
                _emit({"set": row}, args.attempts_out)
                continue
            sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                if name == "hf":
                    pdbs = [hf.infer_pdb(s) for s in seqs]
                elif name == "esm_dual_fast_one_by_one":
                    mode(ours, "esm_dual_fast")
                    pdbs = ours.infer_pdbs(seqs, num_recycles=args.num_recycles, max_tokens_per_batch=0)
                else:
                    mode(ours, name)
                    pdbs = ours.infer_pdbs(seqs, num_recycles=args.num_recycles)
            sync(device)
            row[name] = {"seconds": round(time.perf_counter() - t, 2), "pdbs": len(pdbs)}
            mode(ours, "esm_dual")
            _free()
            _emit({"set": row}, args.attempts_out)
        for name in ("esm_dual", "esm_dual_fast", "esm_dual_fast_one_by_one", "esm_dual_fast_eager", "esm_dual_cli"):
            if name in row and "hf" in row and row[name].get("rc", 0) == 0:  # (a failed command: no ratio)
                row[f"time_ratio_hf_over_{name}"] = round(row["hf"]["seconds"] / row[name]["seconds"], 3)
        res["set"] = row
    return res


_CLI_CHECKPOINTS: dict[int, str] = {}  # id(model) -> where fold_cli saved it


def fold_cli(ours, seqs: list[str], args, num_recycles: int | None = None) -> dict:
    """``esm-dual fold`` with its defaults over ``seqs``, in this process: the model saved in the hub layout to a
    temporary folder (once per model and run), the set written as FASTA, then the command as a user types it
    (with ``--num-recycles`` where ``num_recycles`` is given, and the run's ``--chunk-size`` if any). "seconds" is
    the command's whole run (loading the checkpoint included); "fold_seconds" what it reports for folding."""
    import contextlib
    import io
    import re
    import shutil
    import tempfile

    from esm_dual.cli.main import main as cli_main

    tmp = tempfile.mkdtemp(prefix="esmfold_cli_")
    try:
        fasta, out = (os.path.join(tmp, x) for x in ("set.fasta", "pdbs"))
        t = time.perf_counter()
        ckpt = _CLI_CHECKPOINTS.get(id(ours))
        if ckpt is None:  # saved once per model and run (the suite calls this per length)
            ckpt = _CLI_CHECKPOINTS[id(ours)] = tempfile.mkdtemp(prefix="esmfold_ckpt_")
            atexit.register(shutil.rmtree, ckpt, True)
            ours.save_pretrained(ckpt)
        saved = time.perf_counter() - t
        with open(fasta, "w") as f:
            f.writelines(f">seq{i}\n{s}\n" for i, s in enumerate(seqs))
        err = io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stderr(err):
            extra = [] if num_recycles is None else ["--num-recycles", str(num_recycles)]
            extra += [] if args.chunk_size is None else ["--chunk-size", str(args.chunk_size)]
            rc = cli_main(["fold", fasta, out, "--model", ckpt, *extra])
        total = time.perf_counter() - t
        m = re.search(r"folded (\d+) record\(s\) in ([0-9.]+) s", err.getvalue())
        pdbs = len([x for x in os.listdir(out) if x.endswith(".pdb")]) if os.path.isdir(out) else 0
        res = {"seconds": round(total, 2), "rc": rc, "pdbs": pdbs, "save_seconds": round(saved, 2)}
        if m:
            res["fold_seconds"] = float(m.group(2))
        else:
            res["stderr_tail"] = err.getvalue()[-500:]
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _free()


def _cueq_error() -> str | None:
    from esm_dual.pt.folding.kernels import cueq_import_error

    return cueq_import_error()


def _cueq_available() -> bool:
    from esm_dual.pt.folding.kernels import cueq_available

    return cueq_available()


def profile_breakdown(args, cfg: dict, device, models=None) -> dict:
    """Where one fold's time goes, per part: the ESM stem, the trunk's updates by kind (sequence
    attention + its MLP, sequence->pair, triangle multiplications, triangle attentions, pair
    transition), the structure module, the rest (heads, recycling, embeddings). Each part is timed
    with a device synchronisation around it (the outermost call only), for esm-dual's default, its
    fast mode and HF, at each of ``--profile-lengths`` with ``--profile-recycles`` (0: one pass)."""

    rng = np.random.default_rng(args.seed)
    hf, ours = models if models is not None else build_pair(cfg, device, args.seed)
    parts = {
        "stem": lambda m: [m.esm],
        "seq_attention+mlp": lambda m: [
            x for b in m.trunk.blocks for x in (b.pair_to_sequence, b.seq_attention, b.mlp_seq)
        ],
        "seq_to_pair": lambda m: [b.sequence_to_pair for b in m.trunk.blocks],
        "tri_mul": lambda m: [x for b in m.trunk.blocks for x in (b.tri_mul_out, b.tri_mul_in)],
        "tri_att": lambda m: [x for b in m.trunk.blocks for x in (b.tri_att_start, b.tri_att_end)],
        "pair_mlp": lambda m: [b.mlp_pair for b in m.trunk.blocks],
        "structure_module": lambda m: [m.trunk.structure_module],
    }
    acc: dict = {}
    depth = [0]

    def wrap(mod, key, attr):
        fn = getattr(mod, attr)

        def timed(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0] += 1
            sync(device)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(device)
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
                depth[0] -= 1

        setattr(mod, attr, timed)
        wrapped.append((mod, attr))

    wrapped: list = []

    for m in (ours, hf):
        for key, get in parts.items():
            for mod in get(m):
                for attr in ("forward", "add_into"):
                    if hasattr(mod, attr):
                        wrap(mod, key, attr)
    out = []
    for n in [int(x) for x in args.profile_lengths.split(",") if x]:
        seq = random_seq(n, rng)
        for name in args.profile_impls.split(","):
            m = hf if name == "hf" else ours
            if m is ours:  # per-part timers synchronise: no CUDA graphs here
                ours.set_fast(name == "esm_dual_fast")
                ours.set_fast_path(fold_graphs="off")
            fold(m, seq[:64], 0, device)
            acc.clear()
            dt, _, _, _ = fold(m, seq, args.profile_recycles, device)
            row = {"impl": name, "length": n, "num_recycles": args.profile_recycles, "seconds": round(dt, 3)}
            row.update({k: round(v, 3) for k, v in acc.items()})
            row["rest"] = round(dt - sum(acc.values()), 3)
            out.append(row)
            _emit({"profile": row}, args.attempts_out)
            _free()
        ours.set_fast(False)
    for mod, attr in wrapped:  # back to the class's methods
        delattr(mod, attr)
    return {"breakdown": out}


def check_kernels(args, device) -> dict:
    """Each fused triangle kernel (SDPA in bf16, cuEquivariance where installed) against the fp32
    module at the real ESMFold widths (C_z 128, 4 heads of 32), with padding: relative error and time."""
    import torch

    from esm_dual.common.config import EsmConfig
    from esm_dual.pt.folding.trunk import TriangularSelfAttentionBlock

    cfg = EsmConfig.from_dict(config_dict(False)).esmfold_config.trunk
    torch.manual_seed(0)
    block = TriangularSelfAttentionBlock(cfg).eval().to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = []
    for n in [int(x) for x in args.kernel_lengths.split(",") if x]:
        z = torch.randn(1, n, n, 128, device=device)
        mask = torch.ones(1, n, device=device)
        pm = mask[:, :, None] * mask[:, None, :]
        for name in ("tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end"):
            m = getattr(block, name)
            with torch.no_grad():
                m.kernels = "torch"
                ref = m(z, pm, None)
                row = {"op": name, "n": n}
                for k in ("torch", "sdpa", "cueq"):
                    if k == "cueq" and not _cueq_available():
                        continue
                    m.kernels = k
                    ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
                    with ctx:
                        got = m(z, pm, None).float()
                        sync(device)
                        t = time.perf_counter()
                        for _ in range(5):
                            m(z, pm, None)
                        sync(device)
                    row[k] = {"ms": round((time.perf_counter() - t) / 5 * 1e3, 3),
                              "rel_err": float((got - ref).norm() / ref.norm())}
                m.kernels = "torch"
            out.append(row)
            _emit({"kernel": row}, args.attempts_out)
    return {"kernels": out}


def markdown_table(meta: dict, res: dict) -> str:
    """The README table from a suite result."""
    lines = [f"Card: {meta['card']}, torch {meta['torch']}, transformers {meta['transformers']}; "
             f"cuEquivariance: {'yes' if res.get('kernels', {}).get('cueq_available') else 'no'}", "",
             "| length | recycles | HF infer | esm-dual fp32 trunk | esm-dual default (fast mode) | HF / fp32 trunk "
             "| HF / default | act. peak fp32 / fast / HF (GiB) | fast vs fp32 trunk: RMSD / max (A), pLDDT, pTM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def sec(r, k):
        v = r.get(k, {})
        return "OOM" if v.get("oom") else (f"{v['seconds']:.2f} s" if "seconds" in v else "-")

    def act(r, k):
        v = r.get(k, {})
        return f"{v['activation_peak_gb']:.2f}" if v.get("activation_peak_gb") is not None else "-"

    for r in res.get("per_length", []):
        f = r.get("fast_vs_fp32_trunk", {})
        lines.append(
            f"| {r['length']} | {r['num_recycles'] if r['num_recycles'] is not None else 'default'} "
            f"| {sec(r, 'hf')} | {sec(r, 'esm_dual')} | {sec(r, 'esm_dual_fast')} "
            f"| {r.get('time_ratio_hf_over_esm_dual', '-')}x | {r.get('time_ratio_hf_over_esm_dual_fast', '-')}x "
            f"| {act(r, 'esm_dual')} / {act(r, 'esm_dual_fast')} / {act(r, 'hf')} "
            f"| {f.get('rmsd_angstrom', '-')} / {f.get('max_dev_angstrom', '-')}, "
            f"{f.get('mean_plddt_diff', '-')}, {f.get('ptm_diff', '-')} |")
    clis = [r for r in res.get("per_length", []) if "seconds" in r.get("esm_dual_cli", {})]
    if clis:
        lines += ["", "`esm-dual fold` with its defaults, per structure (folding time it reports / records; whole "
                  "command with loading): " + "; ".join(
                      f"{r['length']}: {r['esm_dual_cli']['seconds']:.2f} s "
                      f"({r.get('time_ratio_hf_over_esm_dual_cli', '-')}x HF; {r['esm_dual_cli']['command_seconds']} s)"
                      for r in clis)]
    st = res.get("set")
    if st:  # suite() put the ratios in
        lines += ["", f"Set of {st['sequences']} UniRef-like sequences ({st['residues']} residues, longest "
                  f"{st['max_length']}): HF infer_pdb loop {st.get('hf', {}).get('seconds', '-')} s; esm-dual "
                  f"infer_pdbs, default (fast mode) {st.get('esm_dual_fast', {}).get('seconds', '-')} s "
                  f"({st.get('time_ratio_hf_over_esm_dual_fast', '-')}x), one by one "
                  f"{st.get('esm_dual_fast_one_by_one', {}).get('seconds', '-')} s "
                  f"({st.get('time_ratio_hf_over_esm_dual_fast_one_by_one', '-')}x), fp32 trunk "
                  f"{st.get('esm_dual', {}).get('seconds', '-')} s ({st.get('time_ratio_hf_over_esm_dual', '-')}x)"]
        if "esm_dual_cli" in st:
            c = st["esm_dual_cli"]
            lines[-1] += (f"; `esm-dual fold` {c.get('seconds', '-')} s end to end, loading included "
                          f"({st.get('time_ratio_hf_over_esm_dual_cli', '-')}x; "
                          f"folding {c.get('fold_seconds', '-')} s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--fasta", default=DEFAULT_FASTA)
    p.add_argument(
        "--lognormal", type=int, default=0, help="N lengths from a UniRef50-like log-normal instead"
    )
    p.add_argument("--max-len", type=int, default=1022)
    p.add_argument("--num-recycles", type=int, default=None, help="default: the model's (4 trunk passes)")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument(
        "--trunk-dtype", choices=("fp32", "bf16", "fast", "auto"), default="fp32",
        help="esm-dual's trunk: fp32, bf16 (today's kernels), fast (set_fast), auto (the default: fast on GPU)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tf32", action="store_true",
        help="allow TF32 matmuls (both models): memory is unchanged, long folds run faster",
    )
    p.add_argument("--max-length-search", action="store_true")
    p.add_argument("--impl", choices=("ours", "hf", "both"), default="both")
    p.add_argument(
        "--search-lengths", default="256,512,1024,1536,2048,2560,3072,3584,4096,5120,6144",
        help="lengths tried in ascending order until the first out-of-memory",
    )
    p.add_argument("--trunk-blocks", type=int, default=0, help="max-length search: keep only this many blocks")
    p.add_argument("--verify-length", type=int, default=0, help="with --trunk-blocks: fold this length both ways")
    p.add_argument("--refine", type=int, default=4, help="bisection steps after the first out-of-memory")
    p.add_argument("--resolution", type=int, default=64, help="stop bisecting at this gap (residues)")
    p.add_argument("--budget-s", type=float, default=420.0, help="time budget of the search (seconds)")
    p.add_argument("--attempts-out", default=None, help="append one JSON line per attempt here")
    p.add_argument("--profile-length", type=int, default=0, help="profile one fold of this length instead")
    p.add_argument("--profile-dir", default=None, help="write the profile tables here")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 with --tiny)")
    p.add_argument("--suite", action="store_true",
                   help="the issue-22 table: HF infer vs esm-dual default and fast mode at --lengths")
    p.add_argument("--lengths", default="256,512,1022")
    p.add_argument("--suite-impls", default="esm_dual,esm_dual_fast,hf",
                   help="--suite: which models per length (also esm_dual_eager, esm_dual_fast_eager: no CUDA graphs; "
                        "esm_dual_cli: `esm-dual fold` with its defaults over the length's sequences)")
    p.add_argument("--repeats", type=int, default=3,
                   help="--suite: folds per model and length (other sequences; graphs capture at the 1st)")
    p.add_argument("--hf-repeats", type=int, default=0, help="--suite: HF's folds per length (0: --repeats)")
    p.add_argument("--first-fold-profile", default=None, metavar="DIR",
                   help="--suite: profile the fast mode's first fold at each length (ops by host time, the longest "
                        "calls) into DIR/first_fold_N.txt; that fold's time is then a profiled one")
    p.add_argument("--full-recycles-max", type=int, default=1022,
                   help="--suite: longer sequences run one trunk pass (num_recycles 0) for every model")
    p.add_argument("--hf-max-len", type=int, default=4096, help="--suite: HF only up to this length")
    p.add_argument("--hf-chunk-size", type=int, default=None, help="--suite: HF's trunk chunk size")
    p.add_argument("--drift-lengths", default="", help="--suite: fp16- vs fp32-stem folds at these lengths")
    p.add_argument("--set", type=int, default=0, help="--suite: also fold N UniRef-like sequences as a set")
    p.add_argument("--set-skip", default="", help="--suite: comma-separated impls to leave out of the set")
    p.add_argument("--set-cli", action="store_true",
                   help="--set: also run `esm-dual fold` with its defaults over the set (model saved to a temp dir)")
    p.add_argument("--fp32-repeats", type=int, default=0, help="--suite: the fp32 trunk's folds per length "
                   "(0: --repeats)")
    p.add_argument("--profile-lengths", default="", help="per-part time breakdown at these lengths")
    p.add_argument("--profile-recycles", type=int, default=0, help="--profile-lengths: recycles (0: one pass)")
    p.add_argument("--profile-impls", default="esm_dual,esm_dual_fast,hf", help="--profile-lengths: which models")
    p.add_argument("--kernel-lengths", default="256,512", help="--check-kernels: pair lengths")
    p.add_argument("--check-kernels", action="store_true", help="fused triangle kernels vs fp32 modules")
    p.add_argument("--markdown", default=None, help="--suite: also write the README table here")
    args = p.parse_args(argv)

    import torch
    import transformers

    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    device = args.device or ("cpu" if args.tiny else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    args.search_lengths = sorted(int(x) for x in str(args.search_lengths).split(",") if x)
    if args.tiny:
        args.search_lengths = [n for n in args.search_lengths if n <= 48] or [8, 16, 32, 48]
        args.resolution = min(args.resolution, 4)
    cfg = config_dict(args.tiny)
    meta = {
        "benchmark": "esmfold_gpu",
        "tiny": args.tiny,
        "device": device,
        "card": torch.cuda.get_device_name(device)
        if torch.device(device).type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "chunk_size": args.chunk_size,
        "num_recycles": args.num_recycles,
        "trunk_dtype": args.trunk_dtype,
        "tf32": args.tf32,
    }
    if args.check_kernels:
        print(json.dumps({**meta, "mode": "check_kernels", "results": check_kernels(args, device)}, indent=2))
    models = build_pair(cfg, device, args.seed) if (args.profile_lengths and args.suite) else None
    if args.profile_lengths:
        res = profile_breakdown(args, cfg, device, models)
        print(json.dumps({**meta, "mode": "breakdown", "results": res}, indent=2))
        _free()
    if args.suite:
        res = suite(args, cfg, device, models)
        print(json.dumps({**meta, "mode": "suite", "results": res}, indent=2))
        table = markdown_table(meta, res)
        print(table, file=sys.stderr)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table + "\n")
        return 0
    if args.check_kernels or args.profile_lengths:
        return 0
    if args.profile_length:
        print(json.dumps({**meta, "mode": "profile", "results": profile_fold(args, cfg, device)}, indent=2))
        return 0
    if args.max_length_search:
        print(
            json.dumps(
                {**meta, "mode": "max_length_search", "results": max_length_search(args, cfg, device)},
                indent=2,
            )
        )
        return 0

    rng = np.random.default_rng(args.seed)
    if args.lognormal:
        lengths = np.clip(
            rng.lognormal(np.log(270), 0.6, args.lognormal).astype(int), 30, args.max_len
        ).tolist()
    else:
        lengths = [min(n, args.max_len) for n in read_lengths(args.fasta)]
    if args.tiny:
        lengths = [min(n, 40) for n in lengths[:4]]
    lengths = sorted(lengths)

    hf = build_hf(cfg, device, args.seed)
    ours = build_ours(cfg, device, hf.state_dict())
    ours.set_chunk_size(args.chunk_size)
    set_trunk(ours, args.trunk_dtype)
    hf.trunk.set_chunk_size(args.chunk_size)
    warm = random_seq(32, rng)
    for m in (ours, hf):
        fold(m, warm, 0, device)

    rows = []
    for n in lengths:
        seq = random_seq(n, rng)
        row = {"length": n}
        for name, m in (("esm_dual", ours), ("hf", hf)):
            try:
                dt, peak, act, pos = fold(m, seq, args.num_recycles, device)
                row[name] = {
                    "seconds": round(dt, 4),
                    "peak_gb": None if peak is None else round(peak, 3),
                    "activation_peak_gb": None if act is None else round(act, 3),
                }
                row[name + "_positions"] = pos
            except Exception as e:
                if not is_oom(e):
                    raise
                row[name] = {"oom": True}
            if row[name].get("oom"):  # freed only once the exception (and its traceback) is gone
                gc.collect()
                torch.cuda.empty_cache()
        a, b = row.pop("esm_dual_positions", None), row.pop("hf_positions", None)
        if a is not None and b is not None:
            row["max_abs_diff_angstrom"] = round(float((a - b).abs().max()), 5)
        if "seconds" in row["esm_dual"] and "seconds" in row["hf"]:
            row["time_ratio_hf_over_ours"] = round(row["hf"]["seconds"] / row["esm_dual"]["seconds"], 3)
            if row["esm_dual"]["activation_peak_gb"]:
                row["memory_ratio_hf_over_ours"] = round(
                    row["hf"]["activation_peak_gb"] / row["esm_dual"]["activation_peak_gb"], 3
                )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    ok = [r for r in rows if "time_ratio_hf_over_ours" in r]
    summary = {
        "structures": len(rows),
        "esm_dual_seconds_per_structure": round(
            sum(r["esm_dual"]["seconds"] for r in ok) / max(1, len(ok)), 4
        ),
        "hf_seconds_per_structure": round(sum(r["hf"]["seconds"] for r in ok) / max(1, len(ok)), 4),
    }
    if ok:
        summary["time_ratio_hf_over_ours"] = round(
            summary["hf_seconds_per_structure"] / summary["esm_dual_seconds_per_structure"], 3
        )
    print(json.dumps({**meta, "mode": "throughput", "summary": summary, "per_length": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
