"""Procedurally generated tasks whose answers can be checked exactly.

Each generator draws everything from the `random.Random` it is given, so a seed fixes the
task set on every machine. Answers are short canonical strings (a number, a word, or a
comma-separated list); `check` accepts a response equal in value to the answer, forgiving
only whitespace, separators between list items and a trailing period. These checkers are
the rewards for RL with verifiable rewards and the exact-match metric of `eval lm`.
Prompts end in punctuation so that in the pretraining text (prompt + " " + answer) a
question's list never runs into the answer's.

The key-value retrieval generator (LongEval "lines") also runs standalone at a given
number of lines or a target token length, for MoA long-context profiling.
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

# Short common words: sortable, countable items a tiny model can spell.
WORDS = tuple("""
apple bread chair cloud dance eagle field glass green happy house juice knife lemon light
money music night ocean paper party piano plant queen radio river salad sheep smile snake
stone sugar table tiger train water whale world zebra alarm beach brick candy coral daisy
dream flame frost grape honey index jelly kite ladder maple metal nurse olive pearl pilot
robot sauce scarf shell spoon storm tooth tower vapor wheat yacht amber cabin delta
""".split())

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class Task:
    kind: str
    prompt: str
    answer: str
    params: dict = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict) -> Task:
        """The task of a `tasks` row or of a chat row's `task` field (extra keys ignored)."""
        return cls(kind=row["kind"], prompt=row["prompt"], answer=row["answer"], params=row["params"])

    def to_row(self, row_id: str) -> dict:
        """A `tasks` split row; text = prompt + " " + answer is the pretraining form."""
        return {"id": row_id, **asdict(self), "text": f"{self.prompt} {self.answer}"}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _join(items: Sequence) -> str:
    return ", ".join(str(x) for x in items)


def add_task(rng: random.Random, digits: int | None = None, max_digits: int = 5) -> Task:
    digits = digits or rng.randint(2, max_digits)
    a, b = _number(rng, digits), _number(rng, digits)
    template = rng.choice(("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} ="))
    return Task("add", template.format(a=a, b=b), str(a + b), {"digits": digits, "a": a, "b": b})


def sub_task(rng: random.Random, digits: int | None = None, max_digits: int = 5) -> Task:
    digits = digits or rng.randint(2, max_digits)
    a, b = sorted((_number(rng, digits), _number(rng, digits)), reverse=True)  # non-negative results
    template = rng.choice(("What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} ="))
    return Task("sub", template.format(a=a, b=b), str(a - b), {"digits": digits, "a": a, "b": b})


def sort_task(rng: random.Random, length: int | None = None, items: str | None = None) -> Task:
    length = length or rng.randint(3, 8)
    items = items or rng.choice(("numbers", "words"))
    if items == "numbers":
        values = [rng.randint(0, 999) for _ in range(length)]
        prompt = rng.choice(("Sort these numbers in ascending order: {}.", "Sort from smallest to largest: {}."))
    elif items == "words":
        values = [rng.choice(WORDS) for _ in range(length)]
        prompt = rng.choice(("Sort these words alphabetically: {}.", "Put these words in alphabetical order: {}."))
    else:
        raise ValueError(f"sort items must be 'numbers' or 'words', got {items!r}")
    return Task("sort", prompt.format(_join(values)), _join(sorted(values)),
                {"length": length, "items": items, "values": values})


def reverse_task(rng: random.Random, length: int | None = None, items: str | None = None) -> Task:
    items = items or rng.choice(("letters", "list"))
    if items == "letters":
        length = length or rng.randint(3, 10)
        word = "".join(rng.choice(LETTERS) for _ in range(length))
        prompt = rng.choice(("Reverse the string '{}'.", "Write '{}' backwards."))
        return Task("reverse", prompt.format(word), word[::-1], {"length": length, "items": items, "value": word})
    if items == "list":
        length = length or rng.randint(3, 8)
        values = [rng.choice(WORDS) for _ in range(length)]
        prompt = rng.choice(("Reverse the order of this list: {}.", "List these in reverse order: {}."))
        return Task("reverse", prompt.format(_join(values)), _join(values[::-1]),
                    {"length": length, "items": items, "values": values})
    raise ValueError(f"reverse items must be 'letters' or 'list', got {items!r}")


def count_task(rng: random.Random, length: int | None = None, items: str | None = None) -> Task:
    length = length or rng.randint(5, 20)
    items = items or rng.choice(("letters", "words"))
    # A small alphabet makes repeats (and answers other than 0 or 1) common.
    if items == "letters":
        alphabet = rng.sample(LETTERS, 4)
        text = "".join(rng.choice(alphabet) for _ in range(length))
        target = rng.choice(alphabet)
        return Task("count", f"How many times does the letter '{target}' appear in '{text}'?", str(text.count(target)),
                    {"length": length, "items": items, "target": target, "value": text})
    if items == "words":
        vocab = rng.sample(WORDS, 4)
        values = [rng.choice(vocab) for _ in range(length)]
        target = rng.choice(vocab)
        return Task("count", f"How many times does '{target}' appear in this list: {_join(values)}?",
                    str(values.count(target)), {"length": length, "items": items, "target": target, "values": values})
    raise ValueError(f"count items must be 'letters' or 'words', got {items!r}")


RETRIEVAL_HEADER = "Remember the REGISTER_CONTENT of every line."
MAX_RETRIEVAL_LINES = 50_000  # line ids are distinct 6-digit numbers


def _retrieval_lines(seed: int, num_lines: int) -> list[tuple[int, int]]:
    """(line id, value) pairs; the first n are the same for every num_lines >= n, so the
    prompt grows with num_lines (what the token-length search relies on)."""
    rng, seen, lines = random.Random(seed), set(), []
    while len(lines) < num_lines:
        line_id = rng.randint(100_000, 999_999)
        if line_id not in seen:
            seen.add(line_id)
            lines.append((line_id, rng.randint(1000, 99999)))
    return lines


def _retrieval_prompt(lines: list[tuple[int, int]], index: int) -> str:
    body = "\n".join(f"line {i}: REGISTER_CONTENT is {v}" for i, v in lines)
    return f"{RETRIEVAL_HEADER}\n{body}\nWhat is the REGISTER_CONTENT in line {lines[index][0]}?"


def _query_index(position: float, num_lines: int) -> int:
    return min(num_lines - 1, int(position * num_lines))


def _fit_num_lines(seed: int, position: float, target_tokens: int, count_tokens: Callable[[str], int]) -> int:
    """Most lines whose prompt stays within target_tokens (doubling, then bisection)."""
    def fits(n: int) -> bool:
        lines = _retrieval_lines(seed, n)
        return count_tokens(_retrieval_prompt(lines, _query_index(position, n))) <= target_tokens

    if not fits(1):
        raise ValueError(f"target_tokens={target_tokens} is shorter than a one-line retrieval prompt")
    lo, hi = 1, 2
    while hi <= MAX_RETRIEVAL_LINES and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_RETRIEVAL_LINES + 1)
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi) (or hi beyond the cap)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def retrieval_task(rng: random.Random, num_lines: int | None = None, target_tokens: int | None = None,
                   count_tokens: Callable[[str], int] | None = None, position: float | None = None,
                   min_lines: int = 8, max_lines: int = 128) -> Task:
    """LongEval-style key-value retrieval: "line <id>: REGISTER_CONTENT is <n>" records, then
    a question about one line.

    Length: `num_lines`, or `target_tokens` with `count_tokens` (e.g.
    `lambda s: len(tok(s)["input_ids"])`) for the longest prompt within that many tokens, or
    neither for a log-uniform number of lines in [min_lines, max_lines].
    `position` in [0, 1) places the queried line (0 = first line); random if None.
    """
    if num_lines is not None and target_tokens is not None:
        raise ValueError("give num_lines or target_tokens, not both")
    if target_tokens is not None and count_tokens is None:
        raise ValueError("target_tokens needs count_tokens (a function from text to its token count)")
    if position is not None and not 0 <= position < 1:
        raise ValueError(f"position must be in [0, 1), got {position}")
    seed = rng.getrandbits(64)
    position = rng.random() if position is None else position
    if target_tokens is not None:
        num_lines = _fit_num_lines(seed, position, target_tokens, count_tokens)
    elif num_lines is None:
        num_lines = round(math.exp(rng.uniform(math.log(min_lines), math.log(max_lines))))
    if not 1 <= num_lines <= MAX_RETRIEVAL_LINES:
        raise ValueError(f"num_lines must be in [1, {MAX_RETRIEVAL_LINES}], got {num_lines}")
    lines = _retrieval_lines(seed, num_lines)
    index = _query_index(position, num_lines)
    params = {"num_lines": num_lines, "index": index, "line": lines[index][0]}
    if target_tokens is not None:
        params["target_tokens"] = target_tokens
    return Task("retrieval", _retrieval_prompt(lines, index), str(lines[index][1]), params)


GENERATORS: dict[str, Callable[..., Task]] = {
    "add": add_task,
    "sub": sub_task,
    "sort": sort_task,
    "reverse": reverse_task,
    "count": count_task,
    "retrieval": retrieval_task,
}
KINDS = tuple(GENERATORS)


def generate_task(kind: str, rng: random.Random, **params) -> Task:
    if kind not in GENERATORS:
        raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")
    return GENERATORS[kind](rng, **params)


def generate_tasks(n: int, seed: int, kinds: Sequence[str] = KINDS,
                   params: dict[str, dict] | None = None) -> list[Task]:
    """n tasks cycling through `kinds` (equal counts per kind); `params` maps a kind to the
    keyword arguments of its generator, e.g. {"retrieval": {"max_lines": 512}}."""
    params = params or {}
    unknown = sorted(set(params) - set(kinds))
    if unknown:
        raise ValueError(f"params given for kinds not generated: {', '.join(unknown)}")
    rng = random.Random(seed)
    return [generate_task(kinds[i % len(kinds)], rng, **params.get(kinds[i % len(kinds)], {})) for i in range(n)]


_SEPARATORS = re.compile(r"[,\s]+")


def answer_items(text: str) -> list[str]:
    """The items of an answer as `check` compares them."""
    text = text.strip().removesuffix(".").strip()
    # Integers compare by value ("007" == "7"), everything else verbatim.
    return [str(int(t)) if re.fullmatch(r"[+-]?\d+", t) else t for t in _SEPARATORS.split(text) if t]


def check(task: Task, response: str) -> bool:
    """True if `response` gives the task's answer (whitespace, list separators and a trailing
    period aside); any other value, extra or missing item is rejected."""
    return answer_items(response) == answer_items(task.answer)
