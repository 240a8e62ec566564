"""Score identity Distillation (SiD) losses as pure functions (the few-step SiD paper: score identity loss,
LSG, Zero-CFG, Anti-CFG, Diffusion-GAN).

Three UNets of the same architecture and prediction type (ε or v, the teacher's scheduler config
says which): the frozen teacher φ, the fake score network ψ (models the score of the generator's
own outputs) and the generator θ. Everything here works on x0 predictions computed by hand in fp32
from the scheduler's ᾱ (sid_pipeline.x0_from_output), never clipped: diffusers' `clip_sample` would
clamp x0 to [-1, 1] and cut the gradient the SiD loss sends through it. x0 is affine in the output at
a fixed x_t, so an ε teacher and a v teacher that denoise alike give the same x0s, gaps and SiD
loss; the fake network's own loss is its prediction type's MSE (ψ is trained like the teacher was).

Guidance convention (κ): ε̂^κ = ε̂(∅) + κ·(ε̂(c) − ε̂(∅)) (the same mix of v̂ for a v-prediction
UNet); κ = 1 is "no guidance" (one conditional pass), κ = 0 one unconditional pass. The four
scales of SiD-LSG: κ1 trains the fake network, κ2 and κ3 evaluate it in the generator loss (the α·L1
and the L2 term), κ4 evaluates the teacher.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# the chain math is shared with the served pipeline (models/ must not import trainers/)
from leanserve.models.sid_pipeline import (  # noqa: F401 - re-exported
    ModelFn,
    add_noise,
    chain_timesteps,
    denoising_target,
    generator_chain,
    noise_coefs,
    x0_from_output,
    x0_per_output,
)

GUIDANCES = ("lsg", "zero-cfg", "anti-cfg")
T_MIN, T_MAX = 20, 979  # noise levels the losses are drawn from: the extremes carry no signal
W_MIN = 1e-5  # floor of the per-sample normaliser w


@dataclass(frozen=True)
class Kappas:
    fake_train: float    # κ1: the fake network's own denoising loss
    fake_eval: float     # κ2: fake network in the generator loss, α·L1 term
    fake_eval_l2: float  # κ3: fake network in the generator loss, L2 term (tied to κ2 by every preset)
    real: float          # κ4: teacher in the generator loss

    @property
    def needs_uncond_fake(self) -> bool:
        """ψ's unconditional branch is used, so it must also be trained (context dropout, pitfall 6)."""
        return any(k != 1 for k in (self.fake_train, self.fake_eval, self.fake_eval_l2))

    def as_dict(self) -> dict[str, float]:
        return {"kappa1": self.fake_train, "kappa2": self.fake_eval, "kappa3": self.fake_eval_l2,
                "kappa4": self.real}


def guidance_kappas(guidance: str, kappa: float | None = None) -> Kappas:
    """The four κ of a strategy (spec §6).

    lsg: all four = κ (default 1.5). zero-cfg: teacher unguided (κ4 = 1), fake network sees only
    the empty prompt (κ1 = κ2 = κ3 = 0). anti-cfg: teacher unguided, the fake network at a negative
    κ (default −1) in both its training and its evaluation (κ1 = κ2 = κ3; the paper's values are
    unpublished, so the κ1 choice is ours and recorded with the model)."""
    if guidance == "lsg":
        k = 1.5 if kappa is None else kappa
        return Kappas(k, k, k, k)
    if guidance == "zero-cfg":
        if kappa is not None:
            raise ValueError("zero-cfg has no kappa (teacher at 1, fake network at 0)")
        return Kappas(0.0, 0.0, 0.0, 1.0)
    if guidance == "anti-cfg":
        k = -1.0 if kappa is None else kappa
        if k >= 0:
            raise ValueError(f"anti-cfg needs a negative kappa, got {k}")
        return Kappas(k, k, k, 1.0)
    raise ValueError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")


def unet_fn(unet, autocast: Callable | None = None) -> ModelFn:
    """A diffusers UNet2DConditionModel (or its bound `forward`) as a ModelFn (output in fp32; autocast optional)."""
    def output(x_t, t, embeds):
        if autocast is None:
            return unet(x_t, t, encoder_hidden_states=embeds, return_dict=False)[0].float()
        with autocast():
            return unet(x_t, t, encoder_hidden_states=embeds, return_dict=False)[0].float()
    return output


def guided_output(model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  kappa: float) -> torch.Tensor:
    """ε̂^κ (or v̂^κ): κ = 1 one conditional pass, κ = 0 one unconditional pass, otherwise one batched pass
    on [∅, c]."""
    if kappa == 1:
        return model_fn(x_t, t, cond)
    if kappa == 0:
        return model_fn(x_t, t, uncond.expand_as(cond))
    # repeat, not cat([x_t, x_t]): its backward sums both halves in one op, so two networks' gradients
    # reach x_t as one term each and cancel exactly when they are equal (zero-at-init)
    e_u, e_c = model_fn(x_t.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([uncond.expand_as(cond), cond])).chunk(2)
    return e_u + kappa * (e_c - e_u)


def fake_loss(fake: ModelFn, x_g: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond, uncond, kappa1: float,
              alphas_cumprod, prediction_type: str) -> torch.Tensor:
    """Denoising score matching of ψ on (detached) generator samples, per sample, in ψ's own prediction
    type: Σ_CHW (ε̂^κ1_ψ − ε)², or Σ_CHW (v̂^κ1_ψ − v)² [B] (= the ε form / ᾱ_t: same minimiser, the
    weighting the teacher was trained with)."""
    x_g = x_g.detach()
    x_t = add_noise(x_g, eps, t, alphas_cumprod)
    target = denoising_target(x_g, eps, t, alphas_cumprod, prediction_type)
    return (guided_output(fake, x_t, t, cond, uncond, kappa1) - target).square().sum(dim=(1, 2, 3))


def x0_gap(out_real: torch.Tensor, out_fake: torch.Tensor, t: torch.Tensor, alphas_cumprod,
           prediction_type: str) -> torch.Tensor:
    """f_φ − f_ψ = −(∂x̂0/∂output)·(out_ψ − out_φ) (ε: (s_t / a_t)·(ε̂_ψ − ε̂_φ)), fp32. Mathematically
    x0(out_φ) − x0(out_ψ), but x_t never enters: when ψ = φ the two output gradients are exact negatives
    and cancel to an exact 0 in x_t's gradient, whereas through both x0's they would be summed with
    two x_t terms in autograd's order and round."""
    return -x0_per_output(alphas_cumprod, t, prediction_type) * (out_fake.float() - out_real.float())


def sid_normaliser(x_g: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
    """w = stopgrad(mean_CHW |x_g − y_r|) per sample, fp32, clamped at 1e-5."""
    return (x_g.float() - y_real.float()).abs().mean(dim=(1, 2, 3)).detach().clamp_min(W_MIN)


def sid_loss_terms(x_g: torch.Tensor, y_real: torch.Tensor, gap: torch.Tensor, gap_l2: torch.Tensor,
                   alpha: float) -> torch.Tensor:
    """Per-sample SiD loss Σ_CHW [(y_r − y_f3)·(y_r − x_g) − α·(y_r − y_f2)²] / w [B], given the gaps
    y_r − y_f2 (`gap`) and y_r − y_f3 (`gap_l2`), with w = stopgrad(mean_CHW |x_g − y_r|) clamped at 1e-5
    (the DMD-style normaliser replacing ω(t)·a²/s⁴). With κ2 = κ3 this is spec §3.2's
    (y_r − y_f)·[(y_r − x_g) − α·(y_r − y_f)] / w."""
    terms = gap_l2 * (y_real.float() - x_g.float()) - alpha * gap.square()
    return terms.sum(dim=(1, 2, 3)) / sid_normaliser(x_g, y_real)


@dataclass
class GeneratorLoss:
    per_sample: torch.Tensor  # [B], carries θ's graph (through x_g, teacher and fake Jacobians)
    w: torch.Tensor           # [B] the detached normaliser
    x_t: torch.Tensor
    y_real: torch.Tensor      # teacher's x0 at κ4
    y_fake: torch.Tensor      # fake network's x0 at κ2


def generator_loss(teacher: ModelFn, fake: ModelFn, x_g: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond,
                   uncond, kappas: Kappas, alpha: float, alphas_cumprod, prediction_type: str) -> GeneratorLoss:
    """The SiD generator loss (spec §3.2). The teacher and fake predictions are NOT computed under no_grad:
    their parameters are frozen by the caller, but x_t depends on θ, so the gradient flows through
    both networks' Jacobians. Only w is detached."""
    x_t = add_noise(x_g, eps, t, alphas_cumprod)
    out_real = guided_output(teacher, x_t, t, cond, uncond, kappas.real)
    out_fake = guided_output(fake, x_t, t, cond, uncond, kappas.fake_eval)
    out_fake_l2 = out_fake if kappas.fake_eval_l2 == kappas.fake_eval else \
        guided_output(fake, x_t, t, cond, uncond, kappas.fake_eval_l2)
    y_real = x0_from_output(out_real, x_t, t, alphas_cumprod, prediction_type)
    gap = x0_gap(out_real, out_fake, t, alphas_cumprod, prediction_type)
    gap_l2 = gap if out_fake_l2 is out_fake else x0_gap(out_real, out_fake_l2, t, alphas_cumprod, prediction_type)
    return GeneratorLoss(sid_loss_terms(x_g, y_real, gap, gap_l2, alpha), sid_normaliser(x_g, y_real), x_t, y_real,
                         y_real - gap)


# ---------------------------------------------------------------------------- Diffusion-GAN (spec §7)

def discriminator_logits(unet, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                         autocast: Callable | None = None) -> torch.Tensor:
    """The fake network's encoder as discriminator, zero extra parameters (SiDA): the bottleneck (the
    mid block's output) of its text-conditioned pass, averaged over channels -> logits [B, 1, h, w].
    Always the conditional pass, whatever κ the fake network's denoising output uses; the decoder's
    output of this pass is unused. The pass calls `unet.forward`, eagerly: a UNet compiled in place
    (distill sid --compile) runs a graph traced without this hook, which would then never fire."""
    captured = []
    handle = unet.mid_block.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        unet_fn(unet.forward, autocast)(x_t, t, cond)
    finally:
        handle.remove()
    return captured[0].float().mean(dim=1, keepdim=True)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic D loss per sample: ½·[BCE(D(real), 1) + BCE(D(fake), 0)], mean over positions [B]."""
    return 0.5 * (F.softplus(-logits_real) + F.softplus(logits_fake)).mean(dim=(1, 2, 3))


def gan_discriminator_loss(unet, x_real: torch.Tensor, x_g: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                           cond: torch.Tensor, alphas_cumprod, autocast: Callable | None = None) -> torch.Tensor:
    """D loss of the fake phase per sample [B]: real and (detached) generated images noised with the
    SAME t and the SAME ε, so D can only tell them apart by content, not by noise."""
    logits_real = discriminator_logits(unet, add_noise(x_real, eps, t, alphas_cumprod), t, cond, autocast)
    logits_fake = discriminator_logits(unet, add_noise(x_g.detach(), eps, t, alphas_cumprod), t, cond, autocast)
    return discriminator_loss(logits_real, logits_fake)


def adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator's term per sample: BCE(D(fake), 1) with logits clamped to [−10, 10], mean over positions [B]."""
    return F.softplus(-logits_fake.clamp(-10, 10)).mean(dim=(1, 2, 3))


def finite_samples(*tensors: torch.Tensor) -> torch.Tensor:
    """[B] bool: samples whose every tensor is finite (NaN guard: bad samples are dropped, spec §4)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for x in tensors:
        ok &= torch.isfinite(x.detach()).flatten(1).all(dim=1)
    return ok


def sample_timesteps(batch: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(T_MIN, T_MAX + 1, (batch,), generator=generator, device=device)


def ema_beta(batch_images: int, images_seen: int, half_life: float, ramp: float | None) -> float:
    """EDM-style EMA decay per step: half-life h = min(half_life, ramp·images_seen) images, β = 0.5^(B/h)."""
    h = half_life if ramp is None else min(half_life, ramp * images_seen)
    return 0.5 ** (batch_images / max(h, 1e-8))
