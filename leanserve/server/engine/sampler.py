"""Logits processing and sampling for one step's rows, in vLLM V1's order:
raw logprobs -> min_tokens, logit_bias -> repetition/frequency/presence penalties -> greedy
argmax | temperature -> min_p -> top_k/top_p -> exponential-race sampling.

Logprobs are vLLM's default "raw_logprobs": log_softmax of the model's logits before any
processing, so they describe the model, not the sampling settings.

On CUDA a step syncs with the host once, when the sampled ids (and logprobs) are read: per-row
settings travel in pinned memory without blocking, which processing steps run is decided from
the host-side params (never from a device tensor), and nothing indexes with Python lists.
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


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> tensor on `device`. CUDA: through pinned memory with a non-blocking copy; a
    pageable copy would make the host wait for the GPU to drain its queue."""
    pin = device.type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=pin).to(device, non_blocking=pin)


def _padded(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(map(len, rows), default=0)
    return to_device([r + [pad] * (width - len(r)) for r in rows], torch.int64, device)


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
    rep, freq, pres = to_device([[s.params.repetition_penalty for s in sub], [s.params.frequency_penalty for s in sub],
                                 [s.params.presence_penalty for s in sub]], torch.float32, dev)[:, :, None]
    index = to_device(rows, torch.int64, dev)
    x = logits[index]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - freq * out_counts - pres * (out_counts > 0).float()
    logits[index] = x
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


def _sampler_output(tables: list[list], want_logprobs: list[int | None]) -> SamplerOutput:
    """SamplerOutput from the host copies of Sampler's tables: the ids [N], or the ids and logprobs
    [N, 1 + k] (column 0 the sampled token, then the top-k)."""
    if len(tables) == 1:
        return SamplerOutput(tables[0])
    ids, vals = tables
    top = [list(zip(ids[i][1:1 + (k or 0)], vals[i][1:1 + (k or 0)])) for i, k in enumerate(want_logprobs)]
    return SamplerOutput([r[0] for r in ids], [r[0] for r in vals], top)


@dataclass(slots=True)
class PendingSample:
    """A step's samples while they are copied to the host without blocking (async scheduling): `ids`
    stays on the device, where the next step reads its input ids; resolve() waits for the copies."""
    ids: torch.Tensor                    # [N] on the device
    host: tuple[torch.Tensor, ...]       # Sampler's tables, in (pinned) host memory
    event: torch.cuda.Event | None       # recorded after the copies (None on CPU: already done)
    want_logprobs: list[int | None]

    @classmethod
    def start(cls, ids: torch.Tensor, tables: tuple[torch.Tensor, ...], want_logprobs: list[int | None]
              ) -> PendingSample:
        if not ids.is_cuda:
            return cls(ids, tables, None, want_logprobs)
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tables)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(ids.device))  # the copies' stream: the engine's GPU need not be current
        return cls(ids, host, event, want_logprobs)

    def resolve(self) -> SamplerOutput:
        if self.event is not None:
            self.event.synchronize()
        return _sampler_output([t.tolist() for t in self.host], self.want_logprobs)


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator  # shared by unseeded requests

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], sync: bool = True
                 ) -> SamplerOutput | PendingSample:
        """logits [N, vocab] float32 (modified in place), one row per sequence in `seqs`. sync: read the
        samples back now (the step's one host sync), else start their copy (PendingSample)."""
        vocab = logits.shape[-1]
        want_logprobs = [s.params.logprobs for s in seqs]
        raw_logprobs = logits.log_softmax(-1) if any(k is not None for k in want_logprobs) else None

        sampled = self.sample(logits, seqs)
        tables: tuple[torch.Tensor, ...] = (sampled,)
        if raw_logprobs is not None:  # ids and logprobs each as one [N, 1 + k] table
            top_vals, top_ids = raw_logprobs.topk(min(max(k or 0 for k in want_logprobs), vocab), dim=-1)
            tables = (torch.cat([sampled[:, None], top_ids], 1),
                      torch.cat([raw_logprobs.gather(1, sampled[:, None]), top_vals], 1))
        if sync:
            return _sampler_output([t.tolist() for t in tables], want_logprobs)
        return PendingSample.start(sampled, tables, want_logprobs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The sampled ids [N], on the logits' device, without a host sync (logits modified in place)."""
        _apply_min_tokens_and_logit_bias(logits, seqs)
        logits = apply_penalties(logits, seqs)
        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            return logits.argmax(-1)
        return self._sample(logits, seqs, greedy)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        dev, vocab = logits.device, logits.shape[-1]
        top_k_host = [vocab if s.params.top_k <= 0 else min(s.params.top_k, vocab) for s in seqs]
        # one copy for all per-row settings; float32 holds top_k exactly (vocabularies < 2**24)
        temp, min_p, top_k, top_p, greedy_mask = to_device(
            [[1.0 if g else s.params.temperature for s, g in zip(seqs, greedy)], [s.params.min_p for s in seqs],
             top_k_host, [s.params.top_p for s in seqs], greedy], torch.float32, dev)
        greedy_ids = logits.argmax(-1)
        logits = logits / temp[:, None]
        if any(s.params.min_p > 0 for s in seqs):
            probs = logits.softmax(-1)
            cutoff = min_p[:, None] * probs.max(-1, keepdim=True).values
            logits = logits.masked_fill(probs < cutoff, float("-inf"))
        if any(k < vocab for k in top_k_host) or any(s.params.top_p < 1 for s in seqs):
            logits = apply_top_k_top_p(logits, top_k.long(), top_p)
        probs = logits.softmax(-1)
        # argmax(p / q) with q ~ Exp(1) draws from p (the exponential race; no host sync, and a
        # row's draw depends only on its own generator, so seeded rows are batch-independent)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None and not greedy[i]:
                q[i].exponential_(generator=s.generator)
        return torch.where(greedy_mask.bool(), greedy_ids, probs.div(q).argmax(-1))


def _apply_min_tokens_and_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place, as one index_add: -inf on the stop ids of rows still under min_tokens, plus
    each row's logit_bias (-inf + bias stays -inf)."""
    vocab = logits.shape[-1]
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, s in enumerate(seqs):
        if s.num_output_tokens < s.params.min_tokens:
            stop = [t for t in s.stop_token_ids if t < vocab]
            rows += [i] * len(stop)
            cols += stop
            vals += [float("-inf")] * len(stop)
        if s.params.logit_bias:
            rows += [i] * len(s.params.logit_bias)
            cols += s.params.logit_bias.keys()
            vals += s.params.logit_bias.values()
    if rows:
        flat = to_device([r * vocab + c for r, c in zip(rows, cols)], torch.int64, logits.device)
        logits.view(-1).index_add_(0, flat, to_device(vals, torch.float32, logits.device))
