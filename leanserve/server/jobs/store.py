"""Jobs and their events in SQLite (WAL): what survives a server killed with SIGKILL.

Every change is one committed transaction: a status change writes the job row and its `status` event
together, so the events list is the job's history with timestamps. Calls are short and synchronous
(a lock serialises the one connection); the event loop calls them directly.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

ACTIVE = ("queued", "running")
# not active: a stream of events ends at these; all but succeeded can be resumed
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order, for pagination
    id TEXT UNIQUE NOT NULL,
    command TEXT NOT NULL,
    args TEXT NOT NULL,          -- JSON, as the client sent them
    argv TEXT NOT NULL,          -- JSON, the command's arguments without --out and --resume
    device TEXT NOT NULL,        -- cpu | cuda: whose slots the job takes
    publish INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    exit_code INTEGER,
    error TEXT,
    output_dir TEXT NOT NULL,    -- relative to the workspace
    progress TEXT,               -- JSON, the last OUT/progress.json seen
    model TEXT,                  -- the served name once published
    pid INTEGER                  -- of the last process, which leads its own process group
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,         -- info | warn | error
    type TEXT NOT NULL,          -- message | status | metrics
    message TEXT NOT NULL,
    data TEXT                    -- JSON or NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""


def _job(row: sqlite3.Row) -> dict:
    job = dict(row)
    for key in ("args", "argv", "progress"):
        job[key] = json.loads(job[key]) if job[key] is not None else None
    job["publish"] = bool(job["publish"])
    return job


def _event(row: sqlite3.Row) -> dict:
    event = dict(row)
    event["data"] = json.loads(event["data"]) if event["data"] is not None else None
    return event


class JobStore:
    def __init__(self, path: str | Path):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing committed
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _write(self, *statements: tuple[str, tuple]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._db.execute(sql, params)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @staticmethod
    def _event_insert(job_id: str, message: str, type_: str, data: dict | None, level: str) -> tuple[str, tuple]:
        return ("INSERT INTO events (job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, int(time.time()), level, type_, message, None if data is None else json.dumps(data)))

    # ---- jobs

    def create(self, command: str, args, argv: list[str], device: str, publish: bool) -> dict:
        job_id = "job-" + secrets.token_hex(8)
        self._write(
            ("INSERT INTO jobs (id, command, args, argv, device, publish, status, created_at, output_dir) "
             "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
             (job_id, command, json.dumps(args), json.dumps(argv), device, int(publish), int(time.time()),
              f"{job_id}/out")),
            self._event_insert(job_id, f"Job created: leanserve {command} (queued)", "status",
                               {"status": "queued"}, "info"))
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def page(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Newest first; `after` a job id: the jobs created before it."""
        where, params = "", ()
        if after is not None:
            where, params = "WHERE seq < (SELECT seq FROM jobs WHERE id = ?)", (after,)
        rows = self._read(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ?", (*params, limit + 1))
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def with_status(self, *statuses: str) -> list[dict]:
        """Oldest first: the order queued jobs start in."""
        marks = ", ".join("?" * len(statuses))
        return [_job(r) for r in self._read(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses)]

    def count_by_status(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._read("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    def set_status(self, job_id: str, status: str, message: str, level: str = "info", **fields) -> None:
        """The new status, any other columns (started_at, exit_code, error, ...) and a `status` event."""
        columns = {"status": status, **fields}
        sets = ", ".join(f"{name} = ?" for name in columns)
        self._write((f"UPDATE jobs SET {sets} WHERE id = ?", (*columns.values(), job_id)),
                    self._event_insert(job_id, message, "status", {"status": status}, level))

    def set_progress(self, job_id: str, progress: dict) -> None:
        """The job's latest progress and a `metrics` event carrying it."""
        step = f"{progress.get('unit', 'step')} {progress.get('step')}/{progress.get('total')}"
        self._write(("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id)),
                    self._event_insert(job_id, step, "metrics", progress, "info"))

    def set_model(self, job_id: str, model: str) -> None:
        self._write(("UPDATE jobs SET model = ? WHERE id = ?", (model, job_id)),
                    self._event_insert(job_id, f"Published as model {model}", "message", {"model": model}, "info"))

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        self._write(self._event_insert(job_id, message, "message", data, level))

    # ---- events

    def events_page(self, job_id: str, after: int | None, limit: int) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists fine-tuning events; `after` an event seq: the older ones."""
        rows = self._read("SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                          (job_id, after if after is not None else 2**62, limit + 1))
        return [_event(r) for r in rows[:limit]], len(rows) > limit

    def events_since(self, job_id: str, after: int) -> list[dict]:
        """Oldest first, those after seq `after` (following a job)."""
        return [_event(r) for r in self._read("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                                              (job_id, after))]
