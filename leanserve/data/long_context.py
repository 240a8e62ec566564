"""Long-context tasks whose answer depends on far context, built from the stdlib corpus to a target
token length: MoA's calibration and validation items, and long-range retrieval tests.

Every kind puts what the question needs in the first 5-35% of the corpus lines (under half of the
prompt, records included) and asks at the end, so the answer sits more than half the context away
from the question: a uniform sink + window that keeps half the tokens (or fewer) cannot see it, and
only heads with long spans can. Given `depth` (retrieval, passkey, copy), the needed context goes
at that fraction of the prompt's tokens instead (the nearest line boundary, each line counted
alone): position-bucketed retrieval tests (`leanserve eval moa`).

- retrieval: "line <id>: REGISTER_CONTENT is <n>" records scattered through stdlib source; asks one id.
- passkey: "The pass key of <word> is <n>." sentences scattered through stdlib docs; asks one word.
- copy: a BEGIN COPY ... END COPY block of words inside stdlib source; asks to repeat it.
- functions: a stdlib module's source; asks for its top-level functions in order (the first opens it).

One more kind is no long-context task but a warm-up: `repeat`, random words asked back at once, the
densest copy signal there is (the answer is half the item). Short items in short windows teach a small
model trained from scratch what the long ones alone do not (benchmarks/induction_warmup_cpu.py): a
warm-up on repeats, to copy the copy tasks' words; one on short retrieval, passkey, copy and repeat
items, to retrieve. A curriculum trains on them first (`data build --long-kinds`, `train lm --init`).

Lengths are fitted with the caller's `count_tokens` (e.g. the length of PromptEncoder's encoding: the
tokens a chat server feeds the model), by doubling then bisecting the number of corpus lines, as
data/tasks.py fits retrieval prompts.
"""
from __future__ import annotations

import functools
import itertools
import math
import multiprocessing
import random
import re
import textwrap
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from leanserve.data.build import derive_seed, split_of
from leanserve.data.corpus import code_document, docs_document, module_docs, stdlib_files
from leanserve.data.tasks import WORDS, Task

LONG_KINDS = ("retrieval", "passkey", "copy", "functions")
FAR = (0.05, 0.35)  # where the needed context goes (fraction of the corpus lines)
_TOP_LEVEL_DEF = re.compile(r"^(?:async\s+)?def\s+(\w+)", re.M)


@dataclass
class Corpus:
    """Stdlib source and docs texts of one side of the data split, as lines."""
    code: list[str]        # whole source files
    docs_lines: list[str]  # every line of the module docs, in order

    @classmethod
    def load(cls, held_out: bool, max_files: int = 64) -> Corpus:
        """`held_out`: the val and test modules of `leanserve data build` (validation items);
        else its train modules (calibration). The first `max_files` of them, and more until one has
        module docs."""
        code, docs_lines = [], []
        for f in stdlib_files():
            if (split_of(f.module) != "train") != held_out:
                continue
            code.append(code_document(f)["text"])
            docs = module_docs(f)
            if docs is not None:
                docs_lines += _short_lines(docs_document(docs)["text"])
            if len(code) >= max_files and docs_lines:
                break
        return cls(code, docs_lines)

    @functools.cached_property
    def code_lines(self) -> list[str]:
        """Once per corpus: rebuilt for every task it was 3/4 of `data build --long-tasks`' time."""
        return [line for text in self.code for line in _short_lines(text)]


def _short_lines(text: str, width: int = 80) -> list[str]:
    """Lines of at most `width` characters (longer ones wrapped), so that lengths fit finely."""
    return [part for line in text.splitlines() for part in (textwrap.wrap(line, width) if len(line) > width
                                                           else [line])]


def _fit_lines(build: Callable[[int], str], target_tokens: int, count_tokens: Callable[[str], int],
               max_lines: int) -> int:
    """The most lines (<= max_lines) whose prompt stays within target_tokens; ValueError if even the
    prompt without corpus lines does not."""
    def fits(n: int) -> bool:
        return count_tokens(build(n)) <= target_tokens

    if not fits(0):
        raise ValueError(f"{target_tokens} tokens cannot hold this task's prompt ({count_tokens(build(0))} "
                         "tokens without any corpus text)")
    lo, hi = 0, 1
    while hi <= max_lines and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_lines + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _window(pool: list[str], rng: random.Random) -> Callable[[int], list[str]]:
    """n consecutive lines of `pool` from a random start (wrapping around)."""
    start = rng.randrange(len(pool))
    return lambda n: [pool[(start + i) % len(pool)] for i in range(n)]


def _scattered(lines: list[str], inserts: list[tuple[float, str]]) -> list[str]:
    """`lines` with each (fraction, text) inserted at that fraction of them."""
    out = list(lines)
    for frac, text in sorted(inserts, reverse=True):
        out.insert(int(frac * len(lines)), text)
    return out


def _line_tokens(count_tokens: Callable[[str], int]) -> Callable[[str], int]:
    """Tokens of one line and its newline, counted alone (memoised: a fit counts the same lines often),
    without what count_tokens adds to any text (a chat template's tokens)."""
    empty = count_tokens("")
    return functools.cache(lambda line: max(count_tokens(line) - empty, 0) + 1)


def _at_depth(head: list[str], lines: list[str], needle: str, tail: list[str], depth: float,
              size: Callable[[str], int]) -> str:
    """head, lines and tail joined by newlines, `needle` inserted between the lines where it starts
    nearest `depth` of the whole text, measured in size(line) units (_line_tokens)."""
    total = sum(map(size, [*head, *lines, needle, *tail]))
    starts = itertools.accumulate(map(size, lines), initial=sum(map(size, head)))
    at = min(enumerate(starts), key=lambda k_start: abs(k_start[1] / total - depth))[0]
    return "\n".join([*head, *lines[:at], needle, *lines[at:], *tail])


def _num_records(target_tokens: int) -> int:
    return max(1, target_tokens // 200)


def _records(rng: random.Random, pool: list[str], target_tokens: int, count_tokens, keys: list, record: Callable,
             header: str, question: Callable, kind: str, depth: float | None) -> Task:
    """Records (key, random value) scattered through corpus lines; the asked one, keys[0], in the
    FAR part of the prompt, or at `depth` of it."""
    values = [rng.randint(1000, 99999) for _ in keys]
    fracs = [rng.uniform(*FAR)] + [rng.random() for _ in keys[1:]]
    lines = _window(pool, rng)
    inserts = [(f, record(k, v)) for f, k, v in zip(fracs, keys, values)]
    size = _line_tokens(count_tokens)

    def build(n: int) -> str:
        if depth is None:
            return "\n".join([header, *_scattered(lines(n), inserts), question(keys[0])])
        return _at_depth([header], _scattered(lines(n), inserts[1:]), inserts[0][1], [question(keys[0])], depth,
                         size)

    n = _fit_lines(build, target_tokens, count_tokens, len(pool))
    where = {"position": fracs[0]} if depth is None else {"depth": depth}
    return Task(kind, build(n), str(values[0]), {"lines": n, **where, "records": len(keys)})


def retrieval(rng: random.Random, corpus: Corpus, target_tokens: int, count_tokens, depth: float | None = None
              ) -> Task:
    keys = rng.sample(range(100_000, 1_000_000), _num_records(target_tokens))
    return _records(rng, corpus.code_lines, target_tokens, count_tokens, keys,
                    lambda k, v: f"line {k}: REGISTER_CONTENT is {v}", "Remember the REGISTER_CONTENT of every line.",
                    lambda k: f"What is the REGISTER_CONTENT in line {k}?", "retrieval", depth)


def passkey(rng: random.Random, corpus: Corpus, target_tokens: int, count_tokens, depth: float | None = None) -> Task:
    keys = rng.sample(WORDS, min(_num_records(target_tokens), len(WORDS)))
    return _records(rng, corpus.docs_lines, target_tokens, count_tokens, keys,
                    lambda k, v: f"The pass key of {k} is {v}. Remember it.", "Remember every pass key.",
                    lambda k: f"What is the pass key of {k}?", "passkey", depth)


def copy(rng: random.Random, corpus: Corpus, target_tokens: int, count_tokens, depth: float | None = None) -> Task:
    pool = corpus.code_lines
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12)))
    frac = rng.uniform(*FAR)
    lines = _window(pool, rng)
    block, question = f"BEGIN COPY\n{words}\nEND COPY", "Repeat the words between BEGIN COPY and END COPY."
    size = _line_tokens(count_tokens)

    def build(n: int) -> str:
        if depth is None:
            return "\n".join([*_scattered(lines(n), [(frac, block)]), question])
        return _at_depth([], lines(n), block, [question], depth, size)

    n = _fit_lines(build, target_tokens, count_tokens, len(pool))
    return Task("copy", build(n), words, {"lines": n, **({"position": frac} if depth is None else {"depth": depth})})


def repeat(rng: random.Random, corpus: Corpus, target_tokens: int, count_tokens) -> Task:
    """Random words (about half of target_tokens, with their answer), asked back."""
    words = [rng.choice(WORDS) for _ in range(target_tokens)]  # more than any fit needs (a word is >= 1 token)
    question = "Repeat the words above."

    def build(n: int) -> str:
        return " ".join(words[:n]) + f"\n{question}"

    n = max(1, _fit_lines(build, max(target_tokens // 2, count_tokens(build(1))), count_tokens, len(words)))
    return Task("repeat", build(n), " ".join(words[:n]), {"words": n})


def functions(rng: random.Random, corpus: Corpus, target_tokens: int, count_tokens) -> Task:
    """A module's source from its first top-level function on, cut to the target length; the answer
    lists the top-level functions in the cut."""
    modules = [text for text in corpus.code if len(_TOP_LEVEL_DEF.findall(text)) >= 3]
    text = rng.choice(modules)
    lines = text[_TOP_LEVEL_DEF.search(text).start():].splitlines()
    question = "List the functions defined at the top level of this module, in order."

    def build(n: int) -> str:  # n lines after the first function's
        return "\n".join(lines[:n + 1]) + f"\n{question}"

    n = _fit_lines(build, target_tokens, count_tokens, len(lines) - 1)
    names = _TOP_LEVEL_DEF.findall("\n".join(lines[:n + 1]))
    return Task("functions", build(n), ", ".join(names), {"lines": n + 1})


CHARS_PER_TOKEN = 3.5  # a rough BPE rate on stdlib text: training items are built before any tokenizer
TASKS_PER_CHUNK = 500  # tasks drawn from one seed: the unit that worker processes share out


def training_tasks(seed: int, n: int, held_out: bool, token_range: tuple[int, int], workers: int = 1,
                   kinds: tuple[str, ...] = LONG_KINDS) -> list[Task]:
    """n long-context tasks for a model to learn these kinds from (`data build --long-tasks`): `kinds`
    in turn, each at a log-uniform target length in token_range, from the train modules (held_out: the
    val and test ones). Lengths are estimated at CHARS_PER_TOKEN, so they are approximate; the items of
    `compress moa` and `eval moa` fit the model's own tokenizer.

    Builds for training run to 10^5 items (~2 ms each), so that a model reads each about once rather than
    fitting a few thousand: they are drawn in chunks of TASKS_PER_CHUNK, each from its own seed, over
    `workers` processes; the items do not depend on how many."""
    chunks = [(derive_seed(seed, "chunk", str(start)), start, min(TASKS_PER_CHUNK, n - start), held_out, token_range,
               kinds) for start in range(0, n, TASKS_PER_CHUNK)]
    if workers <= 1 or len(chunks) <= 1:
        return [task for chunk in chunks for task in _chunk_tasks(*chunk)]
    # spawn: the caller may hold threads (torch, tokenizers) that a fork would copy mid-state
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        return [task for part in pool.map(_chunk_tasks, *zip(*chunks)) for task in part]


@functools.cache
def _corpus(held_out: bool) -> Corpus:
    return Corpus.load(held_out)


def _chunk_tasks(seed: int, start: int, n: int, held_out: bool, token_range: tuple[int, int],
                 kinds: tuple[str, ...]) -> list[Task]:
    """Tasks start..start+n-1 of training_tasks (the index picks the kind)."""
    lo, hi = token_range
    rng, corpus = random.Random(seed), _corpus(held_out)

    def count(text: str) -> int:
        return int(len(text) / CHARS_PER_TOKEN)

    tasks = []
    for i in range(start, start + n):
        target = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        tasks.append(long_task(kinds[i % len(kinds)], rng, corpus, target, count))
    return tasks


class PromptEncoder:
    """A user prompt as the tokens a chat server would feed the model (chat template when the
    tokenizer has one, else BOS + text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        return tok(prompt, verbose=False)["input_ids"]


BUILDERS = {"retrieval": retrieval, "passkey": passkey, "copy": copy, "functions": functions, "repeat": repeat}
DEPTH_KINDS = ("retrieval", "passkey", "copy")  # the kinds whose needed context can go at a chosen depth


def long_task(kind: str, rng: random.Random, corpus: Corpus, target_tokens: int,
              count_tokens: Callable[[str], int], depth: float | None = None) -> Task:
    if kind not in BUILDERS:
        raise ValueError(f"unknown long-context kind {kind!r}; known: {', '.join(BUILDERS)}")
    if depth is None:
        return BUILDERS[kind](rng, corpus, target_tokens, count_tokens)
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if kind not in DEPTH_KINDS:
        raise ValueError(f"{kind!r} tasks cannot place their context at a depth; those that can: "
                         f"{', '.join(DEPTH_KINDS)}")
    return BUILDERS[kind](rng, corpus, target_tokens, count_tokens, depth)
