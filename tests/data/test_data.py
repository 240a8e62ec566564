"""`leanserve data build`: determinism, splits, task checkers, chat pairs, CLI errors."""
from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys

import pytest

from leanserve.cli import main
from leanserve.data.build import load_manifest, read_jsonl, split_of
from leanserve.data.chat import summary
from leanserve.data.tasks import (
    KINDS,
    Task,
    check,
    generate_task,
    generate_tasks,
    retrieval_task,
)
from leanserve.errors import UserError

SMALL = ["--max-docs", "60", "--num-tasks", "48,24,24"]


def _build_cli(out, seed: int) -> dict:
    assert main(["data", "build", "--out", str(out), "--seed", str(seed), *SMALL]) == 0
    return load_manifest(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return out, _build_cli(out, seed=0)


def _rows(out, manifest, domain, split) -> list[dict]:
    return list(read_jsonl(out / manifest["splits"][domain][split]["path"]))


# --- determinism --------------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_other_tasks(built, tmp_path):
    out, manifest = built
    again = _build_cli(tmp_path / "again", seed=0)
    assert again["sha256"] == manifest["sha256"]
    other = _build_cli(tmp_path / "other", seed=1)
    for split in ("train", "val", "test"):
        assert other["splits"]["tasks"][split]["sha256"] != manifest["splits"]["tasks"][split]["sha256"]
        # the corpora and their splits do not depend on the seed
        assert other["splits"]["code"][split]["sha256"] == manifest["splits"]["code"][split]["sha256"]
    assert other["sha256"] != manifest["sha256"]


def test_build_does_not_depend_on_hash_randomisation(tmp_path):
    code = ("import sys; from leanserve.data.build import BuildOptions, build; "
            "print(build(sys.argv[1], BuildOptions(max_docs=30, num_tasks=(12, 6, 6)))['sha256'])")
    hashes = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], env=env,
                              capture_output=True, text=True, check=True)
        hashes.add(proc.stdout.strip())
    assert len(hashes) == 1


def test_manifest_describes_the_files(built):
    out, manifest = built
    assert manifest["python"] == sys.version and manifest["seed"] == 0
    assert set(manifest["splits"]) == {"code", "docs", "tasks", "chat"}
    for domain, splits in manifest["splits"].items():
        for split, entry in splits.items():
            data = (out / entry["path"]).read_bytes()
            assert entry["path"] == f"{domain}/{split}.jsonl"
            assert entry["num_bytes"] == len(data)
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert entry["num_rows"] == len(_rows(out, manifest, domain, split))
    assert manifest["splits"]["tasks"]["val"]["num_rows"] == 24


def test_rows_have_the_documented_fields(built):
    out, manifest = built
    code = _rows(out, manifest, "code", "train")
    assert code and all(set(r) == {"id", "source", "text"} and r["source"].endswith(".py") for r in code)
    assert all(len(r["text"].encode()) <= 64 * 1024 for r in code)
    assert not any("/test/" in r["source"] or r["source"].startswith(("idlelib/", "test/")) for r in code)
    docs = [r for s in ("train", "val", "test") for r in _rows(out, manifest, "docs", s)]
    assert any(r["id"].startswith("topic:") for r in docs) and any(r["source"].endswith(".py") for r in docs)
    task = _rows(out, manifest, "tasks", "train")[0]
    assert set(task) == {"id", "kind", "prompt", "answer", "params", "text"}
    assert task["text"] == f"{task['prompt']} {task['answer']}"
    chat = _rows(out, manifest, "chat", "train")
    assert {r["source"] for r in chat} == {"docs", "tasks"}
    for r in chat:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert (r["task"] is None) == (r["source"] == "docs")


# --- splits -------------------------------------------------------------------------------

def test_splits_are_disjoint_by_document(built):
    out, manifest = built
    ids = {}
    for domain in ("code", "docs"):
        ids[domain] = {s: [r["id"] for r in _rows(out, manifest, domain, s)] for s in ("train", "val", "test")}
        assert sum(bool(v) for v in ids[domain].values()) >= 2, "too few documents to exercise the split"
        for split, split_ids in ids[domain].items():
            assert len(set(split_ids)) == len(split_ids)
            assert all(split_of(i) == split for i in split_ids)
    # a module's code and docs share a split, and docs chat pairs follow their document
    code_split = {i: s for s, v in ids["code"].items() for i in v}
    docs_split = {i: s for s, v in ids["docs"].items() for i in v}
    assert all(code_split[i] == s for i, s in docs_split.items() if not i.startswith("topic:"))
    docs_pairs = 0
    for split in ("train", "val", "test"):
        for r in _rows(out, manifest, "chat", split):
            if r["source"] == "docs":
                assert docs_split[r["id"].split("#")[0]] == split
                docs_pairs += 1
    assert docs_pairs > 0


def test_held_out_tasks_are_not_in_training(built):
    out, manifest = built
    train = {r["prompt"] for r in _rows(out, manifest, "tasks", "train")}
    train |= {r["task"]["prompt"] for r in _rows(out, manifest, "chat", "train") if r["task"]}
    for split in ("val", "test"):
        held = [r["prompt"] for r in _rows(out, manifest, "tasks", split)]
        held += [r["task"]["prompt"] for r in _rows(out, manifest, "chat", split) if r["task"]]
        assert held and not train & set(held)


# --- tasks and checkers -------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _items(text: str) -> list[str]:
    return text.split(": ", 1)[1].rstrip(".").split(", ")


def _solve(task: Task) -> str:
    """The answer worked out from the prompt text alone (not from the generator's params)."""
    p = task.prompt
    if task.kind == "add":
        return str(sum(_ints(p)))
    if task.kind == "sub":
        a, b = _ints(p)
        return str(a - b)
    if task.kind == "sort":
        items = _items(p)
        return ", ".join(sorted(items, key=int) if items[0].isdigit() else sorted(items))
    if task.kind == "reverse":
        quoted = re.search(r"'(\w+)'", p)
        return quoted.group(1)[::-1] if quoted else ", ".join(_items(p)[::-1])
    if task.kind == "count":
        target, where = re.findall(r"'([^']+)'", p) if "letter" in p else (re.search(r"'(\w+)'", p).group(1), None)
        return str(where.count(target) if where else _items(p.rstrip("?")).count(target))
    if task.kind == "retrieval":
        key = re.search(r"in line (\d+)\?$", p).group(1)
        return re.search(rf"^line {key}: REGISTER_CONTENT is (\d+)$", p, re.M).group(1)
    raise AssertionError(task.kind)


def _wrong(task: Task) -> list[str]:
    items = task.answer.split(", ")
    if task.answer.isdigit():
        n = int(task.answer)
        return [str(n + 1), str(n * 10 + 1), f"{n} {n}"] + ([str(n - 1)] if n else [])
    wrong = [", ".join(items[:-1]), task.answer + ", x"]
    if len(set(items)) > 1:
        wrong.append(", ".join(items[::-1]))
    if len(items) == 1 and len(set(task.answer)) > 1:
        wrong.append(task.answer[::-1])
    return wrong


@pytest.mark.parametrize("kind", KINDS)
def test_checker_accepts_right_and_rejects_wrong(kind):
    rng = random.Random(123)
    for _ in range(30):
        task = generate_task(kind, rng)
        assert task.kind == kind
        assert task.answer == _solve(task)
        for ok in (task.answer, f"  {task.answer}.\n", task.answer.replace(", ", " ")):
            assert check(task, ok), (task.prompt, ok)
        for bad in _wrong(task) + ["", "I don't know"]:
            assert not check(task, bad), (task.prompt, bad)


def test_generate_tasks_is_seeded_and_covers_kinds():
    a, b, c = generate_tasks(24, seed=5), generate_tasks(24, seed=5), generate_tasks(24, seed=6)
    assert a == b and a != c
    assert {t.kind for t in a} == set(KINDS)
    assert {t.kind for t in generate_tasks(6, seed=0, kinds=("add", "sort"))} == {"add", "sort"}
    with pytest.raises(ValueError):
        generate_task("nope", random.Random(0))


@pytest.mark.parametrize("num_lines", [10, 300])
def test_retrieval_at_a_number_of_lines(num_lines):
    for position in (0.0, 0.5, 0.99):
        task = retrieval_task(random.Random(num_lines), num_lines=num_lines, position=position)
        records = re.findall(r"^line (\d+): REGISTER_CONTENT is (\d+)$", task.prompt, re.M)
        assert len(records) == num_lines == task.params["num_lines"]
        assert len({k for k, _ in records}) == num_lines  # keys are unique, so the question is unambiguous
        index = task.params["index"]
        assert index == int(position * num_lines)
        assert task.prompt.endswith(f"in line {records[index][0]}?") and task.answer == records[index][1]
        assert check(task, task.answer) and not check(task, str(int(task.answer) + 1))


@pytest.mark.parametrize("target", [100, 2000])
def test_retrieval_at_a_target_token_length(target):
    def count_tokens(text: str) -> int:  # a stand-in tokenizer: one token per word or symbol
        return len(re.findall(r"\w+|[^\w\s]", text))

    task = retrieval_task(random.Random(0), target_tokens=target, count_tokens=count_tokens)
    n = count_tokens(task.prompt)
    per_line = count_tokens("line 123456: REGISTER_CONTENT is 12345")
    assert target - per_line < n <= target  # the longest prompt that fits
    assert task.params["target_tokens"] == target and task.answer == _solve(task)
    with pytest.raises(ValueError):
        retrieval_task(random.Random(0), target_tokens=target)  # no tokenizer given


# --- chat ---------------------------------------------------------------------------------

def test_task_chat_answers_pass_the_checker(built):
    out, manifest = built
    rows = [r for s in ("train", "val", "test") for r in _rows(out, manifest, "chat", s) if r["source"] == "tasks"]
    assert len(rows) == 48 + 24 + 24
    for r in rows:
        task = Task.from_row(r["task"])
        assert r["messages"][0]["content"] == task.prompt
        assert check(task, r["messages"][1]["content"]) and task.answer == _solve(task)


def test_task_kinds_and_answer_tags(tmp_path, capsys):
    """--task-kinds leaves the other kinds unseen everywhere; --answer-tags puts chat task replies in the
    format the RLVR rewards parse."""
    from leanserve.data.rewards import reward

    out = tmp_path / "d"
    assert main(["data", "build", "--out", str(out), "--max-docs", "2", "--num-tasks", "12,4,4",
                 "--task-kinds", "add,sort", "--answer-tags"]) == 0
    manifest = load_manifest(out)
    assert manifest["options"]["task_kinds"] == ["add", "sort"] and manifest["options"]["answer_tags"]
    for split in ("train", "val", "test"):
        assert {r["kind"] for r in _rows(out, manifest, "tasks", split)} == {"add", "sort"}
        chats = [r for r in _rows(out, manifest, "chat", split) if r["source"] == "tasks"]
        assert {r["task"]["kind"] for r in chats} == {"add", "sort"}
        for r in chats:
            reply = r["messages"][1]["content"]
            assert reply.startswith("<answer>") and reward(Task.from_row(r["task"]), reply).total == 3.0
    assert main(["data", "build", "--out", str(tmp_path / "e"), "--task-kinds", "add,mul"]) == 2
    assert "--task-kinds" in capsys.readouterr().err


def test_max_digits_bounds_add_and_sub(tmp_path):
    out = tmp_path / "d"
    assert main(["data", "build", "--out", str(out), "--max-docs", "2", "--num-tasks", "40,4,4",
                 "--task-kinds", "add,sub", "--max-digits", "3"]) == 0
    manifest = load_manifest(out)
    rows = _rows(out, manifest, "tasks", "train")
    assert manifest["options"]["max_digits"] == 3 and {r["params"]["digits"] for r in rows} == {2, 3}


def test_long_tasks_are_far_dependencies_in_tasks_and_chat(tmp_path):
    """--long-tasks adds the long-context kinds to `tasks` and `chat` of every split, at lengths in the
    --long-tokens range, each answerable (its checker accepts the answer) from far back in the prompt."""
    from leanserve.data.long_context import CHARS_PER_TOKEN, LONG_KINDS

    out = tmp_path / "d"
    assert main(["data", "build", "--out", str(out), "--max-docs", "2", "--num-tasks", "4,2,2",
                 "--long-tasks", "8,4,4", "--long-tokens", "256,1024"]) == 0
    manifest = load_manifest(out)
    assert manifest["options"]["long_tasks"] == {"train": 8, "val": 4, "test": 4}
    prompts = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        long = [Task.from_row(r) for r in _rows(out, manifest, "tasks", split) if r["id"].startswith("long-")]
        chats = [r for r in _rows(out, manifest, "chat", split) if r["id"].startswith("chat-long-")]
        # kinds of their own: per-kind scores and tasks:KIND groups of the short tasks stay unmixed
        assert len(long) == len(chats) == n and {t.kind for t in long} == {f"long_{k}" for k in LONG_KINDS}
        for task in long + [Task.from_row(r["task"]) for r in chats]:
            assert check(task, task.answer)
            assert len(task.prompt) / CHARS_PER_TOKEN <= 1024
            if task.kind == "long_retrieval":  # the asked record lies in the prompt's first half
                key = re.search(r"in line (\d+)\?$", task.prompt).group(1)
                assert task.prompt.index(f"line {key}:") < len(task.prompt) / 2
        prompts[split] = {t.prompt for t in long}
    assert not prompts["train"] & (prompts["val"] | prompts["test"])


def test_long_chat_tasks_count_on_their_own(tmp_path):
    """--long-chat-tasks sets the chat split's long items apart from --long-tasks (a chat phase reads far
    fewer conversations than pretraining reads documents), and the manifest records both."""
    out = tmp_path / "d"
    assert main(["data", "build", "--out", str(out), "--max-docs", "2", "--num-tasks", "4,2,2",
                 "--long-tasks", "6,2,2", "--long-chat-tasks", "2,1,1", "--long-tokens", "256,512"]) == 0
    manifest = load_manifest(out)
    assert manifest["options"]["long_chat_tasks"] == {"train": 2, "val": 1, "test": 1}
    for split, n, n_chat in (("train", 6, 2), ("val", 2, 1), ("test", 2, 1)):
        assert sum(r["id"].startswith("long-") for r in _rows(out, manifest, "tasks", split)) == n
        assert sum(r["id"].startswith("chat-long-") for r in _rows(out, manifest, "chat", split)) == n_chat


def test_long_kinds_pick_the_kinds_including_the_repeat_warm_up(tmp_path):
    """--long-kinds: only those kinds, in turn; `repeat` asks back random words about half the item long."""
    out = tmp_path / "d"
    assert main(["data", "build", "--out", str(out), "--max-docs", "2", "--num-tasks", "4,2,2", "--long-tasks",
                 "6,2,2", "--long-chat-tasks", "0", "--long-tokens", "64,160", "--long-kinds", "repeat,copy"]) == 0
    manifest = load_manifest(out)
    assert manifest["options"]["long_kinds"] == ["repeat", "copy"]
    long = [Task.from_row(r) for r in _rows(out, manifest, "tasks", "train") if r["id"].startswith("long-")]
    assert [t.kind for t in long] == ["long_repeat", "long_copy"] * 3
    for task in long:
        assert check(task, task.answer)
        if task.kind == "long_repeat":
            words = task.answer.split()
            assert task.prompt == " ".join(words) + "\nRepeat the words above." and len(words) == task.params["words"]
            assert 64 / 2 <= len(f"{task.prompt} {task.answer}") / 3.5 <= 160 * 1.1  # about the asked length
    assert main(["data", "build", "--out", str(tmp_path / "e"), "--long-kinds", "repeat,video"]) == 2


def test_long_training_tasks_do_not_depend_on_the_worker_count():
    """Chunks of TASKS_PER_CHUNK items each from their own seed: two processes draw what one draws,
    in the same order, the kinds still take turns across a chunk boundary, and chunks do not repeat
    each other's random records."""
    from leanserve.data.long_context import LONG_KINDS, TASKS_PER_CHUNK, training_tasks

    n = TASKS_PER_CHUNK + 3
    one = training_tasks(7, n, False, (64, 96), workers=1)
    two = training_tasks(7, n, False, (64, 96), workers=2)
    assert [(t.prompt, t.answer) for t in one] == [(t.prompt, t.answer) for t in two]
    assert [t.kind for t in one] == [LONG_KINDS[i % len(LONG_KINDS)] for i in range(n)]
    records = [t.prompt for t in one if t.kind in ("retrieval", "passkey")]  # random records: never repeated
    assert len(set(records)) == len(records)


def test_docs_summary_is_the_first_sentence():
    assert summary("Return the sum, e.g. 1 + 2.  More text.\n\nDetails.") == "Return the sum, e.g. 1 + 2."
    assert summary("Serialize ``obj`` as\nJSON text.\n\nMore.") == "Serialize ``obj`` as JSON text."
    assert summary("dumps(obj) -> str\n\nReturn JSON.") is None  # a C-style signature line
    assert summary("json.decoder") is None
    assert summary("Word " * 100) is None


# --- CLI errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["", "sub"])
def test_cli_rejects_an_unusable_output_path(tmp_path, capsys, sub):
    target = tmp_path / "file"
    target.write_text("x")
    out = target / sub if sub else target  # the file itself, or a directory under it
    assert main(["data", "build", "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert "error" in err and str(out) in err and "\n" not in err


@pytest.mark.parametrize("argv", [["--num-tasks", "ten"], ["--num-tasks", "1,2"], ["--max-docs", "0"],
                                  ["--long-tokens", "4096,512"], ["--long-tokens", "8,100"], ["--max-digits", "12"], []])
def test_cli_rejects_bad_options(tmp_path, capsys, argv):
    out = [] if not argv else ["--out", str(tmp_path / "out")]  # [] = --out missing
    with pytest.raises(SystemExit) as exc:
        main(["data", "build", *out, *argv])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "error" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_load_manifest_of_a_missing_build(tmp_path):
    with pytest.raises(UserError, match="manifest.json"):
        load_manifest(tmp_path)
