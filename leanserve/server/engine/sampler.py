"""Logits processing and sampling for one step's rows, in vLLM V1's order:
raw logprobs -> min_tokens, logit_bias -> repetition/frequency/presence penalties -> greedy
argmax | temperature -> min_p -> top_k/top_p -> exponential-race sampling.

Logprobs are vLLM's default "raw_logprobs": log_softmax of the model's logits before any
processing, so they describe the model, not the sampling settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from leanserve.server.engine.sequence import Sequence


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]                                  # one per row
    logprobs: list[float] | None = None                   # sampled token's raw logprob, per row
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per row, best first, k = params.logprobs


def _padded(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(map(len, rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)


def _token_counts(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[N, vocab] occurrence counts; the pad id `vocab_size` lands in a dropped extra column."""
    ids = _padded(rows, vocab_size, device)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[-1]
    sub = [seqs[i] for i in rows]
    out_counts = _token_counts([s.output_token_ids for s in sub], vocab, dev)
    seen = (_token_counts([s.prompt_token_ids for s in sub], vocab, dev) > 0) | (out_counts > 0)
    rep = torch.tensor([s.params.repetition_penalty for s in sub], device=dev)[:, None]
    freq = torch.tensor([s.params.frequency_penalty for s in sub], device=dev)[:, None]
    pres = torch.tensor([s.params.presence_penalty for s in sub], device=dev)[:, None]
    x = logits[rows]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - freq * out_counts - pres * (out_counts > 0).float()
    logits[rows] = x
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top_k and outside its top_p nucleus. top_k = vocab
    and top_p = 1 are no-ops. The most likely token always survives."""
    sorted_logits, idx = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0)[:, None].long())
    sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p)[:, None]
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter(1, idx, sorted_logits)


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator  # shared by unseeded requests

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits [N, vocab] float32 (modified in place), one row per sequence in `seqs`."""
        n, vocab = logits.shape
        dev = logits.device
        want_logprobs = [s.params.logprobs for s in seqs]
        raw_logprobs = logits.log_softmax(-1) if any(k is not None for k in want_logprobs) else None

        for i, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens and s.stop_token_ids:
                logits[i, [t for t in s.stop_token_ids if t < vocab]] = float("-inf")
            if s.params.logit_bias:
                ids = list(s.params.logit_bias)
                logits[i, ids] += torch.tensor([s.params.logit_bias[t] for t in ids], device=dev)
        logits = apply_penalties(logits, seqs)

        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            sampled = logits.argmax(-1)
        else:
            sampled = self._sample(logits, seqs, greedy)

        token_ids = sampled.tolist()
        out = SamplerOutput(token_ids)
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, sampled[:, None])[:, 0].tolist()
            top_vals, top_ids = raw_logprobs.topk(min(max(k or 0 for k in want_logprobs), vocab), dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            out.top_logprobs = [list(zip(top_ids[i][:k or 0], top_vals[i][:k or 0])) for i, k in enumerate(want_logprobs)]
        return out

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        dev, vocab = logits.device, logits.shape[-1]
        greedy_mask = torch.tensor(greedy, device=dev)
        greedy_ids = logits.argmax(-1)
        temp = torch.tensor([1.0 if g else s.params.temperature for s, g in zip(seqs, greedy)], device=dev)
        logits = logits / temp[:, None]
        min_p = torch.tensor([s.params.min_p for s in seqs], device=dev)
        if bool((min_p > 0).any()):
            probs = logits.softmax(-1)
            cutoff = min_p[:, None] * probs.max(-1, keepdim=True).values
            logits = logits.masked_fill(probs < cutoff, float("-inf"))
        top_k = torch.tensor([vocab if s.params.top_k <= 0 else min(s.params.top_k, vocab) for s in seqs], device=dev)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
        if bool((top_k < vocab).any() or (top_p < 1).any()):
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(-1)
        # argmax(p / q) with q ~ Exp(1) draws from p (the exponential race; no host sync, and a
        # row's draw depends only on its own generator, so seeded rows are batch-independent)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None and not greedy[i]:
                q[i].exponential_(generator=s.generator)
        return torch.where(greedy_mask, greedy_ids, probs.div(q).argmax(-1))
