"""CPU inference: keras-hub's ``ESMBackbone`` against ``esm_dual.tf.TFEsmModel``, same weights, same inputs.

Both models get the ESM-2 35M shape (hidden 480, 12 layers, 20 heads, FFN 1920, rotary) and the same
random weights: ours are drawn in the hub layout and loaded with ``load_hub_tensors``; keras-hub's are
copied from the same arrays with the variable mapping of keras-hub's own HF converter
(``keras_hub/src/utils/transformers/convert_esm.py``). Inputs are the real sequences of
``tests/data/some_proteins.fasta``, sorted by length and cut into the same batches (each padded to
its longest sequence) for both models. Each model runs as a ``tf.function`` (``--mode graph``, the
default) or XLA-compiled (``--mode xla``) or eagerly; every batch shape is traced/compiled in warm-up
passes; then ``--runs`` timed passes over all batches, the two models alternating batch by batch;
the median pass time is reported ("ratio_batch_medians": from the per-batch medians). Prints one JSON object.

Architecture differences found (reported in the JSON under "notes"):
- keras-hub has no token dropout. ESM-2 checkpoints have ``token_dropout=True``, which scales every
  embedding by (1 - 0.15 * 0.8) / (1 - <mask> fraction) at inference too (0.88 without <mask> tokens).
  For the numerical comparison keras-hub's embedding table is multiplied by 0.88, which is exact for
  inputs without <mask>; "max_abs_diff_no_fold" is the difference without that fold.
- keras-hub's attention mask on the TensorFlow backend masks padded *queries*, not padded keys
  (``ops.reshape(mask, [b, 1, s, 1])``; only the torch backend transposes it), so real tokens attend to
  padding: its outputs for a sequence depend on the batch it is padded in. "max_abs_diff" is taken on
  sequences run alone (no padding); "max_abs_diff_padded_batches" on the benchmark's padded batches.
- keras-hub recomputes the rotary frequencies instead of loading the checkpoint's (fp16-rounded in real
  ESM-2 files); here both use the exact fp32 values.

Usage: python benchmarks/tf_cpu_inference.py [--quick] [--mode graph|xla|eager] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
from keras_hub_reference import build_keras_hub, token_dropout_scale  # noqa: E402 (beside this file)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FASTA = os.path.join(HERE, "..", "tests", "data", "some_proteins.fasta")

ESM2_35M = dict(
    vocab_size=33, hidden_size=480, num_hidden_layers=12, num_attention_heads=20, intermediate_size=1920,
    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False, layer_norm_eps=1e-5,
    pad_token_id=1, mask_token_id=32, max_position_embeddings=1026, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_hub_tensors(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values for every hub tensor of ``model`` (hub names and orientation); rotary tables kept."""
    from esm_dual.tf import hub_variable_map

    rng = np.random.default_rng(seed)
    out = {}
    for name, (var, transposed) in sorted(hub_variable_map(model).items()):
        shape = tuple(var.shape)[::-1] if transposed else tuple(var.shape)
        if name.endswith("inv_freq"):
            out[name] = np.asarray(var.numpy(), np.float32)
        elif name.endswith(("LayerNorm.weight", "layer_norm.weight", "emb_layer_norm_after.weight")):
            out[name] = (1.0 + rng.normal(0, 0.1, shape)).astype(np.float32)
        elif name.endswith("word_embeddings.weight"):
            out[name] = rng.normal(0, 0.5, shape).astype(np.float32)
        else:  # Linear weights and biases, contact regression
            out[name] = rng.normal(0, 0.02, shape).astype(np.float32)
    return out


def read_sequences(path: str, limit: int | None) -> list[str]:
    from esm_dual.common.fasta import read_fasta

    seqs = [r.sequence for r in read_fasta(path)]
    return seqs[:limit] if limit else seqs


def make_batches(seqs: list[str], batch_size: int, truncation: int = 1022):
    """Sorted by length, ``batch_size`` per batch, each padded to its longest sequence (int32)."""
    from esm_dual.common.tokenizer import EsmTokenizer

    tok = EsmTokenizer()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        part = [seqs[i][:truncation] for i in order[start:start + batch_size]]
        enc = tok(part, padding=True, return_tensors="np")
        batches.append((enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)))
    return batches


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 4 sequences, 1 timed run")
    ap.add_argument("--fasta", default=DEFAULT_FASTA)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mode", choices=("graph", "xla", "eager"), default="graph")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: TensorFlow's default)")
    ap.add_argument("--profile", metavar="DIR", help="write a TensorFlow profile of one pass of each model")
    args = ap.parse_args(argv)

    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, args.threads))
    import keras
    import keras_hub

    from esm_dual.common.config import EsmConfig
    from esm_dual.tf import TFEsmModel

    cfg_dict = dict(ESM2_35M, num_hidden_layers=2) if args.quick else dict(ESM2_35M)
    cfg = EsmConfig(**cfg_dict)
    runs, warmup = (1, 1) if args.quick else (args.runs, args.warmup)
    seqs = read_sequences(args.fasta, 4 if args.quick else None)
    batches = make_batches(seqs, args.batch_size)

    ours = TFEsmModel(cfg)
    tensors = random_hub_tensors(ours)
    ours.load_hub_tensors(tensors)
    fold = token_dropout_scale(cfg)
    kh = build_keras_hub(cfg, tensors, embedding_scale=fold)

    def wrap(fn):
        if args.mode == "eager":
            return fn
        return tf.function(fn, jit_compile=args.mode == "xla", reduce_retracing=False)

    run_ours = wrap(lambda ids, mask: ours(ids, attention_mask=mask, training=False).last_hidden_state)
    run_kh = wrap(lambda ids, mask: kh({"token_ids": ids}, training=False))

    def one_pass(fn):
        t = time.perf_counter()
        for ids, mask in batches:
            fn(tf.constant(ids), tf.constant(mask)).numpy()
        return time.perf_counter() - t

    # Numerics: each sequence alone (no padding), then the padded benchmark batches.
    def max_diff(batch_list, kh_model):
        d = 0.0
        for ids, mask in batch_list:
            a = ours(tf.constant(ids), attention_mask=tf.constant(mask), training=False)
            a = a.last_hidden_state.numpy()
            b = kh_model({"token_ids": tf.constant(ids)}, training=False).numpy()
            m = mask.astype(bool)
            d = max(d, float(np.abs(a[m] - b[m]).max()))
        return d

    singles = make_batches(seqs, 1)
    diff_single = max_diff(singles, kh)
    diff_padded = max_diff(batches, kh)
    kh_nofold = build_keras_hub(cfg, tensors, embedding_scale=1.0)
    diff_nofold = max_diff(singles, kh_nofold)
    del kh_nofold

    for _ in range(warmup):
        one_pass(run_kh)
        one_pass(run_ours)
    if args.profile:
        for name, fn in (("keras_hub", run_kh), ("esm_dual", run_ours)):
            tf.profiler.experimental.start(os.path.join(args.profile, name))
            one_pass(fn)
            tf.profiler.experimental.stop()
    # Timed runs, interleaved batch by batch (alternating which model goes first) so that drifts in
    # machine load hit both models alike. A run's time is the sum over all batches.
    per_batch = {"kh": np.zeros((runs, len(batches))), "ours": np.zeros((runs, len(batches)))}
    fns = {"kh": run_kh, "ours": run_ours}
    for r in range(runs):
        for j, (ids, mask) in enumerate(batches):
            ids_t, mask_t = tf.constant(ids), tf.constant(mask)
            for name in (("kh", "ours") if (r + j) % 2 == 0 else ("ours", "kh")):
                t = time.perf_counter()
                fns[name](ids_t, mask_t).numpy()
                per_batch[name][r, j] = time.perf_counter() - t
    t_kh, t_ours = per_batch["kh"].sum(1).tolist(), per_batch["ours"].sum(1).tolist()
    kh_s, ours_s = statistics.median(t_kh), statistics.median(t_ours)
    # Sum over batches of each batch's median: robust to a run disturbed by other processes.
    kh_med = float(np.median(per_batch["kh"], 0).sum())
    ours_med = float(np.median(per_batch["ours"], 0).sum())

    n_tokens = int(sum(m.sum() for _, m in batches))
    padded_tokens = int(sum(m.size for _, m in batches))
    result = {
        "config": {k: cfg_dict[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "intermediate_size", "position_embedding_type",
                                             "token_dropout")},
        "n_seqs": len(seqs),
        "n_batches": len(batches),
        "batch_size": args.batch_size,
        "tokens": n_tokens,
        "padded_tokens": padded_tokens,
        "mode": args.mode,
        "runs": runs,
        "keras_hub_s": round(kh_s, 4),
        "esm_dual_s": round(ours_s, 4),
        "ratio": round(kh_s / ours_s, 3),
        "ratio_batch_medians": round(kh_med / ours_med, 3),
        "keras_hub_runs_s": [round(t, 4) for t in t_kh],
        "esm_dual_runs_s": [round(t, 4) for t in t_ours],
        "max_abs_diff": diff_single,
        "max_abs_diff_padded_batches": diff_padded,
        "max_abs_diff_no_fold": diff_nofold,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads() or "default",
                    "inter_op": tf.config.threading.get_inter_op_parallelism_threads() or "default"},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "keras_hub": keras_hub.__version__, "python": sys.version.split()[0]},
        "notes": [
            "keras-hub ESMBackbone has no token dropout: its embeddings were scaled by 0.88 for the "
            "comparison (exact for inputs without <mask>); max_abs_diff_no_fold is without that fold",
            "keras-hub (TF backend) masks padded queries instead of padded keys, so real tokens attend to "
            "padding: max_abs_diff is on unpadded single sequences, max_abs_diff_padded_batches on the "
            "padded benchmark batches",
            "keras-hub recomputes rotary inv_freq; ESM-2 hub files store fp16-rounded values that "
            "esm_dual loads (both exact fp32 here)",
        ],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
