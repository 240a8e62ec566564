"""SGLD as a torch optimizer (plain, with a frozen RMSprop preconditioner, with momentum = SGHMC) and
the step-size schedules of SG-MCMC.

Units are an LM trainer's: the loss is the mean token loss L̄ over a minibatch, N the number of
training tokens, lr η = ε·N in terms of the potential U = N·L̄ − log p(θ) and a Gaussian prior
N(0, 1/(N λ)) written as coupled weight decay λ. One step samples π_T(θ) ∝ exp(−U(θ)/T):

    θ ← θ − η·G·(∇L̄_batch(θ) + λθ) + sqrt(2ηT/N)·sqrt(G) ⊙ ξ,    ξ ~ N(0, I)

G = 1 for plain SGLD; for pSGLD G = 1/(sqrt(v̂) + eps) from an RMSprop average v of squared
gradients, which adapts until `freeze_preconditioner()` and is fixed afterwards (an adaptive G
changes the target; the Γ correction term is dropped). With momentum m (SGHMC, friction 1 − m):

    b ← m·b − η·G·(∇L̄ + λθ) + sqrt(2η(1 − m)T/N)·sqrt(G) ⊙ ξ,    θ ← θ + b

which is SGLD for m = 0. The noise comes from torch's default generator of the parameter's device,
whose state the training checkpoints hold. Parameters must be fp32: bf16 rounding would erase
noise of ~1e-5 per step.
"""
from __future__ import annotations

import math

import torch

PRECONDITIONERS = (None, "frozen_rmsprop")


class SGLD(torch.optim.Optimizer):
    def __init__(self, params, lr: float, n_data: int, temperature: float = 1.0, weight_decay: float = 0.0,
                 precond: str | None = None, momentum: float = 0.0, noise: bool = True,
                 precond_beta: float = 0.99, precond_eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not n_data >= 1:
            raise ValueError(f"n_data must be >= 1, got {n_data}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if precond not in PRECONDITIONERS:
            raise ValueError(f"precond must be one of {PRECONDITIONERS}, got {precond!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        # everything per group, so that the optimizer's state_dict (the checkpoint) holds it all,
        # the preconditioner's frozen flag included
        defaults = dict(lr=lr, n_data=n_data, temperature=temperature, weight_decay=weight_decay, precond=precond,
                        momentum=momentum, noise=noise, precond_beta=precond_beta, precond_eps=precond_eps,
                        precond_frozen=False)
        super().__init__(params, defaults)

    def set_noise(self, on: bool) -> None:
        """Noise off = plain SGD (with momentum): the exploration phase of a cyclical schedule."""
        for group in self.param_groups:
            group["noise"] = on

    def freeze_preconditioner(self) -> None:
        """Fix G at its current RMSprop estimate: from now on the chain targets π_T exactly (up to step size)."""
        for group in self.param_groups:
            if group["precond"] is None or group["precond_frozen"]:
                continue
            for p in group["params"]:
                state = self.state[p]
                if "square_avg" not in state:
                    raise RuntimeError("freeze_preconditioner() before every parameter had a gradient: "
                                       "the preconditioner needs steps to estimate it")
                state["precond"] = self._rmsprop_precond(state, group)
                del state["square_avg"]
            group["precond_frozen"] = True

    @staticmethod
    def _rmsprop_precond(state: dict, group: dict) -> torch.Tensor:
        v_hat = state["square_avg"] / (1 - group["precond_beta"] ** state["steps"])
        return 1 / (v_hat.sqrt() + group["precond_eps"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            noise_std = math.sqrt(2 * lr * group["temperature"] / group["n_data"]) if group["noise"] else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32:
                    raise TypeError(f"SGLD needs fp32 parameters (master weights), got {p.dtype}")
                state = self.state[p]
                d = p.grad.add(p, alpha=group["weight_decay"])  # ∇L̄ + λθ, a new tensor
                sqrt_g = None
                if group["precond"] is not None:
                    if group["precond_frozen"]:
                        g = state["precond"]
                    else:
                        if "square_avg" not in state:
                            state["square_avg"], state["steps"] = torch.zeros_like(p), 0
                        state["steps"] += 1
                        state["square_avg"].mul_(group["precond_beta"]).addcmul_(d, d, value=1 - group["precond_beta"])
                        g = self._rmsprop_precond(state, group)
                    d.mul_(g)
                    sqrt_g = g.sqrt()
                if m:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    update = state["momentum_buffer"].mul_(m).add_(d, alpha=-lr)
                    std = noise_std * math.sqrt(1 - m)
                else:
                    update, std = d.mul_(-lr), noise_std
                if std:
                    xi = torch.randn_like(p)
                    if sqrt_g is not None:
                        xi.mul_(sqrt_g)
                    update.add_(xi, alpha=std)  # the momentum buffer carries the noise (SGHMC)
                p.add_(update)
        return loss


# ----------------------------------------------------------------------------- step-size schedules
# LR multipliers of step t (0-based) from the start of sampling.

def cyclical_scale(t: int, cycle_len: int) -> float:
    """cSG-MCMC (Zhang et al. 2020): η_k = (η_0/2)·[cos(π·mod(k−1, L)/L) + 1], k = t + 1, L the cycle length."""
    return 0.5 * (math.cos(math.pi * (t % cycle_len) / cycle_len) + 1)


def in_exploration(t: int, cycle_len: int, explore: float) -> bool:
    """Whether step t lies in the first `explore` fraction of its cycle, where cSG-MCMC turns the noise off."""
    return (t % cycle_len) < explore * cycle_len


def polynomial_scale(t: int, decay_steps: float, gamma: float) -> float:
    """ε_t = a·(b + t)^−γ (Welling & Teh) normalised to 1 at t = 0: (1 + t/b)^−γ, b = decay_steps."""
    return (1 + t / decay_steps) ** -gamma
