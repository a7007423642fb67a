"""ESMFold: where a grid point's first fold spends its time, pass by pass (esm-dual's fast mode alone).

Folds random sequences of the ``esmfold_v1`` shape (random weights, as benchmarks/esmfold_gpu.py builds them)
in the default mode, timing with synchronised timers each trunk pass by what it was: "eager" (an eager pass),
"setup" (``PassGraphs.capture``: a shape's buffers, with the variant's warm-up where it has none yet), "record"
(a shape's first pass: each of its three graphs recorded just before its first replay, and the pass replayed)
or "replay" (``PassGraph.__call__``: a recorded pass). Folds: a warm-up fold of 48 residues (unless ``--cold``:
then the first measured fold is also the process's first), then per length of ``--lengths`` the first fold on
that grid point ("N_first") and, where ``--again`` lists it, a later fold on it ("N_again"). One JSON line per
fold on stdout, the whole record in ``--out``.

The first process on a machine also pays one-time compilation for each new shape (docs/performance.md): run it
twice, or after the suite, to see the steady cost.

    python benchmarks/esmfold_first_fold.py [--lengths 256,320,384,512] [--again 256,384,512] [--cold] [--out F]
    python benchmarks/esmfold_first_fold.py --tiny     # CPU smoke test (eager passes only)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import esmfold_gpu as bench  # noqa: E402


def _timer(owner, name: str, label, log: list, device):
    """Wrap ``owner.name`` to append (label, seconds) to ``log`` (synchronised; not inside a capture); ``label``
    may be a function of the instance called. Returns what puts the original back."""
    import torch

    inner = getattr(owner, name)
    cuda = device == "cuda"

    def timed(*args, **kwargs):
        if cuda and torch.cuda.is_current_stream_capturing():
            return inner(*args, **kwargs)
        name = label(args[0]) if callable(label) else label  # (before the call: what it is about to do)
        bench.sync(device)
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        bench.sync(device)
        log.append((name, round(time.perf_counter() - t, 4)))
        return out

    setattr(owner, name, timed)
    return lambda: setattr(owner, name, inner)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="256,320,384,512", help="comma-separated lengths, each a first fold")
    p.add_argument("--again", default="256,384,512", help="lengths folded once more after their first fold")
    p.add_argument("--cold", action="store_true", help="no warm-up fold: the first measured fold is the process's")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", help="write the whole record (JSON) here")
    args = p.parse_args(argv)

    import torch

    from esm_dual.pt.folding import graphs, trunk

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    log: list = []
    restore = [_timer(trunk.FoldingTrunk, "_recycle_pass", "eager", log, device),
               _timer(graphs.PassGraphs, "capture", "setup", log, device),
               _timer(graphs.PassGraph, "__call__", lambda g: "replay" if g.recorded else "record", log, device)]
    try:
        model = bench.build_ours(bench.config_dict(args.tiny), device)
        model.set_fast(True)
        rng = np.random.default_rng(args.seed)
        if not args.cold:
            bench.fold(model, bench.random_seq(48, rng), None, device)
        card = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
        record = {"card": card, "torch": torch.__version__, "cold": args.cold, "folds": {}}
        again = {int(x) for x in args.again.split(",") if x}
        for n in [int(x) for x in args.lengths.split(",") if x]:
            for tag in ("first", "again") if n in again else ("first",):
                log.clear()
                seconds = bench.fold(model, bench.random_seq(n, rng), None, device)[0]
                row = {"total": round(seconds, 3), "parts": list(log)}
                record["folds"][f"{n}_{tag}"] = row
                print(json.dumps({f"{n}_{tag}": row}), flush=True)
    finally:
        for undo in restore:
            undo()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
