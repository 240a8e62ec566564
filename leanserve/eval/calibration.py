"""Token-level metrics of next-token predictions, for one LM or an ensemble of LMs: NLL (nats and
bits), top-1 accuracy, ECE, Brier, NLL after temperature scaling, and an ensemble's diversity.

Accumulated batch by batch: `update` reduces a batch's [tokens, vocab] logits to a few sums, so an
eval set of 1e5 tokens over an 8192 vocabulary never sits in memory at once. An ensemble's members
arrive one at a time per batch (an iterator), so only the running mixture, the running logit sum
and one member's logits are alive together.

- Ensemble prediction is the probability average, the Bayesian predictive:
  log p̄(y) = logsumexp_s log p_s(y) − log S. Its NLL is the members' mean NLL minus the Jensen
  gap J ≥ 0 (their disagreement at the true token): it never loses to the average member.
- Logit averaging (softmax of the mean logits, a normalised product of experts) is reported as the
  negative control: it is not the predictive and is usually over-confident.
- ECE: 15 equal-width bins of top-1 confidence, Σ_b (n_b/n)·|acc_b − conf_b|.
- Brier: 1 − 2·p_y + Σ_k p_k² per token (= Σ_k (p_k − 1[k = y])²), averaged.
- Temperature scaling: one temperature T, fitted on held-out tokens, divides the (mixture's) log-probs
  before the softmax. NLL(1/T) is convex in 1/T, but depends on every token's whole distribution
  (its log-sum-exp at each T), so no small per-token statistic suffices: the fit reads a strided
  subsample of held-out log-probs (`fit_temperature`), and the test pass scores with that T.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

NUM_BINS = 15
_GOLDEN = (math.sqrt(5) - 1) / 2


def mixture_logprobs(member_logprobs: torch.Tensor) -> torch.Tensor:
    """[S, ..., V] log-probs of S members -> [..., V] log of their mean probability (stable for −1e4 logits)."""
    return torch.logsumexp(member_logprobs, dim=0) - math.log(member_logprobs.shape[0])


def logit_average_logprobs(member_logits: torch.Tensor) -> torch.Tensor:
    """[S, ..., V] logits -> log_softmax of their mean: the product-of-experts control, not the predictive."""
    return member_logits.mean(0).log_softmax(-1)


class TokenMetrics:
    """Sums over tokens of one predictor's NLL, accuracy, Brier and confidence bins."""

    def __init__(self, temperature: float | None = None):
        self.temperature = temperature
        self.tokens = 0
        self.nll = self.nll_ts = self.brier = 0.0
        self.correct = 0
        self.bin_count = torch.zeros(NUM_BINS, dtype=torch.float64)
        self.bin_conf = torch.zeros(NUM_BINS, dtype=torch.float64)
        self.bin_correct = torch.zeros(NUM_BINS, dtype=torch.float64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits: [n, V] (logits or log-probs), labels: [n] true next tokens."""
        logprobs = logits.float().log_softmax(-1)
        true = logprobs.gather(-1, labels[:, None])[:, 0]
        probs = logprobs.exp()
        conf, pred = probs.max(-1)
        correct = (pred == labels).double()
        self.tokens += len(labels)
        self.nll -= true.double().sum().item()
        self.correct += int(correct.sum().item())
        self.brier += (1 - 2 * true.exp() + probs.square().sum(-1)).double().sum().item()
        bins = (conf * NUM_BINS).long().clamp(max=NUM_BINS - 1)
        self.bin_count += torch.bincount(bins, minlength=NUM_BINS).cpu().double()
        self.bin_conf += torch.bincount(bins, weights=conf.double(), minlength=NUM_BINS).cpu()
        self.bin_correct += torch.bincount(bins, weights=correct, minlength=NUM_BINS).cpu()
        if self.temperature is not None:
            self.nll_ts += scaled_nll_sum(logprobs, labels, 1 / self.temperature)

    def result(self) -> dict:
        n = max(self.tokens, 1)
        out = {"tokens": self.tokens, "nll": self.nll / n, "nll_bits": self.nll / n / math.log(2),
               "accuracy": self.correct / n, "ece": float((self.bin_correct - self.bin_conf).abs().sum()) / n,
               "brier": self.brier / n}
        if self.temperature is not None:
            out |= {"temperature": self.temperature, "nll_ts": self.nll_ts / n}
        return out


class EnsembleMetrics:
    """The mixture's, the logit average's and every member's TokenMetrics, and the members' diversity
    (Jensen gap, mean pairwise top-1 disagreement). `temperatures` may hold fitted temperatures for
    "mixture" and "logit_average". The mixtures of the first S members, S a power of two below the
    ensemble's size, are scored on the way (the running log-sum passes through them), so that one pass
    gives NLL against S."""

    def __init__(self, num_members: int, temperatures: dict[str, float] | None = None):
        temperatures = temperatures or {}
        self.num_members = num_members
        self.mixture = TokenMetrics(temperatures.get("mixture"))
        self.logit_average = TokenMetrics(temperatures.get("logit_average"))
        self.members = [TokenMetrics() for _ in range(num_members)]
        self.prefixes = {s: TokenMetrics() for s in (2 ** i for i in range(num_members.bit_length()))
                         if s < num_members}
        self.disagreeing_pairs = 0

    def update(self, member_logits: Iterable[torch.Tensor], labels: torch.Tensor) -> None:
        """member_logits: each member's [n, V] logits for the same tokens, one at a time."""
        mixture = logit_sum = None
        preds = []
        for member, logits in zip(self.members, member_logits, strict=True):
            logits = logits.float()
            logprobs = logits.log_softmax(-1)
            member.update(logprobs, labels)
            preds.append(logprobs.argmax(-1))
            mixture = logprobs if mixture is None else torch.logaddexp(mixture, logprobs)
            logit_sum = logits.clone() if logit_sum is None else logit_sum.add_(logits)
            if len(preds) in self.prefixes:
                self.prefixes[len(preds)].update(mixture - math.log(len(preds)), labels)
        self.mixture.update(mixture - math.log(self.num_members), labels)
        self.logit_average.update(logit_sum / self.num_members, labels)
        for s in range(self.num_members):
            for t in range(s + 1, self.num_members):
                self.disagreeing_pairs += int((preds[s] != preds[t]).sum().item())

    def result(self) -> dict:
        members = [m.result() for m in self.members]
        mixture = self.mixture.result()
        pairs = self.num_members * (self.num_members - 1) // 2
        return {"num_members": self.num_members, "mixture": mixture, "logit_average": self.logit_average.result(),
                "members": members, "prefix_mixtures": {s: m.result() for s, m in self.prefixes.items()},
                # NLL(mixture) = mean member NLL − J
                "jensen_gap": sum(m["nll"] for m in members) / self.num_members - mixture["nll"],
                "disagreement": self.disagreeing_pairs / (pairs * max(self.mixture.tokens, 1)) if pairs else 0.0}


# ----------------------------------------------------------------------------- temperature scaling

def scaled_nll_sum(logprobs: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """Σ over tokens of −log softmax(β·logprobs)(y): the NLL at temperature 1/β."""
    scaled = beta * logprobs.float()
    return float((torch.logsumexp(scaled, -1) - scaled.gather(-1, labels[:, None])[:, 0]).double().sum())


def fit_temperature(logprobs: torch.Tensor, labels: torch.Tensor, low: float = 0.05, high: float = 20.0,
                    iters: int = 60) -> float:
    """The temperature in [low, high] minimising the NLL of held-out [n, V] log-probs (golden-section
    search on log T; the NLL is convex in 1/T, hence unimodal in log T)."""
    a, b = math.log(low), math.log(high)

    def nll(log_t: float) -> float:
        return scaled_nll_sum(logprobs, labels, math.exp(-log_t))

    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


class HeldOutSample:
    """Every `stride`-th token's log-probs of a held-out pass (token order), kept for fit_temperature:
    with stride = ceil(total / max_tokens) at most max_tokens x vocab floats."""

    def __init__(self, total_tokens: int, max_tokens: int):
        self.stride = max(1, math.ceil(total_tokens / max_tokens))
        self.seen = 0
        self.logprobs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def positions(self, n: int) -> torch.Tensor:
        """Indices, among the next n tokens, of those kept; call add() with them next."""
        first = (-self.seen) % self.stride
        return torch.arange(first, n, self.stride)

    def add(self, n: int, logprobs: torch.Tensor, labels: torch.Tensor) -> None:
        """n: tokens of this batch; logprobs/labels: only those at positions(n)."""
        self.seen += n
        self.logprobs.append(logprobs.float().cpu())
        self.labels.append(labels.cpu())

    def fit(self) -> float | None:
        if not self.labels or not sum(len(y) for y in self.labels):
            return None
        return fit_temperature(torch.cat(self.logprobs), torch.cat(self.labels))
