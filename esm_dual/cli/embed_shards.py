"""``esm-dual embed`` over several processes: which records each rank embeds, the shard stores' names, the
``--devices`` workers, and merging the finished shards into OUTPUT.

Rank r of N embeds records ``shard_range(total, r, N)`` into ``OUTPUT.rank{r}-of-{N}.h5`` and marks it finished
with ``OUTPUT.rank{r}-of-{N}.h5.done``; :func:`merge_shards` joins the finished shards.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
from collections.abc import Callable

from ._common import CliError, name_list, note, warn

_MERGE_TIMEOUT_ENV = "ESM_DUAL_MERGE_TIMEOUT"


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Record indices of ``rank``: a contiguous share of ``n`` (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_path(output: str, rank: int, world_size: int) -> str:
    root, ext = os.path.splitext(output)
    return f"{root}.rank{rank}-of-{world_size}{ext or '.h5'}"


def env_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def under_torchrun() -> bool:
    """torchrun (torch.distributed.elastic) starts every rank at once and sets these; a cluster array that sets
    RANK/WORLD_SIZE by hand does not, and its ranks may run days apart."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ


def run_id() -> str:
    """Processes of one run share this: torchrun's run id, the --devices parent's, or this process's own."""
    return (os.environ.get("ESM_DUAL_EMBED_RUN") or os.environ.get("TORCHELASTIC_RUN_ID")
            or f"pid{os.getpid()}")


def _wait_for_shards(shards: list[str], quiet: bool) -> list[str]:
    """Wait until every shard's ``.done`` marker exists; say which ranks are missing every minute, and give up
    (returning the missing ones) when none of them changed for ``ESM_DUAL_MERGE_TIMEOUT`` seconds."""
    timeout = float(os.environ.get(_MERGE_TIMEOUT_ENV, 3600))
    last_change, last_note, seen = time.monotonic(), time.monotonic(), None
    while True:
        missing = [s for s in shards if not os.path.isfile(s + ".done")]
        if not missing:
            return []
        state = [(s, os.path.getsize(s) if os.path.exists(s) else -1,
                  os.path.getmtime(s) if os.path.exists(s) else 0) for s in missing]
        now = time.monotonic()
        if state != seen:
            seen, last_change = state, now
        if now - last_change >= timeout:
            return missing
        if now - last_note >= 60:
            note(f"waiting for {len(missing)} shard(s): {name_list(missing)}", quiet)
            last_note = now
        time.sleep(min(0.5, max(timeout / 10, 0.01)))


def merge_shards(args: argparse.Namespace, world_size: int | None = None, wait: bool = False) -> int:
    """Merge ``OUTPUT.rank{r}-of-{n}.h5`` (each finished: its ``.done`` marker exists) into OUTPUT."""
    from ..common.embeddings import merge_stores

    if world_size is None:
        root, ext = os.path.splitext(args.output)
        pattern = re.compile(re.escape(root) + r"\.rank(\d+)-of-(\d+)" + re.escape(ext or ".h5") + "$")
        found = {int(m.group(2)) for f in glob.glob(glob.escape(root) + ".rank*-of-*")
                 if (m := pattern.match(f))}
        if len(found) != 1:
            raise CliError(f"--merge: expected shard stores {shard_path(args.output, 0, 'N')} ... of one run, "
                           f"found {'none' if not found else 'several world sizes ' + str(sorted(found))}")
        world_size = found.pop()
    shards = [shard_path(args.output, r, world_size) for r in range(world_size)]
    if wait:
        missing = _wait_for_shards(shards, args.quiet)
        if missing:
            raise CliError(f"gave up waiting for shard(s) {name_list(missing)}: no progress for "
                           f"{os.environ.get(_MERGE_TIMEOUT_ENV, 3600)} s (did those ranks start?); this rank's shard "
                           f"is kept: run `esm-dual embed ... {args.output} --merge` once they are done")
    missing = [s for s in shards if not os.path.isfile(s + ".done")]
    if missing:
        raise CliError(f"--merge: shard(s) not finished: {name_list(missing)}")
    n = merge_stores(args.output, shards, compression=None if args.compression == "none" else args.compression)
    for s in shards:
        os.remove(s)
        os.remove(s + ".done")
    note(f"merged {world_size} shard stores ({n} records) into {args.output}", args.quiet)
    return 0


def _watch_parent(parent: int) -> None:
    """Exit this process (a --devices worker) as soon as its parent is gone: no orphan keeps a GPU, a shard's
    file lock or the output directory."""
    import threading

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="esm-dual-parent-watch", daemon=True).start()


def _worker(run: Callable[[argparse.Namespace], int], args: argparse.Namespace, rank: int, world_size: int,
            parent: int | None = None) -> None:
    """One ``--devices`` worker (a spawned process): its own GPU, its shard (``run``, embed's own), no merge."""
    if parent is not None:
        _watch_parent(parent)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(world_size)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[rank % len(gpus)]
    args.devices, args.shard_only, args.plot = 1, True, None
    try:
        sys.exit(run(args))
    except CliError as e:
        warn(str(e))
        sys.exit(2)


def spawn(args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    """``--devices N``: run ``run(args)`` (embed's, a module-level function so the spawned workers can import it)
    in N workers, each on its shard; then merge the shards (``--format h5``)."""
    import multiprocessing as mp

    n = args.devices
    ctx = mp.get_context("spawn")
    os.environ.setdefault("ESM_DUAL_EMBED_RUN", f"devices-{os.getpid()}-{time.time_ns()}")  # shared by workers
    procs = [ctx.Process(target=_worker, args=(run, args, r, n, os.getpid()), daemon=True) for r in range(n)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:  # interrupted (Ctrl-C, an error): the workers stop with the parent
            if p.is_alive():
                p.terminate()
                p.join(10)
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise CliError(f"--devices {n}: worker(s) {failed} failed; rerun the same command to resume")
    if args.format == "pt":
        return 0
    return merge_shards(args, world_size=n)
