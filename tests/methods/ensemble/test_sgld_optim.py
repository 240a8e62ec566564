"""SGLD on the Gaussian toy of the spec: per-datum loss ½(θ − μ)ᵀΣ⁻¹(θ − μ) over N data, flat prior and
exact gradients, so the target π_T is N(μ, T·Σ/N). Many independent chains run as the rows of one
parameter; the sample mean and covariance over chains and time must match the target. Noise of
sqrt(2η) instead of sqrt(2ηT/N) (the classic bug) gives an N/T-fold covariance and fails."""
from __future__ import annotations

import math

import pytest
import torch

from leanserve.trainers.sgld_optim import SGLD, cyclical_scale, in_exploration, polynomial_scale

MU = torch.tensor([1.0, -2.0])
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 2.0]])
CHAINS = 500


def sample(optimizer_kwargs: dict, *, n_data: int, burn_in: int, steps: int, thin: int = 20,
           freeze_after_burn_in: bool = False, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    precision = torch.linalg.inv(SIGMA)
    # off the mode: at the mode the exact gradient is 0 and an RMSprop estimate would start at G = 1/eps
    theta = torch.nn.Parameter((MU + 1).repeat(CHAINS, 1))
    opt = SGLD([theta], n_data=n_data, **optimizer_kwargs)
    kept = []
    for t in range(burn_in + steps):
        # the exact gradient of the mean per-datum loss, for every chain (row) at once
        theta.grad = (theta.detach() - MU) @ precision
        opt.step()
        if t + 1 == burn_in and freeze_after_burn_in:
            opt.freeze_preconditioner()
        if t >= burn_in and (t - burn_in) % thin == 0:
            kept.append(theta.detach().clone())
    return torch.cat(kept)


@pytest.mark.parametrize("name, kwargs, n_data, freeze", [
    ("sgld", dict(lr=0.01), 100, False),
    ("sgld cold", dict(lr=0.01, temperature=0.3), 100, False),
    ("sgld larger N", dict(lr=0.01), 400, False),
    # the RMSprop estimate adapts during burn-in, then stays fixed while sampling
    ("psgld", dict(lr=2e-3, precond="frozen_rmsprop"), 100, True),
    ("psgld cold", dict(lr=2e-3, precond="frozen_rmsprop", temperature=0.3), 100, True),
    ("sghmc", dict(lr=0.002, momentum=0.8), 100, False),
    ("preconditioned sghmc", dict(lr=5e-4, momentum=0.8, precond="frozen_rmsprop"), 100, True),
])
def test_gaussian_toy_mean_and_covariance(name, kwargs, n_data, freeze):
    samples = sample(kwargs, n_data=n_data, burn_in=1500, steps=3000, freeze_after_burn_in=freeze)
    target = kwargs.get("temperature", 1.0) * SIGMA / n_data
    std = target.diag().sqrt()
    mean, cov = samples.mean(0), torch.cov(samples.T)
    assert ((mean - MU).abs() / std).max() < 0.1, (name, mean)
    # within ~10% of the target, relative to the scale of each entry's row and column
    assert ((cov - target).abs() / torch.outer(std, std)).max() < 0.1, (name, cov, target)


def test_frozen_preconditioner_stops_adapting():
    theta = torch.nn.Parameter(torch.ones(3))
    opt = SGLD([theta], lr=1e-3, n_data=10, precond="frozen_rmsprop", noise=False)
    for _ in range(5):
        theta.grad = torch.tensor([1.0, 10.0, 100.0])
        opt.step()
    opt.freeze_preconditioner()
    g = opt.state[theta]["precond"].clone()
    # RMSprop of a constant gradient: G = 1/|grad| after bias correction
    assert torch.allclose(g, torch.tensor([1.0, 0.1, 0.01]), rtol=1e-5)
    before = theta.detach().clone()
    theta.grad = torch.tensor([1000.0, 1000.0, 1000.0])
    opt.step()
    assert torch.equal(opt.state[theta]["precond"], g)
    assert torch.allclose(before - theta.detach(), 1e-3 * g * 1000.0)
    # the frozen state survives a state_dict round trip (a checkpoint)
    again = SGLD([torch.nn.Parameter(theta.detach().clone())], lr=1e-3, n_data=10, precond="frozen_rmsprop")
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["precond_frozen"] and not again.param_groups[0]["noise"]


def test_no_noise_is_sgd_with_coupled_weight_decay():
    theta = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    opt = SGLD([theta], lr=0.1, n_data=5, weight_decay=0.5, noise=False)
    theta.grad = torch.tensor([1.0, 1.0])
    opt.step()
    assert torch.allclose(theta.detach(), torch.tensor([2.0, -1.0]) - 0.1 * (torch.tensor([1.0, 1.0]) +
                                                                           0.5 * torch.tensor([2.0, -1.0])))


def test_refuses_bf16_parameters():
    theta = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    theta.grad = torch.ones(2, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="fp32"):
        SGLD([theta], lr=1e-3, n_data=10).step()


def test_schedules():
    # cosine from 1 down towards 0 within each cycle of 10 steps, restarting at 1
    assert [cyclical_scale(t, 10) for t in (0, 5, 10)] == [1.0, pytest.approx(0.5), 1.0]
    assert cyclical_scale(9, 10) == pytest.approx(0.5 * (math.cos(0.9 * math.pi) + 1))
    assert [in_exploration(t, 10, 0.3) for t in (0, 2, 3, 9, 10, 13)] == [True, True, False, False, True, False]
    assert polynomial_scale(0, 100, 0.55) == 1.0
    assert polynomial_scale(300, 100, 0.55) == pytest.approx(4 ** -0.55)
