"""The transport of a real server: auth on every working route, the input size limit, an event
loop that large bodies cannot block, and connection limits and deadlines (idle, slow headers,
slow bodies, unread responses, too many connections, the descriptor limit)."""
from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
from contextlib import ExitStack

import httpx
import pytest
from server_utils import metric, remote_server, scrape, sse_data

MODEL = "tiny-llm"
KEY = "sk-transport"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_INPUT_CHARS = 1_000_000
# --max-input-chars's default for a 4,096-token model: ~0.2 s of tokenizing, which the loop used to
# block on; off the loop, what still holds the GIL per body is the HF tokenizer building its result
# lists (~11 ms per 10^5 ids) and /tokenize's JSON (~4 ms by pydantic-core; json.dumps took ~17)
LARGE_BODY_CHARS = 4096 * 32
LATENCY_BOUND_S = 0.1  # the bound on stream gaps and /health while large bodies tokenize


@pytest.fixture(scope="module")
def server(tiny_llm_dir):
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--api-key", KEY, "--max-model-len", "512",
                       "--max-input-chars", str(MAX_INPUT_CHARS)) as s:
        yield s


def raw_connection(server, timeout: float = 5.0) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True once the server closed `sock` (EOF or reset) within `within` seconds; reads and drops
    whatever response came first."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def closed_now(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` already; reads and drops what it sent before."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def http_get(path: str, keep_alive: bool = True) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
            .encode())


# ---------------------------------------------------------------- auth

def test_auth_on_every_working_route(server):
    routes = [("GET", "/v1/models", None), ("POST", "/tokenize", {"prompt": "hi"}),
              ("POST", "/detokenize", {"tokens": [1, 2]}),
              ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})]
    for method, path, body in routes:
        assert httpx.request(method, server.url + path, json=body).status_code == 401, path
        assert httpx.request(method, server.url + path, json=body,
                             headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme is case-insensitive (RFC 7235)
            r = httpx.request(method, server.url + path, json=body, headers={"Authorization": f"{scheme} {KEY}"})
            assert r.status_code == 200, (path, scheme, r.text)
    assert httpx.post(server.url + "/tokenize", json={"prompt": "hi"},
                      headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    assert httpx.get(server.url + "/no/such/route").status_code == 401  # unknown routes reveal nothing
    for path in ("/health", "/metrics", "/version", "/load"):
        assert httpx.get(server.url + path).status_code == 200, path


# ---------------------------------------------------------------- input size and the event loop

@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": "a" * (MAX_INPUT_CHARS + 1)}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a" * MAX_INPUT_CHARS}, {"role": "user", "content": "b"}]},
     "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a" * (MAX_INPUT_CHARS + 1)}]},
     "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a" * MAX_INPUT_CHARS, "b"]}, "prompt"),
    ("/detokenize", {"tokens": [1] * (MAX_INPUT_CHARS + 1)}, "tokens"),
])
def test_input_size_limit(server, path, body, param):
    r = httpx.post(server.url + path, json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and f"at most {MAX_INPUT_CHARS}" in error["message"]


async def _stream_gaps(client: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    """Run greedy streams back to back until `stop`; the largest gap between consecutive chunks of
    each stream (from its first token on: the first token waits for the prefill)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 400,
            "ignore_eos": True, "temperature": 0, "stream": True}
    worst = []
    while not stop.is_set():
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            last, gap = None, 0.0
            async for line in r.aiter_lines():
                now = time.perf_counter()
                if line.startswith("data:"):
                    if last is not None:
                        gap = max(gap, now - last)
                    last = now
        worst.append(gap)
    return worst


async def _health_latencies(client: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        start = time.perf_counter()
        assert (await client.get("/health")).status_code == 200
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(0.02)
    return latencies


async def _measure(server, load) -> tuple[float, float]:
    """Worst stream gap and worst /health latency while `load` (a coroutine function taking the
    client, or None) runs; without load, for as long as two streams."""
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
        stop = asyncio.Event()
        streams = asyncio.create_task(_stream_gaps(client, stop))
        health = asyncio.create_task(_health_latencies(client, stop))
        await asyncio.sleep(0.5)  # the first stream is past its prefill
        if load is None:
            await asyncio.sleep(3.0)
        else:
            await load(client)
        stop.set()
        return max(await streams), max(await health)


def _post_raw(server, path: str, body: bytes) -> tuple[int, bytes]:
    """POST on a fresh connection from a plain thread: the load must not run in (and be counted
    against) the measuring event loop."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                     % (path.encode(), KEY.encode(), len(body), body))
        parts = []
        while chunk := sock.recv(1 << 20):
            parts.append(chunk)
    head, _, payload = b"".join(parts).partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def test_large_bodies_do_not_block_the_event_loop(server):
    n = LARGE_BODY_CHARS
    text = ("The quick brown fox jumps over 12 lazy dogs. " * (n // 45 + 1))[:n]
    bodies = [("/tokenize", {"prompt": text})] * 4 + \
             [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]})] * 4
    raw = [(path, json.dumps(body).encode()) for path, body in bodies]

    async def eight_maximal_bodies(client):
        responses = await asyncio.gather(*(asyncio.to_thread(_post_raw, server, path, body) for path, body in raw))
        for (path, _), (status, payload) in zip(raw, responses):
            if path == "/tokenize":  # tokenized in full
                assert status == 200 and json.loads(payload)["count"] > n // 10
            else:  # tokenized, then too long for the context
                assert status == 400 and b"maximum context length" in payload

    # The bound is the issue's; what the idle machine already shows (scheduling on a busy CI box)
    # is not the server's doing, so it is measured first and allowed on top. A blocked event loop
    # fails every round (eight bodies tokenized on the loop stall it for far longer than the
    # bound); a neighbour's CPU burst on a 2-core box fails one round, so up to three are run.
    failures = []
    for _ in range(3):
        base_gap, base_health = asyncio.run(_measure(server, None))
        gap, health = asyncio.run(_measure(server, eight_maximal_bodies))
        if gap < base_gap + LATENCY_BOUND_S and health < base_health + LATENCY_BOUND_S:
            return
        failures.append(f"stream gap {gap * 1e3:.0f} ms under load ({base_gap * 1e3:.0f} ms idle), "
                        f"/health {health * 1e3:.0f} ms ({base_health * 1e3:.0f} ms idle)")
    pytest.fail("; ".join(failures))


# ---------------------------------------------------------------- connection limits and deadlines

@pytest.fixture(scope="module")
def strict_server(tiny_llm_dir):
    """Small limits and short deadlines: 4 served connections, 2 idle ones, cap 6."""
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, "--max-model-len", "512",
                       "--limit-concurrency", "4", "--max-idle-connections", "2", "--timeout-keep-alive", "30",
                       "--timeout-headers", "2", "--timeout-body", "1", "--timeout-write", "1") as s:
        yield s


def test_idle_and_slow_header_connections_are_closed(strict_server):
    idle, slow = raw_connection(strict_server), raw_connection(strict_server)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
    start = time.monotonic()
    assert closed_by_server(idle, within=6) and closed_by_server(slow, within=6)
    assert time.monotonic() - start < 5  # the 2 s deadline, not some later cleanup
    idle.close(), slow.close()


def test_slow_body_gets_408_and_close(strict_server):
    with raw_connection(strict_server) as sock:
        sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # 11 of 100 bytes, then nothing
        sock.settimeout(5)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == 408


def test_idle_keep_alive_connections_are_capped(strict_server):
    with ExitStack() as stack:
        socks = [stack.enter_context(raw_connection(strict_server)) for _ in range(3)]  # 4 = --limit-concurrency
        for sock in socks:
            sock.sendall(http_get("/health"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)
        # the 2 allowed idle ones stay for their next request (until the 2 s head deadline)
        assert [closed_now(sock) for sock in socks] == [False, False, True]
        socks[0].sendall(http_get("/version"))
        assert socks[0].recv(65536).startswith(b"HTTP/1.1 200")


def test_connection_cap_and_limit_concurrency(strict_server):
    with ExitStack() as stack:
        for _ in range(4):
            stack.enter_context(raw_connection(strict_server))
        time.sleep(0.1)
        # 5 connections open >= --limit-concurrency 4: uvicorn answers this request 503
        with raw_connection(strict_server) as fifth:
            fifth.sendall(http_get("/health"))
            assert fifth.recv(65536).startswith(b"HTTP/1.1 503")
            assert closed_by_server(fifth, within=1)
        time.sleep(0.1)
        extra = [stack.enter_context(raw_connection(strict_server)) for _ in range(4)]
        time.sleep(0.3)
        # 4 + 2 open = the cap of 6: the rest are closed at accept
        assert [closed_now(sock) for sock in extra] == [False, False, True, True]
    time.sleep(0.3)
    assert httpx.get(strict_server.url + "/health").status_code == 200
    assert strict_server.log().count("connection limit reached") == 1  # rate-limited: one line for both


def test_unread_stream_is_cut_and_aborted(strict_server):
    # ~6 MB of events: more than the kernel's socket buffers (up to 4 MB each way) absorb
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "n": 8,
                       "ignore_eos": True, "stream": True, "logprobs": True, "top_logprobs": 20}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(strict_server.url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    # never read: the server's writes block, and 1 s later it cuts the connection and ends the request
    deadline = time.monotonic() + 30
    while httpx.get(strict_server.url + "/load").json()["server_load"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(strict_server.url + "/load").json()["server_load"] == 0
    assert metric(scrape(strict_server.url), "leanserve:num_requests_running", model_name=MODEL) == 0
    assert closed_by_server(sock, within=5)
    sock.close()


# ---------------------------------------------------------------- the descriptor limit

def test_no_log_flood_at_the_descriptor_limit(tiny_llm_dir):
    fds = 2048 + 256 + 64  # the accept burst and the reserve (server/connections.py) plus 64 connections

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this process holds the 1,000 client sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    with remote_server(tiny_llm_dir, "--served-model-name", MODEL, preexec_fn=low_fd_limit) as server:
        assert "leaves room for 64 connections" in server.log()
        port = int(server.url.rsplit(":", 1)[1])
        socks = []

        def flood():  # 1,000 connections, as fast as they open
            while len(socks) < 1000:
                try:
                    socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    time.sleep(0.01)

        flood()
        start = time.monotonic()
        try:  # at the cap this connection too is closed at accept: refused at once, not left hanging
            assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        except httpx.TransportError:
            pass
        assert time.monotonic() - start < 5
        for sock in socks:
            sock.close()
        time.sleep(0.5)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        log = server.log()
        assert "Traceback" not in log and log.count("\n") < 20, log[-3000:]
        assert log.count("connection limit reached") == 1


def test_rate_limited_log(caplog):
    from leanserve.server.connections import RateLimitedLog

    log = RateLimitedLog("too many", interval=3600)
    with caplog.at_level("WARNING", logger="leanserve.server.connections"):
        for i in range(1000):
            log(f"event {i}")
    assert [r.getMessage() for r in caplog.records] == ["too many: event 0"]
