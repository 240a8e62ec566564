"""A job's arguments: from the request to the command's argument list, checked before anything runs.

The command's own parser decides what is valid. The server may not import the commands (they live in
trainers/), so it asks `leanserve --check-jobs`, one long-lived subprocess that imports each command
once and answers each check in milliseconds. Its answer names the options that read files or
directories; each must resolve (symlinks and `..` followed) inside the workspace or a served model
directory. Relative paths are relative to the workspace, where jobs run. `--out` is the server's.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from leanserve.server.errors import APIError
from leanserve.server.jobs.process import die_with_server

CHECK_TIMEOUT_S = 120.0  # the first check of a command imports it (torch, diffusers, ...)
_OPTION = re.compile(r"[a-z0-9][a-z0-9_-]*")
SERVER_OPTIONS = ("out", "resume")  # --out is the job's directory; resume is POST /v1/jobs/{id}/resume


def to_argv(args: dict | list) -> list[str]:
    """{"pretrain_steps": 40, "bf16": "off", "compile": true} -> ["--pretrain-steps=40", "--bf16=off",
    "--compile"]; a list passes as it is (the CLI client sends the words it was given). The `=` form
    keeps a value that starts with "-" a value."""
    if isinstance(args, list):
        for token in args:
            name = str(token).split("=", 1)[0]  # argparse also takes unambiguous prefixes: --ou, --res
            if len(name) > 2 and any(f"--{o}".startswith(name) for o in SERVER_OPTIONS):
                raise APIError(400, f"args: {token} is set by the server", "args")
        return [str(a) for a in args]
    argv = []
    for key, value in args.items():
        if not _OPTION.fullmatch(key):
            raise APIError(400, f"args: {key!r} is not an option name", "args")
        if key.replace("-", "_") in SERVER_OPTIONS:
            raise APIError(400, f"args.{key} is set by the server", f"args.{key}")
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, dict) or isinstance(v, list):
                raise APIError(400, f"args.{key}: a value is a string, number or boolean", f"args.{key}")
            if v is True:
                argv.append(flag)
            elif v is not False and v is not None:
                argv.append(f"{flag}={v}")
    return argv


class ArgsChecker:
    def __init__(self, workspace: Path, readable_roots: Callable[[], list[Path]]):
        self.workspace = workspace.resolve()
        self.readable_roots = readable_roots  # the served model directories, now
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def check(self, command: str, argv: list[str]) -> str:
        """Raises a 400 APIError with the parser's message, or for a path outside the allowed roots;
        returns the device the job runs on ("cpu" | "cuda")."""
        # --out is required by the parsers; the job's own comes when it starts
        answer = await self._ask({"command": command, "argv": [*argv, "--out", "OUT"]})
        if "error" in answer:
            raise APIError(400, answer["error"], "args")
        roots = [self.workspace, *(Path(p).resolve() for p in self.readable_roots())]
        for dest, value in answer["paths"].items():
            for v in value if isinstance(value, list) else [value]:
                resolved = (self.workspace / v).resolve()
                if not any(resolved.is_relative_to(root) for root in roots):
                    raise APIError(400, f"args.{dest}: {v!r} is outside the jobs workspace and the served "
                                        "model directories", f"args.{dest}")
        return answer["device"]

    async def _ask(self, request: dict) -> dict:
        async with self._lock:
            if self._proc is None or self._proc.returncode is not None:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "leanserve.cli", "--check-jobs", cwd=self.workspace,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=die_with_server)
            self._proc.stdin.write((json.dumps(request) + "\n").encode())
            try:
                await self._proc.stdin.drain()
                line = await asyncio.wait_for(self._proc.stdout.readline(), CHECK_TIMEOUT_S)
            except (TimeoutError, ConnectionError):
                line = b""
            if not line:
                await self.close()
                raise APIError(503, "The job-argument checker did not answer; try again")
            return json.loads(line)

    async def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None
