"""Load an image model directory for serving and eval, and switch its sampler.

Supported directories (diffusers layout, `leanserve.json` optional):
- leanserve's pixel-space pipeline (`leanserve train diffusion`), built by PixelDiffusionPipeline
  from leanserve's own code;
- SiD few-step generators (`leanserve distill sid`), built by leanserve's own SiDPipeline; their
  K-step chain is fixed by distillation, so `set_sampler` refuses them;
- standard Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`) and SDXL
  (`StableDiffusionXLPipeline`) directories, built by diffusers.
No code from a model directory is ever run: a directory whose pipeline or components are custom
code (a `.py` file next to the weights) is refused. Weights are read from safetensors only.

Every pipeline takes the same call (diffusers' convention): `pipe(prompt=[...], negative_prompt=[...]
| None, num_inference_steps=, guidance_scale=, generator=[one per image], height=, width=,
output_type="np").images` -> float [N, H, W, 3] in [0, 1].

A DPM-OT directory (`leanserve train dpm-ot`) is its teacher's directory plus an OT map, which
`load_ot_map` reads and checks against the loaded pipeline. For serving, models/image_model.py
wraps a loaded pipeline with what it can serve.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from leanserve.errors import UserError
from leanserve.models.image_params import SizeLimits

# sampler name -> (diffusers scheduler class, settings forced on top of the pipeline's scheduler config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    # x0 is never clipped (DDIM/DDPM default to clip_sample=True, which is wrong for latents and
    # for leanserve's teachers alike)
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}

PIXEL_PIPELINE = "PixelDiffusionPipeline"
SID_PIPELINE = "SiDPipeline"
OWN_PIPELINES = (PIXEL_PIPELINE, SID_PIPELINE)
DIFFUSERS_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def pipeline_class_name(model_dir: str | Path) -> str:
    """The pipeline class a directory's model_index.json names; UserError if it is not one we load."""
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        raise UserError(f"{model_dir} is not a diffusers pipeline directory (no model_index.json)")
    config = json.loads(index.read_text())
    name = config.get("_class_name")
    # our pipelines name the copy of their module saved beside the weights, e.g. ["sid_pipeline", class];
    # that copy is never imported: leanserve builds the class from its own code
    if isinstance(name, list) and len(name) == 2 and name[1] in OWN_PIPELINES:
        name = name[1]
    if name not in (*OWN_PIPELINES, *DIFFUSERS_PIPELINES):
        raise UserError(f"{model_dir}: pipeline {name!r} is not supported; leanserve loads "
                        f"{', '.join((*OWN_PIPELINES, *DIFFUSERS_PIPELINES))}")
    for component, value in config.items():
        if component.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        library = value[0]
        if library not in ("diffusers", "transformers") and not _is_diffusers_pipeline_module(library):
            raise UserError(f"{model_dir}: component {component} is custom code ({value}); leanserve runs no code "
                            "from model directories")
    return name


def _is_diffusers_pipeline_module(name: str) -> bool:
    # components shipped inside a diffusers pipeline package, e.g. SD's
    # ["stable_diffusion", "StableDiffusionSafetyChecker"]
    import diffusers.pipelines
    return hasattr(diffusers.pipelines, name)


def load_image_pipeline(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The directory's pipeline on `device` in `dtype`, with its per-call progress bar off (serving/eval)."""
    from leanserve.models.model_dir import check_complete, load_model_info

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"image model directory {model_dir} does not exist")
    check_complete(model_dir)
    info = load_model_info(model_dir)
    if info is not None and info.kind != "image":
        raise UserError(f"{model_dir} holds a {info.kind!r} model (leanserve.json), not an image model")
    name = pipeline_class_name(model_dir)
    if name == PIXEL_PIPELINE:
        from leanserve.models.pixel_pipeline import PixelDiffusionPipeline
        pipe = PixelDiffusionPipeline.from_pretrained(model_dir, dtype=dtype)
    elif name == SID_PIPELINE:
        from leanserve.models.sid_pipeline import SiDPipeline
        pipe = SiDPipeline.from_pretrained(model_dir, dtype=dtype)
    else:
        import diffusers
        pipe = getattr(diffusers, name).from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_ot_map(model_dir: str | Path, pipe):
    """The directory's DPM-OT map (leanserve.json's `ot_map`, else `ot_map.safetensors` if present) on
    the pipeline's device, or None; UserError if it does not fit `pipe` (schedule, image shape)."""
    from leanserve.models.dpm_ot_sampler import OT_MAP_FILE, OTMap
    from leanserve.models.model_dir import load_model_info

    info = load_model_info(model_dir)
    dpm_ot = info is not None and info.method == "dpm_ot"
    path = Path(model_dir) / (info.settings.get("ot_map", OT_MAP_FILE) if dpm_ot else OT_MAP_FILE)
    if not path.is_file():
        if dpm_ot:
            raise UserError(f"{model_dir}: leanserve.json says dpm_ot but {path.name} is missing")
        return None
    if not hasattr(pipe, "default_size"):
        raise UserError(f"{path}: DPM-OT maps are for pixel-space pipelines, not {type(pipe).__name__}")
    try:
        ot_map = OTMap.load(path, device=pipe.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    size = native_size(pipe)
    if ot_map.image_shape != (pipe.unet.config.in_channels, size, size):
        raise UserError(f"{path}: map images are {ot_map.image_shape}, the pipeline makes "
                        f"{(pipe.unet.config.in_channels, size, size)}")
    if not 0 <= ot_map.t_prime < len(pipe.scheduler.alphas_cumprod):
        raise UserError(f"{path}: t′ = {ot_map.t_prime} is outside the pipeline's schedule")
    alpha_bar = float(pipe.scheduler.alphas_cumprod[ot_map.t_prime])
    if abs(alpha_bar - ot_map.alpha_bar) > 1e-6:
        raise UserError(f"{path}: the map was built for ᾱ(t′={ot_map.t_prime}) = {ot_map.alpha_bar:.6g}, the "
                        f"pipeline's schedule gives {alpha_bar:.6g}")
    return ot_map


def native_size(pipe) -> int:
    """The image size (height = width) a pipeline's UNet was trained for."""
    if hasattr(pipe, "default_size"):
        return pipe.default_size
    size = pipe.unet.config.sample_size
    return (size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor


def size_limits(pipe) -> SizeLimits:
    """The sizes a pipeline serves: latent pipelines multiples of the VAE factor times the UNet's
    downsampling, pixel-space pipelines their native size only."""
    size = native_size(pipe)
    multiple = None
    if getattr(pipe, "vae", None) is not None:
        multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)
    return SizeLimits(size, size, multiple)


def set_sampler(pipe, name: str):
    """Replace `pipe.scheduler` with sampler `name` built from the current scheduler's config
    (same betas, training steps, prediction type and timestep spacing). Returns `pipe`."""
    import diffusers

    from leanserve.models.sid_pipeline import SiDPipeline

    if isinstance(pipe, SiDPipeline):
        # its scheduler only supplies ᾱ_t to the SiD chain; a new sampler would be silently ignored
        raise ValueError(f"a SiD few-step generator takes no sampler: its 1..{pipe.config.num_steps}-step chain "
                         "is fixed by distillation")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    class_name, overrides = SAMPLERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    return pipe
