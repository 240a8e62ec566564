"""An image request's parameters and the general limits every image model applies to them.

A model may narrow these (a SiD generator: its distilled steps, no guidance, no sampler; a sampler:
its own step range) but every model checks the size against SizeLimits first.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_STEPS = 200       # teachers; a SiD generator allows only its distilled 1..K
MAX_GUIDANCE = 20.0


@dataclass(slots=True)
class ImageParams:
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    sampler: str | None = None            # None: the scheduler the model ships
    negative_prompt: str | None = None
    seed: int | None = None               # image i uses seed + i; None: a random seed


@dataclass(frozen=True, slots=True)
class ImageDefaults:
    """What a request that leaves a field out gets: the model's native size, steps and guidance."""
    width: int
    height: int
    steps: int
    guidance: float


class ImageParamError(ValueError):
    """A parameter this model cannot serve; the server answers 400 naming `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SizeLimits:
    """The sizes a pipeline serves. Latent pipelines (SD 1.5, SDXL: a VAE) take any width and height
    that are multiples of the UNet's total downsampling (VAE factor x 2^(UNet levels - 1): 64 for SD
    1.5, 32 for SDXL), each side within [native / 2, 2 x native] and at most 2 x native^2 pixels;
    beyond that latent-diffusion UNets produce duplicated subjects and memory grows quadratically.
    Pixel-space pipelines (ours, no VAE) only serve the size they were trained at."""
    width: int                            # the native size
    height: int
    multiple: int | None                  # latent pipelines' size multiple; None: the native size only

    def describe(self) -> str:
        w, h = self.width, self.height
        if self.multiple is None:
            return f"{w}x{h} only"
        return (f"width {w // 2}-{2 * w} and height {h // 2}-{2 * h}, multiples of {self.multiple}, "
                f"at most {2 * w * h} pixels")

    def check(self, p: ImageParams, model_name: str) -> None:
        w, h = self.width, self.height
        if self.multiple is None:
            ok = (p.width, p.height) == (w, h)
        else:
            m = self.multiple
            ok = (p.width % m == 0 and p.height % m == 0 and w // 2 <= p.width <= 2 * w
                  and h // 2 <= p.height <= 2 * h and p.width * p.height <= 2 * w * h)
        if not ok:
            raise ImageParamError("size", f"size {p.width}x{p.height} is not supported by `{model_name}`; "
                                          f"supported: {self.describe()}")


def check_steps_and_guidance(p: ImageParams) -> None:
    """The general limits (teachers)."""
    if not 1 <= p.num_inference_steps <= MAX_STEPS:
        raise ImageParamError("num_inference_steps", f"num_inference_steps must be in [1, {MAX_STEPS}], "
                                                     f"got {p.num_inference_steps}")
    if not 0 <= p.guidance_scale <= MAX_GUIDANCE:
        raise ImageParamError("guidance_scale", f"guidance_scale must be in [0, {MAX_GUIDANCE:g}], "
                                                f"got {p.guidance_scale:g}")
