"""Run a REAL `leanserve serve` subprocess for the server tests (like vLLM's RemoteOpenAIServer)."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 120
EXIT_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sse_data(lines) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comments and blank lines skipped)."""
    return [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """GET /metrics -> {(sample name, frozenset of label items): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until_metrics(url: str, what: str, check, timeout: float = 20) -> None:
    """Poll /metrics until check(samples): off the event loop, so the caller's in-flight requests keep
    going. Tests that must act while the server is in a given state wait for it here, not for a fixed time."""
    deadline = time.monotonic() + timeout
    while not check(await asyncio.to_thread(scrape, url)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def child_pids(parent_pid: int, cmdline_part: bytes) -> list[int]:
    """The child processes of `parent_pid` whose command line contains `cmdline_part`."""
    children = " ".join(p.read_text() for p in Path(f"/proc/{parent_pid}/task").glob("*/children")).split()
    return [int(pid) for pid in children if cmdline_part in Path(f"/proc/{pid}/cmdline").read_bytes()]


def child_pid(parent_pid: int, cmdline_part: bytes) -> int:
    """The one child process of `parent_pid` whose command line contains `cmdline_part`."""
    found = child_pids(parent_pid, cmdline_part)
    assert len(found) == 1, found
    return found[0]


def engine_pids(server_pid: int) -> list[int]:
    """The server's engine processes: the LLM core and one per image model (multiprocessing's spawned
    children; not its resource tracker)."""
    return child_pids(server_pid, b"spawn_main")


def engine_core_pid(server_pid: int) -> int:
    """The engine core process of a server that serves one LLM and no image model."""
    return child_pid(server_pid, b"spawn_main")


@dataclass
class RemoteServer:
    proc: subprocess.Popen
    url: str        # http://127.0.0.1:PORT
    log_path: Path  # the server's stdout + stderr

    @property
    def api_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        """SIGTERM, then wait for the process to exit; fails (after killing it) if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit {timeout} s after SIGTERM:\n{self.log()[-3000:]}") from None


@contextmanager
def remote_server(model_dir, *args: str, env: dict[str, str] | None = None, launcher: str | None = None,
                  preexec_fn=None, exit_code: int = 0,
                  startup_timeout: float = STARTUP_TIMEOUT_S) -> Iterator[RemoteServer]:
    """Start `leanserve serve --model DIR --port <free> ARGS`, wait for /health, yield it, stop it
    and check its exit status (-9 for a test that kills it). Without --jobs-dir in ARGS the jobs
    workspace is a fresh temporary directory (one server per workspace). `launcher`: Python source
    run instead of `-m leanserve.cli` (it gets the arguments in sys.argv[1:]), for tests that patch
    the server before it starts."""
    port = free_port()
    jobs_dir = None
    if "--jobs-dir" not in args:
        jobs_dir = tempfile.mkdtemp(prefix="leanserve-jobs-")
        args = (*args, "--jobs-dir", jobs_dir)
    entry = ["-c", launcher] if launcher else ["-m", "leanserve.cli"]
    cmd = [sys.executable, *entry, "serve", "--model", str(model_dir), "--port", str(port),
           "--log-level", "warning", *args]
    # one intra-op thread: the tiny model gains nothing from more and the test machine is small
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    log_file = tempfile.NamedTemporaryFile(prefix="leanserve-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, preexec_fn=preexec_fn)
    server = RemoteServer(proc, f"http://127.0.0.1:{port}", Path(log_file.name))
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} during startup:\n{server.log()[-3000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {startup_timeout} s:\n{server.log()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        code = server.terminate()
        log_file.close()
        os.unlink(log_file.name)
        if jobs_dir is not None:
            shutil.rmtree(jobs_dir, ignore_errors=True)
    assert code == exit_code, f"server exited with {code}"
