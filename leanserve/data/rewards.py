"""Format-gated verifiable rewards of the task checkers (RL with verifiable rewards, `train rlvr`).

A reply must put its answer in `<answer>…</answer>` (an optional `<think>…</think>` before it). The
format component is 1 when the reply parses, and gates everything: a reply that does not parse scores 0
in every component, however right the text. Accuracy is the task checker's exact match (0/1), except for
`sort`, whose partial credit is the fraction of positions holding the right item (the analogue of a box
IoU): a sort with one pair swapped is nearly right, a reply with the wrong length is mostly wrong.
Total = FORMAT_WEIGHT·format + ACC_WEIGHT·accuracy, in [0, 3]; the score a mixture is judged by is the
accuracy in [0, 1].
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from leanserve.data.tasks import Task, answer_items, check

FORMAT_WEIGHT, ACC_WEIGHT = 1.0, 2.0
# the whole reply: an optional think block, then exactly one answer block, nothing else around them
# (task answers hold no angle brackets, so a block cannot swallow another tag)
_REPLY = re.compile(r"\s*(?:<think>[^<>]*</think>\s*)?<answer>([^<>]*)</answer>\s*")
PARTIAL_CREDIT = ("sort",)


@dataclass(frozen=True)
class Reward:
    format: float
    accuracy: float

    @property
    def total(self) -> float:
        return FORMAT_WEIGHT * self.format + ACC_WEIGHT * self.accuracy


def tag_answer(answer: str) -> str:
    """The reply of the tagged format that `parse_answer` reads back (SFT targets)."""
    return f"<answer>{answer}</answer>"


def parse_answer(reply: str) -> str | None:
    """The text inside the reply's answer block, or None if the reply is not in the format."""
    m = _REPLY.fullmatch(reply)
    return m.group(1) if m else None


def positional_credit(task: Task, answer: str) -> float:
    """Fraction of the expected items matched position by position, over the longer of the two lists
    (so missing or extra items cost their positions): 1 exactly when `check` accepts."""
    got, want = answer_items(answer), answer_items(task.answer)
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1)


def accuracy(task: Task, answer: str) -> float:
    return positional_credit(task, answer) if task.kind in PARTIAL_CREDIT else float(check(task, answer))


def reward(task: Task, reply: str) -> Reward:
    answer = parse_answer(reply)
    if answer is None:
        return Reward(0.0, 0.0)
    return Reward(1.0, accuracy(task, answer))
