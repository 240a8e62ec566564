"""Scheffé mixture surrogates and their constrained argmax (MoDoMoDo's outer loop, `leanserve mixture fit`).

On the simplex Σw = 1 an intercept, the linear terms and the squares are collinear, so the quadratic model
is written in Scheffé's canonical form, which has no redundancy there:

    ŷ(w) = Σ_i β_i w_i + Σ_{i<j} β_ij w_i w_j        (m + m(m−1)/2 terms)

fitted by ridge that penalises only the interaction terms (the β_i are the pure-mixture responses and
must not shrink to 0). For a fixed λ the leave-one-out residuals are exact without refitting:
H = X(XᵀX + Λ)⁻¹Xᵀ, e_loo,n = e_n / (1 − H_nn); λ is chosen on a log grid by LOO MSE, and
LOO R² = 1 − Σe_loo² / Σ(y − ȳ)². The linear Scheffé model (β_ij = 0) is fitted alike (nothing to
penalise) as the baseline it must beat.

The argmax: a quadratic extrapolates badly, so candidates stay within L1 distance r of an observed
mixture (the trust region); they are Dirichlet(1) samples plus samples near each pilot, scored by ŷ
(optionally ŷ − κ·se, se from the ridge covariance), the top k kept at pairwise L1 distance ≥ a minimum,
then polished by projected gradient ascent (∂ŷ/∂w_i = β_i + Σ_{j≠i} β_ij w_j, Euclidean projection onto
the simplex), never leaving the trust region.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAMBDAS = tuple(10.0 ** (k / 2) for k in range(-8, 5))  # 1e-4 .. 1e2


def pairs(m: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(m) for j in range(i + 1, m)]


def design(W: torch.Tensor, quadratic: bool) -> torch.Tensor:
    """[n, m] mixtures -> [n, m (+ m(m−1)/2)] Scheffé columns: w_i, then w_i·w_j for i < j."""
    W = W.to(torch.float64)
    if not quadratic:
        return W
    m = W.shape[1]
    return torch.cat([W, torch.stack([W[:, i] * W[:, j] for i, j in pairs(m)], 1)], 1) if m > 1 else W


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex (the sort-based method)."""
    v = v.to(torch.float64)
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = ((u - css / k) > 0).to(v.dtype).mul(k).argmax(-1, keepdim=True)  # the last index where it holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp(min=0)


def trust_distance(W: torch.Tensor, pilots: torch.Tensor) -> torch.Tensor:
    """[c] L1 distance of each candidate to its nearest observed mixture."""
    return torch.cdist(W.to(torch.float64), pilots.to(torch.float64), p=1).min(1).values


@dataclass
class Surrogate:
    m: int
    quadratic: bool
    theta: torch.Tensor  # [p] coefficients: β_i then β_ij (i < j)
    lam: float
    cov_unscaled: torch.Tensor  # (XᵀX+Λ)⁻¹ XᵀX (XᵀX+Λ)⁻¹: the ridge covariance over σ²
    sigma2: float  # residual variance, RSS / (n − tr H)
    loo_r2: float
    loo_mse: float
    r2: float
    loo_predictions: list[float]

    def predict(self, W: torch.Tensor) -> torch.Tensor:
        return design(W, self.quadratic) @ self.theta

    def se(self, W: torch.Tensor) -> torch.Tensor:
        X = design(W, self.quadratic)
        return ((X @ self.cov_unscaled) * X).sum(1).clamp(min=0).sqrt() * math.sqrt(self.sigma2)

    def gradient(self, W: torch.Tensor) -> torch.Tensor:
        """[c, m] ∂ŷ/∂w at each row."""
        W = W.to(torch.float64)
        grad = self.theta[:self.m].expand_as(W).clone()
        if self.quadratic:
            for k, (i, j) in enumerate(pairs(self.m)):
                b = self.theta[self.m + k]
                grad[:, i] += b * W[:, j]
                grad[:, j] += b * W[:, i]
        return grad

    def coefficients(self, names: list[str]) -> dict[str, float]:
        labels = list(names) + ([f"{names[i]}*{names[j]}" for i, j in pairs(self.m)] if self.quadratic else [])
        return dict(zip(labels, self.theta.tolist()))


def _ridge(X: torch.Tensor, y: torch.Tensor, penalty: torch.Tensor, lam: float):
    A = X.T @ X + lam * torch.diag(penalty)
    A_inv = torch.linalg.inv(A)
    theta = A_inv @ X.T @ y
    H = X @ A_inv @ X.T
    return theta, A_inv, H


def loo_residuals(X: torch.Tensor, y: torch.Tensor, penalty: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact leave-one-out residuals of the ridge fit with fixed λ: e_n / (1 − H_nn)."""
    theta, _, H = _ridge(X, y, penalty, lam)
    return (y - X @ theta) / (1 - torch.diagonal(H))


def fit(W, y, quadratic: bool, lambdas: tuple[float, ...] = LAMBDAS) -> Surrogate:
    """The Scheffé surrogate of y over the mixtures W ([n, m], rows on the simplex), λ by LOO MSE."""
    W, y = torch.as_tensor(W, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    n, m = W.shape
    X = design(W, quadratic)
    if n <= m:
        raise ValueError(f"{n} observations cannot fit a surrogate over {m} groups (need more than {m})")
    if torch.linalg.matrix_rank(W) < m:
        raise ValueError("the observed mixtures span fewer dimensions than the groups: every pure-mixture "
                         "response β_i needs mixtures that vary group i (add pilots)")
    penalty = torch.cat([torch.zeros(m), torch.ones(X.shape[1] - m)]).to(torch.float64)
    # the linear model has nothing to penalise: one λ (any) is the unpenalised fit
    grid = lambdas if quadratic and m > 1 else (0.0,)
    best = None
    for lam in grid:
        e = loo_residuals(X, y, penalty, lam)
        mse = float((e ** 2).mean())
        if math.isfinite(mse) and (best is None or mse < best[0]):
            best = (mse, lam, e)
    if best is None:
        raise ValueError("no λ of the grid gives a finite leave-one-out error (a pilot has leverage 1)")
    loo_mse, lam, e_loo = best
    theta, A_inv, H = _ridge(X, y, penalty, lam)
    resid = y - X @ theta
    sst = float(((y - y.mean()) ** 2).sum())
    dof = max(n - float(torch.trace(H)), 1e-9)
    return Surrogate(m=m, quadratic=quadratic, theta=theta, lam=lam, cov_unscaled=A_inv @ X.T @ X @ A_inv,
                     sigma2=float((resid ** 2).sum()) / dof,
                     loo_r2=1 - float((e_loo ** 2).sum()) / sst if sst > 0 else float("nan"),
                     loo_mse=loo_mse, r2=1 - float((resid ** 2).sum()) / sst if sst > 0 else float("nan"),
                     loo_predictions=(y - e_loo).tolist())


# --------------------------------------------------------------------------- constrained argmax

@dataclass
class Candidate:
    w: torch.Tensor
    predicted: float
    se: float
    score: float  # predicted − κ·se
    distance: float  # L1 to the nearest pilot


def _score(s: Surrogate, W: torch.Tensor, kappa: float) -> torch.Tensor:
    return s.predict(W) - kappa * s.se(W) if kappa else s.predict(W)


def polish(s: Surrogate, w: torch.Tensor, pilots: torch.Tensor, radius: float, kappa: float,
           avoid: list[torch.Tensor] = (), min_separation: float = 0.0, steps: int = 200,
           lr: float = 0.05) -> torch.Tensor:
    """Projected gradient ascent of ŷ from w; a step is taken only if it improves the score, stays in the
    trust region and keeps L1 ≥ min_separation from the mixtures in `avoid`, else the step size halves."""
    w = w[None].to(torch.float64)
    best = float(_score(s, w, kappa))
    for _ in range(steps):
        step = project_simplex(w + lr * s.gradient(w))
        value = float(_score(s, step, kappa))
        if (value > best and float(trust_distance(step, pilots)) <= radius
                and all(float((step[0] - a).abs().sum()) >= min_separation for a in avoid)):
            w, best = step, value
        else:
            lr /= 2
            if lr < 1e-6:
                break
    return w[0]


def argmax(s: Surrogate, pilots, *, k: int = 3, radius: float = 0.4, kappa: float = 0.0, samples: int = 100_000,
           near: int = 200, concentration: float = 50.0, min_separation: float = 0.2, seed: int = 0,
           polish_steps: int = 200) -> list[Candidate]:
    """Up to k mixtures of highest (pessimistic) predicted score in the trust region, pairwise L1 ≥
    min_separation, best first."""
    pilots = torch.as_tensor(pilots, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    m = s.m

    def dirichlet(alpha: torch.Tensor, count: int) -> torch.Tensor:
        # Dirichlet from normalised Gamma draws, so the generator (and hence the seed) fixes them
        g = torch._standard_gamma(alpha.expand(count, m).contiguous(), generator=gen)
        return g / g.sum(1, keepdim=True)

    cands = [dirichlet(torch.ones(m, dtype=torch.float64), samples), pilots]
    for p in pilots:  # a pilot with a zero weight gets a small floor: a Dirichlet needs positive α
        cands.append(dirichlet((concentration * p).clamp(min=0.05), near))
    C = torch.cat(cands)
    C = C[trust_distance(C, pilots) <= radius]
    C = C[torch.argsort(_score(s, C, kappa), descending=True)]
    chosen: list[torch.Tensor] = []
    while len(chosen) < k and len(C):
        # the best candidate still separated from those chosen, polished without coming closer to them
        w = polish(s, C[0], pilots, radius, kappa, avoid=chosen, min_separation=min_separation, steps=polish_steps)
        chosen.append(w)
        C = C[(C - w).abs().sum(1) >= min_separation]
    out = []
    for w in chosen:
        W = w[None]
        out.append(Candidate(w=w, predicted=float(s.predict(W)), se=float(s.se(W)),
                             score=float(_score(s, W, kappa)), distance=float(trust_distance(W, pilots))))
    return sorted(out, key=lambda c: -c.score)
