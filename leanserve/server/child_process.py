"""A server engine in its own process, and the API process's pipe to it: the LLM engine core
(engine/core_client.py) and each image engine (image_client.py) run this way.

One pipe (a socketpair) carries msgpack messages (engine/wire.py) both ways, read and written by two
threads with blocking calls: the event loop never blocks on a full pipe while the child is busy in a
long step, and each message reaches the loop as a callback of its own, at most MAX_UNDELIVERED at a
time (a loop that falls behind leaves the rest in the pipe, which then holds the child back, rather
than piling up stale messages in memory). The pipe is never registered with the loop: uvloop's
add_reader makes a descriptor non-blocking, and then a burst of adds that outgrew the socket buffer
while the child was busy failed the writer with EAGAIN (256 streams of 400-token prompts hung that
way), and a read could stop between a message's header and body. The child's death (a crash, or
killed) shows as end-of-file on the pipe after every message it sent, so its last words (wire.DEAD)
are never lost.

The child starts with build_in_child and answers once, wire.READY with its facts or wire.FAILED, before
any other message.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TypeVar

from leanserve.server.engine import wire
from leanserve.server.engine.errors import startup_error_from_wire, startup_error_to_wire
from leanserve.server.settings import LOG_FORMAT
from leanserve.server.stack_dump import dump_stacks_on_sigusr1

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_UNDELIVERED = 2  # the child's messages handed to the event loop and not yet handled
THREAD_JOIN_S = 5.0  # at close, for the pipe's threads (the pipe is closed after, whatever they do)


class ChildProcessClient:
    def __init__(self, target: Callable, args: tuple, name: str, who: str):
        """Start `target(*args, conn, log level, log format)` in a spawned process named `name` and
        wait for its READY; its startup errors are raised here (those of errors.STARTUP_ERRORS as
        such, others as RuntimeError naming `who`)."""
        self.who = who
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_conn = ctx.Pipe()
        # daemon: multiprocessing ends it if the API process exits without shutting it down
        self.proc = ctx.Process(target=target, name=name, daemon=True,
                                args=(*args, child_conn, logging.getLogger().getEffectiveLevel(), LOG_FORMAT))
        self.proc.start()
        child_conn.close()  # else our own copy would keep the pipe open after the child exits
        try:
            message = wire.decode(self._conn.recv_bytes())
        except EOFError:
            self.proc.join()
            raise RuntimeError(f"{who} process exited during startup (exit code {self.proc.exitcode})") from None
        if message[0] == wire.FAILED:
            self.proc.join()
            _, kind, text = message
            raise startup_error_from_wire(kind, text, who)
        self.facts = message[1]  # the child's READY payload
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name=f"{name}-sender", daemon=True)
        self._sender.start()
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver: threading.Thread | None = None
        self._undelivered = threading.Semaphore(MAX_UNDELIVERED)
        self._closing = False

    def start(self, on_message: Callable[[list], None], on_exit: Callable[[int | None], None]) -> None:
        """Deliver each message from the child to `on_message` on the running event loop, and call
        `on_exit(exit code)` once if the child's end of the pipe closes."""
        self._loop = asyncio.get_running_loop()
        self._on_message, self._on_exit = on_message, on_exit
        self._receiver = threading.Thread(target=self._recv_loop, name=f"{self._name}-receiver", daemon=True)
        self._receiver.start()

    def send(self, message) -> None:
        """Queue a message for the child (thread-safe, never blocks)."""
        self._outbox.put(wire.encode(message))

    async def close(self, timeout: float = 30) -> None:
        """Ask the child to exit (wire.SHUTDOWN), wait up to `timeout` seconds, then kill it."""
        self._closing = True  # its end-of-file is no death now, and late messages have no reader
        self.send((wire.SHUTDOWN,))
        self._outbox.put(None)
        await asyncio.to_thread(self.proc.join, timeout)
        if self.proc.is_alive():
            logger.warning("%s process did not exit in %s s: killing it", self.who, timeout)
            self.proc.kill()
            await asyncio.to_thread(self.proc.join)
        # the child's exit gives the receiver end-of-file, unless a process it started holds a copy
        # of its end; the sender ends at the None above
        for thread in (self._receiver, self._sender):
            if thread is not None:
                await asyncio.to_thread(thread.join, THREAD_JOIN_S)
        self._conn.close()

    def _send_loop(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except (BrokenPipeError, ConnectionResetError):  # the child is gone; the receiver reports it
                return
            except OSError:
                # a child that stops hearing us would leave every request hanging: end it, and the
                # receiver reports its death (its requests fail, /health answers 503)
                logger.exception("sending to %s failed: stopping it", self.who)
                self.proc.kill()
                return

    def _recv_loop(self) -> None:
        try:
            while True:
                try:
                    data = self._conn.recv_bytes()
                except (EOFError, OSError):
                    break
                try:
                    message = wire.decode(data)
                except Exception:  # noqa: BLE001 - a child we cannot understand serves nobody
                    logger.exception("undecodable message from %s: stopping it", self.who)
                    self.proc.kill()
                    break
                while not self._undelivered.acquire(timeout=0.5):
                    if self._closing:
                        return
                self._deliver(self._handle, message)
        finally:
            if not self._closing:  # else close() reaps the child, and nobody listens
                self.proc.join(1)  # it has closed its end: exiting, if not yet gone
                self._deliver(self._on_exit, self.proc.exitcode)

    def _handle(self, message: list) -> None:
        self._undelivered.release()
        self._on_message(message)

    def _deliver(self, callback: Callable, arg) -> None:
        if self._closing:
            return
        try:  # in order: a dead child's last message comes before its exit
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the loop has closed: the server is exiting
            pass


def build_in_child(conn: Connection, log_level: int, log_format: str, build: Callable[[], T], who: str) -> T | None:
    """First thing in a child process: set it up, then `build()` its engine; None when that raised,
    which it has reported (wire.FAILED: the API process raises it). The caller sends wire.READY.

    spawn leaves the child's end of the pipe inheritable: a process started from it (by us or a library)
    would hold the pipe open past its exit, and the API process would not see end-of-file. SIGINT (a
    terminal's Ctrl+C reaches the whole process group) is ignored so the API process can drain; it stops
    the child with wire.SHUTDOWN, and its own death closes the pipe."""
    os.set_inheritable(conn.fileno(), False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    dump_stacks_on_sigusr1()
    logging.basicConfig(level=log_level, format=log_format)
    try:
        return build()
    except BaseException as e:  # noqa: BLE001 - reported to the API process, which raises it
        kind, text = startup_error_to_wire(e)
        if kind is None:  # a bug, not bad input: keep its traceback
            logger.error("%s failed to start", who, exc_info=e)
        conn.send_bytes(wire.encode((wire.FAILED, kind, text)))
        return None
