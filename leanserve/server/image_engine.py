"""The image engine: an image model (leanserve.models.image_model: a diffusers pipeline and the
samplers its directory offers) driven by one worker thread, requests batched per shape. The server
runs it in a process of its own (image_proc.py; the API process holds image_client.py); benchmarks
and tests also run it in theirs.

Every request is split into its n images; the worker takes the oldest waiting image and every
other waiting image with the same batch key (size, steps, guidance, sampler, negative prompt or
not) up to the batch limit, and runs them as ONE pipeline call, i.e. one denoising loop: images that
arrive while a loop runs all go into the next one. When the previous loop of that key ran several
images, the worker first waits (up to `batch_wait` of that loop's time) for as many images to arrive as
it ran: the clients it just answered come back, and would otherwise form their own half-size loop. The limit is `max_image_batch`, or when that is
None (auto) what the model measures fits in device memory at start (ImageModel.auto_batch_size),
scaled down by area for sizes above the native one. Image i
of a request has its own CPU generator seeded seed + i, so an image does not depend on what it
was batched with (nor on the device): the same seed gives the same image alone or batched.

What a model can serve (sizes, steps, guidance, samplers) is the model's to check
(ImageModel.check_inputs, before queueing): anything it cannot serve is a 400, never a silent fix.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from leanserve.errors import UserError
from leanserve.models.image_params import ImageDefaults, ImageParamError, ImageParams
from leanserve.runtime import resolve_device, resolve_dtype
from leanserve.server.drain import drain
from leanserve.server.engine.errors import EngineDeadError, ImageGenerationError, QueueFullError, RequestAbortedError
from leanserve.server.image_config import ImageEngineConfig

if TYPE_CHECKING:  # the model layer imports diffusers; load it only when an engine is built
    from leanserve.models.image_model import ImageModel

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ImageRequestTimes:
    """Monotonic stamps (time.monotonic()); the front end derives queue and e2e times."""
    arrival: float                        # HTTP arrival
    queued: float | None = None
    scheduled: float | None = None        # the first of its images started


@dataclass(slots=True)
class ImageOutput:
    request_id: str
    images: list[np.ndarray]              # uint8 [H, W, 3], in order
    times: ImageRequestTimes


@dataclass(slots=True)
class BatchStats:
    """One pipeline call, for the stage metrics; a stage is None when the pipeline has no such part."""
    num_images: int
    text_encode_s: float | None
    denoise_steps_s: list[float]
    vae_decode_s: float | None


@dataclass(slots=True)
class ImageEngineStats:
    num_running: int                      # requests with an image started and not all done
    num_waiting: int                      # requests none of whose images has started
    healthy: bool


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str
    n: int
    params: ImageParams
    seed: int
    times: ImageRequestTimes
    future: asyncio.Future
    images: list[np.ndarray | None] = field(default_factory=list)
    num_done: int = 0
    cancelled: bool = False

    @property
    def batch_key(self) -> tuple:
        p = self.params
        # with vs without a negative prompt is part of the key: SDXL encodes a missing one as zeros,
        # not as "", so mixing them in one call would change the images of the requests without one
        return p.width, p.height, p.num_inference_steps, p.guidance_scale, p.sampler, p.negative_prompt is not None


class StageClock:
    """Stamps stage boundaries inside a pipeline call without synchronising the device: CUDA events
    on GPU, read after the call (which ends with a device-to-host copy anyway); perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def span(self, start: str, end: str) -> float | None:
        """From the first `start` mark to the last `end` mark (several text encoders, VAE slicing)."""
        starts = [t for n, t in self.marks if n == start]
        ends = [t for n, t in self.marks if n == end]
        return self._seconds(starts[0], ends[-1]) if starts and ends else None

    def steps(self) -> list[float]:
        """Each denoising step: from the previous step's end (the first: the end of text encoding)."""
        stamps = [t for n, t in self.marks if n == "step"]
        encoded = [t for n, t in self.marks if n == "encode_end"]
        if encoded and stamps:
            stamps.insert(0, encoded[-1])
        return [self._seconds(a, b) for a, b in zip(stamps, stamps[1:])]


class AsyncImageEngine:
    kind = "image"

    def __init__(self, config: ImageEngineConfig, model: ImageModel | None = None):
        """`model`: an already built ImageModel on its device (benchmarks); default: load `config.model`."""
        from leanserve.models.image_model import load_image_model

        for name in ("max_image_batch", "max_queued_images"):
            if getattr(config, name) is not None and getattr(config, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(config, name)}")
        if config.batch_wait < 0:
            raise UserError(f"batch_wait must be >= 0, got {config.batch_wait}")
        self.config = config
        self.model_name = config.served_model_name or Path(config.model).name
        if model is None:
            device = resolve_device(config.device)
            model = load_image_model(config.model, self.model_name, device=device,
                                     dtype=resolve_dtype(config.dtype, device))
        self.model = model
        self.defaults = ImageDefaults(model.sizes.width, model.sizes.height, model.default_steps,
                                      model.default_guidance)
        self.device: torch.device = model.device
        self.max_image_batch: int | None = config.max_image_batch  # at the native size; auto: set by start()
        self._clock = StageClock(self.device)
        self._install_stage_hooks()
        self.batch_observer: Callable[[BatchStats], None] | None = None  # called on the event loop
        # called on the event loop whenever a request starts waiting, starts running or leaves
        self.stats_observer: Callable[[ImageEngineStats], None] | None = None

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: deque[tuple[_Request, int]] = deque()  # (request, image index), oldest first
        self._waiting: set[_Request] = set()
        self._running: set[_Request] = set()
        self._batch: list[tuple[_Request, int]] = []
        self._last_loop: dict[tuple, tuple[int, float, float]] = {}  # batch key -> (images, seconds, end)
        self._interrupt_all = False
        self._stop = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # event-loop side
        self._accepting = True
        self._inflight: set[_Request] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = asyncio.get_running_loop()
        if self.config.max_image_batch is None:
            # at start, not in __init__: the server builds every engine first, so what is free now is
            # what the other engines (an LLM's KV cache, image engines started before) leave
            self.max_image_batch = await asyncio.to_thread(self.model.auto_batch_size)
            logger.info("%s: up to %d images per pipeline call", self.model_name, self.max_image_batch)
        if self.config.cuda_graphs and not self.model.enable_cuda_graphs(self.max_image_batch):
            logger.warning("%s: CUDA graphs need a CUDA pipeline with a UNet; running eagerly", self.model_name)
        self._thread = threading.Thread(target=self._run, name="leanserve-image-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop admitting; let in-flight requests finish for up to `drain_timeout` seconds (None =
        as long as they take, 0 = not at all), then abort the rest (RequestAbortedError; a running
        batch stops at its next step) and stop the worker."""
        self._accepting = False
        if self._thread is None:
            return
        await drain(self._idle, bool(self._inflight), drain_timeout)
        with self._lock:
            self._queue.clear()
            self._waiting.clear()
            self._interrupt_all = True
            self._stop = True
            self._wakeup.notify()
        for req in list(self._inflight):
            if not req.future.done():
                req.future.set_exception(RequestAbortedError("the server shut down before the images were done"))
        await asyncio.to_thread(self._thread.join, 30)

    def stats(self) -> ImageEngineStats:
        with self._lock:
            return ImageEngineStats(num_running=len(self._running), num_waiting=len(self._waiting),
                                    healthy=self.healthy)

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    @property
    def death(self) -> str | None:
        """What killed the worker loop, if it died."""
        return None if self._dead is None else f"{type(self._dead).__name__}: {self._dead}"

    # ---- requests ---------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str, n: int, params: ImageParams,
                       arrival_time: float) -> ImageOutput:
        """Generate n images. Raises ImageParamError, QueueFullError or EngineDeadError before
        queueing; cancelling the awaiting task (client gone) drops the request's waiting images."""
        if self._dead is not None:
            raise EngineDeadError(f"the image engine loop died: {self._dead!r}")
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        if self._thread is None:
            raise RuntimeError("AsyncImageEngine.start() has not been awaited")
        if n < 1:
            raise ImageParamError("n", f"n must be >= 1, got {n}")
        self.model.check_inputs(params)
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        req = _Request(request_id, prompt, n, params, seed, ImageRequestTimes(arrival_time),
                       self._loop.create_future(), images=[None] * n)
        with self._lock:
            if len(self._queue) + n > self.config.max_queued_images:
                raise QueueFullError(f"image queue is full ({self.config.max_queued_images} images)")
            req.times.queued = time.monotonic()
            self._queue.extend((req, i) for i in range(n))
            self._waiting.add(req)
            self._wakeup.notify()
        self._inflight.add(req)
        self._idle.clear()
        self._stats_changed()
        req.future.add_done_callback(lambda _: self._retire(req))
        try:
            return await req.future
        except asyncio.CancelledError:
            self._abort(req)
            raise

    def _abort(self, req: _Request) -> None:
        """Drop a cancelled request's waiting images; images in the running batch finish and are
        discarded (the batch stops early when every request in it is cancelled)."""
        with self._lock:
            req.cancelled = True
            self._queue = deque(item for item in self._queue if item[0] is not req)
            self._waiting.discard(req)
            if not any(r is req for r, _ in self._batch):
                self._running.discard(req)
        self._stats_changed()

    def _retire(self, req: _Request) -> None:
        self._inflight.discard(req)
        if not self._inflight:
            self._idle.set()

    # ---- worker thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._stop or self._queue):
                        self._wakeup.wait()
                    self._wait_for_returning_clients()
                    if self._stop:
                        return
                    if not self._queue:  # every waiting image was cancelled meanwhile
                        continue
                    self._batch = batch = self._take_batch()
                if self.stats_observer is not None:
                    self._post(self._stats_changed)
                start = time.monotonic()
                stats, images, error = self._run_batch(batch)
                end = time.monotonic()
                with self._lock:
                    self._last_loop[batch[0][0].batch_key] = (len(batch), end - start, end)
                    self._batch = []
                    for req, _ in batch:
                        req.num_done += 1
                self._post(self._deliver, batch, images, error, stats)
        except BaseException as e:  # noqa: BLE001 - anything outside a pipeline call kills the engine
            logger.exception("image engine loop died")
            with self._lock:
                self._dead = e
            self._post(self._fail_all, f"image engine error: {type(e).__name__}: {e}")

    def _wait_for_returning_clients(self) -> None:
        """Before a loop of the oldest image's key (under the lock): if the previous loop of that key
        ran k >= 2 images, wait until k images of the key have arrived since it ended, the batch is full
        or `batch_wait` of that loop's time has passed. A lone client (k = 1) never waits."""
        if not self._queue or self.config.batch_wait <= 0:
            return
        key = self._queue[0][0].batch_key
        ran, seconds, ended = self._last_loop.get(key, (0, 0.0, 0.0))
        if ran < 2:
            return
        limit = self._batch_limit(self._queue[0][0].params)
        deadline = time.monotonic() + self.config.batch_wait * seconds
        while not self._stop and self._queue and self._queue[0][0].batch_key == key:
            same = [req for req, _ in self._queue if req.batch_key == key]
            if len(same) >= limit or sum(req.times.queued > ended for req in same) >= ran:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wakeup.wait(left)

    def _take_batch(self) -> list[tuple[_Request, int]]:
        """The oldest waiting image and the next ones with its batch key (called under the lock)."""
        first = self._queue[0][0]
        key, limit = first.batch_key, self._batch_limit(first.params)
        batch, rest = [], deque()
        for item in self._queue:
            if len(batch) < limit and item[0].batch_key == key:
                batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        now = time.monotonic()
        for req, _ in batch:
            if req.times.scheduled is None:
                req.times.scheduled = now
                self._waiting.discard(req)
                self._running.add(req)
        return batch

    def _batch_limit(self, p: ImageParams) -> int:
        """Images per call at this size: an explicit max_image_batch as it is; an automatic one (sized
        at the native size) scaled down by area, as a call's activations grow with its pixels."""
        if self.config.max_image_batch is not None:
            return self.config.max_image_batch
        native = self.model.sizes.width * self.model.sizes.height
        return max(1, self.max_image_batch * min(native, p.width * p.height) // (p.width * p.height))

    def _run_batch(self, batch: list[tuple[_Request, int]]):
        p = batch[0][0].params
        self._clock.marks.clear()
        try:
            images = self.model.generate(
                [req.prompt for req, _ in batch],
                [req.params.negative_prompt for req, _ in batch] if p.negative_prompt is not None else None,
                p, [torch.Generator("cpu").manual_seed(req.seed + i) for req, i in batch],
                on_step=lambda: self._on_step(batch))
        except Exception as e:  # noqa: BLE001 - one bad call (e.g. out of memory) fails its batch only
            logger.exception("pipeline call failed (%d images %dx%d)", len(batch), p.width, p.height)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None, None, f"image generation failed: {type(e).__name__}: {e}"
        images = (np.asarray(images, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)
        stats = BatchStats(len(batch), self._clock.span("encode_start", "encode_end"), self._clock.steps(),
                           self._clock.span("decode_start", "decode_end"))
        return stats, images, None

    def _on_step(self, batch) -> bool:
        """After each denoising step; True skips the batch's remaining steps."""
        self._clock.mark("step")
        # nobody is waiting for this batch any more (or the server is stopping)
        return self._interrupt_all or all(req.cancelled for req, _ in batch)

    def _install_stage_hooks(self) -> None:
        """Forward hooks stamp text encoding (all text encoders) and VAE decoding."""
        for name, module in self.model.pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            if name.startswith("text_encoder"):
                target, stage = module, "encode"
            elif name == "vae" and hasattr(module, "decoder"):
                target, stage = module.decoder, "decode"
            else:
                continue
            target.register_forward_pre_hook(lambda *_, s=stage: self._clock.mark(s + "_start"))
            target.register_forward_hook(lambda *_, s=stage: self._clock.mark(s + "_end"))

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # ---- event-loop side --------------------------------------------------------------------------

    def _deliver(self, batch, images, error: str | None, stats: BatchStats | None) -> None:
        # gauges, stage metrics and results change together, as seen from the event loop
        with self._lock:
            for req, _ in batch:
                if req.num_done == req.n or req.cancelled:
                    self._running.discard(req)
        for k, (req, i) in enumerate(batch):
            if req.future.done():  # cancelled or aborted: discard
                continue
            if error is not None:
                req.future.set_exception(ImageGenerationError(error))
                self._abort(req)  # its images still waiting would be discarded anyway
                continue
            req.images[i] = images[k]
            if all(img is not None for img in req.images):
                req.future.set_result(ImageOutput(req.request_id, list(req.images), req.times))
        if stats is not None and self.batch_observer is not None:
            self.batch_observer(stats)
        self._stats_changed()

    def _stats_changed(self) -> None:
        if self.stats_observer is not None:
            self.stats_observer(self.stats())

    def _fail_all(self, message: str) -> None:
        for req in list(self._inflight):
            if not req.future.done():
                req.future.set_exception(EngineDeadError(message))
        self._stats_changed()  # healthy is False now
