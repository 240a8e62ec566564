"""CPU: a real `leanserve serve` under load and misbehaving clients, checked for leaks.

    python benchmarks/load_server.py [--model zoo/chat-tiny] [--streams 1000] [--smoke]

Starts the server, then: round 1 of N concurrent streams; a slow reader, a client that never
reads, slowloris headers, slowloris bodies and idle connections (all at once, /health probed
meanwhile); round 2 of N streams. Reports errors and 429s per round, the server's RSS after each
round (round 2 may not grow it by more than RSS_BOUND_MB: no per-request leak), that the
/metrics gauges are back to 0 (every KV block freed), the size of the server's log, and a clean
SIGTERM exit. Deadlines are shortened (--timeout-* flags below) so the script ends in minutes.
Writes benchmarks/results/load_server-cpu.json (--smoke: only prints).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import write_result
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
RSS_BOUND_MB = 64  # round 2 may grow the RSS by at most this much over round 1
DEADLINE_S = 3.0   # --timeout-headers/-body/-write of the server under test
GAUGES = ("leanserve:num_requests_running", "leanserve:num_requests_waiting", "leanserve:kv_cache_usage_perc")


def start_server(model: str, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "leanserve.cli", "serve", "--model", model, "--port", str(port),
           "--log-level", "warning", "--max-queued-requests", "4096", "--timeout-headers", str(DEADLINE_S),
           "--timeout-body", str(DEADLINE_S), "--timeout-write", str(DEADLINE_S)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during startup")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server not healthy after 120 s")


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = dict.fromkeys(GAUGES, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in values:
                values[s.name] += s.value
    return values


# ---------------------------------------------------------------- well-behaved streams

async def one_stream(client: httpx.AsyncClient, model: str, max_tokens: int) -> str:
    """"ok" (events, a finish_reason, [DONE]), "429", or what went wrong."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about shapes."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return str(r.status_code)
            data = [line[5:].strip() async for line in r.aiter_lines() if line.startswith("data:")]
    except httpx.HTTPError as e:
        return type(e).__name__
    if data[-1:] != ["[DONE]"]:
        return "no [DONE]"
    errors = [json.loads(d)["error"]["message"] for d in data[:-1] if d.startswith('{"error"')]
    if errors:
        return f"error event: {errors[0]}"
    return "ok" if any('"finish_reason":"length"' in d for d in data) else "no finish_reason"


async def stream_round(url: str, model: str, n: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client, HealthProbe(url) as health:
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one_stream(client, model, max_tokens) for _ in range(n)))
        seconds = time.perf_counter() - start
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    return {"streams": n, "max_tokens": max_tokens, "outcomes": counts, "errors": n - counts.get("ok", 0)
            - counts.get("429", 0), "rate_limited_429": counts.get("429", 0), "seconds": round(seconds, 2),
            "output_tok_s": round(counts.get("ok", 0) * max_tokens / seconds, 1), **health.summary()}


_PROBE = """
import json, sys, threading, time
import httpx
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies, failures = [], 0
with httpx.Client(timeout=30) as client:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            failures += client.get(sys.argv[1] + "/health").status_code != 200
        except httpx.HTTPError:
            failures += 1
        latencies.append(time.perf_counter() - start)
        stop.wait(0.1)
print(json.dumps({"health_probes": len(latencies), "health_failures": failures,
                  "health_worst_ms": round(max(latencies, default=0.0) * 1e3, 1)}))
"""


class HealthProbe:
    """GET /health every 100 ms while the block runs, from a process of its own (this one's event
    loop is busy with the load): the worst latency shows whether the server's loop was blocked."""

    def __init__(self, url: str):
        self.url = url

    async def __aenter__(self):
        self._proc = subprocess.Popen([sys.executable, "-c", _PROBE, self.url], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        return self

    async def __aexit__(self, *exc):
        out, _ = await asyncio.to_thread(self._proc.communicate, "")
        self._summary = json.loads(out)

    def summary(self) -> dict:
        return self._summary


# ---------------------------------------------------------------- misbehaving clients

async def _closed_after(reader: asyncio.StreamReader, start: float, give_up: float) -> float | None:
    """Seconds from `start` until the server closed the connection (EOF or reset), None if it did not."""
    try:
        while await asyncio.wait_for(reader.read(65536), give_up - (time.perf_counter() - start)):
            pass
    except (TimeoutError, asyncio.TimeoutError):
        return None
    except ConnectionError:
        pass
    return time.perf_counter() - start


async def idle_connection(host: str, port: int, give_up: float) -> float | None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await _closed_after(reader, time.perf_counter(), give_up)
    finally:
        writer.close()


async def slow_headers(host: str, port: int, give_up: float) -> float | None:
    """A request head sent one header line a second, never finished."""
    reader, writer = await asyncio.open_connection(host, port)
    start = time.perf_counter()
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    closed = asyncio.create_task(_closed_after(reader, start, give_up))
    try:
        while not closed.done():
            writer.write(b"X-Slow: 1\r\n")
            await asyncio.wait([closed], timeout=1.0)
    except ConnectionError:
        pass
    finally:
        writer.close()
    return await closed


async def slow_body(host: str, port: int, give_up: float) -> tuple[int | None, float | None]:
    """A JSON body of 10,000 bytes sent one byte a second: (the status answered, seconds to close)."""
    reader, writer = await asyncio.open_connection(host, port)
    start = time.perf_counter()
    writer.write(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 10000\r\n\r\n{")
    head = asyncio.create_task(reader.readline())
    try:
        while not head.done() and time.perf_counter() - start < give_up:
            writer.write(b" ")
            await asyncio.wait([head], timeout=1.0)
    except ConnectionError:
        pass
    if not head.done():
        head.cancel()
        writer.close()
        return None, None
    line = head.result()
    status = int(line.split()[1]) if line.startswith(b"HTTP/1.1") else None
    closed = await _closed_after(reader, start, give_up)
    writer.close()
    return status, closed


def _raw_chat(model: str, body: dict) -> bytes:
    payload = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                          "ignore_eos": True, **body}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))


async def slow_reader(host: str, port: int, model: str, give_up: float) -> dict:
    """Reads 2 KB every 50 ms (~40 KB/s) of a ~300 KB stream: slow but reading, so never cut."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2048)
    writer.write(_raw_chat(model, {"max_tokens": 256, "logprobs": True, "top_logprobs": 5}))
    start, received = time.perf_counter(), bytearray()
    while time.perf_counter() - start < give_up:
        chunk = await reader.read(2048)
        if not chunk:
            break
        received += chunk
        if b"data: [DONE]" in received:
            break
        await asyncio.sleep(0.05)
    writer.close()
    return {"bytes": len(received), "seconds": round(time.perf_counter() - start, 2),
            "completed": b"data: [DONE]" in received, "cut_by_server": b"data: [DONE]" not in received}


async def never_reader(host: str, port: int, model: str, give_up: float) -> float | None:
    """Asks for ~6 MB of events (n=8 with logprobs) and reads nothing: seconds until the server cut it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    await loop.sock_sendall(sock, _raw_chat(model, {"max_tokens": 480, "n": 8, "logprobs": True,
                                                    "top_logprobs": 20}))
    start = time.perf_counter()
    url = f"http://{host}:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await asyncio.sleep(1.0)
        while time.perf_counter() - start < give_up:  # /load counts the request until it ends
            if (await client.get("/load")).json()["server_load"] == 0:
                sock.close()
                return time.perf_counter() - start
            await asyncio.sleep(0.2)
    sock.close()
    return None


async def misbehaving_clients(url: str, model: str, n: int) -> dict:
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    give_up = 10 * DEADLINE_S + 30
    async with HealthProbe(url) as health:
        results = await asyncio.gather(
            asyncio.gather(*(idle_connection(host, port, give_up) for _ in range(n))),
            asyncio.gather(*(slow_headers(host, port, give_up) for _ in range(n))),
            asyncio.gather(*(slow_body(host, port, give_up) for _ in range(n))),
            slow_reader(host, port, model, give_up), never_reader(host, port, model, give_up))
    idle, headers, bodies, reader, never = results

    def closed(times) -> dict:
        done = [t for t in times if t is not None]
        return {"connections": len(times), "closed_by_server": len(done),
                "close_s_max": round(max(done), 2) if done else None}

    statuses = [s for s, _ in bodies]
    return {"deadline_s": DEADLINE_S, "idle": closed(idle), "slow_headers": closed(headers),
            "slow_bodies": {**closed([t for _, t in bodies]), "status_408": statuses.count(408)},
            "slow_reader": reader, "never_reader_cut_after_s": None if never is None else round(never, 2),
            **health.summary()}


# ---------------------------------------------------------------- main

async def settle(url: str, timeout: float = 60) -> dict[str, float]:
    """The gauges once they are all 0 (or as they are after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        values = gauges(url)
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.5)


async def run(url: str, pid: int, model: str, streams: int, slow: int, max_tokens: int) -> dict:
    rss = {"start_mb": round(rss_mb(pid), 1)}
    round1 = await stream_round(url, model, streams, max_tokens)
    round1["gauges_after"] = await settle(url)
    rss["after_round_1_mb"] = round(rss_mb(pid), 1)
    clients = await misbehaving_clients(url, model, slow)
    clients["gauges_after"] = await settle(url)
    round2 = await stream_round(url, model, streams, max_tokens)
    round2["gauges_after"] = await settle(url)
    rss["after_round_2_mb"] = round(rss_mb(pid), 1)
    rss["growth_round_2_mb"] = round(rss["after_round_2_mb"] - rss["after_round_1_mb"], 1)
    rss["bound_mb"] = RSS_BOUND_MB
    rss["within_bound"] = rss["growth_round_2_mb"] <= RSS_BOUND_MB
    load = httpx.get(url + "/load", timeout=10).json()["server_load"]
    return {"round_1": round1, "misbehaving_clients": clients, "round_2": round2, "rss": rss,
            "server_load_after": load}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "zoo" / "chat-tiny"))
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--slow", type=int, default=200, help="connections of each slow kind (idle, headers, body)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="50 streams, 10 slow connections of each kind; no JSON")
    args = ap.parse_args()
    if args.smoke:
        args.streams, args.slow = 50, 10
    # this process holds every client socket: 2 rounds' worth stay open while they finish
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.streams + 1024)), hard))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    model_name = Path(args.model).name
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = start_server(args.model, port, log)
        try:
            results = asyncio.run(run(url, proc.pid, model_name, args.streams, args.slow, args.max_tokens))
        finally:
            start = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "hung, killed"
        log_text = Path(log.name).read_text(errors="replace")
    results["sigterm"] = {"exit_code": code, "seconds": round(time.perf_counter() - start, 2)}
    results["server_log"] = {"bytes": len(log_text), "lines": log_text.count("\n"),
                             "tracebacks": log_text.count("Traceback")}
    results["config"] = {"model": model_name, "device": "cpu", "omp_num_threads": 1,
                         "server_flags": ["--max-queued-requests", "4096", "--timeout-headers/-body/-write",
                                          str(DEADLINE_S)]}
    print(json.dumps(results, indent=2))
    if not args.smoke:
        print("->", write_result("load_server", results, filename="load_server-cpu.json"))


if __name__ == "__main__":
    main()
