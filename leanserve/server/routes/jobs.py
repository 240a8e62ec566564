"""The jobs API, shaped like OpenAI's /v1/fine_tuning/jobs (objects, statuses, `after`/`limit` pages,
events newest first or followed as SSE), and publishing a model into the running server
(POST /v1/models, DELETE /v1/models/{name}). Behind the same API-key check as every /v1 route."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from leanserve.server.errors import APIError
from leanserve.server.jobs.runner import JobRunner
from leanserve.server.jobs.store import FINISHED
from leanserve.server.json_body import JSONBodyRoute
from leanserve.server.openapi import error_responses
from leanserve.server.routes import server_state
from leanserve.server.routes.openai import _model_card
from leanserve.server.streaming import SSE_DONE, SSE_HEADERS, sse_event

router = APIRouter(route_class=JSONBodyRoute)
MAX_PAGE = 100
FOLLOW_POLL_S = 0.25
MAX_LOG_BYTES = 1 << 20  # GET .../logs answers the log's last MiB


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = Field(min_length=1, description="command words, e.g. `train lm`")
    args: dict[str, Any] | list[str] = Field(default_factory=dict,
                                             description="options without `--` ({'pretrain_steps': 40}) or words")
    publish: bool = Field(False, description="load the output into this server when the job succeeds")


class ModelLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job: str | None = Field(None, description="a succeeded job whose output to serve")
    path: str | None = Field(None, description="or a model directory inside the jobs workspace")
    name: str | None = Field(None, description="the served name (default: the job id or directory name)")


def _runner(request: Request) -> JobRunner:
    runner = request.app.state.jobs
    if runner is None:
        raise APIError(404, "The jobs API is off on this server (start it with --jobs-dir)")
    return runner


def _job_object(job: dict) -> dict:
    error = {"message": job["error"], "code": "job_failed", "param": None} if job["error"] else None
    return {"object": "job", "id": job["id"], "command": job["command"], "args": job["args"],
            "status": job["status"], "created_at": job["created_at"], "started_at": job["started_at"],
            "finished_at": job["finished_at"], "exit_code": job["exit_code"], "error": error,
            "device": job["device"], "output_dir": job["output_dir"], "publish": job["publish"],
            "model": job["model"], "progress": job["progress"], "pid": job["pid"]}


def _event_object(event: dict) -> dict:
    return {"object": "job.event", "id": f"jobevent-{event['seq']}", "created_at": event["created_at"],
            "level": event["level"], "type": event["type"], "message": event["message"], "data": event["data"]}


def _event_seq(after: str | None) -> int | None:
    if after is None:
        return None
    seq = after.removeprefix("jobevent-")
    if not seq.isdigit():
        raise APIError(400, f"after: {after!r} is not an event id (jobevent-N)", "after")
    return int(seq)


@router.post("/v1/jobs", responses=error_responses(404, 429))
async def create_job(body: JobCreate, request: Request) -> dict:
    return _job_object(await _runner(request).submit(body.command.strip(), body.args, body.publish))


@router.get("/v1/jobs", responses=error_responses(400, 404))
async def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=MAX_PAGE)) -> dict:
    jobs, has_more = _runner(request).store.page(after, limit)
    return {"object": "list", "data": [_job_object(j) for j in jobs], "has_more": has_more}


@router.get("/v1/jobs/{job_id}", responses=error_responses(404))
async def get_job(job_id: str, request: Request) -> dict:
    return _job_object(_runner(request).get(job_id))


@router.get("/v1/jobs/{job_id}/events", responses=error_responses(400, 404))
async def list_events(job_id: str, request: Request, after: str | None = None,
                      limit: int = Query(20, ge=1, le=MAX_PAGE), stream: bool = False):
    """Newest first, `after` an event id for the older ones; `stream=true`: every event (after `after`)
    oldest first as SSE, following the job until it is no longer queued or running, then [DONE]."""
    runner = _runner(request)
    runner.get(job_id)
    seq = _event_seq(after)
    if stream:
        return StreamingResponse(_follow(runner, job_id, seq or 0), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    events, has_more = runner.store.events_page(job_id, seq, limit)
    return {"object": "list", "data": [_event_object(e) for e in events], "has_more": has_more}


async def _follow(runner: JobRunner, job_id: str, after: int):
    while True:
        status = runner.get(job_id)["status"]  # read first: a final status's event is then already stored
        for event in runner.store.events_since(job_id, after):
            yield sse_event(_event_object(event))
            after = event["seq"]
        if status in FINISHED:
            yield SSE_DONE
            return
        await asyncio.sleep(FOLLOW_POLL_S)


@router.get("/v1/jobs/{job_id}/logs", responses=error_responses(404))
async def job_logs(job_id: str, request: Request) -> PlainTextResponse:
    """The job's stdout and stderr (its last MiB), every attempt."""
    path = _runner(request).log_path(job_id)
    if not path.is_file():
        return PlainTextResponse("")
    with open(path, "rb") as f:
        f.seek(max(f.seek(0, os.SEEK_END) - MAX_LOG_BYTES, 0))
        return PlainTextResponse(f.read().decode(errors="replace"))


@router.post("/v1/jobs/{job_id}/cancel", responses=error_responses(404, 409))
async def cancel_job(job_id: str, request: Request) -> dict:
    return _job_object(await _runner(request).cancel(job_id))


@router.post("/v1/jobs/{job_id}/resume", responses=error_responses(404, 409))
async def resume_job(job_id: str, request: Request) -> dict:
    return _job_object(await _runner(request).resume(job_id))


@router.post("/v1/models", responses=error_responses(404, 409))
async def load_model(body: ModelLoad, request: Request):
    runner, state = _runner(request), server_state(request)
    if (body.job is None) == (body.path is None):
        raise APIError(400, "Give either `job` (a succeeded job) or `path` (a model directory), not both", "job")
    if body.job is not None:
        job = runner.get(body.job)
        if job["status"] != "succeeded":
            raise APIError(409, f"Job {body.job} is {job['status']}; only a succeeded job's output is served", "job")
        path, name = runner.output_dir(job), body.name or job["id"]
    else:
        path = (runner.workspace / body.path).resolve()
        if not path.is_relative_to(runner.workspace):  # resolved: symlinks and .. followed
            raise APIError(400, f"path: {body.path!r} is outside the jobs workspace", "path")
        name = body.name or Path(path).name
    await request.app.state.publisher.load(path, name)
    if body.job is not None:
        runner.store.set_model(body.job, name)
    return _model_card(state, name, state.engines[name])


@router.delete("/v1/models/{model_id:path}", responses=error_responses(404, 409))
async def unload_model(model_id: str, request: Request) -> dict:
    """Answers once the model's in-flight requests have ended and its engine has stopped."""
    await request.app.state.publisher.unload(model_id)
    return {"id": model_id, "object": "model", "deleted": True}
