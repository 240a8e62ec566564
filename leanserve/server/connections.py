"""Connection limits and deadlines uvicorn lacks, as an h11 protocol class for uvicorn's `http=`.

uvicorn bounds the requests it serves (`limit_concurrency` answers 503 beyond it) and the time a
connection may idle *after* a response (`timeout_keep_alive`), but it accepts connections without
bound and waits forever for a request's head and for a client to read. A client could hold
thousands of connections (idle, slowloris headers, never reading) until the process ran out of
file descriptors. Here:

- a connection that has not sent a complete request head `timeout_headers` seconds after it opened
  (or after its previous response) is closed;
- a response write that stays blocked `timeout_write` seconds (the client stopped reading) aborts
  the connection, which ends the request (a stream's engine request is aborted);
- at most `max_idle` keep-alive connections stay open between requests; beyond that a connection
  is closed once its response is complete;
- beyond `max_connections` open connections a new one is closed at once, so the process never
  reaches its descriptor limit (see `fd_budget`).

The request *body* deadline lives in the app's body-reading middleware (server/app.py), which
answers 408. Everything runs on the event loop: no locks.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass, field

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message for EMFILE/ENFILE on accept
FD_RESERVE = 256  # descriptors for everything but client sockets: model files, logs, pipes, torch
FD_TARGET = 65536  # raise the soft limit towards this (vLLM raises to 65535)


class RateLimitedLog:
    """One warning per `interval` seconds, counting the events it left out: a storm (thousands of
    refused connections or failed accepts per second) must not flood the log."""

    def __init__(self, message: str, interval: float = 10.0):
        self.message = message
        self.interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, detail: str = "") -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} more in the last {now - self._last:.0f} s)" if self._suppressed else ""
        logger.warning("%s%s%s", self.message, f": {detail}" if detail else "", suffix)
        self._last, self._suppressed = now, 0


@dataclass
class ConnectionLimits:
    max_connections: int
    max_idle: int
    timeout_headers: float
    timeout_write: float
    idle: set = field(default_factory=set)  # keep-alive connections waiting for their next request
    refused: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(
        "connection limit reached: closing new connections (raise --limit-concurrency or --max-idle-connections)"))

    def protocol_class(self) -> type[H11Protocol]:
        """An H11Protocol subclass bound to these limits, for uvicorn.Config(http=...)."""
        return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": self})


class LimitedH11Protocol(H11Protocol):
    limits: ConnectionLimits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            self.limits.refused()
            transport.close()
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.limits.idle.discard(self)
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.limits.idle.discard(self)
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # closing, or a pipelined request is already being served
        if len(self.limits.idle) >= self.limits.max_idle:
            self.transport.close()
            return
        self.limits.idle.add(self)
        self._await_head()

    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.limits.timeout_headers, self._head_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        # IDLE: h11 has not parsed a request head since the timer was armed (none, or a partial one)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.timeout_write, self._write_deadline)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_deadline(self) -> None:
        self._write_timer = None
        logger.info("closing a connection whose client has not read for %.0f s", self.limits.timeout_write)
        self.transport.abort()  # close() would wait for the unread buffer to drain


def install_accept_error_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Demote asyncio's accept-failure report to a rate-limited warning. At the descriptor limit
    CPython logs a traceback for every retried accept, hundreds of thousands per minute."""
    accept_failed = RateLimitedLog("accept() failed: out of file descriptors or memory")

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") == ACCEPT_ERROR:
            accept_failed(str(context.get("exception", "")))
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def fd_budget(backlog: int) -> int:
    """Raise this process's soft descriptor limit towards FD_TARGET and return how many client
    connections fit under it: asyncio may hold up to `backlog` freshly accepted sockets before
    the protocol sees (and closes) them, and the process needs FD_RESERVE for itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_TARGET if hard == resource.RLIM_INFINITY else min(hard, FD_TARGET)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft - backlog - FD_RESERVE
