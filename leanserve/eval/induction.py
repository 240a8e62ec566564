"""Does a causal LM copy? Random word sequences shown twice, and the loss on the second copy against the
first's. A model with induction heads predicts the repeat almost for free; a model that only knows which
words occur pays the same on both copies (about ln 74 nats a word over data/tasks.py's 74 words).

`train lm` records it at every validation: a cheap view of whether a model in training has started to
copy in context. It does not predict the long-context tasks by itself (benchmarks/induction_warmup_cpu.py):
a model trained from scratch gained 3.2 nats a token on 8-word repeats yet answered no task; one warmed up
on short retrieval and passkey items answered ~90% of them with a gain of 0.3. And it reads one format
(the repeat after a newline): a model trained only on another copy format (`data build --long-kinds
repeat`, asked back after a question) can score below 0 here while copying well in its own.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from leanserve.data.tasks import WORDS


def repeat_items(tokenizer, num_words: int, n: int, seed: int) -> list[tuple[list[int], slice, slice]]:
    """n items of `num_words` random words, a newline and the same words again: (token ids, the first
    copy's tokens and the repeat's, each from its second word on: a first word is a guess either way, and
    after the newline it is spelt differently)."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(num_words)]
        text = " ".join(words)
        first = tokenizer(text, verbose=False)["input_ids"]  # BOS + the words
        second = tokenizer("\n" + text, add_special_tokens=False, verbose=False)["input_ids"]
        head1 = len(tokenizer(words[0], verbose=False)["input_ids"])  # BOS + the first word
        head2 = len(tokenizer("\n" + words[0], add_special_tokens=False, verbose=False)["input_ids"])
        items.append((first + second, slice(head1, len(first)), slice(len(first) + head2, len(first) + len(second))))
    return items


def induction_words(seq_len: int) -> list[int]:
    """Word counts to probe a model trained on seq_len-token windows at: a short repeat, and one whose two
    copies span about half the window (a word is 1-3 tokens)."""
    return sorted({8, max(8, seq_len // 8)})


@torch.no_grad()
def repeat_losses(model, tokenizer, num_words: int, n: int = 16, seed: int = 0, device="cpu") -> dict[str, float]:
    """Mean next-token loss on the first copy and on the repeat (each from its second word), and
    `copy_gain` = first - repeat: ~0 without induction, up to the first copy's loss with it."""
    was_training = model.training
    model.eval()
    first = repeat = 0.0
    for ids, a, b in repeat_items(tokenizer, num_words, n, seed):
        x = torch.tensor([ids], device=device)
        # losses[i] is the loss of token i + 1
        losses = F.cross_entropy(model(input_ids=x).logits[0, :-1].float(), x[0, 1:], reduction="none")
        first += losses[a.start - 1:a.stop - 1].mean().item()
        repeat += losses[b.start - 1:b.stop - 1].mean().item()
    model.train(was_training)
    return {"words": num_words, "first": first / n, "repeat": repeat / n, "copy_gain": (first - repeat) / n}
