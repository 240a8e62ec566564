"""`leanserve eval sid`: SiD generators against their teacher, in one table, one plot and one goals check.

It combines `leanserve eval images` results (spec sid.md §10): the teacher (a sampler at 25/50
steps over a few CFG scales) and each SiD generator at 1, 2 and 4 steps, all scored with the same
classifier, prompts, image counts and seeds. Two ways in:
- `--results JSON ...`: eval images result files computed elsewhere (e.g. one GPU run per model or
  per seed). Files of the same model are merged seed by seed, so a model evaluated with seed 0 in
  one file and seeds 1 2 in another gets mean and std over all three.
- `--teacher DIR --generators DIR ...`: evaluate them here, on one loaded classifier
  (`--model-results DIR` also keeps each model's eval images JSON, to merge with more seeds later).
Each generator is an arm, named from its leanserve.json (guidance family and kappas, +GAN, K, alpha;
from the directory when it is here, else the copy eval images keeps in its JSON) or, without one,
from the result file's name. Output: a JSON with the real-vs-real reference, the teacher's
best guidance (rule stated in the JSON), one row per (model, sampler, steps, guidance) and a `goals`
section computed from those rows; `--plot` draws FD against alignment from that JSON alone
(`plot_results`), and `markdown_table` gives the BENCHMARKS.md table.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from leanserve.errors import UserError
from leanserve.eval.images import add_runtime_arguments

DIVERSITY = "diversity.pairwise_distance"  # the headline diversity metric (higher: more diverse)
# settings that must agree for rows to be comparable (the seeds may differ per file; they are merged)
SHARED_SETTINGS = ("num_images", "diversity_seeds", "resolution", "real_seed")
TEACHER_RULE = ("at the teacher's largest step count: highest alignment.all mean; ties (equal to 1e-9) go to "
                "the lower FD mean")
REFERENCE_KAPPA = 1.5  # the LSG arm every other guidance strategy is compared with


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--results", nargs="+", help="eval images result JSONs to combine (nothing is generated)")
    p.add_argument("--teacher", help="teacher image model directory (evaluated here)")
    p.add_argument("--generators", nargs="+", help="SiD generator directories (evaluated here)")
    p.add_argument("--teacher-steps", nargs="+", type=int, default=[25, 50])
    p.add_argument("--teacher-guidance", nargs="+", type=float, default=[1.0, 2.0, 4.0], help="teacher CFG scales")
    p.add_argument("--teacher-sampler", default="dpmsolver++", help="the teacher's sampler")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4], help="generator steps")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="evaluation seeds")
    p.add_argument("--num-images", type=int, default=500, help="images per FD set")
    p.add_argument("--diversity-seeds", type=int, default=16, help="images per diversity prompt")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, help="image size (default: the teacher's)")
    p.add_argument("--real-seed", type=int, default=0, help="seed of the real reference images")
    add_runtime_arguments(p)
    p.add_argument("--model-results", help="also write each model's eval images JSON into this folder")
    p.add_argument("--out", required=True, help="the comparison JSON")
    p.add_argument("--plot", help="PNG: FD against alignment.all, one series per arm")
    p.add_argument("--write-metrics", action="store_true",
                   help="merge each generator's own rows into its leanserve.json (image_eval)")


# --------------------------------------------------------------------------- merging eval images results

def merge_runs(runs: list[dict]) -> dict[str, dict]:
    """Group eval images results by model and merge their seeds: model -> one result in the eval
    images layout whose rows hold every seed's values (mean/std recomputed over all of them)."""
    from leanserve.eval.images import aggregate

    if not runs:
        raise UserError("no results to combine")
    first = runs[0]
    for run in runs[1:]:
        differ = [k for k in SHARED_SETTINGS if run["settings"][k] != first["settings"][k]]
        if Path(run["classifier"]["dir"]).name != Path(first["classifier"]["dir"]).name:
            differ.append("classifier")
        if differ:
            raise UserError(f"{run['model']} and {first['model']} were evaluated with different {', '.join(differ)}: "
                            "their numbers are not comparable")
    merged: dict[str, dict] = {}
    per_seed: dict[str, dict[tuple, dict[int, dict]]] = {}  # model -> config -> seed -> metrics
    for run in runs:
        model = run["model"]
        entry = merged.setdefault(model, {k: v for k, v in run.items() if k != "rows"} | {"hardware": []})
        if run["hardware"] not in entry["hardware"]:
            entry["hardware"].append(run["hardware"])
        seeds = run["settings"]["seeds"]
        for row in run["rows"]:
            config = (row["sampler"], row["steps"], row["guidance"], row["unet_evals"])
            done = per_seed.setdefault(model, {}).setdefault(config, {})
            for i, seed in enumerate(seeds):
                if seed in done:
                    raise UserError(f"{model}: {row['sampler']} {row['steps']} steps cfg {row['guidance']:g} has seed "
                                    f"{seed} twice")
                done[seed] = {k: v["values"][i] for k, v in row["metrics"].items()}
    for model, entry in merged.items():
        entry["hardware"] = " + ".join(entry["hardware"])
        entry["rows"] = []
        for (sampler, steps, guidance, unet_evals), by_seed in per_seed[model].items():
            seeds = sorted(by_seed)
            entry["rows"].append({"sampler": sampler, "steps": steps, "guidance": guidance, "unet_evals": unet_evals,
                                  "seeds": seeds, "metrics": aggregate([by_seed[s] for s in seeds])})
        entry["settings"] = entry["settings"] | {"seeds": sorted({s for r in entry["rows"] for s in r["seeds"]})}
    seed_sets = {tuple(r["seeds"]) for e in merged.values() for r in e["rows"]}
    if len(seed_sets) > 1:
        raise UserError(f"rows were evaluated with different seeds {sorted(seed_sets)}: evaluate every model with "
                        "the same seeds")
    return merged


# --------------------------------------------------------------------------- arms

def _family(k: list[float]) -> tuple[str, str]:
    """(family, label) of the kappas κ1..κ4 (spec §6)."""
    if k[0] == k[1] == k[2] == k[3]:
        return "lsg", f"LSG k{k[3]:g}"
    if k == [0.0, 0.0, 0.0, 1.0]:
        return "zero-cfg", "Zero-CFG"
    if k[3] == 1.0 and k[1] == k[2] < 0:
        return "anti-cfg", f"Anti-CFG k{k[1]:g}" + ("" if k[0] == k[1] else f" k1={k[0]:g}")
    return "custom", "k=" + ",".join(f"{v:g}" for v in k)


def arm_info(info, fallback: str) -> dict:
    """An arm's identity and training settings from its leanserve.json (ModelInfo or None)."""
    if info is None or info.method != "sid":
        return {"label": fallback, "family": None, "K": None, "alpha": None, "gan": None, "kappas": None}
    s, m = info.settings, info.metrics
    kappas = [float(s[f"kappa{i}"]) for i in range(1, 5)]
    family, label = _family(kappas)
    return {"label": label, "family": family, "kappas": kappas, "alpha": s.get("alpha"), "gan": s.get("gan"),
            "K": s.get("num_steps"), "t_init": s.get("t_init"), "lr": s.get("lr"), "batch_size": s.get("batch_size"),
            "precision": s.get("precision"), "iterations": m.get("iterations"), "images_seen": m.get("images_seen"),
            "seconds_per_iteration": m.get("seconds_per_iteration"), "peak_memory_gib": m.get("peak_memory_gib")}


def label_arms(arms: list[dict]) -> None:
    """Finish the labels in place: +GAN, K and alpha where they tell arms apart, then the model name
    for any label still shared."""
    ks = {a["K"] for a in arms if a["family"]}
    for a in arms:
        if not a["family"]:
            continue
        a["label"] += " +GAN" if a["gan"] else ""
        a["label"] += f" K{a['K']}" if len(ks) > 1 else ""
        a["label"] += f" a{a['alpha']:g}" if a["alpha"] not in (None, 1.0) else ""
    counts = Counter(a["label"] for a in arms)
    for a in arms:
        if counts[a["label"]] > 1:
            a["label"] += f" ({Path(a['model']).name})"


def _is_generator(result: dict) -> bool:
    return all(r["sampler"] == "sid" for r in result["rows"])


def _model_info(result: dict):
    """The model's leanserve.json when its directory is here, else the copy in its eval images result."""
    from leanserve.models.model_dir import ModelInfo, load_model_info
    if Path(result["model"]).is_dir():
        return load_model_info(result["model"])
    embedded = result.get("model_info")
    return ModelInfo(kind="image", **embedded) if embedded else None


# --------------------------------------------------------------------------- the comparison

def _mean(row: dict, metric: str) -> float:
    return row["metrics"][metric]["mean"]


def _teacher_key(row: dict) -> tuple[float, float]:
    return -round(_mean(row, "alignment.all"), 9), _mean(row, "fd")  # TEACHER_RULE: smaller is better


def best_teacher_rows(rows: list[dict]) -> dict[int, int]:
    """steps -> index (into rows) of the teacher's best guidance at that step count (TEACHER_RULE)."""
    best: dict[int, int] = {}
    for i, r in enumerate(rows):
        if r["role"] == "teacher" and (r["steps"] not in best or _teacher_key(r) < _teacher_key(rows[best[r["steps"]]])):
            best[r["steps"]] = i
    return best


def combine(merged: dict[str, dict], fallback_names: dict[str, str]) -> dict:
    """The comparison JSON from merged per-model results (merge_runs); `fallback_names`: model ->
    arm label when the model has no leanserve.json (the result file's or directory's name)."""
    teachers = [m for m, r in merged.items() if not _is_generator(r)]
    if len(teachers) > 1:
        raise UserError(f"more than one teacher model: {teachers}")
    arms = []
    for model, result in merged.items():
        if _is_generator(result):
            arms.append(arm_info(_model_info(result), fallback_names.get(model, Path(model).name)) | {"model": model})
    label_arms(arms)
    by_model = {a["model"]: a for a in arms}
    rows = []
    for model, result in merged.items():
        arm = by_model.get(model)
        for r in result["rows"]:
            if arm is None:
                rows.append({"arm": f"teacher {r['sampler']}", "role": "teacher", "model": model, **r})
            else:
                training = {k: v for k, v in arm.items() if k not in ("label", "model")}
                rows.append({"arm": arm["label"], "role": "generator", "model": model, **r, "training": training})
    rows.sort(key=lambda r: (r["role"] != "teacher", r["arm"], r["steps"], r["guidance"]))
    first = next(iter(merged.values()))
    best = best_teacher_rows(rows)
    results = {
        "kind": "sid_eval",
        "settings": {k: first["settings"][k] for k in (*SHARED_SETTINGS, "seeds")},
        "classifier": first["classifier"],
        "hardware": sorted({r["hardware"] for r in merged.values()}),
        "reference": first["reference"],
        "teacher": {"model": teachers[0] if teachers else None, "best_guidance_rule": TEACHER_RULE,
                    "best": {str(s): {"row": i, "guidance": rows[i]["guidance"]} for s, i in sorted(best.items())}},
        "arms": arms,
        "rows": rows,
    }
    results["goals"] = goals(results)
    return results


# --------------------------------------------------------------------------- goals

def _stat(row: dict, metric: str) -> dict:
    return {"mean": _mean(row, metric), "std": row["metrics"][metric]["std"]}


def _teacher_reference(results: dict) -> dict | None:
    best = results["teacher"]["best"]
    if not best:
        return None
    steps = max(best, key=int)
    return results["rows"][best[steps]["row"]]


def goals(results: dict) -> dict:
    """The issue's goals, each computed from the rows: (1) the K-step generator (K = 4 if evaluated,
    else the most steps) reaches FD <= the teacher's at its best guidance, at equal or better
    alignment; (2) the 1-step generator within 1.5x the teacher's FD; (3) the direction of FD,
    alignment and diversity of each guidance strategy, LSG kappa and the GAN loss (spec §10)."""
    rows = results["rows"]
    gen = [r for r in rows if r["role"] == "generator"]
    teacher = _teacher_reference(results)
    out: dict = {"teacher_row": None if teacher is None else {
        "steps": teacher["steps"], "guidance": teacher["guidance"], "fd": _stat(teacher, "fd"),
        "alignment.all": _stat(teacher, "alignment.all")}}
    if teacher is None or not gen:
        out["status"] = "needs teacher and generator rows"
        return out
    t_fd, t_align = _mean(teacher, "fd"), _mean(teacher, "alignment.all")

    steps = 4 if any(r["steps"] == 4 for r in gen) else max(r["steps"] for r in gen)
    arms = [{"arm": r["arm"], "fd": _stat(r, "fd"), "alignment.all": _stat(r, "alignment.all"),
             "fd_le_teacher": _mean(r, "fd") <= t_fd, "alignment_ge_teacher": _mean(r, "alignment.all") >= t_align}
            for r in gen if r["steps"] == steps]
    aligned = [a for a in arms if a["alignment_ge_teacher"]]
    best = min(aligned or arms, key=lambda a: a["fd"]["mean"])
    out["few_step_vs_teacher"] = {
        "steps": steps, "goal": f"some {steps}-step arm has FD <= the teacher's and alignment.all >= the teacher's",
        "met": any(a["fd_le_teacher"] and a["alignment_ge_teacher"] for a in arms),
        "best_arm": best["arm"] + ("" if aligned else " (none reaches the teacher's alignment: lowest FD overall)"),
        "fd_ratio": best["fd"]["mean"] / t_fd, "arms": arms}

    one = [r for r in gen if r["steps"] == 1]
    if one:
        ratios = [{"arm": r["arm"], "fd": _stat(r, "fd"), "fd_ratio": _mean(r, "fd") / t_fd,
                   "alignment.all": _stat(r, "alignment.all")} for r in one]
        best1 = min(ratios, key=lambda a: a["fd_ratio"])
        out["one_step_vs_teacher"] = {"goal": "some 1-step arm has FD <= 1.5 x the teacher's",
                                      "met": best1["fd_ratio"] <= 1.5, "best_arm": best1["arm"],
                                      "fd_ratio": best1["fd_ratio"], "arms": ratios}
    out["directions"] = directions(results)
    return out


def _expectations(arm: dict) -> dict[str, str] | None:
    """What spec §10 expects of `arm` against LSG k1.5 (same K, alpha and GAN setting)."""
    if arm["family"] == "zero-cfg":
        return {"fd": "lower", DIVERSITY: "higher"}
    if arm["family"] == "anti-cfg":
        return {"alignment.all": "higher"}
    if arm["family"] == "lsg" and arm["kappas"][3] != REFERENCE_KAPPA:
        up = arm["kappas"][3] > REFERENCE_KAPPA  # more guidance: better alignment, worse FD and diversity
        return {"alignment.all": "higher" if up else "lower", "fd": "higher" if up else "lower",
                DIVERSITY: "lower" if up else "higher"}
    return None


def _sign(delta: float) -> str:
    return "higher" if delta > 0 else "lower" if delta < 0 else "equal"


def _compare(results: dict, a: dict, b: dict, expected: dict[str, str]) -> list[dict]:
    """Per step count both arms were evaluated at: a's metrics against b's, with the expected directions."""
    rows = {(r["arm"], r["steps"]): r for r in results["rows"] if r["role"] == "generator"}
    out = []
    for steps in sorted(s for label, s in rows if label == a["label"] and (b["label"], s) in rows):
        ra, rb = rows[(a["label"], steps)], rows[(b["label"], steps)]
        metrics = {}
        for m in ("fd", "alignment.all", DIVERSITY):
            delta = _mean(ra, m) - _mean(rb, m)
            metrics[m] = {"arm": _stat(ra, m), "baseline": _stat(rb, m), "delta": delta, "direction": _sign(delta)}
            if m in expected:
                metrics[m] |= {"expected": expected[m], "as_expected": _sign(delta) == expected[m]}
        out.append({"arm": a["label"], "baseline": b["label"], "steps": steps, "metrics": metrics})
    return out


def directions(results: dict) -> list[dict]:
    """Each guidance strategy against LSG k1.5 and each +GAN arm against its arm without the GAN."""
    arms = [a for a in results["arms"] if a["family"]]

    def same_run(a, b):
        return a["K"] == b["K"] and a["alpha"] == b["alpha"]

    out = []
    for a in arms:
        expected = _expectations(a)
        ref = next((b for b in arms if b["family"] == "lsg" and b["kappas"][3] == REFERENCE_KAPPA and same_run(a, b)
                    and bool(b["gan"]) == bool(a["gan"])), None)
        if expected and ref:
            out += _compare(results, a, ref, expected)
        if a["gan"]:
            plain = next((b for b in arms if not b["gan"] and b["kappas"] == a["kappas"] and same_run(a, b)), None)
            if plain:
                out += _compare(results, a, plain, {"fd": "lower"})
    return out


# --------------------------------------------------------------------------- report

def markdown_table(results: dict) -> str:
    """The BENCHMARKS.md table: one line per row (mean ± std over the seeds), the real reference first."""
    def pm(row, metric, fmt="{:.3f}"):
        m = row["metrics"][metric]
        return f"{fmt.format(m['mean'])} ± {fmt.format(m['std'])}"

    ref = results["reference"]
    lines = ["| arm | steps | UNet evals | FD | KID | alignment all | shape | colour | pairwise diversity | images/s |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| real (second set) | | | {ref['fd']:.3f} | {ref['kid']:.4f} | {ref['alignment.all']:.3f} | "
             f"{ref['alignment.shape']:.3f} | {ref['alignment.color']:.3f} | {ref[DIVERSITY]:.3f} | |"]
    for r in results["rows"]:
        arm = r["arm"] + (f" cfg {r['guidance']:g}" if r["role"] == "teacher" else "")
        lines.append(f"| {arm} | {r['steps']} | {r['unet_evals']} | {pm(r, 'fd')} | {pm(r, 'kid', '{:.4f}')} | "
                     f"{pm(r, 'alignment.all')} | {pm(r, 'alignment.shape')} | {pm(r, 'alignment.color')} | "
                     f"{pm(r, DIVERSITY)} | {pm(r, 'images_per_s', '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def _steps_text(steps: int) -> str:
    return f"{steps} step" + ("s" if steps > 1 else "")


PLOT_ALIGNMENT = ("alignment.shape", "alignment.color")  # what the shapes teacher does learn (see plot_results)


def _plot_alignment(row: dict) -> tuple[float, float]:
    """Mean and std over seeds of the per-seed mean of the PLOT_ALIGNMENT accuracies."""
    import numpy as np
    per_seed = np.mean([row["metrics"][k]["values"] for k in PLOT_ALIGNMENT], axis=0)
    return float(per_seed.mean()), float(per_seed.std())


def plot_results(results: dict, path: str | Path) -> None:
    """FD (y) against shape/colour alignment (x), std error bars, one series per arm, the teacher rows
    as their own series; the real-vs-real floor goes in the title. Reads only the results JSON.

    The x axis is not alignment.all: the shapes teacher ignores position and background, so every
    model's all-attributes accuracy sits near 0.02 and the plot would show no spread at all."""
    from leanserve.eval.plots import Series, scatter_plot

    groups: dict[str, list[dict]] = {}
    for r in results["rows"]:
        groups.setdefault(r["arm"], []).append(r)
    series = []
    for arm, rows in groups.items():
        teacher = rows[0]["role"] == "teacher"
        x = [_plot_alignment(r) for r in rows]
        series.append(Series(
            label=arm, x=[m for m, _ in x], y=[_mean(r, "fd") for r in rows],
            xerr=[sd for _, sd in x], yerr=[r["metrics"]["fd"]["std"] for r in rows],
            point_labels=[_steps_text(r["steps"]) + (f" cfg {r['guidance']:g}" if teacher else "") for r in rows]))
    seeds = len(results["settings"]["seeds"])
    scatter_plot(series, path, title=f"SiD vs teacher: FD against alignment (mean ± std, {seeds} seed"
                                     f"{'s' if seeds > 1 else ''}; real-vs-real FD {results['reference']['fd']:.2f})",
                 xlabel="alignment: mean of shape and colour accuracy", ylabel="FD (classifier features)")


# --------------------------------------------------------------------------- the command

def _evaluate_here(args) -> tuple[list[dict], dict[str, str]]:
    """Mode 2: run eval images on the teacher and every generator with one classifier."""
    from leanserve.eval.classifier import DEFAULT_DIR, load_classifier
    from leanserve.eval.images import check_counts, device_and_dtype, evaluate_model
    from leanserve.models.image_pipeline import (
        SAMPLERS,
        SID_PIPELINE,
        pipeline_class_name,
    )

    if not args.teacher or not args.generators:
        raise UserError("give --teacher and --generators (or --results)")
    check_counts(args)
    if any(s <= 0 for s in args.teacher_steps):
        raise UserError("--teacher-steps must be > 0")
    if args.teacher_sampler not in SAMPLERS:
        raise UserError(f"unknown --teacher-sampler {args.teacher_sampler!r}; choose from {', '.join(SAMPLERS)}")
    for path in [args.teacher, *args.generators]:
        if not Path(path).is_dir():
            raise UserError(f"image model directory {path} does not exist")
    if pipeline_class_name(args.teacher) == SID_PIPELINE:
        raise UserError(f"--teacher {args.teacher} is a SiD generator: pass it with --generators")
    for path in args.generators:
        if (name := pipeline_class_name(path)) != SID_PIPELINE:
            raise UserError(f"--generators {path} is a {name}, not a SiD generator: --teacher takes the teacher")
    device, dtype = device_and_dtype(args.device, args.dtype)
    classifier_dir = Path(args.classifier) if args.classifier else DEFAULT_DIR
    classifier = load_classifier(classifier_dir, device)
    common = dict(seeds=args.seeds, num_images=args.num_images, diversity_seeds=args.diversity_seeds,
                  batch_size=args.batch_size, real_seed=args.real_seed)
    teacher, _ = evaluate_model(args.teacher, classifier, classifier_dir, device, dtype,
                                samplers=[args.teacher_sampler], steps=args.teacher_steps,
                                guidance=args.teacher_guidance, resolution=args.resolution, **common)
    runs = [teacher]
    for path in args.generators:  # at the teacher's resolution, so every row scores the same real images
        runs.append(evaluate_model(path, classifier, classifier_dir, device, dtype, samplers=None, steps=args.steps,
                                   guidance=None, resolution=teacher["settings"]["resolution"], **common)[0])
    if args.model_results:
        folder = Path(args.model_results)
        folder.mkdir(parents=True, exist_ok=True)
        for run in runs:
            (folder / f"{Path(run['model']).name}.json").write_text(json.dumps(run, indent=2) + "\n")
    return runs, {str(p): Path(p).name for p in [args.teacher, *args.generators]}


def _read_results(paths: list[str]) -> tuple[list[dict], dict[str, str]]:
    runs, names = [], {}
    for path in paths:
        try:
            run = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read eval images results {path}: {e}") from None
        if not {"model", "settings", "reference", "rows", "classifier"} <= set(run):
            raise UserError(f"{path} is not a `leanserve eval images` result")
        runs.append(run)
        names.setdefault(run["model"], Path(path).stem)
    return runs, names


def run(args):
    from leanserve.eval.images import headline
    from leanserve.eval.report import emit_json
    from leanserve.models.model_dir import merge_metrics

    if args.results and (args.teacher or args.generators):
        raise UserError("--results combines finished evaluations; it does not go with --teacher/--generators")
    runs, names = _read_results(args.results) if args.results else _evaluate_here(args)
    merged = merge_runs(runs)
    results = combine(merged, names)
    emit_json(results, args.out)
    if args.plot:
        plot_results(results, args.plot)
        print(f"wrote {args.plot}")
    print(markdown_table(results))
    if args.write_metrics:
        for arm in results["arms"]:
            if not merge_metrics(arm["model"], {"image_eval": headline(merged[arm["model"]])}):
                print(f"{arm['model']} has no leanserve.json here: metrics not recorded there")
    return 0
