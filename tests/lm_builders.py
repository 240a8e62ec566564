"""A tiny `leanserve data build`-format directory for LM trainer tests (train lm, its DDP, fault and jobs
tests), written in milliseconds."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

TASK_KINDS = ("add", "sub", "sort", "reverse", "count")  # short prompts: no retrieval in tiny runs


def write_data(root: Path, seed: int = 0, answer_tags: bool = False) -> Path:
    """A tiny `leanserve data build`-format directory: code, docs, tasks and chat splits + manifest
    (`answer_tags`: chat task replies in the <answer>…</answer> format of RLVR rewards)."""
    from leanserve.data.build import VERSION
    from leanserve.data.chat import messages, task_chat_row
    from leanserve.data.tasks import generate_tasks

    rng = random.Random(seed)
    sizes = {"train": 60, "val": 12, "test": 12}
    split_seeds = {"train": 10, "val": 20, "test": 30}
    rows: dict[str, dict[str, list[dict]]] = {d: {} for d in ("code", "docs", "tasks", "chat")}
    for split, n in sizes.items():
        names = [f"f{split}{i}" for i in range(n)]
        rows["code"][split] = [{"id": f"code-{name}", "source": "synthetic", "text":
                                f"def {name}(x, y):\n    return x * {rng.randint(2, 9)} + y\n"} for name in names]
        rows["docs"][split] = [{"id": f"docs-{name}", "source": "synthetic", "text":
                                f"{name}(x, y) multiplies x by a small number and adds y."} for name in names]
        tasks = generate_tasks(n, seed=split_seeds[split] + seed, kinds=TASK_KINDS)
        rows["tasks"][split] = [t.to_row(f"task-{split}-{i}") for i, t in enumerate(tasks)]
        chat_tasks = generate_tasks(n, seed=split_seeds[split] + seed + 1, kinds=TASK_KINDS)
        rows["chat"][split] = [task_chat_row(t, f"chat-task-{split}-{i}", answer_tags) for i, t in enumerate(chat_tasks)]
        rows["chat"][split] += [{"id": f"chat-docs-{name}", "source": "docs", "task": None,
                                 "messages": messages(f"What does {name} do?", "It multiplies and adds.")}
                                for name in names[: n // 2]]
    splits = {}
    for domain, by_split in rows.items():
        splits[domain] = {}
        for split, domain_rows in by_split.items():
            path = root / domain / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            text = "".join(json.dumps(r) + "\n" for r in domain_rows)
            path.write_text(text)
            splits[domain][split] = {"path": f"{domain}/{split}.jsonl", "num_rows": len(domain_rows),
                                     "num_bytes": len(text.encode()),
                                     "sha256": hashlib.sha256(text.encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
    manifest = {"version": VERSION, "seed": seed, "splits": splits, "sha256": digest}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def train_texts(data: Path) -> list[str]:
    texts = []
    for domain in ("code", "docs", "tasks"):
        texts += [json.loads(line)["text"] for line in open(data / domain / "train.jsonl")]
    for line in open(data / "chat" / "train.jsonl"):
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def write_corpus(root: Path, answer_tags: bool = False) -> Path:
    """A data build under root/data and a 400-token tokenizer trained on it under root/tok: the inputs
    of a tiny `train lm` run."""
    from leanserve.data.tokenizer import train_tokenizer

    data = write_data(root / "data", answer_tags=answer_tags)
    train_tokenizer(train_texts(data), root / "tok", vocab_size=400, model_max_length=512)
    return root
