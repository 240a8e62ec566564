"""`OUT/progress.json`: a long command's progress in a form programs read (the jobs runner of
`leanserve serve`, a `watch cat`), beside the tqdm bar people read.

The file is small and rewritten whole (temporary name + os.replace, like the checkpoints), so a
reader never sees it half written: at most every INTERVAL_S seconds, after every checkpoint and at
the end. Fields: step, total, unit, metrics (the bar's postfix, numbers where they parse), elapsed_s
and eta_s (this session's rate), checkpoint_step (the step --resume would continue from, or null),
done (the output is written), updated_at (Unix time).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

PROGRESS = "progress.json"
INTERVAL_S = 1.0


def _number_or_text(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


class ProgressFile:
    def __init__(self, out: str | Path, unit: str, total: int, step: int = 0, checkpoint_step: int | None = None):
        self.path = Path(out) / PROGRESS
        self.unit, self.total = unit, total
        self.first_step, self.checkpoint_step = step, checkpoint_step  # a resumed run starts at its checkpoint
        self.started = time.monotonic()
        self.last_write = -float("inf")
        self.metrics: dict = {}

    def update(self, step: int, metrics: dict | None = None, checkpointed: bool = False, done: bool = False) -> None:
        if metrics:
            self.metrics = {k: _number_or_text(v) for k, v in metrics.items()}
        if checkpointed:
            self.checkpoint_step = step
        if done:
            self.checkpoint_step = None  # the model directory replaced the checkpoint
        now = time.monotonic()
        if not (checkpointed or done or now - self.last_write >= INTERVAL_S):
            return
        self.last_write = now
        elapsed = now - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
        eta = 0.0 if done else ((self.total - step) / rate if rate > 0 else None)
        record = {"step": step, "total": self.total, "unit": self.unit, "metrics": self.metrics,
                  "elapsed_s": round(elapsed, 3), "eta_s": None if eta is None else round(eta, 3),
                  "checkpoint_step": self.checkpoint_step, "done": done, "updated_at": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(PROGRESS + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)

