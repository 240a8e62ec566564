"""`leanserve eval sid`: tiny SiD generators distilled with the real CLI from test_sid's tiny teacher,
evaluated here (mode 2) and recombined from eval images JSONs (mode 1); the merging, labels, teacher
choice and goals on hand-made results whose answers are known."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_sid import teacher_dir, tokenizer  # noqa: F401 - the tiny 8x8 teacher fixtures

from leanserve import cli
from leanserve.errors import UserError
from leanserve.eval import sid
from leanserve.models.model_dir import ModelInfo, load_model_info, save_model_info

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--num-images", "4", "--diversity-seeds", "2", "--device", "cpu"]


def main(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def generators(teacher_dir, tmp_path_factory):  # noqa: F811
    from torch_threads import single_thread
    root = tmp_path_factory.mktemp("gens")
    out = {}
    with single_thread():
        for name, flags in {"lsg": ["--guidance", "lsg", "--kappa", "1.5"], "zero": ["--guidance", "zero-cfg"]}.items():
            assert main("distill", "sid", "--teacher", teacher_dir, "--steps", 2, "--iterations", 2, "--batch-size", 2,
                        "--device", "cpu", "--save-dtype", "float16", "--out", root / name, *flags) == 0
            out[name] = root / name
    return out


@pytest.fixture(scope="module")
def mode2(teacher_dir, generators, tmp_path_factory):  # noqa: F811
    """Seed 0 evaluated by `eval sid` itself, its per-model JSONs kept."""
    from torch_threads import single_thread
    root = tmp_path_factory.mktemp("mode2")
    with single_thread():
        assert main("eval", "sid", "--teacher", teacher_dir, "--generators", generators["lsg"], generators["zero"],
                    "--teacher-steps", 2, "--teacher-guidance", 1, 2, "--steps", 1, 2, "--seeds", 0, *TINY,
                    "--model-results", root / "per-model", "--out", root / "sid.json", "--plot", root / "sid.png") == 0
    return root


def test_evaluate_here_gives_every_row_a_plot_and_goals_from_the_rows(mode2, teacher_dir, generators):  # noqa: F811
    from PIL import Image

    results = json.loads((mode2 / "sid.json").read_text())
    rows = results["rows"]
    assert [(r["arm"], r["steps"], r["guidance"], r["unet_evals"]) for r in rows] == [
        ("teacher dpmsolver++", 2, 1.0, 2), ("teacher dpmsolver++", 2, 2.0, 4),  # CFG doubles the UNet calls
        ("LSG k1.5", 1, 1.0, 1), ("LSG k1.5", 2, 1.0, 2), ("Zero-CFG", 1, 1.0, 1), ("Zero-CFG", 2, 1.0, 2)]
    for r in rows:
        assert r["seeds"] == [0] and {"fd", "kid", "alignment.all", "alignment.shape", "alignment.color",
                                      sid.DIVERSITY, "images_per_s"} <= set(r["metrics"])
        assert r["metrics"]["images_per_s"]["mean"] > 0
    zero = next(r for r in rows if r["arm"] == "Zero-CFG")["training"]
    assert zero["kappas"] == [0.0, 0.0, 0.0, 1.0] and (zero["K"], zero["iterations"], zero["images_seen"]) == (2, 2, 4)
    assert zero["seconds_per_iteration"] > 0 and zero["gan"] is None
    assert [a["model"] for a in results["arms"]] == [str(generators["lsg"]), str(generators["zero"])]
    assert sorted(p.name for p in (mode2 / "per-model").iterdir()) == sorted(["lsg.json", "zero.json",
                                                                              f"{teacher_dir.name}.json"])

    png = (mode2 / "sid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(mode2 / "sid.png") as image:
        assert image.format == "PNG" and image.size[0] > 300

    # the teacher's best guidance: highest alignment, then lower FD, recomputed here
    teacher = [r for r in rows if r["role"] == "teacher"]
    best = min(teacher, key=lambda r: (-r["metrics"]["alignment.all"]["mean"], r["metrics"]["fd"]["mean"]))
    assert results["teacher"]["best"]["2"] == {"row": rows.index(best), "guidance": best["guidance"]}
    goals = results["goals"]
    t_fd, t_al = best["metrics"]["fd"]["mean"], best["metrics"]["alignment.all"]["mean"]
    assert goals["teacher_row"]["fd"]["mean"] == t_fd
    few = goals["few_step_vs_teacher"]
    two = [r for r in rows if r["role"] == "generator" and r["steps"] == 2]
    assert few["steps"] == 2 and [a["fd"]["mean"] for a in few["arms"]] == [r["metrics"]["fd"]["mean"] for r in two]
    assert few["met"] == any(r["metrics"]["fd"]["mean"] <= t_fd and r["metrics"]["alignment.all"]["mean"] >= t_al
                             for r in two)
    one = {r["arm"]: r["metrics"]["fd"]["mean"] / t_fd for r in rows if r["role"] == "generator" and r["steps"] == 1}
    assert goals["one_step_vs_teacher"]["fd_ratio"] == pytest.approx(min(one.values()))
    assert goals["one_step_vs_teacher"]["met"] == (min(one.values()) <= 1.5)
    # Zero-CFG against LSG k1.5 at both step counts, deltas of the rows' means
    assert [(d["arm"], d["baseline"], d["steps"]) for d in goals["directions"]] == [
        ("Zero-CFG", "LSG k1.5", 1), ("Zero-CFG", "LSG k1.5", 2)]
    for d in goals["directions"]:
        ra, rb = (next(r for r in rows if r["arm"] == arm and r["steps"] == d["steps"]) for arm in ("Zero-CFG", "LSG k1.5"))
        fd = d["metrics"]["fd"]
        assert fd["delta"] == ra["metrics"]["fd"]["mean"] - rb["metrics"]["fd"]["mean"]
        assert fd["as_expected"] == (fd["delta"] < 0) and "expected" not in d["metrics"]["alignment.all"]
        assert d["metrics"][sid.DIVERSITY]["as_expected"] == (d["metrics"][sid.DIVERSITY]["delta"] > 0)

    table = sid.markdown_table(results).splitlines()
    assert len(table) == 3 + len(rows) and table[3].startswith("| teacher dpmsolver++ cfg 1 | 2 | 2 |")


def test_results_files_merge_seeds_and_write_metrics(mode2, teacher_dir, generators, tmp_path):  # noqa: F811
    from torch_threads import single_thread

    seed1 = tmp_path / "seed1"
    with single_thread():
        assert main("eval", "images", "--model", teacher_dir, "--sampler", "dpmsolver++", "--steps", 2, "--guidance", 1, 2,
                    "--seeds", 1, *TINY, "--out", seed1 / "teacher.json") == 0
        for name, path in generators.items():
            assert main("eval", "images", "--model", path, "--steps", 1, 2, "--seeds", 1, *TINY,
                        "--out", seed1 / f"{name}.json") == 0
    files = sorted((mode2 / "per-model").glob("*.json")) + sorted(seed1.glob("*.json"))
    out = tmp_path / "both.json"
    assert main("eval", "sid", "--results", *files, "--out", out, "--plot", tmp_path / "both.png", "--write-metrics") == 0
    both = json.loads(out.read_text())
    alone = json.loads((mode2 / "sid.json").read_text())
    assert both["settings"]["seeds"] == [0, 1] and (tmp_path / "both.png").stat().st_size > 1000
    assert [(r["arm"], r["steps"], r["guidance"]) for r in both["rows"]] == [
        (r["arm"], r["steps"], r["guidance"]) for r in alone["rows"]]
    files_of = {str(teacher_dir): "teacher.json"} | {str(path): f"{name}.json" for name, path in generators.items()}
    for r0, r in zip(alone["rows"], both["rows"]):
        single = json.loads((seed1 / files_of[r["model"]]).read_text())
        r1 = next(x for x in single["rows"] if (x["steps"], x["guidance"]) == (r["steps"], r["guidance"]))
        for metric in ("fd", "alignment.all", sid.DIVERSITY):
            values = [r0["metrics"][metric]["values"][0], r1["metrics"][metric]["values"][0]]
            assert r["metrics"][metric]["values"] == values
            assert r["metrics"][metric]["mean"] == pytest.approx(np.mean(values))
            assert r["metrics"][metric]["std"] == pytest.approx(np.std(values))
    # each generator's own rows, merged into its leanserve.json
    for path in generators.values():
        saved = load_model_info(path).metrics["image_eval"]
        mine = [r for r in both["rows"] if r["model"] == str(path)]
        assert saved["seeds"] == [0, 1] and [x["fd"] for x in saved["rows"]] == [r["metrics"]["fd"]["mean"] for r in mine]

    # a result whose model directory is not here: named from the leanserve.json copy in the result, or
    # without one from its file name (and then left out of the directions: its guidance is unknown)
    moved = json.loads((mode2 / "per-model" / "zero.json").read_text()) | {"model": str(tmp_path / "gone")}
    assert moved["model_info"]["settings"]["guidance"] == "zero-cfg"
    (tmp_path / "copy.json").write_text(json.dumps(moved))
    (tmp_path / "mystery-arm.json").write_text(json.dumps(moved | {"model_info": None}))
    kept = [mode2 / "per-model" / f"{teacher_dir.name}.json", mode2 / "per-model" / "lsg.json"]
    for name, labels, compared in (("copy", ["LSG k1.5", "Zero-CFG"], 2), ("mystery-arm", ["LSG k1.5", "mystery-arm"], 0)):
        assert main("eval", "sid", "--results", *kept, tmp_path / f"{name}.json", "--out", tmp_path / "m.json") == 0
        m = json.loads((tmp_path / "m.json").read_text())
        assert [a["label"] for a in m["arms"]] == labels and len(m["goals"]["directions"]) == compared


def test_misuse_gives_clear_errors(mode2, teacher_dir, generators, tmp_path):  # noqa: F811
    def eval_sid(*argv):
        parser = cli._Parser()
        sid.add_arguments(parser)
        return sid.run(parser.parse_args([str(a) for a in (*argv, "--out", tmp_path / "x.json")]))

    with pytest.raises(UserError, match="is a SiD generator: pass it with --generators"):
        eval_sid("--teacher", generators["lsg"], "--generators", generators["zero"])
    with pytest.raises(UserError, match="not a SiD generator"):
        eval_sid("--teacher", teacher_dir, "--generators", teacher_dir)
    with pytest.raises(UserError, match="does not go with"):
        eval_sid("--results", mode2 / "sid.json", "--teacher", teacher_dir)
    with pytest.raises(UserError, match="not a `leanserve eval images` result"):
        eval_sid("--results", mode2 / "sid.json")
    # the SiD rule of eval images still holds: a generator has no sampler and no CFG
    with pytest.raises(UserError, match="SiD generator: it takes no --sampler and only --guidance 1"):
        from leanserve.eval import images
        parser = cli._Parser()
        images.add_arguments(parser)
        images.run(parser.parse_args(["--model", str(generators["lsg"]), "--guidance", "2", *TINY]))

    teacher = json.loads((mode2 / "per-model" / f"{teacher_dir.name}.json").read_text())
    lsg = json.loads((mode2 / "per-model" / "lsg.json").read_text())
    with pytest.raises(UserError, match="twice"):
        sid.merge_runs([teacher, lsg, lsg])
    with pytest.raises(UserError, match="different num_images"):
        sid.merge_runs([teacher, lsg | {"settings": lsg["settings"] | {"num_images": 8}}])
    with pytest.raises(UserError, match="different seeds"):
        sid.merge_runs([teacher, {**lsg, "settings": lsg["settings"] | {"seeds": [5]}}])


# ---------------------------------------------------------------------------- hand-made results

def fake_run(model, rows, seeds=(0, 1)) -> dict:
    """An eval images result: rows of (sampler, steps, guidance, {metric: per-seed values})."""
    metrics = ("fd", "alignment.all", "alignment.shape", "alignment.color", sid.DIVERSITY)
    return {"model": str(model), "hardware": "test", "classifier": {"dir": "zoo/shapes-classifier"},
            "settings": {"num_images": 10, "diversity_seeds": 2, "resolution": 8, "real_seed": 0, "seeds": list(seeds)},
            "reference": {"fd": 1.0, "alignment.all": 1.0, sid.DIVERSITY: 5.0},
            "rows": [{"sampler": s, "steps": k, "guidance": g, "unet_evals": k * (2 if g > 1 else 1),
                      "metrics": {m: {"values": list(v[m])} for m in metrics}} for s, k, g, v in rows]}


def generator(tmp_path, name, guidance, kappas, gan=False, num_steps=4):
    path = tmp_path / name
    path.mkdir()
    settings = {"guidance": guidance, **{f"kappa{i + 1}": k for i, k in enumerate(kappas)}, "alpha": 1.0,
                "num_steps": num_steps, "gan": {"weight": 1e-3} if gan else None}
    save_model_info(path, ModelInfo(kind="image", method="sid", settings=settings, metrics={"images_seen": 64}))
    return path


def metrics(fd, align, div):
    return {"fd": [fd, fd + 2], "alignment.all": [align, align], "alignment.shape": [align, align + 0.1],
            "alignment.color": [align, align - 0.1], sid.DIVERSITY: [div, div]}


def test_labels_teacher_choice_goals_and_directions_on_known_numbers(tmp_path):
    arms = {"lsg15": ("lsg", [1.5] * 4, False, metrics(10, 0.8, 4)),
            "lsg2": ("lsg", [2.0] * 4, False, metrics(12, 0.9, 3)),     # as expected on all three
            "zero": ("zero-cfg", [0, 0, 0, 1], False, metrics(11, 0.7, 5)),  # FD worse, diversity better
            "anti": ("anti-cfg", [1, -1, -1, 1], False, metrics(9, 0.7, 4)),  # alignment worse than expected
            "lsg15gan": ("lsg", [1.5] * 4, True, metrics(8, 0.8, 4))}
    runs = [fake_run("teacher", [("ddim", 50, 1.0, metrics(20, 0.5, 4)), ("ddim", 50, 2.0, metrics(30, 0.85, 3)),
                                 ("ddim", 50, 4.0, metrics(25, 0.85, 3)), ("ddim", 25, 2.0, metrics(5, 0.95, 3))])]
    for name, (guidance, kappas, gan, m) in arms.items():
        path = generator(tmp_path, name, guidance, kappas, gan)
        runs.append(fake_run(path, [("sid", 1, 1.0, m), ("sid", 4, 1.0, metrics(m["fd"][0] * 0.5, m["alignment.all"][0],
                                                                                   m[sid.DIVERSITY][0]))]))
    results = sid.combine(sid.merge_runs(runs), {})
    assert [a["label"] for a in results["arms"]] == ["LSG k1.5", "LSG k2", "Zero-CFG", "Anti-CFG k-1 k1=1", "LSG k1.5 +GAN"]
    # at 50 steps guidance 2 and 4 tie on alignment: the lower FD (cfg 4) wins; 25 steps is not the reference
    best = results["teacher"]["best"]
    assert (best["50"]["guidance"], best["25"]["guidance"]) == (4.0, 2.0)
    assert results["rows"][best["50"]["row"]]["steps"] == 50
    goals = results["goals"]
    assert goals["teacher_row"]["fd"] == {"mean": 26.0, "std": 1.0}
    few = goals["few_step_vs_teacher"]
    # 4-step FDs are half the 1-step ones (+1); only LSG k2 (0.9) reaches the teacher's 0.85 alignment
    assert few["steps"] == 4 and few["met"] and few["best_arm"] == "LSG k2" and few["fd_ratio"] == pytest.approx(7 / 26)
    one = goals["one_step_vs_teacher"]
    assert one["best_arm"] == "LSG k1.5 +GAN" and one["fd_ratio"] == pytest.approx(9 / 26) and one["met"]
    found = {(d["arm"], d["baseline"], d["steps"]): {m: v.get("as_expected") for m, v in d["metrics"].items()}
             for d in goals["directions"]}
    assert found[("LSG k2", "LSG k1.5", 1)] == {"fd": True, "alignment.all": True, sid.DIVERSITY: True}
    assert found[("Zero-CFG", "LSG k1.5", 1)] == {"fd": False, "alignment.all": None, sid.DIVERSITY: True}
    assert found[("Anti-CFG k-1 k1=1", "LSG k1.5", 4)] == {"fd": None, "alignment.all": False, sid.DIVERSITY: None}
    assert found[("LSG k1.5 +GAN", "LSG k1.5", 1)] == {"fd": True, "alignment.all": None, sid.DIVERSITY: None}
    assert len(found) == 8  # 4 comparisons x 2 step counts (the +GAN arm: against LSG k1.5 without the GAN)

    # a dedicated K = 1 model is told apart by K; identical settings by the directory name
    k1 = generator(tmp_path, "k1", "lsg", [1.5] * 4, num_steps=1)
    twin = generator(tmp_path, "twin", "zero-cfg", [0, 0, 0, 1])
    again = sid.combine(sid.merge_runs(runs + [fake_run(k1, [("sid", 1, 1.0, metrics(9, 0.8, 4))]),
                                               fake_run(twin, [("sid", 1, 1.0, metrics(9, 0.8, 4))])]), {})
    labels = [a["label"] for a in again["arms"]]
    assert "LSG k1.5 K1" in labels and "LSG k1.5 K4" in labels
    assert {"Zero-CFG K4 (zero)", "Zero-CFG K4 (twin)"} <= set(labels)
    k1_row = next(r for r in again["rows"] if r["arm"] == "LSG k1.5 K1")  # shape (0.8, 0.9), colour (0.8, 0.7)
    assert sid._plot_alignment(k1_row) == pytest.approx((0.8, 0.0))  # per seed: the mean of shape and colour
    sid.plot_results(again, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
