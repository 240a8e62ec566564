"""The job runner: a bounded queue, per-device limits, one subprocess per job in its own process group.

A job runs `python -m leanserve.cli <command> <argv> --out WORKSPACE/<id>/out` with the workspace as
its working directory; its stdout and stderr go to WORKSPACE/<id>/job.log (a file the job writes itself,
so the log survives the server). Progress comes from the command's OUT/progress.json (trainers/
progress.py), polled every POLL_S seconds into the job row and `metrics` events. A job resumes with
`--resume` when its last progress record names a checkpoint, else starts over in an emptied OUT.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from leanserve.server.errors import RETRY_AFTER_S, APIError
from leanserve.server.jobs.arguments import ArgsChecker, to_argv
from leanserve.server.jobs.process import die_with_server, signal_group
from leanserve.server.jobs.store import JobStore

POLL_S = 0.5
STOP_GRACE_S = 10.0  # after SIGTERM, a job's process group has this long before SIGKILL
LOG = "job.log"
PROGRESS = "progress.json"  # trainers/progress.py writes it (the server may not import trainers)
RESUMABLE = ("interrupted", "failed", "cancelled")


@dataclass
class _Attempt:
    """One run of a job's process, from its start to the end of its process group."""
    device: str
    task: asyncio.Task | None = None
    pgid: int | None = None
    stop_as: str | None = None      # "cancelled" | "interrupted" once the server ends it
    kill_at: float | None = None    # monotonic time for SIGKILL after the SIGTERM
    started: float = field(default_factory=time.monotonic)


def _read_progress(out: Path) -> dict | None:
    try:
        return json.loads((out / PROGRESS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _last_line(path: Path, limit: int = 1000) -> str:
    """The last non-empty line of a log: a command's `error:` line, or a traceback's exception."""
    with open(path, "rb") as f:
        f.seek(max(f.seek(0, os.SEEK_END) - 16384, 0))
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][-limit:] if lines else ""


class JobRunner:
    def __init__(self, store: JobStore, workspace: Path, checker: ArgsChecker, *, slots: dict[str, int],
                 max_queued: int, publish: Callable[[dict], Awaitable[str]] | None = None,
                 on_finished: Callable[[dict, str, float], None] | None = None, lock_file=None):
        self.store, self.workspace, self.checker = store, workspace, checker
        self.slots = slots            # device ("cpu" | "cuda") -> jobs that may run on it at once
        self.max_queued = max_queued
        self.publish = publish        # loads a succeeded job's output and returns its model name
        self.on_finished = on_finished  # (job, status, seconds) for the duration histogram
        self.lock_file = lock_file    # the workspace's lock, held open until shutdown
        self._attempts: dict[str, _Attempt] = {}
        self._closing = False

    # ---- lifecycle

    async def start(self) -> None:
        """Jobs the last server left running were killed with it: mark them interrupted; start the queue."""
        for job in self.store.with_status("running"):
            self.store.set_status(job["id"], "interrupted", "The server stopped while the job ran; resume it "
                                  "to continue from its last checkpoint", "warn", finished_at=int(time.time()))
        self._dispatch()

    async def shutdown(self) -> None:
        """SIGTERM every running job (they become `interrupted`, resumable) and wait for their groups."""
        self._closing = True
        for attempt in list(self._attempts.values()):
            self._stop(attempt, "interrupted")
        await asyncio.gather(*(a.task for a in list(self._attempts.values())), return_exceptions=True)
        await self.checker.close()
        self.store.close()
        if self.lock_file is not None:
            self.lock_file.close()

    # ---- requests

    def get(self, job_id: str) -> dict:
        job = self.store.get(job_id)
        if job is None:
            raise APIError(404, f"No job with id {job_id!r}", "job_id")
        return job

    async def submit(self, command: str, args: dict | list, publish: bool) -> dict:
        argv = to_argv(args)
        device = await self.checker.check(command, argv)
        self._check_queue()  # after the check's await: nothing else can fill the queue before create
        job = self.store.create(command, args, argv, device, publish)
        self._dispatch()
        return self.get(job["id"])

    async def cancel(self, job_id: str) -> dict:
        """A queued job is cancelled at once; a running one once its process group is gone."""
        job = self.get(job_id)
        attempt = self._attempts.get(job_id)
        if attempt is not None:
            self._stop(attempt, "cancelled")
            await asyncio.shield(attempt.task)
        elif job["status"] == "queued":
            self.store.set_status(job_id, "cancelled", "Job cancelled before it started", finished_at=int(time.time()))
        else:
            raise APIError(409, f"Job {job_id} is {job['status']}; only queued or running jobs can be cancelled",
                           "job_id")
        return self.get(job_id)

    async def resume(self, job_id: str) -> dict:
        job = self.get(job_id)
        if job["status"] not in RESUMABLE or job_id in self._attempts:
            raise APIError(409, f"Job {job_id} is {job['status']}; only {', '.join(RESUMABLE)} jobs resume",
                           "job_id")
        self._check_queue()
        self.store.set_status(job_id, "queued", "Job queued to resume", finished_at=None, exit_code=None,
                              error=None)
        self._dispatch()
        return self.get(job_id)

    def log_path(self, job_id: str) -> Path:
        self.get(job_id)  # a known id, never a path from the client
        return self.workspace / job_id / LOG

    def output_dir(self, job: dict) -> Path:
        return self.workspace / job["output_dir"]

    def _check_queue(self) -> None:
        if len(self.store.with_status("queued")) >= self.max_queued:
            raise APIError(429, f"The job queue is full ({self.max_queued} queued jobs); try again later",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    # ---- running

    def _dispatch(self) -> None:
        """Start queued jobs, oldest first, while their device has a free slot."""
        if self._closing:
            return
        busy = Counter(a.device for a in self._attempts.values())
        for job in self.store.with_status("queued"):
            device = job["device"]
            if job["id"] in self._attempts or busy[device] >= self.slots.get(device, 0):
                continue
            busy[device] += 1
            attempt = self._attempts[job["id"]] = _Attempt(device)
            attempt.task = asyncio.create_task(self._run(job, attempt))

    def _stop(self, attempt: _Attempt, status: str) -> None:
        if attempt.stop_as is None:
            attempt.stop_as = status
            attempt.kill_at = time.monotonic() + STOP_GRACE_S
        if attempt.pgid is not None:
            signal_group(attempt.pgid, signal.SIGTERM)

    async def _run(self, job: dict, attempt: _Attempt) -> None:
        job_id, out = job["id"], self.output_dir(job)
        try:
            checkpoint = (_read_progress(out) or {}).get("checkpoint_step")
            if checkpoint is None and out.exists():
                shutil.rmtree(out)  # an attempt that died before its first checkpoint starts over
            cmd = [sys.executable, "-m", "leanserve.cli", *job["command"].split(), *job["argv"], "--out", str(out)]
            if checkpoint is not None:
                cmd.append("--resume")
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out.parent / LOG, "ab") as log:
                log.write(f"$ {shlex.join(cmd)}\n".encode())
                log.flush()
                proc = await asyncio.create_subprocess_exec(
                    *cmd, cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=die_with_server, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except OSError as e:
            self._finish(job, attempt, "failed", f"The job could not start: {e}", None, str(e))
            return
        attempt.pgid = proc.pid  # start_new_session: the job leads its own process group
        resumed = f" from its checkpoint at step {checkpoint}" if checkpoint is not None else ""
        self.store.set_status(job_id, "running", f"Job started{resumed} (pid {proc.pid})",
                              started_at=int(time.time()), pid=proc.pid)
        if attempt.stop_as is not None:
            self._stop(attempt, attempt.stop_as)
        code = await self._watch(job_id, proc, out, attempt)
        signal_group(proc.pid, signal.SIGKILL)  # whatever the command left of its group
        if attempt.stop_as is not None:
            self._finish(job, attempt, attempt.stop_as, f"Job {attempt.stop_as}", code)
        elif code == 0:
            if job["publish"] and self.publish is not None:
                await self._publish(job)
            self._finish(job, attempt, "succeeded", "The job has successfully completed", code)
        else:
            error = _last_line(out.parent / LOG) or f"exit code {code}"
            self._finish(job, attempt, "failed", f"The job failed (exit code {code}): {error}", code, error)

    async def _watch(self, job_id: str, proc: asyncio.subprocess.Process, out: Path, attempt: _Attempt) -> int:
        exited = asyncio.ensure_future(proc.wait())
        last = None
        while True:
            done, _ = await asyncio.wait({exited}, timeout=POLL_S)
            progress = _read_progress(out)
            if progress is not None and progress != last:
                self.store.set_progress(job_id, progress)
                last = progress
            if done:
                return exited.result()
            if attempt.kill_at is not None and time.monotonic() > attempt.kill_at:
                signal_group(proc.pid, signal.SIGKILL)

    async def _publish(self, job: dict) -> None:
        try:
            self.store.set_model(job["id"], await self.publish(job))
        except APIError as e:
            self.store.add_event(job["id"], f"Publishing failed: {e.message}", "error")

    def _finish(self, job: dict, attempt: _Attempt, status: str, message: str, code: int | None,
                error: str | None = None) -> None:
        level = "error" if status == "failed" else "info"
        self.store.set_status(job["id"], status, message, level, finished_at=int(time.time()), exit_code=code,
                              error=error)
        if self.on_finished is not None:
            self.on_finished(job, status, time.monotonic() - attempt.started)
        del self._attempts[job["id"]]
        self._dispatch()
