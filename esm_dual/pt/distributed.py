"""torch.distributed helpers: process-group set-up, DDP / FSDP2 wrapping, resumable checkpoints.

Launch with ``torchrun`` (it sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``).
Without those variables everything degrades to one process and no process group.

* ``init_distributed()`` picks NCCL when CUDA is there and gloo otherwise (CPU).
* ``wrap_model(model, "ddp" | "fsdp")``: DDP, or FSDP2 ``fully_shard`` applied per transformer layer
  (``EsmLayer``) and then to the root, so a rank holds 1/world of each layer's parameters (what the
  3B/15B checkpoints need). The tied LM decoder stays in the root unit with the word embeddings.
* ``save_checkpoint`` / ``load_checkpoint``: model, optimizer, step and every rank's RNG states, as one
  full state dict (``torch.save`` on rank 0) or sharded (``torch.distributed.checkpoint``, one file per rank).
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def torchrun_worker() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables): more
    than one process, or a rendezvous address even for one. Such a process joins a process group."""
    return env_world()[1] > 1 or "MASTER_ADDR" in os.environ


def init_distributed(backend: str | None = None, device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); no-op for one process."""
    rank, world, local_rank = env_world()
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not torchrun_worker():
        return DistInfo(device=dev)
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, dev, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a process that torchrun started, after :func:`cleanup`, without the interpreter's teardown.

    By then every file is closed and the process group destroyed. Yet a two-process FSDP run on gloo
    (CPU) sometimes aborted in Python's own teardown after that: "terminate called without an active
    exception", SIGABRT, so torchrun failed a run whose work was done (1 of 17 resumed runs on a loaded
    2-core machine; 0 of 42 with this exit). That message is what a C++ thread gets when it takes the GIL of an
    interpreter that is finalizing; the likely holder is gloo's work kept alive by objects freed only at
    finalization (FSDP2's device mesh in the model). ``os._exit`` skips that teardown.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream: nothing left to save
            pass
    os._exit(code)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP, FSDP2 (sharded per ``EsmLayer``, then the root) or the bare model."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    model = model.to(info.device)
    if strategy == "none" or not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .modeling_esm import EsmLayer

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for module in model.modules():
        if isinstance(module, EsmLayer):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def with_tied(model: nn.Module, state_dict: dict) -> dict:
    """The state dict with the tied decoder's entry put back (it aliases the word embeddings, so the models'
    ``state_dict()`` leaves it out, as transformers does; DCP's ``set_state_dict`` wants every name)."""
    tied = getattr(unwrap(model), "_tied_weights_keys", None) or {}  # transformers' map: target -> source
    missing = {t: s for t, s in tied.items() if t not in state_dict and s in state_dict}
    return {**state_dict, **{t: state_dict[s] for t, s in missing.items()}} if missing else state_dict


# ================================================================================================
# Checkpoints
# ================================================================================================


def rng_state() -> dict[str, Any]:
    """Every RNG's state in plain types and tensors, so it loads with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {"python": random.getstate(),
                           "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                     float(cached)),
                           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state dict on CPU; collective under FSDP, every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, info: DistInfo,
                    sharded: bool = False, extra: dict[str, Any] | None = None) -> None:
    """Write ``path/`` with model, optimizer, step and each rank's RNG state; every rank must call it.

    ``sharded=False``: ``path/state.pt`` (full state dicts, written by rank 0).
    ``sharded=True``: ``path/sharded/`` via ``torch.distributed.checkpoint`` (each rank writes its shards).
    ``path/meta.json`` is written last by rank 0: a checkpoint without it is incomplete and ignored."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    os.makedirs(path, exist_ok=True)
    opts = StateDictOptions(full_state_dict=not sharded, cpu_offload=not sharded)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(path, "sharded"))
    elif info.is_main:
        tmp = os.path.join(path, "state.pt.tmp")
        torch.save({"model": model_sd, "optim": optim_sd}, tmp)
        os.replace(tmp, os.path.join(path, "state.pt"))
    torch.save(rng_state(), os.path.join(path, f"rng.rank{info.rank}.pt"))
    barrier(info)
    if info.is_main:
        meta = {"step": step, "world_size": info.world_size, "sharded": sharded, **(extra or {})}
        with open(os.path.join(path, "meta.json.tmp"), "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(os.path.join(path, "meta.json.tmp"), os.path.join(path, "meta.json"))
    barrier(info)


def latest_checkpoint(directory: str) -> str | None:
    """The complete ``step-*`` checkpoint with the highest step under ``directory``, if any."""
    if not os.path.isdir(directory):
        return None
    best, best_step = None, -1
    for name in os.listdir(directory):
        p = os.path.join(directory, name)
        if name.startswith("step-") and os.path.isfile(os.path.join(p, "meta.json")):
            with open(os.path.join(p, "meta.json")) as f:
                step = int(json.load(f)["step"])
            if step > best_step:
                best, best_step = p, step
    return best


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """Restore what ``save_checkpoint`` wrote into the (already wrapped) model and optimizer; returns meta.

    A full checkpoint loads under any world size; a sharded one is resharded by DCP on load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    if meta["sharded"]:
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "sharded"))
        set_state_dict(model, optimizer, model_state_dict=with_tied(model, state["model"]),
                       optim_state_dict=state["optim"])
    else:
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        set_state_dict(model, optimizer, model_state_dict=with_tied(model, state["model"]),
                       optim_state_dict=state["optim"], options=StateDictOptions(full_state_dict=True))
    rng_file = os.path.join(path, f"rng.rank{info.rank}.pt")
    if meta["world_size"] == info.world_size and os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta
