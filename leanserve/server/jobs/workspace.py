"""Opening the jobs workspace (`--jobs-dir`): its lock, its SQLite store and the runner over them."""
from __future__ import annotations

import fcntl
from pathlib import Path

from leanserve.errors import UserError
from leanserve.server.jobs.arguments import ArgsChecker
from leanserve.server.jobs.metrics import register_job_metrics
from leanserve.server.jobs.runner import JobRunner
from leanserve.server.jobs.store import JobStore

DATABASE = "jobs.db"
LOCK = "server.lock"


def open_jobs(settings, state, publisher) -> JobRunner:
    """The runner of `settings.jobs_dir`. One server per workspace: a second would mark the first's
    running jobs interrupted and start its queue twice, so the workspace is locked while served."""
    workspace = Path(settings.jobs_dir).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    lock = open(workspace / LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"--jobs-dir {settings.jobs_dir} is in use by another server") from None
    store = JobStore(workspace / DATABASE)
    checker = ArgsChecker(workspace, lambda: [e.config.model for e in state.engines.values()])
    duration = register_job_metrics(state.metrics.registry, store.count_by_status)

    async def publish(job: dict) -> str:
        await publisher.load(workspace / job["output_dir"], job["id"])
        return job["id"]

    runner = JobRunner(store, workspace, checker, slots={"cuda": settings.gpu_jobs, "cpu": settings.cpu_jobs},
                       max_queued=settings.max_queued_jobs, publish=publish,
                       on_finished=lambda job, status, s: duration.labels(job["command"], status).observe(s),
                       lock_file=lock)
    return runner
