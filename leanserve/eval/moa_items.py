"""The items of `leanserve eval moa`, from held-out stdlib modules (data/long_context.py), each fitted
to its length L = prompt + the most new tokens, as a server plans a request:

- Probe: a retrieval question whose needed context starts at the centre of one of `buckets` equal
  slices of the prompt's tokens (long_task's depth), answered by greedy decoding.
- Scored: a long-context task (every kind, needed context far from the question) with its
  ground-truth answer + end of turn as the response, whose tokens alone are scored.

Every item is seeded by (seed, what it is for, length, index), so seeds are independent samples and
an item does not move when other lengths or counts change.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from leanserve.data.build import derive_seed
from leanserve.data.long_context import LONG_KINDS, Corpus, PromptEncoder, long_task
from leanserve.data.tasks import Task
from leanserve.errors import UserError


@dataclass
class Probe:
    seed: int
    length: int
    bucket: int
    task: Task
    prompt_ids: list[int]


@dataclass
class Scored:
    seed: int
    length: int
    kind: str
    ids: list[int]       # prompt + response
    response_start: int  # the first scored token


def _task(kind: str, rng: random.Random, corpus: Corpus, length: int, max_new_tokens: int, encode,
          depth: float | None = None) -> Task:
    try:
        return long_task(kind, rng, corpus, length - max_new_tokens, lambda text: len(encode(text)), depth)
    except ValueError as e:
        raise UserError(f"a {kind} item of {length} tokens: {e}; use longer --lengths or a smaller "
                        "--max-new-tokens") from None


def probes(tokenizer, corpus: Corpus, *, lengths: list[int], seeds: list[int], buckets: int, per_bucket: int,
           kinds: list[str], max_new_tokens: int) -> list[Probe]:
    """per_bucket probes in every bucket at every length, for every seed; kinds in turn."""
    encode = PromptEncoder(tokenizer)
    out = []
    for seed in seeds:
        for length in lengths:
            for bucket in range(buckets):
                for index in range(per_bucket):
                    kind = kinds[index % len(kinds)]
                    rng = random.Random(derive_seed(seed, "eval-moa", "retrieval", str(length), str(bucket), str(index)))
                    task = _task(kind, rng, corpus, length, max_new_tokens, encode, depth=(bucket + 0.5) / buckets)
                    out.append(Probe(seed, length, bucket, task, encode(task.prompt)))
    return out


def scored(tokenizer, corpus: Corpus, *, lengths: list[int], seeds: list[int], count: int, max_new_tokens: int,
           end_of_turn: int | None) -> list[Scored]:
    """count items at every length for every seed, the long-context kinds in turn; the response is
    the answer's tokens (cut to max_new_tokens with end_of_turn, when given, last)."""
    encode = PromptEncoder(tokenizer)
    tail = [] if end_of_turn is None else [end_of_turn]
    out = []
    for seed in seeds:
        for length in lengths:
            for index in range(count):
                kind = LONG_KINDS[index % len(LONG_KINDS)]
                rng = random.Random(derive_seed(seed, "eval-moa", "ppl", str(length), str(index)))
                task = _task(kind, rng, corpus, length, max_new_tokens, encode)
                prompt = encode(task.prompt)
                answer = tokenizer(task.answer, add_special_tokens=False)["input_ids"]
                response = answer[:max_new_tokens - len(tail)] + tail
                out.append(Scored(seed, length, kind, prompt + response, len(prompt)))
    return out
