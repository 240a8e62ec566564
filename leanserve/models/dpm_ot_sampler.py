"""DPM-OT sampling (Li et al., "DPM-OT: a new diffusion probabilistic model based on optimal
transport", ICCV 2023): one semi-discrete OT jump from x_T ~ N(0, I) to x_t′
(0 network evaluations), then K steps of a diffusers scheduler on a custom grid from t′ to 0.

The map is `ot_map.safetensors` in a model directory (written by `leanserve train dpm-ot`):
targets y_i [N, C, H, W] at noise level t′, their clean images x0_i, and the potentials h [N];
i*(x) = argmax_i (<x, y_i> + h_i) (kernels/ot_argmax.py). In the fresh-noise variant (§4) the
targets are the clean means a_t′·x0_i and the jump adds new noise s_t′·ε.

Assignments: "ot" (the solved map), "random" (a uniformly random target: the spec's mandatory
control, §7.6a) and "nearest" (h_i = -||y_i||²/2, i.e. the nearest target, no solve: §7.6b).

The K steps run through the pipeline's own call (`timesteps=` grid, `latents=` x_t′), so prompts
and classifier-free guidance work as for any sampler: an empty prompt is the paper's
unconditional setting, a text prompt is the spec's §10.3 extension (jump, then conditional steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

from leanserve.atomic import atomic_write
from leanserve.kernels.ot_argmax import ot_argmax
from leanserve.models.image_params import ImageParamError, ImageParams

OT_MAP_FILE = "ot_map.safetensors"
DPM_OT = "dpm-ot"  # the sampler's name in the images API
ASSIGNMENTS = ("ot", "random", "nearest")
# samplers that accept a custom timestep grid: name -> (diffusers scheduler class, settings forced on
# top of the pipeline's scheduler config). DDIM η = 0 is DPM-Solver++ of order 1 (DDIMScheduler
# itself only runs on its own grid); DDPM is the stochastic (ancestral) analogue of the paper's sampler.
TAIL_SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 1}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "sde-dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("TailUniPCScheduler", {}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
}


class TailUniPCScheduler(UniPCMultistepScheduler):
    """UniPC that also accepts a custom descending timestep grid (upstream's set_timesteps takes
    only a step count); the spec's recipe: its own set_timesteps for the state reset, then the grid
    and its sigmas (with the trailing final sigma) written over."""

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None):
        if timesteps is None:
            return super().set_timesteps(num_inference_steps, device)
        if any(self.config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                            "use_flow_sigmas")):
            raise ValueError("custom timesteps need a plain (non-Karras/exponential/beta/flow) sigma grid")
        super().set_timesteps(len(timesteps), device)
        all_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        last = all_sigmas[0] if self.config.final_sigmas_type == "sigma_min" else torch.zeros(())
        grid = torch.tensor(timesteps, dtype=torch.int64)
        self.sigmas = torch.cat([all_sigmas[grid], last[None]]).float()
        self.timesteps = grid.to(device)


@dataclass
class OTMap:
    targets: torch.Tensor          # [N, C, H, W] y_i, what the OT problem was solved against
    x0: torch.Tensor               # [N, C, H, W] the clean images behind the targets (memorisation, floor)
    h: torch.Tensor                # [N] potentials
    t_prime: int
    alpha_bar: float               # ᾱ at t′ the targets were built with (checked against the pipeline)
    fresh_noise: bool = False      # targets are a·x0; the jump adds s·ε_new
    metadata: dict[str, str] = field(default_factory=dict)  # how targets were built, solver summary

    def __post_init__(self):
        n = self.targets.shape[0]
        if self.targets.dim() != 4 or self.x0.shape != self.targets.shape or self.h.shape != (n,):
            raise ValueError(f"need targets and x0 [N, C, H, W] and h [N]; got {tuple(self.targets.shape)}, "
                             f"{tuple(self.x0.shape)}, {tuple(self.h.shape)}")
        if not 0 < self.alpha_bar <= 1:
            raise ValueError(f"alpha_bar must be in (0, 1], got {self.alpha_bar}")

    @property
    def num_targets(self) -> int:
        return self.targets.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.targets.shape[1:])

    # ---- save / load (safetensors: tensors + a str -> str header)

    def save(self, path: str | Path):
        from safetensors.torch import save_file
        header = {**self.metadata, "t_prime": str(self.t_prime), "alpha_bar": repr(self.alpha_bar),
                  "fresh_noise": str(self.fresh_noise).lower()}
        tensors = {"targets": self.targets, "x0": self.x0, "h": self.h}
        with atomic_write(path) as tmp:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> OTMap:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in ("targets", "x0", "h")}
        try:
            t_prime, alpha_bar = int(header.pop("t_prime")), float(header.pop("alpha_bar"))
            fresh_noise = header.pop("fresh_noise") == "true"
        except KeyError as e:
            raise ValueError(f"{path}: not an OT map (no {e} in its header)") from None
        return cls(**tensors, t_prime=t_prime, alpha_bar=alpha_bar, fresh_noise=fresh_noise, metadata=header)

    # ---- the jump

    def assign(self, x_T: torch.Tensor, assignment: str = "ot",
               generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Target index per noise sample x_T [B, C, H, W] -> [B] int64."""
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        y = self.targets.flatten(1).to(x_T.device)
        if assignment == "random":
            gens = generator if isinstance(generator, list) else [generator] * x_T.shape[0]
            return torch.cat([torch.randint(self.num_targets, (1,), generator=g, device=g.device if g else "cpu")
                              for g in gens]).to(x_T.device)
        h = self.h if assignment == "ot" else -0.5 * self.targets.flatten(1).pow(2).sum(1)
        return ot_argmax(x_T.flatten(1).float().contiguous(), y.float(), h.float().to(x_T.device))[1]

    def jump(self, x_T: torch.Tensor, assignment: str = "ot",
             generator: torch.Generator | list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t′ [B, C, H, W], target index [B]) for noise x_T [B, C, H, W]."""
        from diffusers.utils.torch_utils import randn_tensor
        if tuple(x_T.shape[1:]) != self.image_shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape[1:])} per image, the map {self.image_shape}")
        idx = self.assign(x_T, assignment, generator)
        x = self.targets.to(x_T.device)[idx].float()
        if self.fresh_noise:
            noise = randn_tensor(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
            x = x + (1.0 - self.alpha_bar) ** 0.5 * noise
        return x, idx


def tail_timesteps(t_prime: int, num_steps: int) -> list[int]:
    """K descending integer timesteps uniform in t from t′ (included) towards 0; the scheduler's last
    step goes from the smallest one to the clean image."""
    if not 1 <= num_steps <= t_prime:
        raise ValueError(f"need 1 <= steps <= t′ = {t_prime} for distinct timesteps, got {num_steps}")
    return [int(t) for t in np.linspace(t_prime, 0, num_steps, endpoint=False).round()]


def tail_scheduler(pipe, sampler: str):
    """A fresh scheduler (no multistep state) of kind `sampler`, built from the pipeline's config."""
    import diffusers
    if sampler not in TAIL_SAMPLERS:
        raise ValueError(f"unknown DPM-OT sampler {sampler!r}; choose from {', '.join(TAIL_SAMPLERS)}")
    class_name, overrides = TAIL_SAMPLERS[sampler]
    cls = TailUniPCScheduler if class_name == TailUniPCScheduler.__name__ else getattr(diffusers, class_name)
    return cls.from_config(pipe.scheduler.config, **overrides)


@dataclass
class DPMOTOutput:
    images: object                 # as the pipeline's output_type gives them
    target_indices: torch.Tensor   # [B] the target each image jumped to (unique count: spec §7.1)
    jump_rms: torch.Tensor         # [B] ‖x_T − x_t′‖ / √d: the coupling's cost, which OT minimises (nearest: lower,
                                   # unbalanced), where the law of the images cannot tell OT from a random target


@torch.no_grad()
def dpm_ot_generate(pipe, ot_map: OTMap, prompt: str | list[str] = "", *, num_inference_steps: int = 10,
                    sampler: str = "ddpm", assignment: str = "ot", guidance_scale: float = 1.0,
                    num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                    output_type: str = "np", **kwargs) -> DPMOTOutput:
    """OT jump then `num_inference_steps` network steps (NFE = K, ×2 in one batch with guidance).

    `generator` (one per image, or one for all) draws x_T, then the random assignment or the fresh
    noise, then the scheduler's step noise. The pipeline's scheduler is left as it was.
    """
    from diffusers.utils.torch_utils import randn_tensor
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch = len(prompts) * num_images_per_prompt
    alpha_bar = float(pipe.scheduler.alphas_cumprod[ot_map.t_prime])
    if abs(alpha_bar - ot_map.alpha_bar) > 1e-6:
        raise ValueError(f"the OT map was built for ᾱ(t′={ot_map.t_prime}) = {ot_map.alpha_bar:.6g}, "
                         f"this pipeline's schedule gives {alpha_bar:.6g}")
    device = pipe._execution_device
    x_T = randn_tensor((batch, *ot_map.image_shape), generator=generator, device=device, dtype=torch.float32)
    x, idx = ot_map.jump(x_T, assignment, generator)
    scheduler = tail_scheduler(pipe, sampler)
    if scheduler.init_noise_sigma != 1.0:
        raise ValueError(f"sampler {sampler!r} scales its start ({scheduler.init_noise_sigma}); x_t′ is unscaled")
    original, pipe.scheduler = pipe.scheduler, scheduler
    try:
        _, height, width = ot_map.image_shape
        images = pipe(prompt=prompts, num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale,
                      timesteps=tail_timesteps(ot_map.t_prime, num_inference_steps), latents=x, height=height,
                      width=width, generator=generator, output_type=output_type, **kwargs).images
    finally:
        pipe.scheduler = original
    return DPMOTOutput(images=images, target_indices=idx, jump_rms=(x - x_T).flatten(1).pow(2).mean(1).sqrt())


class OTSampler:
    """Sampler "dpm-ot" of a served model whose directory carries an OT map (`leanserve train dpm-ot`):
    the OT jump from x_T to x_t′ (no network call), then `num_inference_steps` = K steps of
    dpm_ot_generate's default tail (DDPM ancestral, spec dpm_ot §5) from t′ to 0; 1 <= K <= t′. The
    per-image generators draw x_T, then the step noise, so seeds behave as for the other samplers.
    NFE = K: the jump is a lookup and costs no network call (with guidance_scale > 1 each step
    batches the two CFG branches, i.e. 2K UNet rows)."""
    name = DPM_OT

    def __init__(self, ot_map: OTMap):
        self.ot_map = ot_map

    def check_inputs(self, p: ImageParams) -> None:
        t_prime = self.ot_map.t_prime
        if p.num_inference_steps > t_prime:
            raise ImageParamError("num_inference_steps", f"{DPM_OT} runs num_inference_steps from its jump "
                                                         f"target t′ = {t_prime}: at most "
                                                         f"{t_prime}, got {p.num_inference_steps}")

    def generate(self, pipe, *, height: int, width: int, **kwargs):
        """One batched call with `pipe`'s own call arguments; the map fixes the size (it was checked
        against the pipeline's at load), so height and width are not passed on."""
        return dpm_ot_generate(pipe, self.ot_map, **kwargs).images
