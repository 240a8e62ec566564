"""The API process's side of an image engine in its own process (image_proc.py): the interface of
AsyncImageEngine (which runs in the child), with a future per request here. The route encodes the
images it returns (PNG off the event loop), so the child's interpreter only drives the pipeline."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np

from leanserve.models.image_params import ImageDefaults, ImageParams
from leanserve.server.child_process import ChildProcessClient
from leanserve.server.drain import drain
from leanserve.server.engine import wire
from leanserve.server.engine.errors import EngineDeadError, RequestAbortedError
from leanserve.server.image_config import ImageEngineConfig
from leanserve.server.image_engine import BatchStats, ImageEngineStats, ImageOutput, ImageRequestTimes
from leanserve.server.image_proc import error_from_wire, run_image_engine

logger = logging.getLogger(__name__)


class ImageEngineClient:
    kind = "image"

    def __init__(self, config: ImageEngineConfig):
        """Start the engine's process and wait until it has loaded the model; its startup errors
        (a bad directory, bad settings) are raised here."""
        self.config = config
        self.model_name = config.served_model_name or Path(config.model).name
        self._child = ChildProcessClient(run_image_engine, (config,), "leanserve-image-engine",
                                         f"the image engine of {self.model_name}")
        self.defaults = ImageDefaults(*self._child.facts)
        self.max_image_batch: int | None = config.max_image_batch  # auto: what the child sized at start
        self.batch_observer = None  # called with each pipeline call's BatchStats, on the event loop
        self._pending: dict[str, asyncio.Future] = {}
        self._counts = (0, 0)  # requests running, waiting: as of the child's last STATS
        self._started = self._stopped = False
        self._accepting = True
        self._dead: str | None = None
        self._on_started: asyncio.Future | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("the engine is already started")
        self._started = True
        self._on_started = asyncio.get_running_loop().create_future()
        self._child.start(self._on_message, self._on_exit)
        # sized now, not at load: every engine of the server has loaded, so what is free is what the
        # others (an LLM's KV cache) leave
        self._child.send((wire.START,))
        self.max_image_batch = await self._on_started

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop admitting; let in-flight requests finish for up to `drain_timeout` seconds (None =
        as long as they take, 0 = not at all), then abort the rest (RequestAbortedError) and stop
        the engine's process."""
        self._accepting = False
        if self._stopped:
            return
        await drain(self._idle, bool(self._pending), drain_timeout)
        self._stopped = True
        self._fail_pending(RequestAbortedError("the server shut down before the images were done"))
        await self._child.close()

    def stats(self) -> ImageEngineStats:
        return ImageEngineStats(num_running=self._counts[0], num_waiting=self._counts[1], healthy=self.healthy)

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._started and not self._stopped

    async def generate(self, request_id: str, prompt: str, n: int, params: ImageParams,
                       arrival_time: float) -> ImageOutput:
        """Generate n images; raises what AsyncImageEngine.generate raises. Cancelling the awaiting
        task (client gone) aborts the request in the engine."""
        if self._dead is not None:
            raise EngineDeadError(f"the image engine died: {self._dead}")
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        if not self._started:
            raise RuntimeError("ImageEngineClient.start() has not been awaited")
        if request_id in self._pending:
            raise ValueError(f"request id {request_id!r} is already in use")
        future = asyncio.get_running_loop().create_future()
        try:
            self._pending[request_id] = future
            self._idle.clear()
            self._child.send((wire.ADD, request_id, prompt, n, wire.to_wire(params), arrival_time))
            return await future
        except asyncio.CancelledError:
            if self._dead is None and not self._stopped:
                self._child.send((wire.ABORT, request_id))
            raise
        finally:
            self._pending.pop(request_id, None)
            if not self._pending:
                self._idle.set()

    def _on_message(self, message: list) -> None:
        kind = message[0]
        if kind == wire.DONE:
            _, request_id, images, shape, times, error = message
            future = self._pending.get(request_id)
            if future is None or future.done():  # cancelled meanwhile
                return
            if error is not None:
                future.set_exception(error_from_wire(error))
                return
            future.set_result(ImageOutput(request_id, [np.frombuffer(b, np.uint8).reshape(shape) for b in images],
                                          ImageRequestTimes(*times)))
        elif kind == wire.STATS:
            self._counts = (message[1], message[2])
        elif kind == wire.BATCH:
            if self.batch_observer is not None:
                self.batch_observer(BatchStats(*message[1]))
        elif kind == wire.STARTED:
            self._on_started.set_result(message[1])
        elif kind == wire.DEAD:  # end-of-file follows: _on_exit
            self._dead = message[1]

    def _on_exit(self, exit_code: int | None) -> None:
        """The child's end of the pipe closed while serving: fail whatever waits on it."""
        if self._stopped:
            return
        if self._dead is None:
            self._dead = f"the image engine process exited unexpectedly (exit code {exit_code})"
        logger.error("%s: %s", self.model_name, self._dead)
        error = EngineDeadError(f"image engine error: {self._dead}")
        if self._on_started is not None and not self._on_started.done():
            self._on_started.set_exception(error)
        self._fail_pending(error)

    def _fail_pending(self, error: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
