"""The server's engine API: LLMEngine driven by one background thread, results streamed to asyncio.

The thread owns the LLMEngine; the event loop never touches it except for read-only checks.
Requests and aborts reach the thread through a lock-protected inbox, outputs come back with
loop.call_soon_threadsafe. torch releases the GIL inside ops, so the loop stays responsive while
a step runs; when there is no work the thread sleeps on a condition variable.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.errors import EngineDeadError, QueueFullError
from leanserve.server.engine.llm_engine import EngineStats, LLMEngine
from leanserve.server.engine.outputs import RequestOutput
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
        from transformers import AutoTokenizer

        self.config = config
        self.engine = LLMEngine(config)
        self.model_name = config.served_model_name or Path(config.model).name
        self.max_model_len = self.engine.max_model_len
        # the front end's own instance: a fast tokenizer's Rust state must not be borrowed by the
        # event loop (encode may reconfigure truncation/padding) while the engine thread decodes
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.vocab_size = self.engine.vocab_size
        self.eos_token_ids = self.engine.eos_token_ids

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending_adds: list[tuple[str, list[int], SamplingParams, float]] = []
        self._pending_aborts: list[str] = []
        self._stop = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # event-loop side
        self._accepting = True
        self._streams: dict[str, asyncio.Queue] = {}
        self._unfinished: set[str] = set()  # added and not yet finished in the engine
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="leanserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop admitting; let in-flight requests finish for up to `drain_timeout` seconds (None =
        as long as they take, 0 = not at all), abort the rest, then stop the engine thread."""
        self._accepting = False
        if self._thread is None:
            return
        if self._unfinished and drain_timeout != 0:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except TimeoutError:
                pass
        for request_id in list(self._unfinished):
            self.abort(request_id)
        if self._unfinished and self._dead is None:
            try:  # the abort outputs come after the step in progress
                await asyncio.wait_for(self._idle.wait(), 30)
            except TimeoutError:
                logger.warning("engine did not confirm %d aborts", len(self._unfinished))
        with self._lock:
            self._stop = True
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join, 30)

    # ---- requests ---------------------------------------------------------------------------------

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, *, validated: bool = False) -> RequestStream:
        """Admit a request and return its output stream. Raises here, before any await:
        ValueError (cannot run: validate_request, unless `validated` says the caller ran it),
        QueueFullError (waiting queue full), EngineDeadError."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop died: {self._dead!r}")
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        if self._thread is None:
            raise RuntimeError("AsyncLLMEngine.start() has not been awaited")
        if request_id in self._streams or request_id in self._unfinished:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not validated:
            validate_request(prompt_token_ids, params, self.vocab_size, self.max_model_len)
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine loop died: {self._dead!r}")
            # the engine thread moves the inbox into the waiting queue under this lock
            if len(self.engine.scheduler.waiting) + len(self._pending_adds) >= self.config.max_queued_requests:
                raise QueueFullError(f"waiting queue is full ({self.config.max_queued_requests} requests)")
            self._pending_adds.append((request_id, list(prompt_token_ids), params, arrival_time))
            self._wakeup.notify()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._unfinished.add(request_id)
        self._idle.clear()
        return RequestStream(self, request_id, queue)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); its stream ends with finish_reason "abort"."""
        with self._lock:
            self._pending_aborts.append(request_id)
            self._wakeup.notify()

    def stats(self) -> EngineStats:
        return self.engine.stats(healthy=self.healthy)

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    # ---- engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._lock:
                    while not (self._stop or self._pending_adds or self._pending_aborts or engine.has_unfinished()):
                        self._wakeup.wait()
                    if self._stop:
                        return
                    adds, self._pending_adds = self._pending_adds, []
                    aborts, self._pending_aborts = self._pending_aborts, []
                    # generate() validated them and enforced the queue bound under this lock
                    for request_id, prompt, params, arrival in adds:
                        engine.add_request(request_id, prompt, params, arrival, check_queue=False, validated=True)
                outputs: list[RequestOutput] = []
                for request_id in aborts:
                    if (out := engine.abort(request_id)) is not None:
                        outputs.append(out)
                if engine.has_unfinished():
                    outputs += engine.step()
                if outputs:
                    self._post(self._dispatch, outputs)
        except BaseException as e:  # noqa: BLE001 - anything that escapes a step kills the engine
            logger.exception("engine loop died")
            with self._lock:
                self._dead = e
            self._post(self._fail_all, f"engine error: {type(e).__name__}: {e}")

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # ---- event-loop side --------------------------------------------------------------------------

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if (queue := self._streams.get(out.request_id)) is not None:
                queue.put_nowait(out)
            if out.finished:
                self._unfinished.discard(out.request_id)
        if not self._unfinished:
            self._idle.set()

    def _fail_all(self, message: str) -> None:
        self._dispatch([RequestOutput(request_id, [], "", finished=True, finish_reason="error", error=message)
                        for request_id in self._unfinished])
