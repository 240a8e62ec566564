"""The MoDoMoDo surrogate (spec B.5-B.6, B.9's unit tests): the Scheffé fit recovers known coefficients, the
LOO shortcut equals brute-force refits, the simplex projection and the trust region, the argmax, the
heuristics, and `leanserve mixture fit` end to end."""
from __future__ import annotations

import json

import pytest
import torch

from leanserve.cli import main
from leanserve.eval import mixture_heuristics as heur
from leanserve.eval import scheffe


def pilots(m: int = 4, n: int = 21, seed: int = 0) -> torch.Tensor:
    seeds = torch.tensor(list(heur.seed_mixtures(m).values()), dtype=torch.float64)
    torch.manual_seed(seed)
    extra = torch.distributions.Dirichlet(torch.ones(m, dtype=torch.float64)).sample((n - len(seeds),))
    return torch.cat([seeds, extra])


def quadratic_truth(m: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m + m * (m - 1) // 2, generator=g, dtype=torch.float64)


def test_fit_recovers_known_coefficients_from_noiseless_data():
    W = pilots()
    theta = quadratic_truth(4)
    y = scheffe.design(W, quadratic=True) @ theta
    s = scheffe.fit(W, y, quadratic=True)
    assert s.lam == min(scheffe.LAMBDAS)  # noiseless: the least shrinkage predicts held-out points best
    torch.testing.assert_close(s.theta, theta, atol=1e-2, rtol=0)  # what 1e-4 of shrinkage leaves
    torch.testing.assert_close(scheffe.fit(W, y, quadratic=True, lambdas=(1e-12,)).theta, theta)
    assert s.loo_r2 > 0.999
    linear = scheffe.fit(W, y, quadratic=False)
    assert linear.loo_r2 < s.loo_r2  # the interactions are real: the linear model misses them


def test_linear_truth_is_fitted_exactly_by_both_models():
    W = pilots()
    y = W @ torch.tensor([0.1, 0.5, 0.3, 0.9], dtype=torch.float64)
    torch.testing.assert_close(scheffe.fit(W, y, quadratic=False).theta,
                               torch.tensor([0.1, 0.5, 0.3, 0.9], dtype=torch.float64))
    assert scheffe.fit(W, y, quadratic=True).loo_r2 > 0.9999


@pytest.mark.parametrize("lam", [1e-3, 1.0, 30.0])
def test_loo_shortcut_equals_brute_force_refits(lam):
    W = pilots(seed=2)
    torch.manual_seed(3)
    y = scheffe.design(W, True) @ quadratic_truth(4, 5) + 0.05 * torch.randn(len(W), dtype=torch.float64)
    X = scheffe.design(W, True)
    penalty = torch.cat([torch.zeros(4), torch.ones(6)]).to(torch.float64)
    shortcut = scheffe.loo_residuals(X, y, penalty, lam)
    brute = []
    for n in range(len(y)):
        keep = torch.arange(len(y)) != n
        A = X[keep].T @ X[keep] + lam * torch.diag(penalty)
        theta = torch.linalg.solve(A, X[keep].T @ y[keep])
        brute.append(float(y[n] - X[n] @ theta))
    torch.testing.assert_close(shortcut, torch.tensor(brute, dtype=torch.float64))
    s = scheffe.fit(W, y, quadratic=True, lambdas=(lam,))
    sst = float(((y - y.mean()) ** 2).sum())
    assert s.loo_r2 == pytest.approx(1 - sum(e * e for e in brute) / sst)
    torch.testing.assert_close(torch.tensor(s.loo_predictions, dtype=torch.float64), y - torch.tensor(brute))


def test_interaction_terms_only_are_penalised():
    """With a huge λ the interactions vanish but the pure-mixture responses stay: the linear fit."""
    W = pilots()
    y = scheffe.design(W, True) @ quadratic_truth(4)
    heavy = scheffe.fit(W, y, quadratic=True, lambdas=(1e9,))
    linear = scheffe.fit(W, y, quadratic=False)
    assert heavy.theta[4:].abs().max() < 1e-6
    torch.testing.assert_close(heavy.theta[:4], linear.theta, atol=1e-6, rtol=0)


def test_simplex_projection_is_on_the_simplex_and_idempotent():
    torch.manual_seed(0)
    v = torch.randn(200, 5, dtype=torch.float64) * 3
    p = scheffe.project_simplex(v)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(200, dtype=torch.float64))
    torch.testing.assert_close(scheffe.project_simplex(p), p)
    # the nearest point: no simplex point (a Dirichlet sample) is closer to v
    q = torch.distributions.Dirichlet(torch.ones(5, dtype=torch.float64)).sample((200,))
    assert ((v - p).norm(dim=1) <= (v - q).norm(dim=1) + 1e-12).all()
    torch.testing.assert_close(scheffe.project_simplex(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)),
                               torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))


def test_trust_distance_is_l1_to_the_nearest_pilot():
    P = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    W = torch.tensor([[0.8, 0.2, 0.0], [0.0, 0.4, 0.6], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(scheffe.trust_distance(W, P), torch.tensor([0.4, 0.2, 1.0], dtype=torch.float64))


def test_argmax_stays_on_the_simplex_in_the_trust_region_and_finds_the_interior_peak():
    # ŷ = −Σ (w_i − c_i)² on the simplex, written in Scheffé form: the peak is c
    c = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    W = pilots()
    y = -((W - c) ** 2).sum(1)
    s = scheffe.fit(W, y, quadratic=True)
    found = scheffe.argmax(s, W, k=3, radius=0.4, samples=20_000, seed=0)
    assert len(found) == 3 and found[0].score >= found[1].score >= found[2].score
    for cand in found:
        assert (cand.w >= 0).all() and abs(float(cand.w.sum()) - 1) < 1e-9
        assert cand.distance <= 0.4 + 1e-12
    for a in range(3):
        for b in range(a):
            assert float((found[a].w - found[b].w).abs().sum()) >= 0.2
    torch.testing.assert_close(found[0].w, c, atol=5e-3, rtol=0)
    # a tight trust region around pilots far from the peak keeps the answer near those pilots
    far = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.9, 0.1, 0, 0]], dtype=torch.float64)
    tight = scheffe.argmax(s, far, k=1, radius=0.1, samples=5_000)
    assert tight[0].distance <= 0.1 + 1e-12


def test_fit_refuses_too_few_or_degenerate_pilots():
    with pytest.raises(ValueError, match="need more than"):
        scheffe.fit(torch.eye(3, dtype=torch.float64), torch.zeros(3), quadratic=True)
    W = torch.tensor([[0.5, 0.5, 0.0]] * 3 + [[0.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="span fewer"):
        scheffe.fit(W, torch.arange(6.0), quadratic=False)


def test_heuristics():
    assert list(heur.seed_mixtures(3).values()) == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0.5, 0.5], [0.5, 0, 0.5],
                                                    [0.5, 0.5, 0], [1 / 3] * 3]
    # leaving group 0 out hurt most (lowest score): group 0 gets the largest weight, at most 2x the smallest
    w, fallback = heur.norm_mixture([0.1, 0.5, 0.3])
    assert not fallback and w[0] > w[2] > w[1] and w[0] / w[1] == pytest.approx(2.0) and sum(w) == pytest.approx(1)
    recs = [heur.Record(tuple(w), i, o) for w, i, o in
            [((1, 0, 0), 0.9, 0.1), ((0, 1, 0), 0.1, 0.9), ((0, 0, 1), 0.5, 0.5), ((0.5, 0.5, 0), 0.5, 0.5)]]
    a_in, _ = heur.alpha_mixture(recs, 1.0)
    a_out, _ = heur.alpha_mixture(recs, 0.0)
    assert a_in[0] > a_in[1] and a_out[1] > a_out[0] and sum(a_in) == pytest.approx(1)
    coli, _ = heur.coli_mixture(recs)
    assert coli[1] == max(coli) and min(coli) >= 0
    # every group equally good: no signal, uniform, and said so
    flat = [heur.Record((1, 0), 0.5, 0.5), heur.Record((0, 1), 0.5, 0.5)]
    assert heur.coli_mixture([heur.Record((1, 1), 0.0, 0.0), heur.Record((1, 0), 0.0, 0.0)]) == ([0.5, 0.5], True)
    assert heur.alpha_mixture(flat, 0.5)[0] == [0.5, 0.5]


def test_mixture_fit_command(tmp_path):
    W = pilots()
    y = scheffe.design(W, True) @ quadratic_truth(4)
    groups = ["add", "sort", "reverse", "count"]
    path = tmp_path / "pilots.json"
    path.write_text(json.dumps({"groups": groups, "pilots": [
        {"name": f"p{n}", "mixture": dict(zip(groups, w.tolist())), "out_score": float(v)}
        for n, (w, v) in enumerate(zip(W, y))]}))
    out = tmp_path / "fit.json"
    assert main(["mixture", "fit", "--pilots", str(path), "--out", str(out), "--samples", "5000"]) == 0
    fit = json.loads(out.read_text())
    assert fit["fits"]["quadratic"]["loo_r2"] > fit["fits"]["linear"]["loo_r2"]
    assert set(fit["fits"]["quadratic"]["coefficients"]) == set(groups) | {
        f"{a}*{b}" for i, a in enumerate(groups) for b in groups[i + 1:]}
    assert len(fit["candidates"]) == 3 and all(c["distance"] <= 0.4 + 1e-12 for c in fit["candidates"])
    assert fit["pilots"][0]["name"] == "p0" and fit["hardware"].startswith("CPU")
    path.write_text(json.dumps({"groups": groups, "pilots": [{"mixture": {"add": 1.0}, "out_score": 0.1}]}))
    assert main(["mixture", "fit", "--pilots", str(path)]) == 2
