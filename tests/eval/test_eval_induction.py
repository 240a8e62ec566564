"""The induction probe: a model that copies gains on the repeat, one that only knows the words does not."""
from __future__ import annotations

import torch
from torch import nn
from types import SimpleNamespace

from leanserve.eval.induction import repeat_items, repeat_losses


class Copier(nn.Module):
    """Induction: predict what followed the latest earlier occurrence of the longest suffix seen before."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        ids = input_ids[0].tolist()
        logits = torch.zeros(1, len(ids), self.vocab)
        for i in range(len(ids)):
            follower, n = None, 1
            while n <= i:
                ends = [j for j in range(n - 1, i) if ids[j - n + 1:j + 1] == ids[i - n + 1:i + 1]]
                if not ends:
                    break
                follower, n = ids[ends[-1] + 1], n + 1
            if follower is not None:
                logits[0, i, follower] = 30.0
        return SimpleNamespace(logits=logits)


class Uniform(Copier):
    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], self.vocab))


def test_items_repeat_the_words(tiny_llm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    for ids, first, repeat in repeat_items(tok, 9, 4, seed=1):
        assert ids[first] == ids[repeat] and len(ids[first]) >= 8
        assert ids[0] == tok.bos_token_id and first.stop < repeat.start


def test_copy_gain_separates_a_copier_from_a_word_model(tiny_llm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    vocab = len(tok)
    # the first copy can only be guessed; the copier's repeat costs next to nothing
    copier = repeat_losses(Copier(vocab), tok, num_words=20, n=4)
    uniform = repeat_losses(Uniform(vocab), tok, num_words=20, n=4)
    assert copier["repeat"] < 0.1 * copier["first"] and copier["copy_gain"] > 0.9 * copier["first"]
    assert abs(uniform["copy_gain"]) < 1e-6 and abs(uniform["first"] - torch.log(torch.tensor(vocab)).item()) < 1e-4
