"""Long-context tasks for MoA calibration: fitted to a token length, the needed context far from the
question (beyond any uniform window of half the tokens), answers that the prompt supports."""
from __future__ import annotations

import random
import re

import pytest

from leanserve.data.long_context import DEPTH_KINDS, LONG_KINDS, Corpus, long_task


@pytest.fixture(scope="module")
def corpus():
    return Corpus.load(held_out=False, max_files=16)


@pytest.fixture(scope="module")
def count_tokens(tiny_llm_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    return lambda text: len(tok(text)["input_ids"])


def _needed_at(task) -> int:
    """Where in the prompt the context the answer needs begins."""
    if task.kind == "retrieval":
        return task.prompt.index(f"REGISTER_CONTENT is {task.answer}")
    if task.kind == "passkey":
        return task.prompt.index(f"is {task.answer}. Remember it.")
    if task.kind == "copy":
        return task.prompt.index(f"BEGIN COPY\n{task.answer}\nEND COPY")
    return task.prompt.index(f"def {task.answer.split(', ')[0]}")


@pytest.mark.parametrize("kind", LONG_KINDS)
@pytest.mark.parametrize("target", [400, 800])
def test_tasks_fit_the_length_and_need_far_context(kind, target, corpus, count_tokens):
    for seed in range(3):
        task = long_task(kind, random.Random(seed), corpus, target, count_tokens)
        assert task.kind == kind and task.answer
        assert 0.7 * target <= count_tokens(task.prompt) <= target
        assert _needed_at(task) < 0.5 * len(task.prompt)
        assert task == long_task(kind, random.Random(seed), corpus, target, count_tokens)


def test_answers_are_what_the_prompt_says(corpus, count_tokens):
    rng = random.Random(0)
    retrieval = long_task("retrieval", rng, corpus, 300, count_tokens)
    line = re.search(r"in line (\d+)\?$", retrieval.prompt).group(1)
    assert f"line {line}: REGISTER_CONTENT is {retrieval.answer}\n" in retrieval.prompt
    assert retrieval.prompt.count("REGISTER_CONTENT is") == retrieval.params["records"]
    functions = long_task("functions", rng, corpus, 300, count_tokens)
    body = functions.prompt.rsplit("\n", 1)[0]
    assert functions.answer.split(", ") == re.findall(r"^(?:async\s+)?def\s+(\w+)", body, re.M)


def test_held_out_corpus_is_other_modules():
    train, held_out = Corpus.load(held_out=False, max_files=8), Corpus.load(held_out=True, max_files=8)
    assert not set(train.code) & set(held_out.code)


@pytest.mark.parametrize("kind", DEPTH_KINDS)
def test_depth_puts_the_needed_context_in_its_bucket(kind, corpus, count_tokens):
    """At each of 10 depth buckets' centres, the needed context starts inside that bucket of the
    prompt's tokens (~100 lines at 1500 tiny-tokenizer tokens: a line is ~1% of the prompt)."""
    for bucket in range(10):
        task = long_task(kind, random.Random(bucket), corpus, 1500, count_tokens, depth=(bucket + 0.5) / 10)
        start = task.prompt.rfind("\n", 0, _needed_at(task)) + 1  # the line it opens
        assert int(10 * count_tokens(task.prompt[:start]) / count_tokens(task.prompt)) == bucket
        assert task.params["depth"] == (bucket + 0.5) / 10
    with pytest.raises(ValueError, match="cannot place"):
        long_task("functions", random.Random(0), corpus, 300, count_tokens, depth=0.5)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        long_task(kind, random.Random(0), corpus, 300, count_tokens, depth=1.5)
