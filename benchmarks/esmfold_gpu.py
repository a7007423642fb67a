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


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def fold(model, seq: str, num_recycles, device) -> tuple[float, float | None, float | None, object]:
    """(seconds, peak GB, peak GB above the memory held before the call, positions)."""
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
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        return dt, peak / 2**30, (peak - base) / 2**30, out["positions"][-1].float().cpu()
    return dt, None, None, out["positions"][-1].float().cpu()


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
            model.set_trunk_dtype(torch.bfloat16 if args.trunk_dtype == "bf16" else None)
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
    ours.set_trunk_dtype(torch.bfloat16 if args.trunk_dtype == "bf16" else None)
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
        "--trunk-dtype", choices=("fp32", "bf16"), default="fp32", help="esm-dual's trunk precision"
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
    ours.set_trunk_dtype(torch.bfloat16 if args.trunk_dtype == "bf16" else None)
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
