"""Aioli (Chen et al., "Aioli: A Unified Optimization Framework for Language Model Data Mixing",
ICLR 2025): the data mixture of `train lm --mixture aioli`, re-estimated online with zero extra runs.

The mixing law is linear and dynamic: one round of training on mixture p lowers the per-group
validation losses by A^t p. Every round of R steps starts with LearnParams (Alg. 2): k sweeps, each
a random order of the m groups, of lp_steps steps on the smoothed one-hot mixture P_j =
f e_j + (1-f)/(m-1) (1 - e_j); the loss drops of the m groups over each interval, summed per
mixture and divided by k, are beta = A P, so A = beta P^-1. These steps are ordinary training steps
(same optimizer and LR schedule, no rollback). A is normalised (shifted to >= 0, scaled to sum 1:
the large early drops would dominate otherwise) and the mixture takes an exponentiated-gradient
step p^t ∝ p^{t-1} exp(eta * column sums) (Alg. 1), with the EMA variant and a p_min floor as
options. The rest of the round trains on p^t.

`Aioli.weights(step, evaluate)` is the whole interface the trainer sees: the mixture of the batch of
`step`, given a callable that returns the m fixed-batch validation losses of the model as it is
now. It evaluates only at LearnParams interval boundaries (k m + 1 times a round), and holds all
its state (p, the LearnParams phase in progress, the permutation generator, the history) in
`state_dict()` for an exact resume.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from leanserve.data.mixture import uniform
from leanserve.errors import UserError


@dataclass(frozen=True)
class AioliConfig:
    round_steps: int = 200       # R
    sweeps: int = 4              # k
    lp_steps: int = 4            # steps per LearnParams interval
    one_hot: float = 0.6         # f of the smoothed one-hot mixtures
    eta: float = 0.2             # EGD step size
    ema: float | None = None     # gamma, the EMA's weight on the past; None: cumulative EGD (the paper's default)
    p_min: float = 0.0           # floor on every p_j (our guardrail; 0: off, as in the paper)
    diagonal: bool = False       # ablation: A_ii = beta_ii / f, no transfer between groups
    prior: tuple[float, ...] | None = None  # mixture of the first prior_steps steps (None: uniform)
    prior_steps: int = 0
    max_rounds: int | None = None  # rounds that estimate A; later ones keep the last p (1: "Aioli-static")

    def learn_steps(self, m: int) -> int:
        return self.sweeps * m * self.lp_steps

    def check(self, m: int):
        """UserError for settings under which the algorithm is undefined or silently degenerate."""
        if m < 2:
            raise UserError("--mixture aioli needs at least two groups")
        for name in ("round_steps", "sweeps", "lp_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--aioli-{name.replace('_', '-')} must be >= 1")
        if self.learn_steps(m) >= self.round_steps:
            raise UserError(f"--aioli-round-steps {self.round_steps} must exceed the LearnParams phase, "
                            f"sweeps x groups x lp-steps = {self.learn_steps(m)} steps")
        # P's eigenvalues are 1 and f - (1-f)/(m-1): f <= 1/m makes un-mixing singular or sign-flipped
        if not 1 / m < self.one_hot <= 1:
            raise UserError(f"--aioli-one-hot must be in (1/m, 1] = ({1 / m:.3g}, 1] for {m} groups")
        if not self.eta >= 0:
            raise UserError("--aioli-eta must be >= 0")
        if self.ema is not None and not 0 <= self.ema < 1:
            raise UserError("--aioli-ema must be in [0, 1)")
        if not 0 <= self.p_min < 1 / m:
            raise UserError(f"--aioli-p-min must be in [0, 1/m) = [0, {1 / m:.3g}) for {m} groups")
        if self.prior_steps < 0 or (self.max_rounds is not None and self.max_rounds < 1):
            raise UserError("--aioli-prior-steps must be >= 0 and --aioli-max-rounds >= 1")


# --------------------------------------------------------------------------- the pieces (Alg. 1-2)

def one_hot_mixtures(m: int, f: float) -> torch.Tensor:
    """P (symmetric): row j is f on group j and (1-f)/(m-1) on every other group."""
    off = (1 - f) / (m - 1)
    return torch.full((m, m), off, dtype=torch.float64) + (f - off) * torch.eye(m, dtype=torch.float64)


def unmix(beta: torch.Tensor, P: torch.Tensor, diagonal: bool = False) -> torch.Tensor:
    """A from beta = A P (beta[i, j]: drop of group i's loss per interval on mixture P_j)."""
    if diagonal:
        return torch.diag(torch.diagonal(beta) / P[0, 0])
    return torch.linalg.solve(P, beta.T).T  # P symmetric: row i of A is P^-1 beta[i]


def normalise(A: torch.Tensor) -> torch.Tensor:
    """Shift so the smallest entry is 0 (only if some entry is negative), then scale to sum 1."""
    A = A - A.min().clamp(max=0)
    total = A.sum()
    # all entries equal (e.g. all-zero loss drops): no group is preferred, every column sum is 1/m
    return A / total if total > 0 else torch.full_like(A, 1 / A.numel())


def floor_mixture(p: torch.Tensor, p_min: float) -> torch.Tensor:
    """Lift entries below p_min to it and rescale the others to fill the rest, until none is below:
    unlike clamp-then-renormalise-all, the floor then holds exactly (needs p_min < 1/m)."""
    if p_min <= 0:
        return p
    floored = torch.zeros_like(p, dtype=torch.bool)
    while True:
        free = p.masked_fill(floored, 0)
        scaled = torch.where(floored, p_min, free * (1 - p_min * int(floored.sum())) / free.sum())
        below = (scaled < p_min) & ~floored
        if not below.any():
            return scaled
        floored |= below


def egd_update(p: torch.Tensor, A_bar: torch.Tensor, eta: float, p_min: float = 0.0) -> torch.Tensor:
    """p_j ∝ p_j exp(eta sum_i A_bar[i, j]): the entropy-regularised step on the linear law, whose
    gradient in p_j is minus the column sum. Computed in log space, so it never under/overflows."""
    logits = torch.log(p) + eta * A_bar.sum(0)
    return floor_mixture(torch.softmax(logits, 0), p_min)


class LearnParams:
    """One LearnParams phase: its interval order (k random permutations of the groups) and beta."""

    def __init__(self, P: torch.Tensor, order: torch.Tensor, beta: torch.Tensor | None = None):
        self.P, self.order = P, order
        self.beta = torch.zeros_like(P) if beta is None else beta

    @classmethod
    def draw(cls, P: torch.Tensor, sweeps: int, generator: torch.Generator) -> LearnParams:
        return cls(P, torch.cat([torch.randperm(len(P), generator=generator) for _ in range(sweeps)]))

    def mixture(self, interval: int) -> torch.Tensor:
        return self.P[self.order[interval]]

    def observe(self, interval: int, before: torch.Tensor, after: torch.Tensor):
        self.beta[:, self.order[interval]] += before - after

    def estimate(self, diagonal: bool = False) -> torch.Tensor:
        return unmix(self.beta / (len(self.order) // len(self.P)), self.P, diagonal)


# --------------------------------------------------------------------------- the schedule

class Aioli:
    """Alg. 1 over the pretraining steps [0, total_steps): prior_steps on the prior mixture, then rounds
    of round_steps, each a LearnParams phase then p^t. A round whose LearnParams phase would not end
    before total_steps (or past max_rounds) keeps training on the last p."""

    def __init__(self, config: AioliConfig, m: int, total_steps: int, seed: int,
                 log: Callable[[str], None] | None = None):
        config.check(m)
        self.config, self.m, self.total_steps = config, m, total_steps
        self.log = log or (lambda message: None)
        self.learn_steps = config.learn_steps(m)
        self.P = one_hot_mixtures(m, config.one_hot)
        # the same on every rank: the interval order must agree across data-parallel ranks
        self.generator = torch.Generator().manual_seed(seed)
        self.prior = torch.tensor(config.prior, dtype=torch.float64) if config.prior else uniform(m)
        self.p = uniform(m)  # p^0: rounds start from uniform, after any prior (as the released code does)
        self.ema_matrix: torch.Tensor | None = None
        self.lp: LearnParams | None = None
        self.before: torch.Tensor | None = None
        self.eval_seconds = 0.0
        self.p_history = [{"step": 0, "p": self.prior.tolist()}]  # each mixture from the step it is used
        self.rounds: list[dict] = []

    def estimates(self, round_index: int) -> bool:
        start = self.config.prior_steps + round_index * self.config.round_steps
        capped = self.config.max_rounds is not None and round_index >= self.config.max_rounds
        return not capped and start + self.learn_steps < self.total_steps

    def weights(self, step: int, evaluate: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The mixture of the batch of `step` (0-based); calls `evaluate` (collective under DDP: every
        rank calls this with the same step) before a LearnParams phase and after each of its intervals."""
        c = self.config
        if step < c.prior_steps:
            return self.prior
        t, pos = divmod(step - c.prior_steps, c.round_steps)
        if not self.estimates(t) or pos > self.learn_steps:
            return self.p
        if pos == 0:
            self.lp, self.eval_seconds = LearnParams.draw(self.P, c.sweeps, self.generator), 0.0
            self.before = self._timed(evaluate)
        elif pos % c.lp_steps == 0:
            after = self._timed(evaluate)
            self.lp.observe(pos // c.lp_steps - 1, self.before, after)
            self.before = after
            if pos == self.learn_steps:
                self._update(step, t)
                return self.p
        return self.lp.mixture(pos // c.lp_steps)

    def _timed(self, evaluate) -> torch.Tensor:
        started = time.perf_counter()
        losses = torch.as_tensor(evaluate(), dtype=torch.float64)
        self.eval_seconds += time.perf_counter() - started
        return losses

    def _update(self, step: int, t: int):
        c = self.config
        A_hat = self.lp.estimate(c.diagonal)
        A_bar = normalise(A_hat)
        if c.ema is None:
            self.p = egd_update(self.p, A_bar, c.eta, c.p_min)
        else:  # EMA variant: smooth A, then one step from uniform
            self.ema_matrix = A_bar if self.ema_matrix is None else (1 - c.ema) * A_bar + c.ema * self.ema_matrix
            self.p = egd_update(uniform(self.m), self.ema_matrix, c.eta, c.p_min)
        self.lp, self.before = None, None
        record = {"round": t + 1, "step": step, "A_hat": A_hat.tolist(), "A_bar": A_bar.tolist(),
                  "column_sums": A_bar.sum(0).tolist(), "p": self.p.tolist(),
                  "eval_seconds": round(self.eval_seconds, 3)}
        self.rounds.append(record)
        self.p_history.append({"step": step, "p": self.p.tolist()})
        self.log(f"aioli round {t + 1} at step {step}: column sums "
                 + " ".join(f"{v:.3f}" for v in record["column_sums"])
                 + " -> p " + " ".join(f"{v:.3f}" for v in record["p"]))

    # ---- checkpoints

    def state_dict(self) -> dict:
        lp = self.lp
        return {"p": self.p, "ema_matrix": self.ema_matrix, "generator": self.generator.get_state(),
                "order": lp.order if lp else None, "beta": lp.beta if lp else None, "before": self.before,
                "eval_seconds": self.eval_seconds, "p_history": self.p_history, "rounds": self.rounds}

    def load_state_dict(self, state: dict):
        self.p, self.ema_matrix, self.before = state["p"], state["ema_matrix"], state["before"]
        self.generator.set_state(state["generator"])
        self.lp = LearnParams(self.P, state["order"], state["beta"]) if state["order"] is not None else None
        self.eval_seconds, self.p_history, self.rounds = state["eval_seconds"], state["p_history"], state["rounds"]

    def summary(self) -> dict:
        """What leanserve.json records: the settings, every round's estimate and mixture, p over steps."""
        return {"config": asdict(self.config), "rounds": self.rounds, "p_history": self.p_history}
