"""Keras on JAX: esm-dual's ``TFEsmModel`` against keras-hub's ``ESMBackbone``, same weights, same batches;
inference and one training step; esm-dual's PyTorch path on the same card for reference.

Self-contained: random weights in the ESM-2 650M shape (hidden 1280, 33 layers, 20 heads, FFN 5120, rotary,
token dropout), drawn once in the hub layout from ``--seed`` and loaded into every model (keras-hub's
variables through the mapping of keras-hub's own HF converter). Inputs: UniRef50-like lengths (log-normal,
median ~270 residues, capped at 1022), random residues, sorted by length and cut into batches of at most
``--budget`` padded tokens, each padded to one of ``--buckets`` (128, 256, 512, 1024 tokens; the same batches for
every model, so each of the few shapes is compiled once, in warm-up).

Sections (each reported in the JSON):
- ``inference``: ``jax.jit`` of ``stateless_call`` (last hidden state) over all batches, ``--reps`` timed
  passes after a warm-up pass; tokens/s over real (unpadded) tokens.
- ``training``: one step per batch (``--train-budget`` tokens): forward, loss mean(h^2) over real tokens,
  gradients of every trainable variable and an SGD update, all in one ``jax.jit``.
- ``numerics``: max |ours - keras-hub| of the last hidden state on single unpadded sequences (keras-hub has no
  token dropout: its embedding table is folded by 0.88, exact without <mask>; and it masks padded *queries*
  rather than keys, so padded batches differ by design).
- ``pytorch``: esm_dual.pt ``EsmModel`` on the same weights and batches (a subprocess, so JAX and PyTorch do
  not share the card's memory pools): inference and the same training step, if torch is installed.

Usage: python benchmarks/keras_gpu.py [--dtype bfloat16|float32] [--n-seqs 1024] [--budget 16384] [--smoke]
``--smoke``: a tiny model and 8 short sequences on the CPU (what the test suite runs). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax" and "--section" not in sys.argv:
    raise SystemExit(f"keras_gpu.py runs the Keras JAX backend; KERAS_BACKEND is {os.environ['KERAS_BACKEND']!r}")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from keras_hub_reference import build_keras_hub, token_dropout_scale  # noqa: E402 (beside this file)

ESM2_650M = dict(
    vocab_size=33, hidden_size=1280, num_hidden_layers=33, num_attention_heads=20, intermediate_size=5120,
    position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False, layer_norm_eps=1e-5,
    pad_token_id=1, mask_token_id=32, max_position_embeddings=1026, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
SMOKE = dict(ESM2_650M, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


def lengths_uniref(n: int, seed: int, max_residues: int) -> np.ndarray:
    """UniRef50-like residue counts: log-normal, median ~270, at least 20, at most ``max_residues``."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(270), 0.65, n)), 20, max_residues).astype(int)


def make_batches(n: int, seed: int, budget: int, max_residues: int,
                 buckets: tuple[int, ...] = (256, 512, 1024)) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random residues of UniRef-like lengths with BOS/EOS, sorted by length, each padded to the smallest of
    ``buckets`` (padded lengths) that holds it, in batches of ``budget // bucket`` rows: int32 (ids [B, L],
    mask [B, L]). A bucket's last batch is filled up with rows holding a lone ``<cls>`` token, so every
    batch of a bucket has one shape: at most ``len(buckets)`` shapes to compile, whatever ``n`` is (XLA
    compiles each shape anew; a shape per batch made compiling, not running, the cost of a GPU run)."""
    rng = np.random.default_rng(seed + 1)
    lengths = np.sort(lengths_uniref(n, seed, max_residues)) + 2
    buckets = tuple(sorted(buckets))
    if lengths[-1] > buckets[-1]:
        raise ValueError(f"the longest sequence ({lengths[-1]} tokens) does not fit the largest bucket {buckets[-1]}")
    batches = []
    for lo, L in zip((0,) + buckets, buckets):
        ks = lengths[(lengths > lo) & (lengths <= L)]
        rows = max(1, budget // L)
        for start in range(0, len(ks), rows):
            ids = np.full((rows, L), 1, np.int32)
            mask = np.zeros((rows, L), np.int32)
            ids[:, 0], mask[:, 0] = 0, 1  # filler rows: a lone <cls>
            for r, k in enumerate(ks[start:start + rows]):
                ids[r, k - 1] = 2
                ids[r, 1:k - 1] = rng.integers(4, 24, k - 2)
                mask[r, :k] = 1
            batches.append((ids, mask))
    return batches


def single_sequences(seed: int, tokens: int, n: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` unpadded sequences of ``tokens`` tokens (BOS + residues + EOS), one shape: one compile."""
    rng = np.random.default_rng(seed + 2)
    out = []
    for _ in range(n):
        ids = np.concatenate([[0], rng.integers(4, 24, tokens - 2), [2]]).astype(np.int32)[None]
        out.append((ids, np.ones_like(ids)))
    return out


def real_tokens(batches) -> int:
    """Tokens of the real sequences (the filler rows' lone <cls> left out)."""
    return int(sum(m[m.sum(1) > 1].sum() for _, m in batches))


def random_hub_tensors(cfg, seed: int) -> dict[str, np.ndarray]:
    """Every tensor of an ``EsmModel`` in hub names and PyTorch orientation, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    D, F, V, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    k = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, k, 2, dtype=np.float32) / k))).astype(np.float32)

    def normal(*shape, std=0.02):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    out = {"embeddings.word_embeddings.weight": normal(V, D, std=0.5),
           "encoder.emb_layer_norm_after.weight": 1 + normal(D, std=0.1),
           "encoder.emb_layer_norm_after.bias": normal(D)}
    for i in range(n):
        p = f"encoder.layer.{i}."
        for name, (o, i_) in {"attention.self.query": (D, D), "attention.self.key": (D, D),
                              "attention.self.value": (D, D), "attention.output.dense": (D, D),
                              "intermediate.dense": (F, D), "output.dense": (D, F)}.items():
            out[p + name + ".weight"] = normal(o, i_)
            out[p + name + ".bias"] = normal(o)
        for name in ("attention.LayerNorm", "LayerNorm"):
            out[p + name + ".weight"] = 1 + normal(D, std=0.1)
            out[p + name + ".bias"] = normal(D)
        out[p + "attention.self.rotary_embeddings.inv_freq"] = inv.copy()
    out["contact_head.regression.weight"] = normal(1, n * cfg.num_attention_heads)
    out["contact_head.regression.bias"] = normal(1)
    return out


def device_name() -> str:
    try:
        import jax

        d = jax.devices()[0]
        return f"{d.platform}: {getattr(d, 'device_kind', d)}"
    except Exception:  # noqa: BLE001 - reporting only
        return platform.processor() or platform.machine()


def measured(fn, batches, reps: int) -> dict:
    """``time_passes``, or the error that stopped it (out of memory, say): one model failing a section is a
    result to report, not a reason to lose the other model's numbers."""
    try:
        return time_passes(fn, batches, reps)
    except Exception as e:  # noqa: BLE001 - recorded in the JSON
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def speedup(ours: dict, peer: dict) -> float | None:
    if "tokens_per_s" in ours and "tokens_per_s" in peer:
        return round(ours["tokens_per_s"] / peer["tokens_per_s"], 3)
    return None


def time_passes(fn, batches, reps: int) -> dict:
    """Warm-up pass (compiles every shape), then ``reps`` timed passes; median pass."""
    import jax

    for ids, mask in batches:
        jax.block_until_ready(fn(ids, mask))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for ids, mask in batches:
            out = fn(ids, mask)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    tokens = real_tokens(batches)
    s = float(np.median(times))
    return {"s": round(s, 4), "tokens_per_s": round(tokens / s, 1), "runs_s": [round(t, 4) for t in times]}


def jax_sections(args, cfg, tensors, batches, train_batches, progress=lambda res: None) -> dict:
    """The JAX sections; ``progress(res)`` is called after each one (the script saves partial results)."""
    import jax
    import jax.numpy as jnp
    import keras
    import keras_hub

    from esm_dual.tf import TFEsmModel

    policy = "mixed_bfloat16" if args.dtype == "bfloat16" else "float32"
    ours = TFEsmModel.from_checkpoint(_Ckpt(cfg, tensors), dtype=policy)
    kh = build_keras_hub(cfg, tensors, token_dropout_scale(cfg), dtype=policy)
    res = {"versions": {"jax": jax.__version__, "keras": keras.__version__, "keras_hub": keras_hub.__version__}}

    def forward(model, is_ours):
        def f(tv, ntv, ids, mask):
            if is_ours:
                out, _ = model.stateless_call(tv, ntv, ids, attention_mask=mask)
                return out.last_hidden_state
            out, _ = model.stateless_call(tv, ntv, {"token_ids": ids})
            return out
        return f

    def infer(model, is_ours):
        f = jax.jit(forward(model, is_ours))
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        return lambda ids, mask: f(tv, ntv, ids, mask)

    def train(model, is_ours):
        fwd = forward(model, is_ours)

        def loss_fn(tv, ntv, ids, mask):
            h = fwd(tv, ntv, ids, mask).astype(jnp.float32)
            m = mask.astype(jnp.float32)[..., None]
            return jnp.sum(h * h * m) / (jnp.sum(m) * h.shape[-1])

        @jax.jit
        def step(tv, ntv, ids, mask):
            loss, grads = jax.value_and_grad(loss_fn)(tv, ntv, ids, mask)
            return loss, [w - 1e-4 * g.astype(w.dtype) for w, g in zip(tv, grads)]

        state = {"tv": [v.value for v in model.trainable_variables]}
        ntv = [v.value for v in model.non_trainable_variables]

        def run(ids, mask):
            loss, state["tv"] = step(state["tv"], ntv, ids, mask)
            return loss
        return run

    # Numerics on single unpadded sequences (fp32 compute for the comparison is not asked: same dtype both).
    singles = single_sequences(args.seed, 64 if args.smoke else 256)
    fo, fk = infer(ours, True), infer(kh, False)
    diff = max(float(jnp.max(jnp.abs(fo(i, m).astype(jnp.float32) - fk(i, m).astype(jnp.float32))))
               for i, m in singles)
    res["numerics"] = {"max_abs_diff_last_hidden_single_sequences": diff, "dtype": args.dtype}
    res["inference"] = {"keras_hub": measured(fk, batches, args.reps), "esm_dual": measured(fo, batches, args.reps)}
    res["inference"]["speedup_vs_keras_hub"] = speedup(res["inference"]["esm_dual"], res["inference"]["keras_hub"])
    progress(res)
    del fo, fk
    res["training"] = {"esm_dual": measured(train(ours, True), train_batches, args.reps)}
    progress(res)
    res["training"]["keras_hub"] = measured(train(kh, False), train_batches, args.reps)
    res["training"]["speedup_vs_keras_hub"] = speedup(res["training"]["esm_dual"], res["training"]["keras_hub"])
    return res


class _Ckpt:
    """The in-memory checkpoint ``from_checkpoint`` takes (config + hub-named tensors)."""

    def __init__(self, config, tensors):
        self.config, self.tensors, self.source = config, tensors, "random weights (keras_gpu.py)"


def torch_section(args, cfg, tensors, batches, train_batches) -> dict:
    import torch

    import esm_dual.pt as P

    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" and dev == "cuda" else torch.float32
    model = P.EsmModel(cfg)
    model.load_hub_tensors(tensors)
    model = model.to(dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(fn, data):
        for ids, mask in data:
            fn(ids, mask)
        sync()
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            for ids, mask in data:
                fn(ids, mask)
            sync()
            times.append(time.perf_counter() - t)
        s = float(np.median(times))
        tokens = real_tokens(data)
        return {"s": round(s, 4), "tokens_per_s": round(tokens / s, 1), "runs_s": [round(t, 4) for t in times]}

    infer_model = P.EsmModel(cfg)
    infer_model.load_hub_tensors(tensors)
    infer_model = infer_model.to(dev, dtype).eval()

    @torch.inference_mode()
    def infer(ids, mask):
        out = infer_model(torch.from_numpy(ids).to(dev), attention_mask=torch.from_numpy(mask).to(dev))
        return out.last_hidden_state

    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train(ids, mask):
        m = torch.from_numpy(mask).to(dev)
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            h = model(torch.from_numpy(ids).to(dev), attention_mask=m).last_hidden_state.float()
        mf = m.float()[..., None]
        loss = (h * h * mf).sum() / (mf.sum() * h.shape[-1])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "inference": timed(infer, batches), "training": timed(train, train_batches)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, 8 short sequences, CPU")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--n-seqs", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=16384, help="padded tokens per inference batch")
    ap.add_argument("--train-budget", type=int, default=4096, help="padded tokens per training batch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--buckets", default="128,256,512,1024",
                    help="padded lengths (tokens); every batch of a bucket has one shape (one compile each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch section")
    ap.add_argument("--section", choices=("jax", "torch"), default="jax", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="also write the JSON here")
    attention = ap.add_mutually_exclusive_group()
    attention.add_argument("--cudnn-attention", action="store_true",
                           help="esm-dual's attention through cuDNN on JAX GPUs (the default unless "
                                "ESM_DUAL_KERAS_CUDNN_ATTENTION=0)")
    attention.add_argument("--xla-attention", action="store_true",
                           help="esm-dual's attention through XLA instead (ESM_DUAL_KERAS_CUDNN_ATTENTION=0)")
    args = ap.parse_args(argv)
    if args.cudnn_attention or args.xla_attention:
        os.environ["ESM_DUAL_KERAS_CUDNN_ATTENTION"] = "1" if args.cudnn_attention else "0"
    if args.smoke:
        args.n_seqs, args.budget, args.train_budget, args.reps = 8, 256, 256, 1

    from esm_dual.common.config import EsmConfig

    cfg = EsmConfig(**(SMOKE if args.smoke else ESM2_650M))
    max_res = 60 if args.smoke else 1022
    tensors = random_hub_tensors(cfg, args.seed)
    buckets = (64,) if args.smoke else tuple(int(x) for x in args.buckets.split(","))
    batches = make_batches(args.n_seqs, args.seed, args.budget, max_res, buckets)
    train_batches = make_batches(args.n_seqs, args.seed, args.train_budget, max_res, buckets)
    if args.section == "torch":
        res = torch_section(args, cfg, tensors, batches, train_batches)
        print(json.dumps(res))
        return res

    from esm_dual.tf.ops import cudnn_attention_enabled

    result = {
        "benchmark": "keras_gpu", "device": device_name(), "dtype": args.dtype, "smoke": args.smoke,
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size")},
        "n_seqs": args.n_seqs, "inference_batches": len(batches), "training_batches": len(train_batches),
        "buckets": list(buckets), "tokens": real_tokens(batches),
        "esm_dual_cudnn_attention": cudnn_attention_enabled(),
        "padded_tokens": int(sum(m.size for _, m in batches)),
        "lengths": {"median_residues": float(np.median(lengths_uniref(args.n_seqs, args.seed, max_res))),
                    "max_residues": int(lengths_uniref(args.n_seqs, args.seed, max_res).max())},
    }
    def save(partial=None):
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps({**result, **(partial or {})}, indent=2) + "\n")

    # PyTorch first (a subprocess: it is done with the card before JAX takes it, and its figures are saved
    # even if the JAX sections run out of time).
    if not args.no_torch:
        cmd = [sys.executable, os.path.abspath(__file__), "--section", "torch", "--dtype", args.dtype,
               "--n-seqs", str(args.n_seqs), "--budget", str(args.budget), "--train-budget", str(args.train_budget),
               "--reps", str(args.reps), "--seed", str(args.seed), "--buckets", args.buckets] + (
                   ["--smoke"] if args.smoke else [])
        env = {**os.environ, "KERAS_BACKEND": "torch"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            result["pytorch"] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            result["pytorch"] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        save()

    result.update(jax_sections(args, cfg, tensors, batches, train_batches, progress=save))
    for sec in ("inference", "training"):
        if sec in result.get("pytorch", {}) and sec in result:
            result["pytorch"][sec]["esm_dual_keras_jax_vs_pytorch"] = speedup(
                result[sec]["esm_dual"], result["pytorch"][sec])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
