"""SiDPipeline: a few-step text-to-image generator distilled with SiD (leanserve distill sid).

Same components and directory layout as PixelDiffusionPipeline (unet, text_encoder, tokenizer,
scheduler), but the UNet is a generator, not a denoiser, and sampling is the SiD chain (the
few-step SiD paper's multistep generation) rather than a scheduler loop: start from pure scaled noise at t_init,
predict x0 in one UNet call, re-noise it with fresh noise to the next of the K timesteps
t_k = floor(t_init·(1 − (k−1)/K)), predict again. No classifier-free guidance (the guidance was
distilled in), one UNet call per step. The generator was trained on a uniform mixture of 1..K
steps, so any step count in 1..`num_steps` is valid. Like its teacher's UNet, of which it is a copy,
the generator outputs ε or v as the scheduler config's `prediction_type` says.

The chain math lives here (models/) and the trainer imports it, so training and serving unroll
the generator with the same code. model_index.json carries `t_init` and `num_steps`. Plain diffusers
loads a saved directory with `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` where
leanserve is installed (the copy of this file saved beside the weights imports leanserve's
PixelDiffusionPipeline); leanserve itself builds SiDPipeline from its own code.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from leanserve.models.image_params import ImageParamError, ImageParams
from leanserve.models.pixel_pipeline import PixelDiffusionPipeline, check_prediction_type

MODULE_NAME = "sid_pipeline"


def chain_timesteps(num_steps: int, t_init: int) -> list[int]:
    """t_k = floor(t_init·(1 − (k−1)/K)), k = 1..K: K=4, t_init=625 -> [625, 468, 312, 156]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [t_init * (num_steps - k) // num_steps for k in range(num_steps)]


def noise_coefs(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a_t = √ᾱ_t, s_t = √(1−ᾱ_t) per sample, shaped [B, 1, 1, 1], fp32."""
    ab = alphas_cumprod.to(device=t.device, dtype=torch.float64)[t].float().view(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a, s = noise_coefs(alphas_cumprod, t)
    return a * x0 + s * eps


def x0_from_output(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                   prediction_type: str) -> torch.Tensor:
    """x̂0 from a UNet's output in fp32 with per-sample t: (x_t − s·ε̂) / a, or a·x_t − s·v̂ for v = a·ε − s·x0
    (finite at a = 0, zero terminal SNR, where ε gives no x0). Never clipped, whatever the scheduler
    config says (clip_sample would clamp x0 to [-1, 1] and cut the gradient SiD sends through it)."""
    check_prediction_type(prediction_type)
    a, s = noise_coefs(alphas_cumprod, t)
    if prediction_type == "epsilon":
        return (x_t.float() - s * output.float()) / a
    return a * x_t.float() - s * output.float()


def x0_per_output(alphas_cumprod: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """∂x̂0/∂output per sample [B, 1, 1, 1]: −s/a (ε) or −s (v). x̂0 is affine in the output at a fixed x_t,
    so a difference of two x̂0s is this times the difference of the outputs, and guidance (a linear mix
    of outputs) is the same mix of x̂0s whatever the UNet predicts."""
    check_prediction_type(prediction_type)
    a, s = noise_coefs(alphas_cumprod, t)
    return -s / a if prediction_type == "epsilon" else -s


def denoising_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """What a UNet predicting `prediction_type` is trained to output at x_t = a·x0 + s·ε: ε, or v = a·ε − s·x0."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    a, s = noise_coefs(alphas_cumprod, t)
    return a * eps - s * x0


# model_fn(x_t, t [B], embeds) -> the UNet's output [B, C, H, W]: ε̂ or v̂, as its prediction_type says
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def generator_chain(model_fn: ModelFn, z: torch.Tensor, timesteps: list[int], cond: torch.Tensor, alphas_cumprod,
                    prediction_type: str, noise: Callable[[], torch.Tensor] | None = None,
                    grad: bool = False) -> torch.Tensor:
    """The generator's k-step unroll ("fresh" noise): x̂ = 0; for each t_k, x_k = a·x̂ + s·ε_k
    (ε_1 = z, later ε_k = noise()), x̂ = x0(θ(x_k)). Returns x̂ in fp32.

    With grad=True only the last call records a graph: steps 1..k−1 run under no_grad, so θ's
    gradient comes from the last call alone (no backpropagation through time, spec §4)."""
    x0 = torch.zeros_like(z, dtype=torch.float32)
    batch = z.shape[0]
    for i, step in enumerate(timesteps):
        t = torch.full((batch,), step, dtype=torch.long, device=z.device)
        eps_k = z if i == 0 else noise()
        with torch.set_grad_enabled(grad and i == len(timesteps) - 1):
            x_k = add_noise(x0, eps_k, t, alphas_cumprod)
            x0 = x0_from_output(model_fn(x_k, t, cond), x_k, t, alphas_cumprod, prediction_type)
    return x0


class SiDPipeline(PixelDiffusionPipeline):
    _module_file, _module_name = __file__, MODULE_NAME  # saved beside the weights (see PixelDiffusionPipeline)

    def __init__(self, unet, text_encoder, tokenizer, scheduler, t_init: int = 625, num_steps: int = 1):
        super().__init__(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        if not 0 < t_init < scheduler.config.num_train_timesteps:
            raise ValueError(f"t_init must be in [1, {scheduler.config.num_train_timesteps}), got {t_init}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.register_to_config(t_init=t_init, num_steps=num_steps)

    # ---- serving limits (what leanserve's ImageModel asks a pipeline that sets its own)

    samplers: tuple[str, ...] = ()  # the chain is fixed by distillation

    @property
    def default_steps(self) -> int:
        return self.config.num_steps

    def check_params(self, p: ImageParams, model_name: str) -> None:
        """`num_inference_steps` is one of 1..K (K, the generator's distilled step count, by default),
        guidance was distilled in (guidance_scale only 0 or 1, no negative prompt) and the chain admits
        no sampler: anything else is an ImageParamError (a 400), never a silent fix."""
        k = self.config.num_steps
        if not 1 <= p.num_inference_steps <= k:
            allowed = str(k) if k == 1 else f"1..{k}"
            raise ImageParamError("num_inference_steps", f"`{model_name}` is a SiD generator distilled for "
                                                         f"{allowed} steps: num_inference_steps must be one of "
                                                         f"{allowed}, got {p.num_inference_steps}")
        if p.guidance_scale not in (0.0, 1.0):
            raise ImageParamError("guidance_scale", f"`{model_name}` is a SiD generator with the guidance "
                                                    "distilled in: omit guidance_scale (or give 0 or 1), got "
                                                    f"{p.guidance_scale:g}")
        if p.negative_prompt is not None:
            raise ImageParamError("negative_prompt", f"`{model_name}` is a SiD generator with the guidance "
                                                     "distilled in: it takes no negative_prompt")
        if p.sampler is not None:
            raise ImageParamError("scheduler", f"`{model_name}` is a SiD generator: its few-step chain is fixed "
                                               f"by distillation and takes no sampler/scheduler, got {p.sampler!r}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, dtype: torch.dtype | None = None,
                        **kwargs) -> SiDPipeline:
        """Load a local directory written by `save_pretrained` (safetensors only), running no code from it."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, dtype=dtype, **kwargs)
        config = json.loads((Path(pretrained_model_name_or_path) / "model_index.json").read_text())
        pipe.register_to_config(t_init=int(config["t_init"]), num_steps=int(config["num_steps"]))
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float = 1.0,
    ) -> ImagePipelineOutput | tuple:
        """Generate with 1..num_steps generator calls (default: all). `latents` replaces z ([N, 3, H, W]);
        `generator` may hold one generator per image (z and every step's fresh noise come from it).
        negative_prompt and guidance_scale exist for call compatibility with the teacher; the
        generator takes no guidance (it was distilled in), so only their neutral values are accepted."""
        if negative_prompt is not None or guidance_scale not in (0.0, 1.0):
            raise ValueError("a SiD generator takes no classifier-free guidance (negative_prompt, guidance_scale)")
        steps = self.config.num_steps if num_inference_steps is None else num_inference_steps
        if not 1 <= steps <= self.config.num_steps:
            raise ValueError(f"this generator was distilled for 1..{self.config.num_steps} steps, got {steps}")
        height = height or self.default_size
        width = width or self.default_size
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        batch_size = len(prompt) * num_images_per_prompt
        self.check_inputs(prompt, None, height, width, batch_size, generator, latents, output_type, [])
        device = self._execution_device
        embeds, _ = self.encode_prompt(prompt, device, num_images_per_prompt, False)
        embeds = embeds.to(dtype=self.unet.dtype)
        shape = (batch_size, 3, height, width)
        z = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) if latents is None \
            else latents.to(device=device, dtype=torch.float32)

        def model_fn(x, t, c):
            return self.unet(x.to(self.unet.dtype), t, encoder_hidden_states=c, return_dict=False)[0]

        # the generator is a copy of its teacher's UNet: it predicts what the teacher's scheduler config says
        x0 = generator_chain(model_fn, z, chain_timesteps(steps, self.config.t_init), embeds,
                             self.scheduler.alphas_cumprod, self.scheduler.config.prediction_type,
                             noise=lambda: randn_tensor(shape, generator=generator, device=device, dtype=torch.float32))
        image = self.image_processor.postprocess(x0, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
