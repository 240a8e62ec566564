"""The jobs store on its own: WAL mode, status history as events, newest-first pages, and what another
connection (a restarted server) reads back."""
from __future__ import annotations

import sqlite3

from leanserve.server.jobs.store import JobStore


def test_status_changes_are_events_and_survive_a_reopen(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job = store.create("train lm", {"seq_len": 64}, ["--seq-len=64"], "cpu", publish=True)
    assert job["status"] == "queued" and job["output_dir"] == f"{job['id']}/out" and job["publish"] is True
    store.set_status(job["id"], "running", "Job started", started_at=1, pid=42)
    store.set_progress(job["id"], {"step": 3, "total": 10, "unit": "step"})
    store.set_status(job["id"], "failed", "boom", "error", finished_at=2, exit_code=1, error="boom")

    assert sqlite3.connect(tmp_path / "jobs.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = JobStore(tmp_path / "jobs.db")  # as a restarted server sees it, the first still open
    again = reopened.get(job["id"])
    assert (again["status"], again["exit_code"], again["error"], again["pid"]) == ("failed", 1, "boom", 42)
    assert again["args"] == {"seq_len": 64} and again["progress"]["step"] == 3
    events = reopened.events_since(job["id"], 0)
    assert [(e["type"], (e["data"] or {}).get("status")) for e in events] == [
        ("status", "queued"), ("status", "running"), ("metrics", None), ("status", "failed")]
    assert events[-1]["level"] == "error" and events[2]["message"] == "step 3/10"
    assert reopened.count_by_status() == {"failed": 1}


def test_pages_are_newest_first(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    ids = [store.create("train lm", {}, [], "cpu", publish=False)["id"] for _ in range(5)]
    page, more = store.page(None, 2)
    assert [j["id"] for j in page] == ids[::-1][:2] and more
    page, more = store.page(page[-1]["id"], 10)
    assert [j["id"] for j in page] == ids[::-1][2:] and not more
    assert [j["id"] for j in store.with_status("queued")] == ids  # the order they start in
    events, more = store.events_page(ids[0], None, 1)
    assert events[0]["data"] == {"status": "queued"} and not more
