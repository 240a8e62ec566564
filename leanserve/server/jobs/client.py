"""`leanserve jobs submit|list|show|logs|cancel|resume`: a small client of a running server's jobs API.

    leanserve jobs submit --publish --follow train lm --data inputs/data --tokenizer inputs/tok
    leanserve jobs list
    leanserve jobs logs job-0123abcd

The server is --url (default $LEANSERVE_URL or http://127.0.0.1:8000), the key --api-key (default
$LEANSERVE_API_KEY). `--follow` draws a progress bar from the job's events until it ends; the exit
status is then 0 only if the job succeeded.
"""
from __future__ import annotations

import argparse
import json
import os

import httpx

from leanserve.errors import UserError


def add_arguments(p: argparse.ArgumentParser):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LEANSERVE_URL", "http://127.0.0.1:8000"),
                        help="the server (default: $LEANSERVE_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key", default=os.environ.get("LEANSERVE_API_KEY"),
                        help="its API key (default: $LEANSERVE_API_KEY)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = actions.add_parser("submit", parents=[common], help="submit a job: [options] COMMAND WORDS ARGS...")
    submit.add_argument("--publish", action="store_true", help="serve the output once the job succeeds")
    submit.add_argument("--follow", action="store_true", help="follow the job to its end with a progress bar")
    submit.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND ARGS",
                        help="e.g. train lm --data inputs/data --tokenizer inputs/tok (paths relative to the "
                             "server's --jobs-dir; --out is the server's)")
    listing = actions.add_parser("list", parents=[common], help="the latest jobs, newest first")
    listing.add_argument("--limit", type=int, default=20)
    for name, help_ in (("show", "one job as JSON"), ("logs", "a job's output"), ("cancel", "cancel a job"),
                        ("resume", "resume an interrupted, failed or cancelled job from its last checkpoint")):
        action = actions.add_parser(name, parents=[common], help=help_)
        action.add_argument("job_id", metavar="JOB")
        if name in ("show", "resume"):
            action.add_argument("--follow", action="store_true", help="follow the job to its end")


def run(args) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url.rstrip("/") + "/v1", headers=headers, timeout=60) as client:
        try:
            return _ACTIONS[args.action](client, args)
        except httpx.TransportError as e:
            raise UserError(f"cannot reach {args.url}: {e}") from None


def _call(client: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    response = client.request(method, path, **kwargs)
    if response.is_error:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise UserError(f"{response.status_code}: {message}")
    return response


def _submit(client, args) -> int:
    words = list(args.words)
    split = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
    if not split:
        raise UserError("name the command to run, e.g. `leanserve jobs submit train lm --data ...`")
    body = {"command": " ".join(words[:split]), "args": words[split:], "publish": args.publish}
    job = _call(client, "POST", "/jobs", json=body).json()
    print(f"{job['id']} {job['status']}")
    return _follow(client, job["id"]) if args.follow else 0


def _list(client, args) -> int:
    for job in _call(client, "GET", "/jobs", params={"limit": args.limit}).json()["data"]:
        progress = job["progress"] or {}
        step = f"{progress['step']}/{progress['total']}" if progress else "-"
        print(f"{job['id']}  {job['status']:<11} {step:>11}  {job['command']:<16} {job['model'] or ''}")
    return 0


def _show(client, args) -> int:
    if args.follow:
        return _follow(client, args.job_id)
    print(json.dumps(_call(client, "GET", f"/jobs/{args.job_id}").json(), indent=2))
    return 0


def _logs(client, args) -> int:
    print(_call(client, "GET", f"/jobs/{args.job_id}/logs").text, end="")
    return 0


def _cancel(client, args) -> int:
    job = _call(client, "POST", f"/jobs/{args.job_id}/cancel", json={}).json()
    print(f"{job['id']} {job['status']}")
    return 0


def _resume(client, args) -> int:
    job = _call(client, "POST", f"/jobs/{args.job_id}/resume", json={}).json()
    print(f"{job['id']} {job['status']}")
    return _follow(client, job["id"]) if args.follow else 0


def _follow(client: httpx.Client, job_id: str) -> int:
    """Events as they come: a progress bar from `metrics` events, a line for every other one."""
    from tqdm import tqdm

    bar = None
    with client.stream("GET", f"/jobs/{job_id}/events", params={"stream": "true"}, timeout=None) as response:
        if response.is_error:
            response.read()
            _call(client, "GET", f"/jobs/{job_id}")  # raises the API's error
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data:"))
            if event["type"] == "metrics":
                progress = event["data"]
                if bar is None:
                    bar = tqdm(total=progress["total"], unit=progress.get("unit", "step"), desc=job_id,
                               dynamic_ncols=True)
                bar.n = progress["step"]
                bar.set_postfix(progress.get("metrics") or {}, refresh=True)
            else:
                tqdm.write(f"[{event['level']}] {event['message']}")
    if bar is not None:
        bar.close()
    job = _call(client, "GET", f"/jobs/{job_id}").json()
    if job["model"]:
        print(f"model: {job['model']}")
    return 0 if job["status"] == "succeeded" else 1


_ACTIONS = {"submit": _submit, "list": _list, "show": _show, "logs": _logs, "cancel": _cancel, "resume": _resume}
