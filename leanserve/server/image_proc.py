"""An image engine in its own process, as the LLM engine core is: the pipeline's host work (prompt
encoding, the hundreds of launches of a denoising loop) never waits for the API process's GIL, which
its event loop (HTTP, JSON) and PNG threads hold much of the time under load (BENCHMARKS.md, where an
image request's time goes: at one step, prompt encoding took 3.3x a whole direct pipeline call).

The child runs the whole AsyncImageEngine (the batching queue and its worker thread) on an event loop
of its own; the API process (image_client.py) keeps a future per request and encodes the images.

API -> child: (START,) | (ADD, request_id, prompt, n, ImageParams fields, arrival) | (ABORT, request_id) | (SHUTDOWN,)
child -> API: (READY, ImageDefaults fields) | (FAILED, ...): once, at startup; (STARTED, max_image_batch);
              (DONE, request_id, [image bytes] | None, [H, W, 3] | None, ImageRequestTimes fields | None,
              error | None); (BATCH, BatchStats fields): after each pipeline call; (STATS, running,
              waiting): whenever a request starts waiting, starts running or leaves (ImageEngineStats'
              gauges); (DEAD, message): the engine's worker or this process's loop died, and it exits.
Images travel as raw uint8 bytes.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from leanserve.models.image_params import ImageParamError, ImageParams
from leanserve.server.child_process import build_in_child
from leanserve.server.engine import wire
from leanserve.server.engine.errors import EngineDeadError, ImageGenerationError, QueueFullError, RequestAbortedError
from leanserve.server.image_config import ImageEngineConfig

if TYPE_CHECKING:
    from leanserve.server.image_engine import AsyncImageEngine

logger = logging.getLogger(__name__)

# what AsyncImageEngine.generate raises for one request (ImageParamError first: the only one with a param)
REQUEST_ERRORS = (ImageParamError, QueueFullError, EngineDeadError, RequestAbortedError, ImageGenerationError)
_DIED = object()  # put on the child's inbox when its engine's worker died


def error_to_wire(e: Exception) -> list:
    """By the REQUEST_ERRORS class it is an instance of; anything else travels as ImageGenerationError."""
    cls = next((cls for cls in REQUEST_ERRORS if isinstance(e, cls)), ImageGenerationError)
    message = str(e) if isinstance(e, REQUEST_ERRORS) else f"{type(e).__name__}: {e}"
    return [cls.__name__, message, getattr(e, "param", None)]


def error_from_wire(values: list) -> Exception:
    name, message, param = values
    if name == ImageParamError.__name__:
        return ImageParamError(param, message)
    return {cls.__name__: cls for cls in REQUEST_ERRORS}[name](message)


def run_image_engine(config: ImageEngineConfig, conn: Connection, log_level: int, log_format: str) -> None:
    """The process target (spawned: CUDA does not survive a fork)."""
    from leanserve.server.image_engine import AsyncImageEngine

    engine = build_in_child(conn, log_level, log_format, lambda: AsyncImageEngine(config), "image engine")
    if engine is None:
        return
    conn.send_bytes(wire.encode((wire.READY, wire.to_wire(engine.defaults))))
    if asyncio.run(_serve(engine, conn)):
        raise SystemExit(1)


async def _serve(engine: AsyncImageEngine, conn: Connection) -> bool:
    """Serve the API process's messages until SHUTDOWN or its end of the pipe closes, or until the
    engine's worker or this loop dies (then DEAD is the last message, and this returns True)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def post(item) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # the loop has closed: this process is exiting
            pass

    def receive() -> None:  # blocking reads off the loop, as in the API process (child_process.py)
        try:
            while True:
                post(wire.decode(conn.recv_bytes()))
        except (EOFError, OSError):
            post(None)  # the API process is gone

    def send_loop() -> None:  # the only writer of the pipe
        while (data := outbox.get()) is not None:
            try:
                conn.send_bytes(data)
            except OSError:  # the API process is gone; the receiver ends the loop
                return

    def send(message) -> None:
        outbox.put(wire.encode(message))

    def on_stats(stats) -> None:
        send((wire.STATS, stats.num_running, stats.num_waiting))
        if not stats.healthy:  # the worker died, perhaps with no request to tell
            inbox.put_nowait(_DIED)

    async def one(request_id: str, prompt: str, n: int, params: list, arrival: float) -> None:
        try:
            out = await engine.generate(request_id, prompt, n, ImageParams(*params), arrival)
            images = [image.tobytes() for image in out.images]
            done = (wire.DONE, request_id, images, list(out.images[0].shape), wire.to_wire(out.times),
                    None)
        except asyncio.CancelledError:  # aborted: the API process no longer waits for it
            return
        except Exception as e:  # noqa: BLE001 - the request's answer, whatever it is: it must get one
            if not isinstance(e, REQUEST_ERRORS):
                logger.exception("image request %s failed", request_id)
            done = (wire.DONE, request_id, None, None, None, error_to_wire(e))
        send(done)

    def start_task(request_id: str, *args) -> None:
        task = tasks[request_id] = asyncio.create_task(one(request_id, *args))
        # not in one(): a task cancelled before its first step never runs its body
        task.add_done_callback(lambda _: tasks.pop(request_id, None))

    threading.Thread(target=receive, name="leanserve-image-receiver", daemon=True).start()
    sender = threading.Thread(target=send_loop, name="leanserve-image-sender", daemon=True)
    sender.start()
    engine.batch_observer = lambda stats: send((wire.BATCH, wire.to_wire(stats)))
    engine.stats_observer = on_stats
    tasks: dict[str, asyncio.Task] = {}
    died = None
    try:
        while (message := await inbox.get()) is not None:
            if message is _DIED:
                died = engine.death
                break
            kind = message[0]
            if kind == wire.START:
                await engine.start()
                send((wire.STARTED, engine.max_image_batch))
            elif kind == wire.ADD:
                start_task(*message[1:])
            elif kind == wire.ABORT:
                if (task := tasks.get(message[1])) is not None:
                    task.cancel()
            elif kind == wire.SHUTDOWN:
                break
    except Exception as e:  # noqa: BLE001 - anything that escapes the loop kills the engine
        logger.exception("image engine process died")
        died = f"{type(e).__name__}: {e}"
    finally:
        await engine.shutdown(0)  # the running batch stops at its next step
        if died is not None:
            send((wire.DEAD, died))
        outbox.put(None)
        await asyncio.to_thread(sender.join)
    return died is not None
