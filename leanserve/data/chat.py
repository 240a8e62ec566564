"""Single-turn instruction pairs for chat finetuning, built from the docs corpus and the tasks.

Docs pairs ask what a module, class or function is for and answer with the first sentence
of its docstring; task pairs ask a task's prompt and answer with its checked answer.
Answers stay short because the models finetuned on them are tiny.
"""
from __future__ import annotations

import random
import re

from leanserve.data.corpus import ModuleDocs
from leanserve.data.rewards import tag_answer
from leanserve.data.tasks import Task

MAX_ANSWER_CHARS = 200

QUESTIONS = {
    "module": ("What is the docstring summary of module {name}?", "What is the {name} module for?",
               "Describe the module {name} in one sentence."),
    "class": ("What is {name}?", "What is the class {name} for?", "Describe the class {name} in one sentence."),
    "function": ("What does {name} do?", "What is {name} for?", "In one sentence, what does {name} do?"),
}
QUESTIONS["method"] = QUESTIONS["function"]

# A sentence ends at . ! or ? followed by a capitalised word or the end: this keeps
# "e.g. foo" and "os.path" inside the sentence.
_FIRST_SENTENCE = re.compile(r".+?[.!?](?=\s+[A-Z`(\"']|$)")
# C-style docstrings open with a signature ("dumps(obj) -> str"), not a sentence.
_SIGNATURE = re.compile(r"^[\w.]+\(")


def summary(doc: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """The first sentence of a docstring's first paragraph, or None if it has no usable one."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    m = _FIRST_SENTENCE.match(paragraph)
    sentence = m.group(0) if m else paragraph
    # Too short to be a sentence (often just the module's name), too long for a tiny model.
    if len(sentence.split()) < 3 or len(sentence) > max_chars or _SIGNATURE.match(sentence):
        return None
    return sentence


def messages(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def docs_rows(docs: ModuleDocs, doc_id: str, rng: random.Random) -> list[dict]:
    """Chat rows for one docs document; ids are `<doc_id>#<n>` so a row's split follows its
    document's."""
    items = [("module", docs.module, docs.doc)] if docs.doc else []
    items += [(e.kind, f"{docs.module}.{e.qualname}", e.doc) for e in docs.entries]
    rows = []
    for kind, name, doc in items:
        answer = summary(doc)
        if answer is None:
            continue
        question = rng.choice(QUESTIONS[kind]).format(name=name)
        rows.append({"id": f"{doc_id}#{len(rows)}", "source": "docs", "messages": messages(question, answer),
                     "task": None})
    return rows


def task_chat_row(task: Task, row_id: str, answer_tags: bool = False) -> dict:
    """A task's question and answer; with `answer_tags` the reply is in the tagged format of RLVR rewards."""
    reply = tag_answer(task.answer) if answer_tags else task.answer
    return {"id": row_id, "source": "tasks", "messages": messages(task.prompt, reply), "task": task.to_row(row_id)}
