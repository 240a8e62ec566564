"""ImageModel: what an image engine serves, i.e. a loaded pipeline (models/image_pipeline.py) and
the samplers its directory offers, behind one interface: its defaults and samplers, a check of a
request's parameters (ImageParamError naming the parameter) and one batched call.

Every model serves the sizes of its SizeLimits. Beyond that the general limits apply (steps,
guidance, one of the diffusers samplers of image_pipeline.SAMPLERS or a sampler the directory
carries, such as DPM-OT's OT map), unless the pipeline sets its own: a pipeline that defines
`check_params(params, model_name)`, `samplers` and `default_steps` (SiDPipeline) is checked by
those alone.

How many images one call may take (`auto_batch_size`) is measured, not guessed: on CUDA two calls at
the native size (1 and PROBE_BATCH images, one step) give the fixed and the per-image peak memory,
and the batch is what fits in FREE_MEMORY_FRACTION of the free memory, at most AUTO_BATCH_CAP.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from leanserve.models.dpm_ot_sampler import DPM_OT, OTSampler
from leanserve.models.image_params import ImageParamError, ImageParams, check_steps_and_guidance
from leanserve.models.image_pipeline import (
    SAMPLERS,
    load_image_pipeline,
    load_ot_map,
    set_sampler,
    size_limits,
)
from leanserve.models.pixel_pipeline import PixelDiffusionPipeline
from leanserve.models.unet_graphs import graph_forward

logger = logging.getLogger(__name__)

AUTO_BATCH_CAP = 256          # a call's latency grows with its batch; past hundreds throughput gains little
CPU_BATCH = 8                 # on CPU a call is compute-bound already at a few images
FREE_MEMORY_FRACTION = 0.8    # of the free device memory at startup; the rest absorbs fragmentation
PROBE_BATCH = 4


class ImageModel:
    def __init__(self, pipe, name: str, ot_sampler: OTSampler | None = None):
        """`pipe`: a pipeline on its device; `name`: the model's served name, for error messages."""
        self.pipe = pipe
        self.name = name
        self.ot_sampler = ot_sampler
        self.sizes = size_limits(pipe)
        self._own_limits = hasattr(pipe, "check_params")
        self.samplers: tuple[str, ...] = pipe.samplers if self._own_limits else tuple(SAMPLERS)
        if ot_sampler is not None:
            self.samplers += (ot_sampler.name,)
        call = inspect.signature(pipe.__call__).parameters
        self.default_steps: int = pipe.default_steps if self._own_limits \
            else _default(call, "num_inference_steps", 50)
        self.default_guidance: float = _default(call, "guidance_scale", 7.5)
        self._has_step_callback = "callback_on_step_end" in call
        self._schedulers = {None: pipe.scheduler}  # sampler name -> scheduler, built on first use

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def check_inputs(self, p: ImageParams) -> None:
        """Raise ImageParamError for what this model cannot serve."""
        self.sizes.check(p, self.name)
        if self._own_limits:
            self.pipe.check_params(p, self.name)
            return
        check_steps_and_guidance(p)
        if p.sampler == DPM_OT and self.ot_sampler is None:
            raise ImageParamError("scheduler", f"sampler {DPM_OT!r} needs an OT map and `{self.name}` has none "
                                               "(make one with `leanserve train dpm-ot`); choose one of "
                                               f"{', '.join(self.samplers)}")
        if p.sampler is not None and p.sampler not in self.samplers:
            raise ImageParamError("scheduler", f"unknown scheduler {p.sampler!r}; choose one of "
                                               f"{', '.join(self.samplers)}")
        if p.sampler == DPM_OT:
            self.ot_sampler.check_inputs(p)

    def generate(self, prompts: list[str], negative_prompts: list[str] | None, p: ImageParams,
                 generators: list[torch.Generator], on_step: Callable[[], bool]):
        """One pipeline call for images that share `p` but their prompts and seeds: float [N, H, W, 3]
        in [0, 1]. `on_step()` runs after each denoising step (pipelines with a step callback) and
        returns True to skip the remaining steps."""
        kwargs = dict(prompt=prompts, negative_prompt=negative_prompts, num_inference_steps=p.num_inference_steps,
                      guidance_scale=p.guidance_scale, generator=generators, height=p.height, width=p.width,
                      output_type="np")
        if self._has_step_callback:
            kwargs["callback_on_step_end"] = _step_end(on_step)
        if p.sampler == DPM_OT:
            # the tail scheduler is built from the shipped one's config
            self._use_sampler(None)
            return self.ot_sampler.generate(self.pipe, **kwargs)
        self._use_sampler(p.sampler)
        return self.pipe(**kwargs).images

    def enable_cuda_graphs(self, max_images: int) -> bool:
        """Replay the denoiser's forward as CUDA graphs (models/unet_graphs.py) in calls of up to
        `max_images` images (twice that many rows with guidance), and a PixelDiffusionPipeline's text
        encoder too: eager, its hundreds of small launches per call cost a few-step generator more than
        its denoising (BENCHMARKS.md, images through HTTP). CUDA pipelines with a `unet` only; returns
        whether it did."""
        unet = getattr(self.pipe, "unet", None)
        if self.device.type != "cuda" or not isinstance(unet, torch.nn.Module):
            return False
        graph_forward(unet, max_batch=2 * max_images)
        if isinstance(self.pipe, PixelDiffusionPipeline):  # its _encode asks for tensors, which a graph returns
            graph_forward(self.pipe.text_encoder, max_batch=max_images)
        return True

    def auto_batch_size(self) -> int:
        """Images per call at the native size: on CUDA what fits in the free memory (probed with two
        one-step calls, see the module docstring), on CPU CPU_BATCH."""
        if self.device.type != "cuda":
            return CPU_BATCH
        p = ImageParams(self.sizes.width, self.sizes.height, 1, self.default_guidance)
        try:
            self.check_inputs(p)
        except ImageParamError:  # a model that takes no 1-step call
            p = ImageParams(self.sizes.width, self.sizes.height, self.default_steps, self.default_guidance)
        self._peak_bytes(1, p)  # warm-up: one-time workspaces are not per-image memory
        peak_1, peak_k = self._peak_bytes(1, p), self._peak_bytes(PROBE_BATCH, p)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        batch = batch_that_fits(free, peak_1, peak_k, PROBE_BATCH)
        logger.info("%s: %d images per call (%.1f MiB per image, %.1f MiB fixed, %.1f GiB free)", self.name, batch,
                    (peak_k - peak_1) / (PROBE_BATCH - 1) / 2**20, peak_1 / 2**20, free / 2**30)
        return batch

    def _peak_bytes(self, n: int, p: ImageParams) -> int:
        """Peak device memory of one call of n images, above what was allocated before it."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.generate(["a probe"] * n, None, p, [torch.Generator("cpu").manual_seed(i) for i in range(n)],
                      on_step=lambda: False)
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base

    def _use_sampler(self, name: str | None) -> None:
        if name not in self._schedulers:
            self.pipe.scheduler = self._schedulers[None]
            set_sampler(self.pipe, name)
            self._schedulers[name] = self.pipe.scheduler
        self.pipe.scheduler = self._schedulers[name]


def load_image_model(model_dir: str | Path, name: str, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> ImageModel:
    """The directory's pipeline (load_image_pipeline) with the OT map it carries, if any."""
    pipe = load_image_pipeline(model_dir, device=device, dtype=dtype)
    ot_map = load_ot_map(model_dir, pipe)
    return ImageModel(pipe, name, OTSampler(ot_map) if ot_map is not None else None)


def batch_that_fits(free_bytes: int, peak_1: int, peak_k: int, k: int) -> int:
    """The batch whose peak fits in FREE_MEMORY_FRACTION of `free_bytes`, given the peaks of calls of 1
    and k images (peak = fixed + n x per-image), within [1, AUTO_BATCH_CAP]."""
    per_image = max((peak_k - peak_1) / (k - 1), 1.0)  # a tiny model can measure no growth at all
    fixed = max(peak_1 - per_image, 0.0)
    fits = int((free_bytes * FREE_MEMORY_FRACTION - fixed) // per_image)
    return max(1, min(AUTO_BATCH_CAP, fits))


def _step_end(on_step: Callable[[], bool]):
    """diffusers' callback_on_step_end around `on_step`."""
    def callback(pipe, step, t, tensors: dict) -> dict:
        if on_step():
            pipe._interrupt = True
        return tensors
    return callback


def _default(params, name: str, fallback):
    default = params[name].default if name in params else inspect.Parameter.empty
    return fallback if default in (inspect.Parameter.empty, None) else default
