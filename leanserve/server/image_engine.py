"""The image engine: a diffusers pipeline driven by one worker thread, requests batched per shape.

Every request is split into its n images; the worker takes the oldest waiting image and every
other waiting image with the same batch key (size, steps, guidance, sampler, negative prompt or
not) up to `max_image_batch`, and runs them as ONE pipeline call, i.e. one denoising loop. Image i
of a request has its own CPU generator seeded seed + i, so an image does not depend on what it
was batched with (nor on the device): the same seed gives the same image alone or batched.

Supported sizes: latent pipelines (SD 1.5, SDXL: a VAE) take any width and height that are
multiples of the UNet's total downsampling (VAE factor x 2^(UNet levels - 1): 64 for SD 1.5, 32 for
SDXL), each side within [native / 2, 2 x native] and at most 2 x native^2 pixels; beyond that
latent-diffusion UNets produce duplicated subjects and memory grows quadratically. Pixel-space
pipelines (ours, no VAE) only serve the size they were trained at.

Sampler "dpm-ot" (models whose directory carries an OT map, `leanserve train dpm-ot`): the OT jump
from x_T to x_t′ (no network call), then `num_inference_steps` = K steps of dpm_ot_generate's default tail
(DDPM ancestral, spec dpm_ot §5) from t′ to 0; 1 <= K <= t′. The per-image generators draw x_T, then
the step noise, so seeds behave as for the other samplers.

SiD few-step generators (`leanserve distill sid`): `num_inference_steps` is one of 1..K (K, the
generator's distilled step count, by default), guidance was distilled in (guidance_scale only 0 or
1, no negative prompt) and the chain admits no sampler: anything else is a 400, never a silent fix.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from leanserve.errors import UserError
from leanserve.runtime import resolve_device, resolve_dtype
from leanserve.server.engine.errors import EngineDeadError, QueueFullError
from leanserve.server.image_config import ImageEngineConfig

logger = logging.getLogger(__name__)

MAX_STEPS = 200       # teachers; a SiD generator allows only its distilled 1..K
MAX_GUIDANCE = 20.0
DPM_OT = "dpm-ot"


@dataclass(slots=True)
class ImageParams:
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    sampler: str | None = None            # None: the scheduler the model ships
    negative_prompt: str | None = None
    seed: int | None = None               # image i uses seed + i; None: a random seed


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


class ImageParamError(ValueError):
    """A parameter this model cannot serve; the server answers 400 naming `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class RequestAbortedError(RuntimeError):
    """The request was aborted because the server shut down before it finished."""


class ImageGenerationError(RuntimeError):
    """The pipeline call of the request's batch raised; the engine itself keeps serving."""


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

    def __init__(self, config: ImageEngineConfig, pipe=None):
        """`pipe`: an already built pipeline on its device (benchmarks); default: load `config.model`."""
        from leanserve.models.image_pipeline import (
            SAMPLERS,
            load_image_pipeline,
            load_ot_map,
            native_size,
        )
        from leanserve.models.sid_pipeline import SiDPipeline

        for name in ("max_image_batch", "max_queued_images"):
            if getattr(config, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(config, name)}")
        self.config = config
        self.model_name = config.served_model_name or Path(config.model).name
        if pipe is None:
            device = resolve_device(config.device)
            pipe = load_image_pipeline(config.model, device=device, dtype=resolve_dtype(config.dtype, device))
        self.pipe = pipe
        self.device: torch.device = pipe.device
        self.ot_map = load_ot_map(config.model, self.pipe)
        # a SiD generator's distilled step count K; None for teachers
        self.sid_steps: int | None = self.pipe.config.num_steps if isinstance(self.pipe, SiDPipeline) else None
        self.samplers: tuple[str, ...] = tuple(SAMPLERS) if self.sid_steps is None else ()  # SiD: its chain only
        if self.ot_map is not None:
            self.samplers += (DPM_OT,)
        self._schedulers = {None: self.pipe.scheduler}  # sampler name -> scheduler, built on first use

        size = native_size(self.pipe)
        self.native_size = (size, size)  # (width, height)
        # latent pipelines: multiples of the VAE factor times the UNet's downsampling; pixel: native only
        self.size_multiple: int | None = None
        if getattr(self.pipe, "vae", None) is not None:
            self.size_multiple = self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.down_block_types) - 1)
        call = inspect.signature(self.pipe.__call__).parameters
        self.default_steps: int = self.sid_steps or _default(call, "num_inference_steps", 50)
        self.default_guidance: float = _default(call, "guidance_scale", 7.5)
        self._has_step_callback = "callback_on_step_end" in call
        self._clock = StageClock(self.device)
        self._install_stage_hooks()
        self.batch_observer: Callable[[BatchStats], None] | None = None  # called on the event loop

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: deque[tuple[_Request, int]] = deque()  # (request, image index), oldest first
        self._waiting: set[_Request] = set()
        self._running: set[_Request] = set()
        self._batch: list[tuple[_Request, int]] = []
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

    # ---- limits -----------------------------------------------------------------------------------

    def supported_sizes(self) -> str:
        w, h = self.native_size
        if self.size_multiple is None:
            return f"{w}x{h} only"
        return (f"width {w // 2}-{2 * w} and height {h // 2}-{2 * h}, multiples of {self.size_multiple}, "
                f"at most {2 * w * h} pixels")

    def check_params(self, p: ImageParams) -> None:
        """Raise ImageParamError for what this model cannot serve (route -> 400)."""
        w, h = self.native_size
        if self.size_multiple is None:
            ok = (p.width, p.height) == (w, h)
        else:
            m = self.size_multiple
            ok = (p.width % m == 0 and p.height % m == 0 and w // 2 <= p.width <= 2 * w
                  and h // 2 <= p.height <= 2 * h and p.width * p.height <= 2 * w * h)
        if not ok:
            raise ImageParamError("size", f"size {p.width}x{p.height} is not supported by `{self.model_name}`; "
                                          f"supported: {self.supported_sizes()}")
        if self.sid_steps is not None:
            self._check_sid_params(p)
            return
        if not 1 <= p.num_inference_steps <= MAX_STEPS:
            raise ImageParamError("num_inference_steps", f"num_inference_steps must be in [1, {MAX_STEPS}], "
                                                         f"got {p.num_inference_steps}")
        if not 0 <= p.guidance_scale <= MAX_GUIDANCE:
            raise ImageParamError("guidance_scale", f"guidance_scale must be in [0, {MAX_GUIDANCE:g}], "
                                                    f"got {p.guidance_scale:g}")
        if p.sampler == DPM_OT and self.ot_map is None:
            raise ImageParamError("scheduler", f"sampler {DPM_OT!r} needs an OT map and `{self.model_name}` has none "
                                               "(make one with `leanserve train dpm-ot`); choose one of "
                                               f"{', '.join(self.samplers)}")
        if p.sampler is not None and p.sampler not in self.samplers:
            raise ImageParamError("scheduler", f"unknown scheduler {p.sampler!r}; choose one of "
                                               f"{', '.join(self.samplers)}")
        if p.sampler == DPM_OT and p.num_inference_steps > self.ot_map.t_prime:
            raise ImageParamError("num_inference_steps", f"{DPM_OT} runs num_inference_steps from its jump "
                                                         f"target t′ = {self.ot_map.t_prime}: at most "
                                                         f"{self.ot_map.t_prime}, got {p.num_inference_steps}")

    def _check_sid_params(self, p: ImageParams) -> None:
        k = self.sid_steps
        if not 1 <= p.num_inference_steps <= k:
            allowed = str(k) if k == 1 else f"1..{k}"
            raise ImageParamError("num_inference_steps", f"`{self.model_name}` is a SiD generator distilled for "
                                                         f"{allowed} steps: num_inference_steps must be one of "
                                                         f"{allowed}, got {p.num_inference_steps}")
        if p.guidance_scale not in (0.0, 1.0):
            raise ImageParamError("guidance_scale", f"`{self.model_name}` is a SiD generator with the guidance "
                                                    "distilled in: omit guidance_scale (or give 0 or 1), got "
                                                    f"{p.guidance_scale:g}")
        if p.negative_prompt is not None:
            raise ImageParamError("negative_prompt", f"`{self.model_name}` is a SiD generator with the guidance "
                                                     "distilled in: it takes no negative_prompt")
        if p.sampler is not None:
            raise ImageParamError("scheduler", f"`{self.model_name}` is a SiD generator: its few-step chain is fixed "
                                               f"by distillation and takes no sampler/scheduler, got {p.sampler!r}")

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="leanserve-image-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop admitting; let in-flight requests finish for up to `drain_timeout` seconds (None =
        as long as they take, 0 = not at all), then abort the rest (RequestAbortedError; a running
        batch stops at its next step) and stop the worker."""
        self._accepting = False
        if self._thread is None:
            return
        if self._inflight and drain_timeout != 0:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except TimeoutError:
                pass
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
        self.check_params(params)
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
                    if self._stop:
                        return
                    self._batch = batch = self._take_batch()
                stats, images, error = self._run_batch(batch)
                with self._lock:
                    self._batch = []
                    for req, _ in batch:
                        req.num_done += 1
                self._post(self._deliver, batch, images, error, stats)
        except BaseException as e:  # noqa: BLE001 - anything outside a pipeline call kills the engine
            logger.exception("image engine loop died")
            with self._lock:
                self._dead = e
            self._post(self._fail_all, f"image engine error: {type(e).__name__}: {e}")

    def _take_batch(self) -> list[tuple[_Request, int]]:
        """The oldest waiting image and the next ones with its batch key (called under the lock)."""
        key = self._queue[0][0].batch_key
        batch, rest = [], deque()
        for item in self._queue:
            if len(batch) < self.config.max_image_batch and item[0].batch_key == key:
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

    def _run_batch(self, batch: list[tuple[_Request, int]]):
        p = batch[0][0].params
        kwargs = dict(
            prompt=[req.prompt for req, _ in batch],
            negative_prompt=[req.params.negative_prompt for req, _ in batch] if p.negative_prompt is not None else None,
            num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(req.seed + i) for req, i in batch],
            height=p.height, width=p.width, output_type="np")
        if self._has_step_callback:
            kwargs["callback_on_step_end"] = lambda pipe, step, t, tensors: self._on_step(pipe, batch, tensors)
        self._clock.marks.clear()
        try:
            if p.sampler == DPM_OT:
                from leanserve.models.dpm_ot_sampler import dpm_ot_generate
                # the tail scheduler is built from the shipped one's config; the map fixes the size
                self._use_sampler(None)
                del kwargs["height"], kwargs["width"]
                images = dpm_ot_generate(self.pipe, self.ot_map, **kwargs).images
            else:
                self._use_sampler(p.sampler)
                images = self.pipe(**kwargs).images
        except Exception as e:  # noqa: BLE001 - one bad call (e.g. out of memory) fails its batch only
            logger.exception("pipeline call failed (%d images %dx%d)", len(batch), p.width, p.height)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None, None, f"image generation failed: {type(e).__name__}: {e}"
        images = (np.asarray(images, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)
        stats = BatchStats(len(batch), self._clock.span("encode_start", "encode_end"), self._clock.steps(),
                           self._clock.span("decode_start", "decode_end"))
        return stats, images, None

    def _on_step(self, pipe, batch, tensors: dict) -> dict:
        self._clock.mark("step")
        # nobody is waiting for this batch any more (or the server is stopping): skip its remaining steps
        if self._interrupt_all or all(req.cancelled for req, _ in batch):
            pipe._interrupt = True
        return tensors

    def _use_sampler(self, name: str | None) -> None:
        if name not in self._schedulers:
            from leanserve.models.image_pipeline import set_sampler
            self.pipe.scheduler = self._schedulers[None]
            set_sampler(self.pipe, name)
            self._schedulers[name] = self.pipe.scheduler
        self.pipe.scheduler = self._schedulers[name]

    def _install_stage_hooks(self) -> None:
        """Forward hooks stamp text encoding (all text encoders) and VAE decoding."""
        for name, module in self.pipe.components.items():
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

    def _fail_all(self, message: str) -> None:
        for req in list(self._inflight):
            if not req.future.done():
                req.future.set_exception(EngineDeadError(message))


def _default(params, name: str, fallback):
    default = params[name].default if name in params else inspect.Parameter.empty
    return fallback if default in (inspect.Parameter.empty, None) else default
