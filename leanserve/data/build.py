"""`leanserve data build`: the local corpora, tasks and chat sets, split and hashed.

Layout (the trainer, tokenizer and eval read exactly this):

    OUT/manifest.json
    OUT/{code,docs,tasks,chat}/{train,val,test}.jsonl

Everything comes from this machine's Python standard library and seeded generators, so
the same seed and Python version give byte-identical files (the manifest hashes them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import count
from pathlib import Path

from tqdm import tqdm

from leanserve.atomic import atomic_write, atomic_write_text
from leanserve.data.chat import docs_rows, task_chat_row
from leanserve.data.corpus import (
    MAX_FILE_BYTES,
    code_document,
    docs_document,
    module_docs,
    stdlib_files,
    topic_documents,
)
from leanserve.data.tasks import KINDS, Task, generate_task
from leanserve.errors import UserError

VERSION = 1
DOMAINS = ("code", "docs", "tasks", "chat")
SPLITS = ("train", "val", "test")
SPLIT_BOUNDS = (0.90, 0.95)  # train below the first, val below the second, test above


def stable_hash(text: str) -> int:
    """64 bits of sha256: unlike hash(), the same in every process (PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def derive_seed(seed: int, *names: str) -> int:
    return stable_hash("/".join([str(seed), *names]))


def split_of(doc_id: str) -> str:
    """A document's split, from its id alone: not from the seed (held-out documents stay
    held out in every build) nor from the other documents (adding one moves no other)."""
    u = stable_hash(doc_id) / 2**64
    return "train" if u < SPLIT_BOUNDS[0] else "val" if u < SPLIT_BOUNDS[1] else "test"


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a built data directory; split paths in it are relative to data_dir."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not a built data directory (no manifest.json); run `leanserve data build`")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != VERSION:
        raise UserError(f"{path}: data format version {manifest.get('version')}, expected {VERSION}; rebuild it")
    return manifest


@dataclass(frozen=True)
class BuildOptions:
    seed: int = 0
    num_tasks: tuple[int, int, int] = (20000, 1000, 1000)  # per split, for `tasks` and again for `chat`
    max_docs: int | None = None  # cap on stdlib files and on pydoc topics (quick test builds)
    max_file_bytes: int = MAX_FILE_BYTES
    max_retrieval_lines: int = 128
    max_digits: int = 5  # add and sub operands get 2 to this many digits
    task_kinds: tuple[str, ...] = KINDS  # kinds of the tasks and of the chat task pairs
    answer_tags: bool = False  # chat task replies as <answer>…</answer> (data/rewards.py's format)
    long_tasks: tuple[int, int, int] = (0, 0, 0)  # long-context tasks per split, for `tasks`
    long_chat_tasks: tuple[int, int, int] | None = None  # and for `chat` (None: as many again)
    long_tokens: tuple[int, int] = (512, 4096)  # their approximate token lengths (log-uniform)
    long_kinds: tuple[str, ...] | None = None  # their kinds, in turn (None: data/long_context.py's LONG_KINDS)
    workers: int = 1  # processes drawing the long-context tasks (the data does not depend on it)

    @property
    def long_chat_counts(self) -> tuple[int, int, int]:
        return self.long_tasks if self.long_chat_tasks is None else self.long_chat_tasks


def _unseen_tasks(seed: int, n: int, seen: set[str], task_params: dict[str, dict],
                  kinds: tuple[str, ...] = KINDS) -> list[Task]:
    """n tasks cycling through `kinds`, skipping prompts in `seen` (items of earlier
    splits), so a held-out task never also appears in training data."""
    rng, tasks = random.Random(seed), []
    for i in count():
        if len(tasks) == n:
            return tasks
        if i >= 10 * n + 1000:
            raise RuntimeError(f"could not draw {n} unseen tasks: the task space is too small")
        kind = kinds[i % len(kinds)]
        task = generate_task(kind, rng, **task_params.get(kind, {}))
        if task.prompt not in seen:
            tasks.append(task)


def _add_long_tasks(rows: dict[str, dict[str, list[dict]]], opts: BuildOptions) -> None:
    """Long-context tasks (data/long_context.py: the answer far from the question) into `tasks` and,
    as many again unless long_chat_tasks says otherwise, `chat`: what a model needs to learn before MoA
    can compress it (a uniform window must fail where it succeeds). Train from the train modules; val and
    test from the held-out ones. Their kinds are prefixed long_ (long_retrieval, ...): per-kind scores and
    `tasks:KIND` groups of the short tasks stay theirs, and --task-kinds does not apply to them."""
    from leanserve.data.long_context import LONG_KINDS, training_tasks  # it imports split_of from here

    for split, n, n_chat in tqdm(list(zip(SPLITS, opts.long_tasks, opts.long_chat_counts)), desc="long tasks",
                                 unit=" splits"):
        tasks = [replace(t, kind=f"long_{t.kind}") for t in
                 training_tasks(derive_seed(opts.seed, "long", split), n + n_chat, split != "train", opts.long_tokens,
                                opts.workers, opts.long_kinds or LONG_KINDS)]
        rows["tasks"][split] += [t.to_row(f"long-{split}-{i}") for i, t in enumerate(tasks[:n])]
        rows["chat"][split] += [task_chat_row(t, f"chat-long-{split}-{i}", opts.answer_tags)
                                for i, t in enumerate(tasks[n:])]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> dict:
    """Write rows atomically; return the manifest entry (row count, bytes, sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, num_rows, num_bytes = hashlib.sha256(), 0, 0
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        for row in rows:
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            digest.update(line)
            num_rows += 1
            num_bytes += len(line)
    return {"num_rows": num_rows, "num_bytes": num_bytes, "sha256": digest.hexdigest()}


def build(out: str | Path, opts: BuildOptions) -> dict:
    """Build every domain and split into `out`; return the manifest (also written there)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The manifest is written last: a half-finished build must not look finished.
    (out / "manifest.json").unlink(missing_ok=True)
    rows: dict[str, dict[str, list[dict]]] = {d: {s: [] for s in SPLITS} for d in DOMAINS}

    for f in tqdm(stdlib_files(opts.max_docs), desc="stdlib", unit=" files"):
        # Code and docs of a module share its id, hence its split: held-out docstrings are
        # not trained on through the source either.
        split = split_of(f.module)
        rows["code"][split].append(code_document(f, opts.max_file_bytes))
        docs = module_docs(f)
        if docs is not None:
            rows["docs"][split].append(docs_document(docs))
            rng = random.Random(derive_seed(opts.seed, "chat-docs", f.module))
            rows["chat"][split] += docs_rows(docs, f.module, rng)
    for doc in topic_documents(opts.max_docs):
        rows["docs"][split_of(doc["id"])].append(doc)

    task_params = {"retrieval": {"max_lines": opts.max_retrieval_lines}, "add": {"max_digits": opts.max_digits},
                   "sub": {"max_digits": opts.max_digits}}
    seen: set[str] = set()
    with tqdm(total=2 * sum(opts.num_tasks), desc="tasks", unit=" tasks") as bar:
        for split, n in zip(SPLITS, opts.num_tasks):
            tasks = _unseen_tasks(derive_seed(opts.seed, "tasks", split), n, seen, task_params, opts.task_kinds)
            chat_tasks = _unseen_tasks(derive_seed(opts.seed, "chat-tasks", split), n, seen, task_params,
                                       opts.task_kinds)
            rows["tasks"][split] = [t.to_row(f"task-{split}-{i}") for i, t in enumerate(tasks)]
            rows["chat"][split] += [task_chat_row(t, f"chat-task-{split}-{i}", opts.answer_tags)
                                    for i, t in enumerate(chat_tasks)]
            seen.update(t.prompt for t in tasks + chat_tasks)
            bar.update(2 * n)
    if any(opts.long_tasks) or any(opts.long_chat_counts):
        _add_long_tasks(rows, opts)

    splits: dict[str, dict[str, dict]] = {}
    for domain in DOMAINS:
        splits[domain] = {}
        for split in SPLITS:
            rel = f"{domain}/{split}.jsonl"
            splits[domain][split] = {"path": rel, **_write_jsonl(out / rel, rows[domain][split])}
    combined = hashlib.sha256("".join(f"{d}/{s} {splits[d][s]['sha256']}\n" for d in DOMAINS for s in SPLITS)
                              .encode()).hexdigest()
    manifest = {
        "version": VERSION,
        "seed": opts.seed,
        "python": sys.version,
        "options": {
            "num_tasks": dict(zip(SPLITS, opts.num_tasks)),
            "max_docs": opts.max_docs,
            "max_file_bytes": opts.max_file_bytes,
            "max_retrieval_lines": opts.max_retrieval_lines,
            "max_digits": opts.max_digits,
            "task_kinds": list(opts.task_kinds),
            "answer_tags": opts.answer_tags,
            "long_tasks": dict(zip(SPLITS, opts.long_tasks)),
            "long_chat_tasks": dict(zip(SPLITS, opts.long_chat_counts)),
            "long_tokens": list(opts.long_tokens),
            **({"long_kinds": list(opts.long_kinds)} if opts.long_kinds else {}),
            "split_bounds": list(SPLIT_BOUNDS),
        },
        "splits": splits,
        "sha256": combined,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _long_kinds(text: str | None) -> tuple[str, ...] | None:
    from leanserve.data.long_context import BUILDERS

    if text is None:
        return None
    kinds = tuple(k.strip() for k in text.split(","))
    if any(k not in BUILDERS for k in kinds) or len(set(kinds)) < len(kinds):
        raise UserError(f"--long-kinds: distinct kinds from {', '.join(BUILDERS)}, got {text!r}")
    return kinds


def _split_sizes(text: str) -> tuple[int, int, int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 3
    if len(sizes) != 3 or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"expected N or TRAIN,VAL,TEST (non-negative integers), got {text!r}")
    return tuple(sizes)


def _token_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(part) for part in text.split(","))
    except ValueError:
        lo = hi = 0
    if not 64 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 64 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser):
    defaults = BuildOptions()
    p.add_argument("--out", required=True, help="output directory (created; its split files are overwritten)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the tasks and of the chat phrasing")
    p.add_argument("--num-tasks", type=_split_sizes, default=defaults.num_tasks, metavar="N|TRAIN,VAL,TEST",
                   help="tasks per split, for `tasks` and again for `chat` (one N: the same for every split; "
                        "default %(default)s)")
    p.add_argument("--max-docs", type=_positive_int, default=None,
                   help="cap on stdlib files and on pydoc topics (small builds for tests)")
    p.add_argument("--max-file-bytes", type=_positive_int, default=defaults.max_file_bytes,
                   help="longer source files are cut at a line end (default %(default)s)")
    p.add_argument("--max-retrieval-lines", type=_positive_int, default=defaults.max_retrieval_lines,
                   help="retrieval tasks get 8 to this many lines, log-uniform (default %(default)s)")
    p.add_argument("--max-digits", type=int, default=defaults.max_digits, choices=range(2, 10), metavar="2..9",
                   help="add and sub operands get 2 to this many digits (default %(default)s)")
    p.add_argument("--task-kinds", default=",".join(KINDS),
                   help="task kinds of the tasks and chat splits, comma-separated (default: all); kinds left out "
                        "stay unseen, e.g. out-of-distribution tasks of an RLVR experiment")
    p.add_argument("--long-tasks", type=_split_sizes, default=defaults.long_tasks, metavar="N|TRAIN,VAL,TEST",
                   help="long-context tasks per split (retrieval, passkey, copy, functions: the answer far from "
                        "the question), for `tasks` and again for `chat` (default none)")
    p.add_argument("--long-chat-tasks", type=_split_sizes, default=None, metavar="N|TRAIN,VAL,TEST",
                   help="long-context tasks per split for `chat` (default: as many as --long-tasks); a chat phase "
                        "reads far fewer conversations than pretraining reads documents")
    p.add_argument("--long-tokens", type=_token_range, default=defaults.long_tokens, metavar="MIN,MAX",
                   help="approximate token lengths of the long-context tasks, log-uniform (default 512,4096)")
    p.add_argument("--long-kinds", default=None, metavar="KIND,...",
                   help="kinds of the long-context tasks, in turn (default: retrieval,passkey,copy,functions); "
                        "repeat (random words asked back) is the warm-up of a short-window curriculum")
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                   help="processes drawing the long-context tasks (default: one per core; the data is the same)")
    p.add_argument("--answer-tags", action="store_true",
                   help="chat task replies as <answer>ANSWER</answer>: the format `train rlvr` rewards")


def run(args):
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if args.max_retrieval_lines < 8:
        raise UserError(f"--max-retrieval-lines must be at least 8, got {args.max_retrieval_lines}")
    kinds = tuple(k.strip() for k in args.task_kinds.split(","))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or len(set(kinds)) < len(kinds):
        raise UserError(f"--task-kinds: distinct kinds from {', '.join(KINDS)}, got {args.task_kinds!r}")
    opts = BuildOptions(seed=args.seed, num_tasks=args.num_tasks, max_docs=args.max_docs,
                        max_file_bytes=args.max_file_bytes, max_retrieval_lines=args.max_retrieval_lines,
                        max_digits=args.max_digits,
                        task_kinds=kinds, answer_tags=args.answer_tags, long_tasks=args.long_tasks,
                        long_chat_tasks=args.long_chat_tasks, long_tokens=args.long_tokens,
                        long_kinds=_long_kinds(args.long_kinds), workers=args.workers)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror}") from e
    manifest = build(out, opts)
    for domain, splits in manifest["splits"].items():
        sizes = ", ".join(f"{s} {e['num_rows']} rows/{e['num_bytes'] / 1e6:.1f} MB" for s, e in splits.items())
        print(f"{domain:<6} {sizes}")
    print(f"manifest {manifest['sha256'][:16]} -> {out / 'manifest.json'}")
