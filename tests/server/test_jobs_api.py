"""The jobs API end to end on a real server running real `train lm` subprocesses: submit, follow the
events, publish, chat through the openai client, unload; cancel (the process group is gone); a full
queue; bad commands, arguments and paths; SIGKILL the server mid-job, restart, resume, same weights."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from server_utils import metric, remote_server, scrape, sse_data
from lm_builders import train_texts, write_data

KEY = "jobs-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# long enough to SIGKILL the server between the first checkpoint and the end (~20 ms a step here)
TRAIN_ARGS = {"data": "inputs/data", "tokenizer": "inputs/tok", "device": "cpu", "preset": "tiny", "batch_size": 8,
              "seq_len": 64, "lr": 3e-3, "eval_batches": 2, "pretrain_steps": 60, "chat_steps": 30,
              "save_every": 20}
STEPS = TRAIN_ARGS["pretrain_steps"] + TRAIN_ARGS["chat_steps"]  # a kill at the first checkpoint leaves 70 to go
SERVER_ARGS = ("--api-key", KEY, "--cpu-jobs", "1", "--max-queued-jobs", "1")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A jobs workspace holding the inputs jobs read: a tiny data directory and tokenizer."""
    from leanserve.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("jobs")
    data = write_data(root / "inputs" / "data")
    train_tokenizer(train_texts(data), root / "inputs" / "tok", vocab_size=400, model_max_length=512)
    return root


@pytest.fixture(scope="module")
def server(tiny_llm_dir, workspace):
    with remote_server(tiny_llm_dir, "--jobs-dir", str(workspace), *SERVER_ARGS) as s:
        yield s


def api(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, server.api_url + path, headers=AUTH, timeout=TIMEOUT_S, **kwargs)


def follow(server, job_id: str) -> list[dict]:
    """Every event of the job, oldest first, through the SSE stream that ends with the job."""
    with httpx.stream("GET", f"{server.api_url}/jobs/{job_id}/events", params={"stream": "true"}, headers=AUTH,
                      timeout=TIMEOUT_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = sse_data(r.iter_lines())
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def wait_for(server, job_id: str, ready, what: str) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job = api(server, "GET", f"/jobs/{job_id}").json()
        if ready(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never {what}: {job}\n{server.log()[-3000:]}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def weights(job_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(job_dir / "out" / "model.safetensors")


@pytest.fixture(scope="module")
def trained_job(server):
    """A train lm job submitted with publish, followed to its end."""
    r = api(server, "POST", "/jobs", json={"command": "train lm", "args": TRAIN_ARGS, "publish": True})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "job" and job["status"] in ("queued", "running") and job["id"].startswith("job-")
    return job, follow(server, job["id"])


def test_submit_follow_publish_chat_unload(server, workspace, trained_job):
    job, events = trained_job
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"], [e["message"] for e in events]
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps and steps == sorted(steps) and steps[-1] == STEPS, steps
    assert any(e["message"] == f"Published as model {job['id']}" for e in events)

    done = api(server, "GET", f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["exit_code"] == 0 and done["error"] is None
    assert done["model"] == job["id"] and done["progress"]["done"] and done["started_at"] <= done["finished_at"]
    assert (workspace / done["output_dir"] / "model.safetensors").is_file()
    assert "wrote" in api(server, "GET", f"/jobs/{job['id']}/logs").text

    client = openai.OpenAI(base_url=server.api_url, api_key=KEY, max_retries=0)
    assert job["id"] in [m.id for m in client.models.list().data]
    chat = client.chat.completions.create(model=job["id"], max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "Sort: 3, 1, 2."}])
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens > 0

    samples = scrape(server.url)
    assert metric(samples, "leanserve:jobs", status="succeeded") == 1
    assert metric(samples, "leanserve:job_duration_seconds_count", command="train lm", status="succeeded") == 1

    r = api(server, "DELETE", f"/models/{job['id']}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert job["id"] not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=job["id"], max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    # published again from the job, by name
    r = api(server, "POST", "/models", json={"job": job["id"], "name": "trained"})
    assert r.status_code == 200 and r.json()["id"] == "trained"
    assert client.completions.create(model="trained", prompt="def", max_tokens=2).choices[0].text is not None


def test_events_and_jobs_paginate(server, trained_job):
    job, events = trained_job
    everything = api(server, "GET", f"/jobs/{job['id']}/events", params={"limit": 100}).json()
    newest = [e["id"] for e in everything["data"]]
    assert not everything["has_more"] and newest[-len(events):] == [e["id"] for e in reversed(events)]
    page = api(server, "GET", f"/jobs/{job['id']}/events", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] and len(page["data"]) == 2
    assert [e["id"] for e in page["data"]] == newest[:2]
    older = api(server, "GET", f"/jobs/{job['id']}/events", params={"limit": 2, "after": newest[1]}).json()
    assert [e["id"] for e in older["data"]] == newest[2:4]
    jobs = api(server, "GET", "/jobs", params={"limit": 1}).json()
    assert jobs["object"] == "list" and jobs["data"][0]["object"] == "job"


def test_cancel_running_job_and_full_queue(server, trained_job):
    long_args = {**TRAIN_ARGS, "pretrain_steps": 100_000}
    running = api(server, "POST", "/jobs", json={"command": "train lm", "args": long_args}).json()
    running = wait_for(server, running["id"], lambda j: j["progress"] is not None, "made progress")
    assert running["status"] == "running" and group_alive(running["pid"])

    # one CPU slot is taken and the queue holds one job: the next is refused
    queued = api(server, "POST", "/jobs", json={"command": "train lm", "args": long_args}).json()
    assert queued["status"] == "queued"
    r = api(server, "POST", "/jobs", json={"command": "train lm", "args": long_args})
    assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError" and "Retry-After" in r.headers

    assert api(server, "POST", f"/jobs/{queued['id']}/cancel", json={}).json()["status"] == "cancelled"
    cancelled = api(server, "POST", f"/jobs/{running['id']}/cancel", json={}).json()
    assert cancelled["status"] == "cancelled" and not group_alive(running["pid"])
    r = api(server, "POST", f"/jobs/{running['id']}/cancel", json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == 409


@pytest.mark.parametrize("body, status, message", [
    ({"command": "train nothing", "args": {}}, 400, "is not a leanserve command"),
    ({"command": "serve", "args": {}}, 400, "does not run as a job"),
    ({"command": "train lm", "args": {**TRAIN_ARGS, "bogus": 1}}, 400, "unrecognized arguments: --bogus=1"),
    ({"command": "train lm", "args": {**TRAIN_ARGS, "pretrain_steps": "many"}}, 400, "invalid int value: 'many'"),
    ({"command": "train lm", "args": {**TRAIN_ARGS, "out": "/tmp/x"}}, 400, "args.out is set by the server"),
    ({"command": "train lm", "args": ["--data", "inputs/data", "--ou", "/tmp/x"]}, 400, "is set by the server"),
    ({"command": "train lm", "args": {**TRAIN_ARGS, "data": "../../etc"}}, 400, "outside the jobs workspace"),
    ({"command": "train lm", "args": {**TRAIN_ARGS, "tokenizer": "/etc"}}, 400, "outside the jobs workspace"),
    ({"command": "train lm", "args": {**TRAIN_ARGS, "data": "escape"}}, 400, "outside the jobs workspace"),
    ({"command": "train lm", "args": TRAIN_ARGS, "priority": 1}, 400, "priority"),
])
def test_bad_requests_are_4xx_in_the_error_envelope(server, workspace, body, status, message):
    (workspace / "escape").unlink(missing_ok=True)
    (workspace / "escape").symlink_to("/etc")  # a symlink in the workspace leading out of it
    before = api(server, "GET", "/jobs", params={"limit": 100}).json()["data"]
    r = api(server, "POST", "/jobs", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["code"] == status
    assert api(server, "GET", "/jobs", params={"limit": 100}).json()["data"] == before  # nothing created


def test_unknown_job_auth_and_model_paths(server):
    assert api(server, "GET", "/jobs/job-0000").status_code == 404
    assert httpx.get(server.api_url + "/jobs", timeout=10).status_code == 401
    r = api(server, "POST", "/models", json={"path": "../"})
    assert r.status_code == 400 and "outside the jobs workspace" in r.json()["error"]["message"]


def test_sigkill_mid_job_then_resume_gives_the_same_weights(tiny_llm_dir, workspace, trained_job, tmp_path):
    job_a, _ = trained_job
    second = tmp_path / "jobs"
    shutil.copytree(workspace / "inputs", second / "inputs")
    with remote_server(tiny_llm_dir, "--jobs-dir", str(second), *SERVER_ARGS, exit_code=-signal.SIGKILL) as s:
        job = api(s, "POST", "/jobs", json={"command": "train lm", "args": TRAIN_ARGS}).json()
        job = wait_for(s, job["id"], lambda j: (j["progress"] or {}).get("checkpoint_step"), "checkpointed")
        s.proc.kill()
        s.proc.wait()
        assert job["progress"]["step"] < STEPS, "the job ended before the server was killed"
        deadline = time.monotonic() + 10
        while group_alive(job["pid"]) and time.monotonic() < deadline:  # it dies with the server
            time.sleep(0.05)
        assert not group_alive(job["pid"])
    assert (second / job["id"] / "out" / "checkpoint.pt").is_file() and (second / job["id"] / "job.log").is_file()

    with remote_server(tiny_llm_dir, "--jobs-dir", str(second), *SERVER_ARGS) as s:
        interrupted = api(s, "GET", f"/jobs/{job['id']}").json()
        assert interrupted["status"] == "interrupted"
        assert api(s, "POST", f"/jobs/{job['id']}/resume", json={}).json()["status"] == "queued"
        events = follow(s, job["id"])
        assert events[-1]["data"]["status"] == "succeeded", api(s, "GET", f"/jobs/{job['id']}/logs").text
        assert any("from its checkpoint at step" in e["message"] for e in events)
        assert "--resume" in api(s, "GET", f"/jobs/{job['id']}/logs").text
    a, b = weights(workspace / job_a["id"]), weights(second / job["id"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_jobs_cli_submits_follows_and_lists(server, capsys):
    from leanserve.cli import main

    conn = ["--url", server.url, "--api-key", KEY]
    words = ["train", "lm", "--data", "inputs/data", "--tokenizer", "inputs/tok", "--device", "cpu", "--preset", "tiny",
             "--batch-size", "8", "--seq-len", "64", "--eval-batches", "2", "--pretrain-steps", "6", "--chat-steps", "4"]
    assert main(["jobs", "submit", *conn, "--follow", *words]) == 0
    out = capsys.readouterr().out
    job_id = out.split()[0]
    assert job_id.startswith("job-") and "The job has successfully completed" in out
    assert main(["jobs", "list", *conn]) == 0 and job_id in capsys.readouterr().out
    assert main(["jobs", "show", *conn, job_id]) == 0
    assert json.loads(capsys.readouterr().out)["progress"]["step"] == 10
    assert main(["jobs", "logs", *conn, job_id]) == 0 and "wrote" in capsys.readouterr().out
    assert main(["jobs", "submit", *conn, "train", "lm", "--bogus"]) == 2
    assert "400: leanserve train lm: " in capsys.readouterr().err
