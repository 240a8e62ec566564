"""`leanserve eval bayes --c1`: rows and summary under "c1" of a shared results file, and the plot."""
from __future__ import annotations

import json

import numpy as np
import pytest

from leanserve.cli import main


def test_c1_writes_its_section_beside_other_sections_and_the_plot(tmp_path):
    out = tmp_path / "bayes_eval.json"
    out.write_text(json.dumps({"c2": {"git_commit": "abc", "rows": [1]}}))
    argv = ["eval", "bayes", "--c1", "--n", "300", "100", "--seeds", "2", "--ctw-depths", "3", "5", "--kt-depth", "4",
            "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["c2"] == {"git_commit": "abc", "rows": [1]}
    c1 = results["c1"]
    assert c1["git_commit"] and c1["date"] and c1["hardware"].startswith("CPU")
    assert c1["settings"]["n"] == [100, 300]
    learners = {(r["learner"], r["depth"]) for r in c1["rows"]}
    assert learners == {("oracle", 2), ("kt", 4), ("order0", 0), ("ctw", 3), ("ctw", 5)}
    assert len(c1["rows"]) == len(learners) * 2 * 2
    for row in c1["summary"]:
        values = [r["regret_bits"] for r in c1["rows"] if (r["learner"], r["depth"], r["n"]) ==
                  (row["learner"], row["depth"], row["n"])]
        assert row["mean"] == pytest.approx(np.mean(values)) and row["std"] == pytest.approx(np.std(values, ddof=1))
    assert c1["expected_ctw_minus_oracle_bits"] == {"3": 5, "5": 5}
    assert all(gap["mean"] <= 5 for gap in c1["ctw_minus_oracle"])
    assert (tmp_path / "bayes_c1_regret.png").stat().st_size > 0
    # a second run replaces its own section only
    assert main([*argv[:-2], "--seeds", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["c2"]["rows"] == [1] and results["c1"]["settings"]["seeds"] == [0]


def test_c1_refuses_to_overwrite_a_file_that_is_not_a_json_object(tmp_path, capsys):
    out = tmp_path / "notes.json"
    out.write_text("[1, 2]")
    assert main(["eval", "bayes", "--c1", "--n", "50", "--seeds", "1", "--out", str(out)]) == 2
    assert "not an object" in capsys.readouterr().err
    assert out.read_text() == "[1, 2]"


@pytest.mark.parametrize("argv, message", [([], "pass --c1"), (["--c1", "--ctw-depths", "40"], "must lie in"),
                                            (["--c1", "--n", "0"], "must be positive")])
def test_bad_arguments_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["eval", "bayes", *argv, "--out", str(tmp_path / "r.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
