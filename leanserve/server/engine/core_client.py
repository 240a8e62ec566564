"""The API process's side of the engine core process: spawn it, send it adds and aborts, and
hand its messages to the event loop.

One pipe (a socketpair) carries msgpack messages both ways, read and written by two threads with
blocking calls: the event loop never blocks on a full pipe while the core is busy in a long step,
and each message reaches the loop as a callback of its own, at most MAX_UNDELIVERED at a time (a
loop that falls behind leaves the rest in the pipe, which then holds the core back, rather than
piling up stale steps in memory). The pipe is never registered with the
loop: uvloop's add_reader makes a descriptor non-blocking, and then a burst of adds that outgrew
the socket buffer while the core was in a step failed the writer with EAGAIN (256 streams of
400-token prompts hung that way), and a read could stop between a message's header and body.
The core's death (a crash, or killed) shows as end-of-file on the pipe after every message it
sent, so its last words (wire.DEAD) are never lost.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable

from leanserve.server.engine import wire
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.core_proc import run_engine_core
from leanserve.server.engine.errors import startup_error_from_wire
from leanserve.server.settings import LOG_FORMAT

logger = logging.getLogger(__name__)

MAX_UNDELIVERED = 2  # the core's messages handed to the event loop and not yet handled
THREAD_JOIN_S = 5.0  # at close, for the pipe's threads (the pipe is closed after, whatever they do)


class EngineCoreClient:
    def __init__(self, config: EngineConfig):
        """Start the core process and wait until it has loaded the model; its startup errors are
        raised here (those of errors.STARTUP_ERRORS as such, others as RuntimeError)."""
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_conn = ctx.Pipe()
        # daemon: multiprocessing ends it if the API process exits without shutting it down
        self.proc = ctx.Process(target=run_engine_core, name="leanserve-engine-core", daemon=True,
                                args=(config, child_conn, logging.getLogger().getEffectiveLevel(), LOG_FORMAT))
        self.proc.start()
        child_conn.close()  # else our own copy would keep the pipe open after the core exits
        try:
            message = wire.decode(self._conn.recv_bytes())
        except EOFError:
            self.proc.join()
            raise RuntimeError(f"the engine core process exited during startup (exit code {self.proc.exitcode})") \
                from None
        if message[0] == wire.FAILED:
            self.proc.join()
            _, kind, text = message
            raise startup_error_from_wire(kind, text, "the engine core")
        self.facts: dict = message[1]
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="leanserve-core-sender", daemon=True)
        self._sender.start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver: threading.Thread | None = None
        self._undelivered = threading.Semaphore(MAX_UNDELIVERED)
        self._closing = False

    def start(self, on_message: Callable[[list], None], on_exit: Callable[[int | None], None]) -> None:
        """Deliver each message from the core to `on_message` on the running event loop, and call
        `on_exit(exit code)` once if the core's end of the pipe closes."""
        self._loop = asyncio.get_running_loop()
        self._on_message, self._on_exit = on_message, on_exit
        self._receiver = threading.Thread(target=self._recv_loop, name="leanserve-core-receiver", daemon=True)
        self._receiver.start()

    def send(self, message) -> None:
        """Queue a message for the core (thread-safe, never blocks)."""
        self._outbox.put(wire.encode(message))

    async def close(self, timeout: float = 30) -> None:
        """Ask the core to exit, wait up to `timeout` seconds, then kill it."""
        self._closing = True  # its end-of-file is no death now, and late outputs have no reader
        self.send((wire.SHUTDOWN,))
        self._outbox.put(None)
        await asyncio.to_thread(self.proc.join, timeout)
        if self.proc.is_alive():
            logger.warning("the engine core process did not exit in %s s: killing it", timeout)
            self.proc.kill()
            await asyncio.to_thread(self.proc.join)
        # the core's exit gives the receiver end-of-file, unless a process it started holds a copy
        # of its end; the sender ends at the None above
        for thread in (self._receiver, self._sender):
            if thread is not None:
                await asyncio.to_thread(thread.join, THREAD_JOIN_S)
        self._conn.close()

    def _send_loop(self) -> None:
        while (data := self._outbox.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except (BrokenPipeError, ConnectionResetError):  # the core is gone; the receiver reports it
                return
            except OSError:
                # a core that stops hearing us would leave every request hanging: end it, and the
                # receiver reports its death (the server answers 503)
                logger.exception("sending to the engine core failed: stopping it")
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
                except Exception:  # noqa: BLE001 - a core we cannot understand serves nobody
                    logger.exception("undecodable message from the engine core: stopping it")
                    self.proc.kill()
                    break
                while not self._undelivered.acquire(timeout=0.5):
                    if self._closing:
                        return
                self._deliver(self._handle, message)
        finally:
            if not self._closing:  # else close() reaps the core, and nobody listens
                self.proc.join(1)  # it has closed its end: exiting, if not yet gone
                self._deliver(self._on_exit, self.proc.exitcode)

    def _handle(self, message: list) -> None:
        self._undelivered.release()
        self._on_message(message)

    def _deliver(self, callback: Callable, arg) -> None:
        if self._closing:
            return
        try:  # in order: a dead core's last message comes before its exit
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the loop has closed: the server is exiting
            pass
