"""Tokenizer speed: esm-dual vs transformers.EsmTokenizer on UniRef50-like protein batches.

Synthetic sequences: log-normal lengths (median 270, sigma 0.6) clipped to [30, 1022], the 20 standard
amino acids, seeded. Both tokenizers get the same vocab.txt and the same call (a list of strings,
default options: python lists of ids + attention masks). HF is slow, so by default it is timed on a
subset and extrapolated linearly to the full set (``hf_extrapolated: true``); ``--hf-n 0`` times it on
everything. Before timing, the outputs of both are checked to be identical on the HF subset.

    python benchmarks/tokenizer_speed.py [--n 100000] [--hf-n 5000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np


def synthetic_sequences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(270.0), 0.6, n)), 30, 1022).astype(np.int64)
    alphabet = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    chars = alphabet[rng.integers(0, 20, int(lengths.sum()))].tobytes().decode("ascii")
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    return [chars[bounds[i]:bounds[i + 1]] for i in range(n)]


def _time(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
        del out
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--hf-n", type=int, default=5_000, help="HF subset size; 0 = all sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (both tokenizers)")
    args = parser.parse_args(argv)

    import transformers

    from esm_dual.common.config import DEFAULT_VOCAB
    from esm_dual.common.tokenizer import EsmTokenizer

    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    seqs = synthetic_sequences(args.n, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = os.path.join(tmp, "vocab.txt")
        with open(vocab, "w", encoding="utf-8") as f:
            f.write("\n".join(DEFAULT_VOCAB))
        ours = EsmTokenizer(vocab)
        hf = transformers.EsmTokenizer(vocab)

    hf_n = args.n if args.hf_n <= 0 or args.hf_n >= args.n else args.hf_n
    subset = seqs[:hf_n]
    if dict(hf(subset)) != dict(ours(subset)):
        raise SystemExit("outputs differ between esm-dual and HF")

    ours_s = _time(lambda: ours(seqs), args.repeats)
    ours_np_s = _time(lambda: ours.encode_batch(seqs), args.repeats)
    ours_padded_s = _time(lambda: ours(seqs[:10_000], padding=True, return_tensors="np"), args.repeats)
    hf_sub_s = _time(lambda: hf(subset), args.repeats)
    hf_s = hf_sub_s * args.n / hf_n
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    result = {
        "n": args.n,
        "residues": int(lengths.sum()),
        "median_length": float(np.median(lengths)),
        "esm_dual_s": round(ours_s, 3),
        "hf_s": round(hf_s, 3),
        "ratio": round(hf_s / ours_s, 1),
        "hf_extrapolated": hf_n != args.n,
        "hf_timed_n": hf_n,
        "hf_timed_s": round(hf_sub_s, 3),
        "esm_dual_encode_batch_numpy_s": round(ours_np_s, 3),
        "esm_dual_padded_np_10k_s": round(ours_padded_s, 3),
        "call": "tokenizer(list_of_strings) -> python lists (input_ids, attention_mask)",
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
