"""The training loop `train lm`, `train diffusion` and `distill sid` share: exact resume, the progress
bar, periodic evaluation and checkpoints, --stop-at and --time-limit, and the end of a run (a last
evaluation, the model directory written by rank 0, the checkpoint removed).

A trainer subclasses TrainingLoop and keeps its own data, models, step and output; checkpoints are
trainers/checkpoint.py's (every rank's RNG states, same world size to resume); rank 0 keeps
OUT/progress.json current (trainers/progress.py). Also here: the two
option helpers the data-parallel trainers share (--batch-size over ranks, --bf16 autocast).
"""
from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from leanserve.atomic import fsync_tree
from leanserve.errors import UserError
from leanserve.models.model_dir import make_recipe
from leanserve.runtime import DistInfo
from leanserve.trainers.checkpoint import check_resume_args, load_checkpoint, save_checkpoint
from leanserve.trainers.progress import ProgressFile

CHECKPOINT = "checkpoint.pt"  # in --out until the model directory replaces it


def local_batch_size(batch_size: int, dist_info: DistInfo) -> int:
    """This rank's share of a global --batch-size."""
    if batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {batch_size} must be a multiple of the {dist_info.world_size} ranks")
    return batch_size // dist_info.world_size


def bf16_autocast(choice: str, device: torch.device):
    """`--bf16 auto|on|off` (auto: on CUDA) as a torch.autocast factory: `with autocast(): ...`."""
    if choice == "on" and device.type != "cuda":
        raise UserError("--bf16 on needs CUDA (bf16 autocast is for GPU training)")
    bf16 = device.type == "cuda" and choice != "off"
    return partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)


class TrainingLoop:
    """Steps from self.step to total_steps; stops early at --stop-at (with a checkpoint, to --resume)
    or once --time-limit is spent (and writes the model as it is).

    Reads args.out, resume, stop_at, save_every and seed, and eval_every and time_limit where the
    trainer has those options. A trainer implements
      _advance()                      one step, self.step += 1; returns the progress-bar postfix or None
      _checkpointed()                 the (module, optimizer, LR scheduler or None) a checkpoint holds
      _checkpoint_state()             (its own state, this rank's state) beyond them, plain data and tensors
      _restore(state, rank_state)     puts them back on --resume
      _write_output(metrics)          the model directory (rank 0; metrics: the last _evaluate())
    and may override _start() (after any resume, before the first step) and _evaluate() (validation
    metrics every --eval-every steps and at the end, recorded in self.history; called on every rank,
    as it is collective).
    """
    command: str  # e.g. "train lm": the progress bar's label, and the recipe's command
    unit = "step"  # what one _advance() is called in messages
    resume_free: tuple[str, ...] = ()  # options that may differ between a run and its resume

    def __init__(self, args, dist_info: DistInfo, device: torch.device, total_steps: int):
        self.args, self.dist, self.device = args, dist_info, device
        self.out = Path(args.out)
        self.total_steps = total_steps
        self.step = 0
        self.history: list[dict] = []
        # a trainer with --time-limit sets this once all ranks know rank 0's clock ran out (_time_is_up)
        self.out_of_time = False
        self.deadline = math.inf
        self.seconds_per_step: float | None = None  # of this session's steps, set when the loop ends

    # ---- what a trainer provides

    def _advance(self) -> dict | None:
        raise NotImplementedError

    def _checkpointed(self) -> tuple[torch.nn.Module, torch.optim.Optimizer, object | None]:
        raise NotImplementedError

    def _checkpoint_state(self) -> tuple[dict, dict]:
        raise NotImplementedError

    def _restore(self, state: dict, rank_state: dict) -> None:
        raise NotImplementedError

    def _write_output(self, metrics: dict | None) -> None:
        raise NotImplementedError

    def _start(self) -> None:
        pass

    def _evaluate(self) -> dict | None:
        return None

    # ---- shared

    def _log(self, message: str):
        if self.dist.is_main:
            tqdm.write(message)

    def _time_is_up(self) -> bool:
        """Whether --time-limit is spent, on rank 0's clock (False elsewhere): the trainer sends it to
        every rank with its next collective so that all stop at the same step."""
        return self.dist.is_main and time.perf_counter() > self.deadline

    def _recipe(self) -> dict:
        return make_recipe(f"leanserve {self.command}", self.args, self.args.seed, skip=("resume", "stop_at"))

    def _save(self):
        module, optimizer, scheduler = self._checkpointed()
        state, rank_state = self._checkpoint_state()
        save_checkpoint(self.out / CHECKPOINT, module, optimizer, scheduler, rank_state=rank_state, **state,
                        args=vars(self.args))

    def _resume(self):
        module, optimizer, scheduler = self._checkpointed()
        try:
            state, rank_state = load_checkpoint(self.out / CHECKPOINT, module, optimizer, scheduler)
        except ValueError as e:
            raise UserError(str(e)) from None
        check_resume_args(state["args"], self.args, self.resume_free)
        self._restore(state, rank_state)
        self._log(f"resumed from {self.out / CHECKPOINT} at {self.unit} {self.step}")

    def train(self) -> int:
        args = self.args
        if args.resume:
            self._resume()
        self._start()
        end = args.stop_at if args.stop_at is not None else self.total_steps
        eval_every = getattr(args, "eval_every", None)
        time_limit = getattr(args, "time_limit", None)
        started, first = time.perf_counter(), self.step
        if time_limit is not None:
            self.deadline = started + 60 * time_limit
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True,
                   desc=self.command)
        progress = ProgressFile(self.out, self.unit, self.total_steps, self.step,
                                checkpoint_step=self.step if args.resume else None)
        while self.step < end and not self.out_of_time:
            postfix = self._advance()
            bar.update(1)
            if postfix is not None:
                bar.set_postfix(**postfix)
            if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                self._evaluate()
            saved = self.step % args.save_every == 0 or self.step == args.stop_at
            if saved:
                self._save()
            if self.dist.is_main:
                progress.update(self.step, postfix, checkpointed=saved)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds_per_step = (time.perf_counter() - started) / max(self.step - first, 1)
        if self.out_of_time and self.step < end:
            self._log(f"time limit: ending at {self.unit} {self.step}/{self.total_steps}")
        elif self.step < self.total_steps:
            self._log(f"stopped at {self.unit} {self.step}/{self.total_steps}; continue with --resume")
            return 0
        metrics = self._evaluate()
        if self.dist.is_main:
            self._write_output(metrics)
            fsync_tree(self.out)  # the model directory is on disk before what it replaces is gone
            (self.out / CHECKPOINT).unlink(missing_ok=True)  # the model directory is the artifact now
            progress.update(self.step, done=True)
        if self.dist.world_size > 1:
            torch.distributed.barrier()  # no rank exits (or reads OUT) before the model directory is complete
        return 0
