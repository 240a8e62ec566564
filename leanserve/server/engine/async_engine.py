"""The server's engine API (vLLM V1's AsyncLLM): requests in, RequestOutput streams out, with the
engine core in its own process.

This process tokenizes (the routes), detokenizes, finds stop strings and writes SSE; the core
process (core_proc.py) schedules and runs the model and sends one message per step with every
request's new token ids. So the per-token Python work of the two sides runs on two interpreters.
Everything here runs on the event loop, which owns the request table; the core's messages arrive
through a reader callback (core_client.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from leanserve.models.model_dir import load_tokenizer
from leanserve.server.drain import drain
from leanserve.server.engine import wire
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.core_client import EngineCoreClient
from leanserve.server.engine.errors import EngineDeadError, QueueFullError
from leanserve.server.engine.output_processor import OutputProcessor
from leanserve.server.engine.outputs import EngineStats, RequestOutput
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.validation import validate_request

__all__ = ["AsyncLLMEngine", "EngineStats", "RequestStream"]

logger = logging.getLogger(__name__)


class RequestStream:
    """AsyncIterator over one request's RequestOutputs; the last has finished=True. Leaving early
    (task cancelled while waiting, aclose(), or dropping the stream) aborts the request."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, queue: asyncio.Queue):
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except BaseException:  # cancelled: the consumer is gone (e.g. client disconnect)
            self._close()
            raise
        if out.finished:
            self._done = True
            self._engine._streams.pop(self.request_id, None)
        return out

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._engine._streams.pop(self.request_id, None)
            self._engine.abort(self.request_id)

    def __del__(self):
        # dropped without being consumed to the end (e.g. the handler raised before iterating)
        self._close()


class AsyncLLMEngine:
    kind = "llm"  # the server routes by kind; image engines say "image"

    def __init__(self, config: EngineConfig):
        """Start the core process and load the model there (blocks until it is ready)."""
        self.config = config
        self.model_name = config.served_model_name or Path(config.model).name
        # two instances: a fast tokenizer's Rust state must not be borrowed by the routes' encode
        # in a worker thread (it may reconfigure truncation/padding) while the loop decodes
        self.tokenizer = load_tokenizer(config.model)
        self._processor = OutputProcessor(load_tokenizer(config.model))
        self._core = EngineCoreClient(config)
        self.max_model_len: int = self._core.facts["max_model_len"]
        self.vocab_size: int = self._core.facts["vocab_size"]
        self.eos_token_ids: list[int] = self._core.facts["eos_token_ids"]
        self._stats = wire.stats_from_wire(self._core.facts["stats"])

        self._started = False
        self._stopped = False
        self._accepting = True
        self._dead: str | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._unfinished: set[str] = set()  # added and not yet finished
        self._idle = asyncio.Event()
        self._idle.set()
        # the waiting queue's bound is checked here, at admission: adds the core has not yet
        # taken count as waiting, on top of the waiting count of its last message
        self._adds_sent = 0
        self._adds_received = 0

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("the engine is already started")
        self._started = True
        self._core.start(self._on_message, self._on_core_exit)

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop admitting; let in-flight requests finish for up to `drain_timeout` seconds (None =
        as long as they take, 0 = not at all), abort the rest, then stop the core process."""
        self._accepting = False
        if self._stopped:
            return
        if not self._started:  # its core process runs since __init__
            self._stopped = True
            await self._core.close()
            return
        await drain(self._idle, bool(self._unfinished), drain_timeout)
        for request_id in list(self._unfinished):
            self.abort(request_id)
        if self._unfinished and self._dead is None:
            try:  # the abort outputs come after the step in progress
                await asyncio.wait_for(self._idle.wait(), 30)
            except TimeoutError:
                logger.warning("engine core did not confirm %d aborts", len(self._unfinished))
        self._stopped = True
        await self._core.close()

    # ---- requests ---------------------------------------------------------------------------------

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, *, validated: bool = False) -> RequestStream:
        """Admit a request and return its output stream. Raises here, before any await:
        ValueError (cannot run: validate_request, unless `validated` says the caller ran it),
        QueueFullError (waiting queue full), EngineDeadError."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine core died: {self._dead}")
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        if not self._started:
            raise RuntimeError("AsyncLLMEngine.start() has not been awaited")
        if request_id in self._streams or request_id in self._unfinished:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not validated:
            validate_request(prompt_token_ids, params, self.vocab_size, self.max_model_len)
        if self._stats.num_waiting + self._adds_sent - self._adds_received >= self.config.max_queued_requests:
            raise QueueFullError(f"waiting queue is full ({self.config.max_queued_requests} requests)")
        self._processor.add_request(request_id, prompt_token_ids, params)
        self._core.send((wire.ADD, request_id, list(prompt_token_ids), wire.to_wire(params), arrival_time))
        self._adds_sent += 1
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._unfinished.add(request_id)
        self._idle.clear()
        return RequestStream(self, request_id, queue)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); its stream ends with finish_reason "abort"."""
        if request_id in self._unfinished and self._dead is None:
            self._core.send((wire.ABORT, [request_id]))

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats, healthy=self.healthy)

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._started and not self._stopped

    # ---- the core's messages ----------------------------------------------------------------------

    def _on_message(self, message: list) -> None:
        if message[0] == wire.DEAD:  # end-of-file follows: _on_core_exit
            self._dead = message[1]
            return
        _, outputs, stats, self._adds_received = message
        self._stats = wire.stats_from_wire(stats)
        request_outputs, stopped = self._processor.process([wire.output_from_wire(o) for o in outputs])
        if stopped:  # a stop string ended them here: free their blocks in the core
            self._core.send((wire.ABORT, stopped))
        self._dispatch(request_outputs)

    def _on_core_exit(self, exit_code: int | None) -> None:
        if self._stopped:
            return
        if self._dead is None:
            self._dead = f"the engine core process exited unexpectedly (exit code {exit_code})"
        logger.error("engine core died: %s", self._dead)
        for request_id in self._unfinished:
            self._processor.drop(request_id)
        self._dispatch([RequestOutput(request_id, [], "", finished=True, finish_reason="error",
                                      error=f"engine error: {self._dead}") for request_id in self._unfinished])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if (queue := self._streams.get(out.request_id)) is not None:
                queue.put_nowait(out)
            if out.finished:
                self._unfinished.discard(out.request_id)
        if not self._unfinished:
            self._idle.set()
