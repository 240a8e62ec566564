"""PixelDiffusionPipeline: text-to-image diffusion straight in pixel space (no VAE).

Components: `unet` (UNet2DConditionModel, in/out channels 3; it predicts what the scheduler
config's `prediction_type` says, ε or v), `text_encoder` (a CLIPTextModel; the UNet cross-attends to
its last hidden state at every position, padding included, as in Stable Diffusion), `tokenizer` (any
transformers tokenizer with a pad token; prompts are padded to its `model_max_length`) and
`scheduler`. Images are x in [-1, 1]; the output is clamp((x + 1) / 2).

The teacher's noise schedule, shared with SiD and DPM-OT (see `teacher_scheduler`): DDPM betas
`scaled_linear` 0.00085 -> 0.012 over 1000 steps (SD's, so SD constants such as SiD's t_init carry
over), `clip_sample=False` (x0 is never clipped: clipping is not part of the model and would bias
few-step samplers) and "trailing" timestep spacing: the first step of every grid is t = 999, where
x_T ~ N(0, I) matches what the model was trained on; SD's "leading" spacing starts at t = 981 for 50
steps and at t = 1 for one step (Lin et al. 2023, "Common diffusion noise schedules and sample steps
are flawed"). Two variants of it: ε-prediction on SD's betas (the first zoo teacher), whose x_999
still holds √ᾱ = 0.068 of the image, enough for a denoiser to read the background and the object's
position off its input instead of the prompt (`leanserve eval leakage` measures it), so that
sampling from pure noise ignores those words; and, from the same paper, the betas rescaled to zero
terminal SNR (diffusers' `rescale_betas_zero_snr`: ᾱ_999 = 0, x_999 is pure noise) with
v-prediction (ε is not learnable at SNR 0: x_999 = ε). Every sampler reads both settings from the
saved scheduler config. Guidance is applied to the model output whatever it predicts (ε and v are
affine in each other at a fixed x_t, so guiding one is guiding the other); `guidance_rescale` is the
paper's CFG rescale (diffusers' `rescale_noise_cfg`).

Self-contained on purpose: this file imports only torch, transformers and diffusers, because
`save_pretrained` copies it into the model directory as `pixel_pipeline.py` and names it in
model_index.json (`"_class_name": ["pixel_pipeline", "PixelDiffusionPipeline"]`). That is how
diffusers resolves a pipeline class it does not ship, so plain diffusers loads the directory with

    DiffusionPipeline.from_pretrained(model_dir, trust_remote_code=True)

leanserve never runs that copy: `PixelDiffusionPipeline.from_pretrained` builds each component
from the library class model_index.json names (diffusers' generic loader would import the copy).
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    SchedulerMixin,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MODULE_NAME = "pixel_pipeline"  # the file name save_pretrained gives its copy of this module
OUTPUT_TYPES = ("np", "pil", "pt", "latent")


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a teacher's UNet may predict


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def teacher_scheduler(prediction_type: str = "epsilon", rescale_betas_zero_snr: bool = False) -> DDIMScheduler:
    """The scheduler a new teacher is trained with and saved with (see the module docstring)."""
    check_prediction_type(prediction_type)
    if rescale_betas_zero_snr and prediction_type == "epsilon":
        # at ᾱ_T = 0, x_T = ε: predicting ε is trivial there and x0 = (x_T - ε) / 0 is undefined
        raise ValueError("zero terminal SNR needs prediction_type v_prediction (ε gives no x0 at t = T)")
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, rescale_betas_zero_snr=rescale_betas_zero_snr, clip_sample=False,
        timestep_spacing="trailing",
        # unused by trailing spacing; 1 is what StableDiffusionPipeline insists on (latent teachers)
        steps_offset=1,
        # pixel space: the last step lands on the clean image (alpha_bar = 1), not on t = 0's tiny noise
        set_alpha_to_one=True)


class PixelDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerBase,
                 scheduler: SchedulerMixin):
        super().__init__()
        if unet.config.in_channels != 3 or unet.config.out_channels != 3:
            raise ValueError(f"a pixel-space UNet has 3 input and output channels, got "
                             f"{unet.config.in_channels} -> {unet.config.out_channels}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (prompts are padded to a fixed length)")
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)
        self._interrupt = False

    @property
    def default_size(self) -> int:
        """The resolution the UNet was trained at (height = width)."""
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (one halving per down block but the last)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from callback_on_step_end) to stop a call after the current step."""
        return self._interrupt

    # ---- save / load

    # the module saved beside the weights, which plain diffusers loads with trust_remote_code;
    # subclasses defined in other modules name their own
    _module_file, _module_name = __file__, MODULE_NAME

    def save_pretrained(self, save_directory: str | Path, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        save_directory = Path(save_directory)
        shutil.copyfile(self._module_file, save_directory / f"{self._module_name}.py")
        index = save_directory / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = [self._module_name, type(self).__name__]
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, dtype: torch.dtype | None = None,
                        **kwargs) -> "PixelDiffusionPipeline":
        """Load a local directory written by `save_pretrained` (safetensors only), running no code from it."""
        if kwargs:
            raise TypeError(f"unsupported arguments {sorted(kwargs)}: only a local directory and dtype")
        root = Path(pretrained_model_name_or_path)
        index = root / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{root} is not a pipeline directory (no model_index.json)")
        config = json.loads(index.read_text())
        components = {}
        for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
            library, class_name = config.get(name) or (None, None)
            component_cls = getattr(importlib.import_module(library), class_name, None) \
                if library in ("diffusers", "transformers") else None
            if not (isinstance(component_cls, type) and issubclass(
                    component_cls, (ModelMixin, PreTrainedModel, PreTrainedTokenizerBase, SchedulerMixin))):
                raise ValueError(f"{index}: component {name} is {[library, class_name]}, "
                                 "not a diffusers or transformers class")
            is_model = issubclass(component_cls, (ModelMixin, PreTrainedModel))
            options = {"dtype": dtype, "use_safetensors": True} if is_model else {}
            components[name] = component_cls.from_pretrained(root / name, **options)
        pipe = cls(**components)
        pipe.register_to_config(_name_or_path=str(root))
        return pipe

    # ---- prompts

    def _encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                return_attention_mask=True, return_tensors="pt")
        # only a row that fills max_length can have been cut: tokenize those again to know (a served batch
        # pays the tokenizer once, not twice)
        full = [prompt for prompt, mask in zip(prompts, tokens.attention_mask) if mask.all()]
        if full and max(len(ids) for ids in self.tokenizer(full, verbose=False).input_ids) > max_length:
            logger.warning("prompt(s) longer than %d tokens were truncated", max_length)
        # a tuple, not a ModelOutput: ImageModel.enable_cuda_graphs replays this call as a CUDA graph
        return self.text_encoder(tokens.input_ids.to(device), return_dict=False)[0]

    def encode_prompt(self, prompt: list[str], device: torch.device, num_images_per_prompt: int,
                      do_classifier_free_guidance: bool, negative_prompt: list[str] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds), each repeated per image: [p0, p0, p1, p1, ...].
        The negative embeddings are None without guidance; an absent negative prompt is ""."""
        embeds = self._encode(prompt, device).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return embeds, None
        negative = self._encode(negative_prompt or [""] * len(prompt), device)
        return embeds, negative.repeat_interleave(num_images_per_prompt, dim=0)

    # ---- sampling

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        # eta is DDIM's; the stochastic samplers (DDPM, ...) draw their step noise from the generator(s)
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def check_inputs(self, prompt: list[str], negative_prompt: list[str] | None, height: int, width: int,
                     batch_size: int, generator, latents, output_type: str, callback_on_step_end_tensor_inputs,
                     guidance_rescale: float = 0.0):
        if not prompt:
            raise ValueError("no prompt")
        if negative_prompt is not None and len(negative_prompt) != len(prompt):
            raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompt)} prompts")
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"height and width must be positive multiples of {m}, got {height}x{width}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for {batch_size} images (one per image)")
        if latents is not None and tuple(latents.shape) != (batch_size, 3, height, width):
            raise ValueError(f"latents must have shape {(batch_size, 3, height, width)}, got {tuple(latents.shape)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, "
                             f"got {sorted(unknown)}")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        timesteps: list[int] | None = None,
        guidance_scale: float = 3.0,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["PixelDiffusionPipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature
    ) -> ImagePipelineOutput | tuple:
        """Generate images; diffusers' text-to-image call convention.

        guidance_scale > 1 runs classifier-free guidance (conditional and unconditional in one UNet
        batch); <= 1 runs the conditional branch only. `guidance_rescale` in [0, 1] mixes in the guided
        output rescaled to the conditional one's std (Lin et al. 2023, §3.4; 0 is plain CFG).
        `generator` may be a list with one generator per image: each image's noise (initial and per
        step) then comes from its own generator, so an image does not depend on the batch it is
        generated in. `latents` replaces the initial
        noise x_T ([N, 3, H, W], before scaling by the scheduler's init_noise_sigma); `timesteps` is a
        custom descending grid (schedulers whose set_timesteps accepts one). output_type "latent"
        returns the final x in [-1, 1] space, unclamped.
        """
        height = height or self.default_size
        width = width or self.default_size
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        batch_size = len(prompt) * num_images_per_prompt
        self.check_inputs(prompt, negative_prompt, height, width, batch_size, generator, latents, output_type,
                          callback_on_step_end_tensor_inputs, guidance_rescale)
        self._interrupt = False
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt)
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        embeds = embeds.to(device=device, dtype=self.unet.dtype)

        timesteps, _ = retrieve_timesteps(
            self.scheduler, None if timesteps is not None else num_inference_steps, device, timesteps)
        # x and the scheduler math stay in float32 whatever the UNet's dtype: they cost nothing at
        # 3 channels, and a half-precision x drifts over many small steps
        if latents is None:
            latents = randn_tensor((batch_size, 3, height, width), generator=generator, device=device,
                                   dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(model_input.to(self.unet.dtype), t, encoder_hidden_states=embeds,
                                       return_dict=False)[0].float()
                if do_cfg:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                    if guidance_rescale > 0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_cond, guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        image = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
