"""Aioli's pieces (trainers/aioli.py) on synthetic losses: LearnParams un-mixing, normalisation, the
EGD step and its p_min floor, the round schedule on a toy model that follows the linear law exactly,
and an exact resume of the schedule's state."""
from __future__ import annotations

import pytest
import torch

from leanserve.errors import UserError
from leanserve.trainers.aioli import (
    Aioli,
    AioliConfig,
    LearnParams,
    egd_update,
    floor_mixture,
    normalise,
    one_hot_mixtures,
)


def random_law(m: int, seed: int) -> torch.Tensor:
    """A with positive and negative entries (negative: training on j raises i's loss)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, m, generator=g, dtype=torch.float64) - 0.3


@pytest.mark.parametrize("m, f, sweeps", [(2, 0.625, 4), (3, 0.5, 4), (5, 0.6, 2), (7, 0.75, 1)])
def test_learn_params_recovers_a_linear_law(m, f, sweeps):
    A = random_law(m, seed=m)
    P = one_hot_mixtures(m, f)
    assert torch.allclose(P.sum(1), torch.ones(m, dtype=torch.float64)) and torch.equal(P, P.T)
    lp = LearnParams.draw(P, sweeps, torch.Generator().manual_seed(0))
    assert sorted(lp.order.tolist()) == sorted(list(range(m)) * sweeps)  # every group once per sweep
    # losses that follow L_after = L_before - A p for each interval's mixture, from a drifting start
    before = torch.linspace(5, 3, m, dtype=torch.float64)
    for interval in range(sweeps * m):
        after = before - A @ lp.mixture(interval)
        lp.observe(interval, before, after)
        before = after
    assert torch.allclose(lp.estimate(), A, atol=1e-12)
    # the diagonal ablation keeps only A_ii (its beta_ii / f also carries the others' leakage)
    diag = lp.estimate(diagonal=True)
    assert torch.equal(diag, torch.diag(torch.diagonal(diag)))
    assert torch.allclose(torch.diagonal(diag), torch.diagonal(A @ P) / f)


def test_normalise_is_non_negative_and_sums_to_one():
    for seed in range(5):
        A_bar = normalise(random_law(4, seed))
        assert A_bar.min() == 0 and A_bar.sum().item() == pytest.approx(1)
    positive = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    assert torch.allclose(normalise(positive), positive / 8)  # no shift when nothing is negative
    assert torch.allclose(normalise(torch.zeros(3, 3, dtype=torch.float64)), torch.full((3, 3), 1 / 9,
                                                                                          dtype=torch.float64))


def test_egd_step():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    A_bar = normalise(random_law(3, 1))
    assert torch.allclose(egd_update(p, A_bar, 0.0), p)  # eta 0: a no-op
    q = egd_update(p, A_bar, 0.5)
    expected = p * torch.exp(0.5 * A_bar.sum(0))
    assert torch.allclose(q, expected / expected.sum())
    # with normalised A one step changes any p_j by at most a factor e^eta
    assert (q / p).max() <= torch.exp(torch.tensor(0.5)) and (q / p).min() >= torch.exp(torch.tensor(-0.5))


@pytest.mark.parametrize("p_min", [0.0, 0.02, 0.1, 0.19])
def test_egd_stays_on_the_simplex_above_p_min(p_min):
    g = torch.Generator().manual_seed(3)
    p = torch.full((5,), 0.2, dtype=torch.float64)
    for _ in range(200):  # large steps toward whatever group the random law favours
        p = egd_update(p, normalise(torch.randn(5, 5, generator=g, dtype=torch.float64)), eta=8.0, p_min=p_min)
        assert p.sum().item() == pytest.approx(1, abs=1e-12)
        assert (p >= p_min - 1e-12).all() and (p > 0).all()
    assert p.min() < 0.2  # the steps did move mass


def test_floor_mixture_keeps_the_order_of_the_free_entries():
    p = torch.tensor([1e-6, 0.01, 0.3, 0.689999], dtype=torch.float64)
    q = floor_mixture(p, 0.05)
    assert q[:2].tolist() == [0.05, 0.05] and q.sum().item() == pytest.approx(1)
    assert q[2] / q[3] == pytest.approx(p[2] / p[3])  # the rest is rescaled, not shifted
    assert torch.equal(floor_mixture(p, 0.0), p)


class ToyModel:
    """Group losses that follow the linear dynamic law exactly: each step on mixture p lowers them by A p."""

    def __init__(self, A: torch.Tensor):
        self.A, self.losses, self.evaluations = A, torch.full((len(A),), 6.0, dtype=torch.float64), 0

    def evaluate(self) -> torch.Tensor:
        self.evaluations += 1
        return self.losses.clone()

    def step(self, p: torch.Tensor):
        self.losses = self.losses - 1e-3 * self.A @ p


def run(aioli: Aioli, model: ToyModel, steps: range) -> list[torch.Tensor]:
    used = []
    for step in steps:
        p = aioli.weights(step, model.evaluate)
        assert p.sum().item() == pytest.approx(1)
        model.step(p)
        used.append(p.clone())
    return used


def test_aioli_moves_toward_the_largest_column_sum():
    # group 2 helps every group most (largest column sum); group 0 mostly helps only itself
    A = torch.tensor([[1.0, 0.1, 0.5], [0.0, 0.2, 0.6], [0.1, 0.1, 0.9]], dtype=torch.float64)
    config = AioliConfig(round_steps=40, sweeps=2, lp_steps=3, one_hot=0.6, eta=0.5)
    model, aioli = ToyModel(A), Aioli(config, m=3, total_steps=800, seed=0)
    used = run(aioli, model, range(800))
    # every round: one evaluation before LearnParams and one after each of its k m intervals
    assert len(aioli.rounds) == 20 and model.evaluations == 20 * (2 * 3 + 1)
    for record in aioli.rounds:
        A_hat = torch.tensor(record["A_hat"], dtype=torch.float64)
        assert torch.allclose(A_hat, A * 1e-3 * config.lp_steps, atol=1e-12)
    shares = torch.stack([torch.tensor(r["p"]) for r in aioli.rounds])
    assert (shares[1:, 2] > shares[:-1, 2]).all() and shares[-1].argmax() == 2 and shares[-1, 2] > 0.8
    # LearnParams steps train on the smoothed one-hot mixtures, the rest of the round on p^t
    assert any(torch.equal(used[0], row) for row in aioli.P)
    assert torch.equal(used[39], torch.tensor(aioli.rounds[0]["p"], dtype=torch.float64))


def test_aioli_prior_ema_and_max_rounds():
    A = torch.tensor([[0.2, 0.0], [0.3, 1.0]], dtype=torch.float64)
    prior = (0.9, 0.1)
    config = AioliConfig(round_steps=20, sweeps=1, lp_steps=2, eta=1.0, ema=0.5, prior=prior, prior_steps=15,
                         max_rounds=2)
    aioli = Aioli(config, m=2, total_steps=200, seed=0)
    used = run(aioli, ToyModel(A), range(200))
    assert all(p.tolist() == list(prior) for p in used[:15])
    assert [r["step"] for r in aioli.rounds] == [19, 39]  # 15 + 4 LearnParams steps; then capped
    assert all(torch.equal(p, used[-1]) for p in used[39:])
    # EMA: a step from uniform on the smoothed matrix, not a cumulative one
    A1, A2 = (torch.tensor(r["A_bar"], dtype=torch.float64) for r in aioli.rounds)
    ema = 0.5 * A2 + 0.5 * A1
    assert torch.allclose(torch.tensor(aioli.rounds[1]["p"], dtype=torch.float64),
                          torch.softmax(1.0 * ema.sum(0), 0))


def test_state_round_trip_resumes_exactly():
    A = random_law(3, 7).abs()
    config = AioliConfig(round_steps=30, sweeps=2, lp_steps=2, eta=0.7, p_min=0.05)
    straight_model, straight = ToyModel(A), Aioli(config, m=3, total_steps=150, seed=4)
    straight_used = run(straight, straight_model, range(150))

    model, first = ToyModel(A), Aioli(config, m=3, total_steps=150, seed=4)
    used = run(first, model, range(37))  # stop inside the second round's LearnParams phase
    state = first.state_dict()
    resumed = Aioli(config, m=3, total_steps=150, seed=999)  # the seed is overwritten by the state
    resumed.load_state_dict(state)
    used += run(resumed, model, range(37, 150))
    assert all(torch.equal(a, b) for a, b in zip(used, straight_used))
    strip = [{k: v for k, v in r.items() if k != "eval_seconds"} for r in resumed.rounds]
    assert strip == [{k: v for k, v in r.items() if k != "eval_seconds"} for r in straight.rounds]
    assert resumed.p_history == straight.p_history


@pytest.mark.parametrize("m, changes, message", [
    (1, {}, "at least two groups"),
    (3, {"round_steps": 24}, "must exceed the LearnParams phase"),
    (3, {"one_hot": 1 / 3}, "--aioli-one-hot"),
    (2, {"p_min": 0.5}, "--aioli-p-min"),
    (2, {"ema": 1.0}, "--aioli-ema"),
    (2, {"max_rounds": 0}, "--aioli-max-rounds"),
])
def test_config_errors(m, changes, message):
    with pytest.raises(UserError, match=message):
        AioliConfig(**changes).check(m)
