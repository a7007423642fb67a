"""Fine-tune an ESM checkpoint with PyTorch on one process, DDP or FSDP2 (``torchrun``-launchable).

    torchrun --nproc_per_node 2 -m esm_dual.train.pt_finetune --model DIR --fasta seqs.fasta \\
        --task mlm --strategy ddp --steps 1000 --global-batch-size 32 --output run/

Tasks: ``mlm`` (BERT-style 15% masking: 80% <mask>, 10% random residue, 10% kept), ``regression``
(target = float in the header's last ``|`` field, e.g. ``>0|beta-lactamase_P20P|1.58``) and
``classification`` (integer class id in that field).

Results do not depend on the number of processes: step ``s`` always trains on the same *global* batch
(a seeded permutation per epoch), each rank takes a contiguous ``1/world`` slice of it, MLM masks are
drawn per (seed, step, record), and every loss is a sum over the rank's part divided by the global
count (times world, since DDP/FSDP average gradients). With dropout off, N processes match one process
up to float rounding.

Checkpoints ``OUTPUT/checkpoints/step-N/`` every ``--save-every`` steps (model, optimizer, step, RNG
of every rank; ``--state-dict full`` or ``sharded``); ``--resume`` continues from the newest complete
one. The final model is written to ``OUTPUT/final/`` in the hub layout (``config.json`` +
``model.safetensors``), loadable by ``esm_dual.pt``/``esm_dual.tf``/transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..pt import distributed as D

TASKS = ("mlm", "regression", "classification")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esm_dual.train.pt_finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub-layout directory, hub id, preset or fair-esm .pt file")
    p.add_argument("--fasta", required=True, help="training sequences (labels in the header's last '|' field)")
    p.add_argument("--output", required=True, help="run directory (checkpoints/, final/, log.jsonl)")
    p.add_argument("--task", choices=TASKS, default="mlm")
    p.add_argument("--strategy", choices=D.STRATEGIES, default="ddp",
                   help="ddp (default), fsdp (FSDP2, sharded per transformer layer) or none; one process "
                   "(no torchrun) always trains the plain model")
    p.add_argument("--state-dict", choices=("full", "sharded"), default="full",
                   help="checkpoint layout: full (one file from rank 0) or sharded (torch.distributed.checkpoint)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--global-batch-size", type=int, default=8, help="sequences per step over all processes")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then constant")
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--max-length", type=int, default=1022, help="residues kept per sequence")
    p.add_argument("--max-records", type=int, default=0, help="use only the first N records (0: all)")
    p.add_argument("--mlm-probability", type=float, default=0.15)
    p.add_argument("--dropout", type=float, default=None, help="override hidden/attention dropout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulate a crash
    return p


# ================================================================================================
# Data
# ================================================================================================


class Dataset:
    """Tokenised records (residue ids) and, for sequence tasks, labels from the last '|' header field."""

    def __init__(self, fasta: str, tokenizer, task: str, max_length: int, max_records: int = 0):
        from ..common.fasta import read_fasta

        recs = []
        for i, r in enumerate(read_fasta(fasta)):
            if max_records and i >= max_records:
                break
            recs.append(r)
        if not recs:
            raise SystemExit(f"{fasta}: no sequences")
        self.ids = [r.id for r in recs]
        self.residues = [e[:max_length] for e in tokenizer.encode_residues_np([r.sequence for r in recs])]
        self.labels = None
        if task != "mlm":
            raw = [r.description.rsplit("|", 1)[-1].strip() for r in recs]
            try:
                vals = [float(x) for x in raw] if task == "regression" else [int(x) for x in raw]
            except ValueError as e:
                raise SystemExit(f"{fasta}: the header's last '|' field must be a "
                                 f"{'number' if task == 'regression' else 'class id'}: {e}") from None
            self.labels = np.asarray(vals, dtype=np.float32 if task == "regression" else np.int64)

    def __len__(self) -> int:
        return len(self.residues)

    def global_batch(self, step: int, size: int, seed: int) -> list[int]:
        """Record indices of step ``step``: positions ``[step*size, (step+1)*size)`` of the concatenated
        per-epoch permutations (independent of world size and of resuming)."""
        n = len(self)
        out = []
        for pos in range(step * size, (step + 1) * size):
            epoch, k = divmod(pos, n)
            out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[k]))
        return out


def mlm_mask(residues: np.ndarray, seed: int, step: int, index: int, prob: float, tok) -> tuple:
    """BERT masking of one record, drawn from (seed, step, record index): (inputs, labels) residue ids."""
    rng = np.random.default_rng([seed, 1, step, index])
    n = len(residues)
    chosen = rng.random(n) < prob
    if not chosen.any():
        chosen[rng.integers(0, n)] = True
    roll = rng.random(n)
    random_res = rng.integers(4, 24, size=n)  # the 20 standard amino acids in the ESM alphabet
    inputs = residues.copy()
    inputs[chosen & (roll < 0.8)] = tok.mask_token_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_res[swap]
    labels = np.where(chosen, residues, -100)
    return inputs, labels


def make_batch(data: Dataset, indices: list[int], step: int, args, tok, pad_to: int):
    """(input_ids [b, L], attention_mask [b, L], labels) padded to ``pad_to`` tokens."""
    b = len(indices)
    ids = np.full((b, pad_to), tok.pad_token_id, dtype=np.int64)
    mask = np.zeros((b, pad_to), dtype=np.int64)
    labels = np.full((b, pad_to), -100, dtype=np.int64) if args.task == "mlm" else None
    for j, i in enumerate(indices):
        res = data.residues[i]
        n = len(res)
        if args.task == "mlm":
            res, lab = mlm_mask(res, args.seed, step, i, args.mlm_probability, tok)
            labels[j, 1:n + 1] = lab
        ids[j, 0] = tok.cls_token_id
        ids[j, 1:n + 1] = res
        ids[j, n + 1] = tok.eos_token_id
        mask[j, :n + 2] = 1
    if args.task != "mlm":
        labels = data.labels[indices]
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)


# ================================================================================================
# Training
# ================================================================================================


def load_model(args):
    from ..pt import EsmForMaskedLM, EsmForSequenceClassification

    overrides = {}
    if args.dropout is not None:
        overrides.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    torch.manual_seed(args.seed)  # a freshly initialised head is the same on every rank
    if args.task == "mlm":
        model = EsmForMaskedLM.from_pretrained(args.model, **overrides)
    elif args.task == "regression":
        model = EsmForSequenceClassification.from_pretrained(args.model, num_labels=1, problem_type="regression",
                                                             **overrides)
    else:
        model = EsmForSequenceClassification.from_pretrained(args.model, num_labels=args.num_labels,
                                                             problem_type="single_label_classification", **overrides)
    # The contact head is not part of either loss: frozen, so DDP sees no parameter without a gradient.
    for name, param in model.named_parameters():
        if ".contact_head." in name:
            param.requires_grad_(False)
    return model.float().train()


def local_loss(model, ids, mask, labels, args, global_count: int, world: int) -> torch.Tensor:
    """Sum of this rank's per-item losses / the global item count, times world (DDP/FSDP average)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    if args.task == "mlm":
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                ignore_index=-100, reduction="sum")
    elif args.task == "regression":
        total = ((logits.squeeze(-1).float() - labels.float()) ** 2).sum()
    else:
        total = F.cross_entropy(logits.float(), labels, reduction="sum")
    return total * (world / global_count)


def train(args) -> int:
    from ..common.tokenizer import EsmTokenizer

    info = D.init_distributed(device=args.device)
    G, W = args.global_batch_size, info.world_size
    if G % W:
        raise SystemExit(f"--global-batch-size {G} must be a multiple of the number of processes ({W})")
    tok = EsmTokenizer()
    if os.path.isfile(os.path.join(args.model, "vocab.txt")):
        tok = EsmTokenizer.from_pretrained(args.model)
    data = Dataset(args.fasta, tok, args.task, args.max_length, args.max_records)
    args.num_labels = int(data.labels.max()) + 1 if args.task == "classification" else 1

    model = load_model(args)
    config = model.config
    tied = set(model._tied) if config.tie_word_embeddings else set()
    strategy = args.strategy if info.distributed else "none"
    model = D.wrap_model(model, strategy, info)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)

    ckpt_dir = os.path.join(args.output, "checkpoints")
    start = 0
    if args.resume:
        path = D.latest_checkpoint(ckpt_dir)
        if path is not None:
            meta = D.load_checkpoint(path, model, opt, info)
            start = int(meta["step"])
            if info.is_main:
                print(f"resumed from {path} at step {start}", file=sys.stderr)
    os.makedirs(args.output, exist_ok=True)
    log = open(os.path.join(args.output, "log.jsonl"), "a") if info.is_main else None
    if info.is_main:  # what this rank holds: under FSDP about 1/world of every sharded parameter
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        run_info = {"strategy": strategy, "world_size": W, "backend": info.backend, "device": str(info.device),
                    "params": sum(p.numel() for p in model.parameters()), "params_on_rank0": local,
                    "start_step": start}
        with open(os.path.join(args.output, "run.json"), "w") as f:
            json.dump(run_info, f, indent=2)

    t0 = time.perf_counter()
    for step in range(start, args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        batch = data.global_batch(step, G, args.seed)
        per = G // W
        mine = batch[info.rank * per:(info.rank + 1) * per]
        pad_to = max(len(data.residues[i]) for i in batch) + 2  # same padding as one process would use
        ids, mask, labels = make_batch(data, mine, step, args, tok, pad_to)
        if args.task == "mlm":  # masked tokens of the whole global batch (every rank can count them)
            count = sum(int((mlm_mask(data.residues[i], args.seed, step, i, args.mlm_probability, tok)[1]
                             != -100).sum()) for i in batch)
        else:
            count = G
        ids, mask, labels = ids.to(info.device), mask.to(info.device), labels.to(info.device)
        loss = local_loss(model, ids, mask, labels, args, count, W)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        done = step + 1
        if args.log_every and (done % args.log_every == 0 or done == args.steps):
            value = loss.detach().clone()
            if info.distributed:
                torch.distributed.all_reduce(value)
            if log is not None:
                rec = {"step": done, "loss": float(value) / W, "time_s": round(time.perf_counter() - t0, 3)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            D.save_checkpoint(os.path.join(ckpt_dir, f"step-{done}"), model, opt, done, info,
                              sharded=args.state_dict == "sharded", extra={"task": args.task})
        if args.stop_after and done >= args.stop_after:
            if log is not None:
                log.close()
            D.cleanup()
            return 0  # a clean exit: torchrun tears the group down without signals

    D.save_checkpoint(os.path.join(ckpt_dir, f"step-{args.steps}"), model, opt, args.steps, info,
                      sharded=args.state_dict == "sharded", extra={"task": args.task})
    state = D.full_model_state(model)
    if info.is_main:
        from ..io.dtypes import torch_to_numpy
        from ..io.hub import save_checkpoint

        arch = "EsmForMaskedLM" if args.task == "mlm" else "EsmForSequenceClassification"
        tensors = {k.removeprefix("module."): torch_to_numpy(v) for k, v in state.items()}
        tensors = {k: v for k, v in tensors.items() if k not in tied}
        save_checkpoint(os.path.join(args.output, "final"), config.copy(architectures=[arch]), tensors)
        log.close()
    D.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return train(args)


if __name__ == "__main__":
    code = main()
    if D.torchrun_worker():  # skip the teardown that can abort it (see exit_worker)
        D.exit_worker(code)
    sys.exit(code)
