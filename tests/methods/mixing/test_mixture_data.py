"""data/mixture.py: the per-group row counts and windows of MixtureSampler, and --groups / --mixture parsing."""
from __future__ import annotations

import math

import pytest
import torch

from leanserve.data.mixture import (
    Group,
    MixtureSampler,
    format_groups,
    parse_groups,
    parse_mixture,
    systematic_counts,
)
from leanserve.errors import UserError

DOMAINS = ("code", "docs", "tasks")


def test_counts_round_each_share_and_fill_the_batch():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.02, 0.49, 0.31, 0.18], dtype=torch.float64)
    seen = torch.zeros(4)
    for _ in range(2000):
        counts = systematic_counts(p, 32, g)
        assert counts.sum() == 32
        assert ((counts == torch.floor(32 * p)) | (counts == torch.ceil(32 * p))).all()
        seen += counts
    # 0.64 rows a batch on average: the small group is not starved by rounding
    assert seen[0] > 0
    assert torch.allclose(seen / seen.sum(), p.float(), atol=0.01)


def test_sampler_frequencies_match_p():
    # each group's stream holds only its own token id, so a row's group can be read off its tokens
    streams = [torch.full((100 + 37 * i,), i) for i in range(3)]
    p = [0.6, 0.3, 0.1]
    sampler, g = MixtureSampler(streams, p), torch.Generator().manual_seed(1)
    n, batch = 300, 10
    rows = torch.cat([sampler.sample(batch, 8, g)["input_ids"] for _ in range(n)])
    assert rows.shape == (n * batch, 8) and (rows == rows[:, :1]).all()
    freq = torch.bincount(rows[:, 0], minlength=3) / len(rows)
    for f, q in zip(freq.tolist(), p):
        assert abs(f - q) <= 4 * math.sqrt(q * (1 - q) / len(rows))  # well inside binomial error
    sampler.set_mixture([0.0, 0.0, 1.0])  # swapped in place, between two batches
    assert (sampler.sample(batch, 8, g)["input_ids"] == 2).all()
    with pytest.raises(ValueError):
        sampler.set_mixture([0.5, 0.6, -0.1])


def test_windows_wrap_and_are_reproducible():
    stream = torch.arange(10)
    a = MixtureSampler([stream], [1.0]).sample(4, 25, torch.Generator().manual_seed(3))
    b = MixtureSampler([stream], [1.0]).sample(4, 25, torch.Generator().manual_seed(3))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], a["input_ids"])
    diffs = (a["input_ids"][:, 1:] - a["input_ids"][:, :-1]) % 10
    assert (diffs == 1).all()  # consecutive tokens, wrapping at the end of the stream


def test_groups_parse_and_format():
    groups = parse_groups("code, docs ,arith=tasks:add+sub,kv=tasks:retrieval", DOMAINS)
    assert groups == [Group("code", "code"), Group("docs", "docs"), Group("arith", "tasks", ("add", "sub")),
                      Group("kv", "tasks", ("retrieval",))]
    assert parse_groups(format_groups(groups), DOMAINS) == groups
    assert format_groups(groups) == "code,docs,arith=tasks:add+sub,kv=tasks:retrieval"


def test_group_rows_filter_task_kinds(tmp_path):
    import json
    (tmp_path / "tasks").mkdir()
    rows = [{"id": str(i), "kind": k, "text": k} for i, k in enumerate(["add", "sort", "sub", "add"])]
    (tmp_path / "tasks" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {"splits": {"tasks": {"val": {"path": "tasks/val.jsonl"}}}}
    assert [r["id"] for r in Group("arith", "tasks", ("add", "sub")).rows(tmp_path, manifest, "val")] == \
        ["0", "2", "3"]
    assert len(Group("tasks", "tasks").rows(tmp_path, manifest, "val")) == 4
    assert Group("arith", "tasks", ("add",)).rows(tmp_path, manifest, "test") == []  # no such split


@pytest.mark.parametrize("text, message", [
    ("code,video", "unknown domain 'video'"),
    ("tasks:add", "is not NAME=SOURCE"),
    ("arith=tasks:add+mul", "unknown task kind 'mul'"),
    ("c=code:add", "only tasks rows have task kinds"),
    ("code,code", "repeated"),
    ("tasks,arith=tasks:add", "share rows of tasks"),
    ("a=tasks:add+sub,b=tasks:sub", "share rows of tasks"),
])
def test_bad_groups(text, message):
    with pytest.raises(UserError, match=message):
        parse_groups(text, DOMAINS)


def test_mixtures_parse():
    names = ["code", "docs", "arith"]
    for kind in ("natural", "stratified", "aioli"):
        assert parse_mixture(kind, names).kind == kind and parse_mixture(kind, names).weights is None
    static = parse_mixture("static:docs=1, code=2,arith=1", names)
    assert static.kind == "static" and static.weights == (0.5, 0.25, 0.25)  # in group order
    assert parse_mixture("static:code=1,docs=0,arith=0", names).weights == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("text, message", [
    ("uniform", "is not one of natural"),
    ("static", "is not one of natural"),
    ("static:code=1,docs=1", "missing: arith"),
    ("static:code=1,docs=1,arith=1,sort=1", "'sort' is not a group"),
    ("static:code=1,code=2,docs=1,arith=1", "given twice"),
    ("static:code=x,docs=1,arith=1", "is not NAME=WEIGHT"),
    ("static:code=-1,docs=1,arith=1", "finite number >= 0"),
    ("static:code=inf,docs=1,arith=1", "finite number >= 0"),
    ("static:code=0,docs=0,arith=0", "at least one weight must be positive"),
])
def test_bad_mixtures(text, message):
    with pytest.raises(UserError, match=message):
        parse_mixture(text, ["code", "docs", "arith"])
