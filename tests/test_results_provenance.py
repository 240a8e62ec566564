"""Every published number has a result file behind it, and every result file says which code, hardware
and day made it: the JSONs in benchmarks/results/ carry git_commit (of a clean tree), hardware and date,
and every results/ path that README.md, BENCHMARKS.md or docs/ names exists."""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
# a path as the docs write it: {a,b} alternatives, "..." for a hardware suffix
RESULT_PATH = re.compile(r"results/([A-Za-z0-9_.{},+\-]+?\.(?:json|png|log|txt))")


def expand(pattern: str) -> list[str]:
    """`a_{x,y}-...json` -> ['a_x-*json', 'a_y-*json']."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern.replace("...", "*")]
    return [p for alt in m.group(1).split(",") for p in expand(pattern[:m.start()] + alt + pattern[m.end():])]


def sections(result: dict) -> list[dict]:
    """The parts of a result that each need provenance: the file, or each top-level part of a file
    that combines runs (e.g. bayes_eval.json's c1 and c2)."""
    if "git_commit" in result or not all(isinstance(v, dict) for v in result.values()):
        return [result]
    return list(result.values())


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_result_names_its_commit_hardware_and_date(path):
    for part in sections(json.loads(path.read_text())):
        assert {"git_commit", "hardware", "date"} <= set(part), f"{path.name}: {sorted(part)[:12]}"
        commit = str(part["git_commit"])
        assert re.fullmatch(r"[0-9a-f]{7,40}", commit), f"{path.name}: git_commit {commit!r} is not a clean tree's"
        assert re.match(r"\d{4}-\d{2}-\d{2}", str(part["date"])), f"{path.name}: date {part['date']!r}"
        assert part["hardware"], path.name


def test_every_result_the_docs_name_exists():
    named = {(doc.name, p) for doc in DOCS for m in RESULT_PATH.finditer(doc.read_text()) for p in expand(m.group(1))}
    assert len(named) > 50  # the pattern still finds the docs' references
    missing = sorted((doc, p) for doc, p in named if not glob.glob(str(RESULTS / p)) and p != "moa_eval.json")
    assert not missing, missing  # (moa_eval.json: the default --out of `eval moa` in README's command table)
