"""MoA calibration and validation items: long-dependency prompts (data/long_context.py) at a length,
each with a response the dense model itself wrote (greedy; MoA's "model alignment": the gradient then
measures what the model uses, not its disagreement with a reference) or, for ablations, the task's
own answer. The response's token span is stored explicitly (`response_start`), never searched for.

Lengths: items for profile length L spread over the top two length buckets at or below L (bucket
width N_min / 2, as MoA's 1024-token buckets at N_min = 2048), never below L / 2; an item's length
is its prompt plus response, at most L.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from leanserve.atomic import atomic_write_text
from leanserve.data.build import derive_seed
from leanserve.data.long_context import LONG_KINDS, Corpus, PromptEncoder, long_task
from leanserve.errors import UserError

TARGETS = ("model", "answer")


@dataclass
class Item:
    id: str
    kind: str           # the long-context task kind: validation averages per kind, then over kinds
    ids: list[int]      # prompt + response tokens
    response_start: int
    answer: str         # the task's own answer
    response: str       # the supervised response, as text


def target_lengths(length: int, n_min: int, count: int) -> list[int]:
    """`count` item lengths spread evenly over the top two buckets at or below `length`."""
    low = max(length - n_min, length // 2)
    return [low + (k + 1) * (length - low) // count for k in range(count)]


def stop_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.no_grad()
def dense_response(model, prompt_ids: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
    """The dense model's greedy response, through its first stop token (included: it is supervised)."""
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor(prompt_ids, device=device)[None]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops or None,
                         pad_token_id=stops[0] if stops else 0)[0, len(prompt_ids):].tolist()
    for i, t in enumerate(out):
        if t in stops:
            return out[: i + 1]
    return out


def build_items(model, tokenizer, corpus: Corpus, length: int, n_min: int, count: int, *, max_new_tokens: int,
                targets: str, seed: int, name: str) -> list[Item]:
    """Up to `count` items of at most `length` tokens, kinds in turn; items whose response is empty
    (the model stopped at once) are dropped."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    encode = PromptEncoder(tokenizer)
    stops = stop_ids(model, tokenizer)
    items = []
    for index, total in enumerate(target_lengths(length, n_min, count)):
        kind = LONG_KINDS[index % len(LONG_KINDS)]
        rng = random.Random(derive_seed(seed, "moa", name, str(length), str(index)))
        try:
            task = long_task(kind, rng, corpus, total - max_new_tokens, lambda text: len(encode(text)))
        except ValueError as e:
            raise UserError(f"{name} item of {total} tokens ({kind}): {e}; use longer lengths or a smaller "
                            "--max-new-tokens") from None
        prompt_ids = encode(task.prompt)
        if targets == "model":
            response = dense_response(model, prompt_ids, max_new_tokens, stops)
        else:
            response = tokenizer(task.answer, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + stops[:1]
        if not [t for t in response if t not in stops]:
            continue
        items.append(Item(f"{name}-{length}-{index}", kind, prompt_ids + response, len(prompt_ids), task.answer,
                          tokenizer.decode(response, skip_special_tokens=True)))
    if not items:
        raise UserError(f"the model answered none of the {count} {name} items of length {length} "
                        "(every greedy response was empty)")
    return items


def save_items(path: Path, items: list[Item]) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(item)) + "\n" for item in items))


def load_items(path: Path) -> list[Item]:
    return [Item(**json.loads(line)) for line in path.read_text().splitlines()]
