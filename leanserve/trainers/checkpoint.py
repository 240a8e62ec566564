"""Atomic, exactly-resumable training checkpoints.

A checkpoint holds everything a step depends on: model, optimizer, scheduler, the trainer's own
state (step, phase, data-loader position) and every RNG state of every rank. Resuming from it
reproduces the uninterrupted run bit for bit wherever the kernels are deterministic (CPU fp32;
same world size). On GPU, two uninterrupted runs already differ in the last bits (atomics in
backward kernels), and a resumed run differs from a straight one by as much.

One file, written atomically (leanserve/atomic.py), so a job killed mid-write leaves the previous
checkpoint intact; a truncated or corrupt one is refused in one line. Only our own files are read
back, and only with `torch.load(weights_only=True)`: nothing but tensors and plain containers is
ever unpickled.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from leanserve.atomic import atomic_write


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DistributedDataParallel (or torch.compile)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and CUDA RNG states as plain data and tensors."""
    version, keys, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler=None, *, rank_state: dict | None = None, **state) -> None:
    """Save a checkpoint; under torch.distributed every rank must call it (RNG states and
    `rank_state`, e.g. each rank's data-loader position, are gathered), rank 0 writes.

    `state` is the trainer's own state (step, phase, args ...): plain data and tensors only.
    """
    rank, world = _world()
    mine = {"rng": rng_state(), **(rank_state or {})}
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, _to_cpu(mine))
    else:
        per_rank = [_to_cpu(mine)]
    if rank == 0:
        ckpt = {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "world_size": world,
            "ranks": per_rank,
            "state": state,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            torch.save(ckpt, tmp)
    if world > 1:
        dist.barrier()  # nobody races ahead (or exits) before the file is complete


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None) -> tuple[dict, dict]:
    """Restore model/optimizer/scheduler and this rank's RNG states in place.

    Returns (state, rank_state): the trainer state and this rank's `rank_state` as saved.
    Restores RNG last, so call it after the model and optimizer are built and before training.
    """
    rank, world = _world()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({_first_line(e)}); it cannot be resumed from") from None
    if ckpt["world_size"] != world:
        raise ValueError(f"{path} was written by {ckpt['world_size']} process(es), this run has {world}: "
                         "an exact resume needs the same world size")
    unwrap(model).load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    mine = dict(ckpt["ranks"][rank])
    set_rng_state(mine.pop("rng"))
    return ckpt["state"], mine


def _first_line(error: Exception) -> str:
    return str(error).strip().split("\n", 1)[0] or type(error).__name__


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def check_resume_args(saved: dict, args, free: tuple[str, ...]) -> None:
    """Refuse to resume with options that change the result (everything but `free`): one line
    naming each changed option, old -> new."""
    from leanserve.errors import UserError

    changed = [k for k, v in vars(args).items() if k not in free and saved.get(k) != v]
    if changed:
        raise UserError("--resume with different options than the checkpoint: " +
                        ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}" for k in changed))


def check_out_dir(out: str | Path, checkpoint: str, resume: bool, finished: str) -> None:
    """--out of a resumable trainer: --resume needs `checkpoint` there; a fresh run refuses a directory
    that holds an unfinished run's checkpoint or a finished model (its `finished` file)."""
    from leanserve.errors import UserError

    out = Path(out)
    if resume and not (out / checkpoint).is_file():
        raise UserError(f"--resume: no checkpoint {out / checkpoint}")
    if not resume and (out / checkpoint).is_file():
        raise UserError(f"{out} holds an unfinished run's checkpoint; pass --resume or choose another --out")
    if not resume and (out / finished).exists():
        raise UserError(f"{out} already holds a {'pipeline' if finished == 'model_index.json' else 'model'}; "
                        "choose another --out")
