"""The FastAPI application: `create_app(settings, engines)`.

`engines` maps a served model name to its engine; each engine has a `kind` ("llm" or
"image") and the route modules pick the engines of their kind. The lifespan starts
and stops the engines; `ServerState.shutdown()` drains them (SIGTERM, see serve.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leanserve import __version__
from leanserve.server.errors import APIError, error_response, install_exception_handlers
from leanserve.server.jobs.workspace import open_jobs
from leanserve.server.metrics import ServerMetrics
from leanserve.server.openapi import install_openapi
from leanserve.server.publisher import ModelPublisher
from leanserve.server.routes import images, jobs, openai, ops
from leanserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

KIND_NAMES = {"llm": "an LLM (chat/completions)", "image": "an image"}
# never gated by auth or draining: probes and scrapers carry no key, and none of these does work
# for the caller (vLLM leaves /load open too); every other route needs the key when one is set
OPS_PATHS = frozenset({"/health", "/metrics", "/version", "/load"})
MAX_REQUEST_ID_CHARS = 256
CLOSE = {"Connection": "close"}  # the body was left unread: this connection cannot carry another request
FLUSH_TIMEOUT_S = 2.0  # after the engines finished every request, time for the last SSE events to go out


@dataclass
class ServerState:
    settings: ServerSettings
    engines: Mapping[str, object]
    kinds: dict[str, str]   # model name -> "llm" | "image"
    metrics: ServerMetrics
    api_key_digests: list[bytes] = field(default_factory=list)
    ready: bool = False     # engines started
    draining: bool = False  # shutdown begun: health 503, new requests 503
    num_in_flight: int = 0  # API requests being answered (the /load value)
    created: int = field(default_factory=lambda: int(time.time()))
    _shutdown: asyncio.Task | None = None

    def engine(self, name: str, kind: str):
        engine = self.engines.get(name)
        if engine is None:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        if self.kinds[name] != kind:
            raise APIError(400, f"The model `{name}` is {KIND_NAMES[self.kinds[name]]} model; this endpoint "
                                f"needs {KIND_NAMES[kind]} model.", "model")
        return engine

    def default_engine(self, kind: str):
        for name, engine in self.engines.items():
            if self.kinds[name] == kind:
                return engine
        raise APIError(404, f"No {kind} model is served.", "model")

    def healthy(self) -> bool:
        return self.ready and not self.draining and all(e.stats().healthy for e in self.engines.values())

    def api_key_ok(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 7235 2.1)
            return False
        # constant-time over fixed-length digests: neither the key nor its length leaks by timing
        digest = hashlib.sha256(token.strip(" ").encode("latin-1")).digest()
        return any(secrets.compare_digest(digest, d) for d in self.api_key_digests)

    async def shutdown(self) -> None:
        """Drain: refuse new requests, let the engines finish in-flight ones for up to
        settings.shutdown_timeout then abort the rest, and give the streams time to send
        their final events. Idempotent (SIGTERM and the lifespan exit both call it)."""
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._shutdown)

    async def _drain(self) -> None:
        self.draining = True
        logger.info("draining %d in-flight requests (timeout %.1f s)", self.num_in_flight,
                    self.settings.shutdown_timeout)
        await asyncio.gather(*(e.shutdown(self.settings.shutdown_timeout) for e in self.engines.values()))
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


class FrontDoorMiddleware:
    """Per-request checks before any route runs: arrival stamp, API key, draining, body size and
    the X-Request-Id header (echoed); counts in-flight API requests. An exception that escapes the
    app before its response started is answered here, 500 in the error envelope, and the
    connection stays usable (Starlette's own 500 handler re-raises, which makes the server drop it).

    A plain ASGI middleware (not BaseHTTPMiddleware) so streaming responses and client
    disconnects pass through untouched.
    """

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = scope.setdefault("state", {})["arrival_time"] = time.monotonic()  # TTFT and e2e start here
        path, method = scope["path"], scope["method"]
        status = None  # set when the response starts

        async def send_seeing_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path in OPS_PATHS:
                await self.app(scope, receive, send_seeing_status)
            else:
                await self._serve(scope, receive, send_seeing_status)
        except Exception as e:
            logger.exception("internal error on %s %s", method, path)
            if status is not None:
                raise  # the response is under way: nothing valid can follow, the connection must close
            await error_response(500, f"Internal server error: {type(e).__name__}")(
                scope, receive, send_seeing_status)
        finally:
            if path not in OPS_PATHS:
                # label by the route template the router matched (it leaves it in the scope); unknown
                # paths share one label, so a scanner cannot grow the label set without bound
                route = scope.get("route")
                handler = getattr(route, "path", "other")
                metrics = self.state.metrics
                metrics.http_requests.labels(handler, method, str(status or 500)).inc()
                metrics.http_duration.labels(handler, method).observe(time.monotonic() - arrival)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        state, method = self.state, scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        if state.api_key_digests and method != "OPTIONS" and not state.api_key_ok(headers.get("authorization")):
            await error_response(401, "Invalid or missing API key (send Authorization: Bearer <key>)")(
                scope, receive, send)
            return
        if state.draining or not state.ready:
            message = "Server is shutting down" if state.draining else "Server is not ready"
            await error_response(503, message)(scope, receive, send)
            return
        request_id = headers.get("x-request-id")
        if request_id and not _printable_ascii(request_id):
            # it becomes part of response ids: text every client and log can carry
            await error_response(400, f"X-Request-Id must be printable ASCII text of at most "
                                      f"{MAX_REQUEST_ID_CHARS} characters",
                                 "X-Request-Id")(scope, receive, send)
            return
        if method == "POST":
            receive = await self._read_body(scope, receive, send, headers)
            if receive is None:
                return

        if request_id:
            send = _add_header(send, b"x-request-id", request_id.encode("ascii"))
        state.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.num_in_flight -= 1

    async def _read_body(self, scope: Scope, receive: Receive, send: Send,
                         headers: dict[str, str]) -> Receive | None:
        """Read the whole (JSON) body under the size limit and deadline, then replay it to the app.

        Reading up front turns both a large Content-Length and an endless chunked body
        into a 413 before any parsing, and a body that trickles in (slowloris) into a 408
        (uvicorn has no body timeout); later receive() calls reach the client, so
        disconnects are still seen."""
        settings = self.state.settings
        limit = settings.max_body_bytes
        too_large = error_response(413, f"Request body is larger than {limit} bytes", headers=CLOSE)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await too_large(scope, receive, send)
            return None
        body = bytearray()
        try:
            async with asyncio.timeout(settings.timeout_body):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    if len(body) > limit:
                        await too_large(scope, receive, send)
                        return None
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await error_response(408, f"Request body not received within {settings.timeout_body:g} s",
                                 headers=CLOSE)(scope, receive, send)
            return None
        pending: Message | None = {"type": "http.request", "body": bytes(body), "more_body": False}

        async def replay() -> Message:
            nonlocal pending
            if pending is not None:
                message, pending = pending, None
                return message
            return await receive()

        return replay


def _printable_ascii(value: str) -> bool:
    return len(value) <= MAX_REQUEST_ID_CHARS and all(" " <= c <= "~" for c in value)


def _add_header(send: Send, name: bytes, value: bytes) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (name, value)]
        await send(message)
    return wrapped


def create_app(settings: ServerSettings, engines: Mapping[str, object],
               make_engine: Callable[[str, str], object] | None = None) -> FastAPI:
    """`make_engine(model directory, served name)`: an unstarted engine, for models published while
    serving (POST /v1/models); `settings.jobs_dir` turns on the jobs API over that workspace."""
    kinds = {name: e.kind for name, e in engines.items()}
    state = ServerState(settings=settings, engines=engines, kinds=kinds, metrics=ServerMetrics(engines),
                        api_key_digests=[hashlib.sha256(k.encode()).digest() for k in settings.api_keys])
    for name, image_metrics in state.metrics.image_models.items():
        engines[name].batch_observer = image_metrics.observe_batch  # stage timings of each pipeline call
    publisher = ModelPublisher(state, make_engine)
    job_runner = open_jobs(settings, state, publisher) if settings.jobs_dir else None

    async def log_stats_loop() -> None:
        while True:
            await asyncio.sleep(settings.log_stats_interval)
            state.metrics.log_stats()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for engine in engines.values():
            await engine.start()
        if job_runner is not None:
            await job_runner.start()
        state.ready = True
        logger.info("serving %s", ", ".join(f"{name} ({kind})" for name, kind in kinds.items()))
        log_task = asyncio.create_task(log_stats_loop()) if settings.log_stats_interval > 0 else None
        try:
            yield
        finally:
            if log_task is not None:
                log_task.cancel()
                with suppress(asyncio.CancelledError):
                    await log_task
            if job_runner is not None:
                await job_runner.shutdown()  # running jobs become `interrupted`, resumable
            await state.shutdown()

    app = FastAPI(title="leanserve", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.state.publisher, app.state.jobs = publisher, job_runner
    install_exception_handlers(app)
    install_openapi(app, OPS_PATHS, api_keys=bool(settings.api_keys),
                    vocab_sizes=[e.vocab_size for name, e in engines.items() if kinds[name] == "llm"])
    app.include_router(openai.router)
    app.include_router(images.router)
    app.include_router(ops.router)
    app.include_router(jobs.router)
    app.add_middleware(FrontDoorMiddleware, state=state)
    return app
