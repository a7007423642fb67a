"""CPU forward pass: esm_dual.pt.EsmModel vs HF transformers' EsmModel, same weights, same batches.

ESM-2 35M shape (480 hidden, 12 layers, 20 heads), random weights, the real sequences of
tests/data/some_proteins.fasta in length-sorted batches. Both models run in this process,
interleaved, after a warm-up; the JSON has the median seconds per pass over all batches and the
ratio (HF / esm-dual: > 1 means esm-dual is faster).

    python benchmarks/pt_cpu_forward.py [--repeats 5] [--threads N] [--toks-per-batch 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FASTA = os.path.join(HERE, "..", "tests", "data", "some_proteins.fasta")


def read_sequences(path: str) -> list[str]:
    from esm_dual.common.fasta import read_fasta

    return [r.sequence for r in read_fasta(path)]


def batches(seqs: list[str], toks_per_batch: int, max_len: int = 1022):
    """Length-sorted padded batches of at most toks_per_batch tokens (``esm-dual embed``'s grouping):
    [(input_ids [B, L], attention_mask [B, L])] as int64 numpy."""
    from esm_dual.cli._common import token_batches
    from esm_dual.common.tokenizer import EsmTokenizer

    tok = EsmTokenizer()
    out = []
    for b in token_batches([min(len(s), max_len) for s in seqs], toks_per_batch):
        enc = tok([seqs[i][:max_len] for i in b], padding=True, return_tensors="np")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fasta", default=DEFAULT_FASTA)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--toks-per-batch", type=int, default=4096)
    p.add_argument("--attn", default="sdpa", help="HF attn_implementation (sdpa or eager)")
    args = p.parse_args(argv)

    import torch
    import transformers

    from esm_dual.common.config import EsmConfig
    from esm_dual.pt import EsmModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg_kwargs = dict(vocab_size=33, pad_token_id=1, mask_token_id=32, hidden_size=480, num_hidden_layers=12,
                      num_attention_heads=20, intermediate_size=1920, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5, position_embedding_type="rotary",
                      token_dropout=True, emb_layer_norm_before=False, max_position_embeddings=1026)
    hf = transformers.EsmModel(transformers.EsmConfig(**cfg_kwargs), add_pooling_layer=False,
                               ).eval()
    hf.config._attn_implementation = args.attn
    ours = EsmModel(EsmConfig(**cfg_kwargs)).eval()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours.load_hub_tensors(state, source="HF random weights")

    data = batches(read_sequences(args.fasta), args.toks_per_batch)
    tensors = [(torch.from_numpy(i), torch.from_numpy(m)) for i, m in data]

    def run(model):
        with torch.inference_mode():
            for ids, mask in tensors:
                model(input_ids=ids, attention_mask=mask)

    with torch.inference_mode():
        diff = max((ours(input_ids=i, attention_mask=m).last_hidden_state
                    - hf(input_ids=i, attention_mask=m).last_hidden_state).abs().max().item()
                   for i, m in tensors)
    run(ours)
    run(hf)
    t_ours, t_hf = [], []
    for _ in range(args.repeats):
        for model, acc in ((ours, t_ours), (hf, t_hf)):
            t0 = time.perf_counter()
            run(model)
            acc.append(time.perf_counter() - t0)
    residues = int(sum((m.sum() - 2 * m.shape[0]) for _, m in data))
    res = {
        "benchmark": "pt_cpu_forward",
        "shape": "ESM-2 35M (480 hidden, 12 layers, 20 heads)",
        "n_seqs": int(sum(i.shape[0] for i, _ in data)),
        "n_batches": len(data),
        "residues": residues,
        "esm_dual_s": statistics.median(t_ours),
        "hf_s": statistics.median(t_hf),
        "ratio_hf_over_esm_dual": statistics.median(t_hf) / statistics.median(t_ours),
        "max_abs_diff_last_hidden": diff,
        "hf_attn_implementation": args.attn,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
