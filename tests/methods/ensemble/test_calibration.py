"""eval/calibration.py: the token metrics and the ensemble's mixture, against direct computations."""
from __future__ import annotations

import math

import pytest
import torch

from leanserve.eval.calibration import (
    EnsembleMetrics,
    HeldOutSample,
    TokenMetrics,
    fit_temperature,
    logit_average_logprobs,
    mixture_logprobs,
)


def random_batch(n=300, vocab=50, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, vocab, generator=g), torch.randint(vocab, (n,), generator=g)


def test_identical_members_are_the_member():
    logits, labels = random_batch()
    single = TokenMetrics()
    ens = EnsembleMetrics(3)
    for lo, hi in ((0, 100), (100, 300)):  # two batches
        single.update(logits[lo:hi], labels[lo:hi])
        ens.update((logits[lo:hi] for _ in range(3)), labels[lo:hi])
    one, result = single.result(), ens.result()
    for key in ("nll", "nll_bits", "accuracy", "ece", "brier"):
        assert result["mixture"][key] == pytest.approx(one[key], abs=1e-5), key
        assert result["logit_average"][key] == pytest.approx(one[key], abs=1e-5), key
    assert result["jensen_gap"] == pytest.approx(0, abs=1e-5) and result["disagreement"] == 0
    assert one["nll_bits"] == pytest.approx(one["nll"] / math.log(2)) and one["tokens"] == 300


def test_mixture_never_loses_to_the_average_member():
    labels = random_batch()[1]
    members = [random_batch(seed=s)[0] for s in range(1, 6)]
    ens = EnsembleMetrics(len(members))
    ens.update(iter(members), labels)
    result = ens.result()
    mean_member = sum(m["nll"] for m in result["members"]) / len(members)
    assert result["mixture"]["nll"] < mean_member
    assert result["jensen_gap"] == pytest.approx(mean_member - result["mixture"]["nll"]) and result["jensen_gap"] > 0
    # and the mixture is the log of the mean probability, token by token
    probs = torch.stack([m.double().softmax(-1) for m in members]).mean(0)
    direct = -probs.gather(-1, labels[:, None]).log().mean()
    assert result["mixture"]["nll"] == pytest.approx(float(direct), rel=1e-5)
    # the control is the softmax of the mean logits
    expected = torch.stack(members).mean(0).log_softmax(-1)
    assert torch.allclose(logit_average_logprobs(torch.stack(members)), expected)
    direct = -expected.gather(-1, labels[:, None]).mean()
    assert result["logit_average"]["nll"] == pytest.approx(float(direct), rel=1e-5)


def test_prefix_mixtures_are_the_first_members_ensembles():
    """NLL against S from one pass: the mixture of the first S members equals a separate S-member ensemble's."""
    labels = random_batch()[1]
    members = [random_batch(seed=s)[0] for s in range(1, 7)]
    ens = EnsembleMetrics(len(members))
    ens.update(iter(members), labels)
    prefixes = ens.result()["prefix_mixtures"]
    assert sorted(prefixes) == [1, 2, 4]  # powers of two below S = 6; S itself is "mixture"
    for s, got in prefixes.items():
        alone = EnsembleMetrics(s)
        alone.update(iter(members[:s]), labels)
        expected = alone.result()["mixture"]
        for key in ("nll", "accuracy", "ece", "brier"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6), (s, key)
    assert prefixes[1]["nll"] == pytest.approx(ens.result()["members"][0]["nll"], rel=1e-6)
    assert prefixes[4]["nll"] != pytest.approx(prefixes[2]["nll"], rel=1e-3)


def test_log_mean_exp_is_stable_at_minus_1e4():
    a = torch.tensor([[0.0, -1e4, -1e4]])
    b = torch.tensor([[-1e4, 0.0, -1e4 + 1]])
    mix = mixture_logprobs(torch.stack([a.log_softmax(-1), b.log_softmax(-1)]))[0]
    assert torch.isfinite(mix).all()
    assert mix[0].item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert mix[1].item() == pytest.approx(math.log(0.5), abs=1e-6)
    # both members put ~e^-1e4 on token 2: exp() underflows to 0, log-mean-exp does not
    assert mix[2].item() == pytest.approx(-1e4 + math.log((1 + math.e) / 2), abs=1e-2)
    ens = EnsembleMetrics(2)
    ens.update(iter([a, b]), torch.tensor([2]))
    assert ens.result()["mixture"]["nll"] == pytest.approx(1e4 - math.log((1 + math.e) / 2), abs=1e-2)


def test_ece_is_zero_when_calibrated_and_not_when_overconfident():
    vocab = 4
    logits, labels = [], []
    for conf, n in ((0.4, 10), (0.7, 20), (0.95, 40)):
        rest = (1 - conf) / (vocab - 1)
        p = torch.tensor([conf] + [rest] * (vocab - 1))
        right = round(conf * n)
        logits.append(p.log().repeat(n, 1))
        labels.append(torch.tensor([0] * right + [1] * (n - right)))  # exactly conf of them right
    logits, labels = torch.cat(logits), torch.cat(labels)
    metrics = TokenMetrics()
    metrics.update(logits, labels)
    assert metrics.result()["ece"] == pytest.approx(0, abs=1e-6)
    wrong = TokenMetrics()
    wrong.update(logits, torch.ones_like(labels))  # always wrong: ECE = mean confidence
    expected = float(logits.exp().max(-1).values.mean())
    assert wrong.result()["ece"] == pytest.approx(expected, rel=1e-5) and wrong.result()["accuracy"] == 0


def test_brier_is_the_squared_distance_to_the_one_hot():
    logits, labels = random_batch(scale=2.0)
    metrics = TokenMetrics()
    metrics.update(logits, labels)
    p = logits.double().softmax(-1)
    one_hot = torch.nn.functional.one_hot(labels, p.shape[-1]).double()
    assert metrics.result()["brier"] == pytest.approx(float(((p - one_hot) ** 2).sum(-1).mean()), rel=1e-5)
    accuracy = float((p.argmax(-1) == labels).double().mean())
    assert metrics.result()["accuracy"] == pytest.approx(accuracy)


def test_temperature_fit_recovers_the_true_temperature():
    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(4000, 20, generator=g)
    labels = torch.multinomial((logits / 2.5).softmax(-1), 1, generator=g)[:, 0]  # over-confident by 2.5x
    t = fit_temperature(logits.log_softmax(-1), labels)
    assert t == pytest.approx(2.5, rel=0.1)
    metrics = TokenMetrics(temperature=t)
    metrics.update(logits, labels)
    result = metrics.result()
    assert result["nll_ts"] < result["nll"] - 0.1 and result["temperature"] == t


def test_disagreement_counts_pairs_of_members():
    eye = torch.eye(3) * 10
    labels = torch.tensor([0, 1, 2])
    # members' top-1: (0,1,2), (0,1,2), (1,1,2): pairs disagree on 0, 1, 1 of 3 tokens
    members = [eye, eye, eye[[1, 1, 2]]]
    ens = EnsembleMetrics(3)
    ens.update(iter(members), labels)
    assert ens.result()["disagreement"] == pytest.approx(2 / 9)


def test_held_out_sample_strides_across_batches():
    sample = HeldOutSample(total_tokens=25, max_tokens=5)  # stride 5
    kept = []
    offset = 0
    for n in (7, 4, 14):
        pos = sample.positions(n)
        kept += (pos + offset).tolist()
        sample.add(n, torch.zeros(len(pos), 3), torch.zeros(len(pos), dtype=torch.long))
        offset += n
    assert kept == [0, 5, 10, 15, 20] and sum(len(y) for y in sample.labels) == 5
