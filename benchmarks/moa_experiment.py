"""MoA end to end on a model worth compressing (issue 15, spec §11): a small Llama trained here on long-context
tasks, compressed at KV density 0.5 and 0.25, and evaluated against dense and the uniform window.

  1. data: `leanserve data build --long-tasks` (100,000 retrieval, passkey, copy and functions items whose
     answer lies in the first third of the prompt, ~256-3,072 tokens, ~90M tokens in all, drawn over every
     core) beside the usual code, docs and short tasks, and its BPE tokenizer; and the warm-up's build:
     200,000 short items (64-256 tokens) of repeat (random words asked back), retrieval, passkey and copy
  2. warmup: `leanserve train lm` on the short items in 256-token windows (128 a step, 1,500 steps: 49M
     tokens), so that the model learns the lookups on short items before the long windows (the first run,
     trained on 4,096-token windows from scratch, never retrieved: BENCHMARKS.md; the CPU control:
     benchmarks/induction_warmup_cpu.py)
     model: from it (`--init`), a GQA Llama (d 384, 8 layers, 6 query / 2 KV heads, ~20M parameters with the
     8k vocabulary) with 4,096 positions: pretraining on 4,096-token windows (8 a step, 4,000 steps: 131M
     tokens) with the long tasks weighted up, then chat SFT (the eval asks through the chat template)
  3. check: the dense model's greedy retrieval on 40 held-out probes at 1,024 and 2,048 tokens (item seed
     100, apart from the eval's); below --min-dense-retrieval (0.2) the run stops there, as a model that
     cannot retrieve makes every arm score 0 (the first run, BENCHMARKS.md) -> WORK/dense_check.json
  4. `leanserve compress moa` at density 0.5 and 0.25 (profile lengths 512, 1024, 2048: validation at 4096),
     the 0.25 one with the ablation ladder's plans
  5. `leanserve eval moa`: dense, the uniform sink + window at each density, the ladder, both MoA plans; retrieval
     by position bucket at 512-4,096 tokens and response perplexity, 3 item seeds
     -> benchmarks/results/moa_eval.json (+ .png)
Data, training and compression are skipped once done and resume where they stopped (training from its
checkpoint, compression from its profiles), so a time-boxed GPU job (--stop-after, or its time limit) is
continued by running the same command again; the eval runs every time.

    python benchmarks/moa_experiment.py --work build/moa                  # GPU
    python benchmarks/moa_experiment.py --scale cpu --work build/moa-cpu  # CPU, a 1M model, ~30 minutes on 2 cores
    python benchmarks/moa_experiment.py --smoke --work /tmp/moa-smoke     # CPU, toy sizes, ~1 minute

GPU time, first run (one H100, commit 6002533, 12,000 long items then): data 75 s, training 327 s, compression
218 s, eval 199 s.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("data", "warmup", "train", "check", "compress", "eval")


@dataclass(frozen=True)
class Scale:
    build: tuple[str, ...]
    vocab_size: int
    shape: tuple[str, ...]  # the model's (warm-up and training alike)
    warmup_build: tuple[str, ...]  # the warm-up's data: short repeat and long-task items
    warmup: tuple[str, ...]  # its training, on short windows
    train: tuple[str, ...]
    compress: tuple[str, ...]
    eval: tuple[str, ...]
    densities: tuple[float, ...]
    ablation_density: float  # the ablation ladder's plans are made at this one
    device: str
    check_lengths: tuple[int, ...]  # of the dense retrieval check (its items ask with max_new_tokens 32, or 4 in smoke)
    check_new_tokens: int


FULL = Scale(
    # lengths are estimated at 3.5 characters a token: 3,072 keeps a margin under the 4,096-token windows
    # ~90M tokens of long items: training reads each about once (the first run read 12,000 ~7 times, fit its
    # training text and never learned to retrieve: BENCHMARKS.md); the chat phase reads ~8,000 conversations
    build=("--long-tasks", "100000,300,300", "--long-chat-tasks", "12000,300,300", "--long-tokens", "256,3072"),
    vocab_size=8192,
    shape=("--preset", "small", "--hidden-size", "384", "--layers", "8", "--heads", "6", "--kv-heads", "2",
           "--intermediate-size", "1024", "--max-len", "4096"),
    # short items first: the first run, trained from scratch on 4,096-token windows for 131M tokens, never
    # retrieved; on CPU this warm-up took a 1M model from 0-2.5% to 90-93% exact retrieval and passkey answers
    # (benchmarks/induction_warmup_cpu.py; copy stayed at 0, which a repeat-only warm-up lifts instead)
    warmup_build=("--num-tasks", "2000,100,100", "--long-tasks", "200000,300,300", "--long-chat-tasks", "0",
                  "--long-tokens", "64,256", "--long-kinds", "repeat,retrieval,passkey,copy"),
    warmup=("--seq-len", "256", "--batch-size", "128", "--pretrain-steps", "1500", "--chat-steps", "0",
            "--mix", "tasks=1", "--eval-every", "500", "--save-every", "500"),
    train=("--seq-len", "4096", "--batch-size", "8", "--pretrain-steps", "4000", "--chat-steps", "1000",
           "--mix", "code=1,docs=1,tasks=6", "--eval-every", "500", "--save-every", "200"),
    compress=("--profile-lengths", "512,1024,2048", "--block-size", "32", "--items", "50"),
    # 64 sequences a step: a 20M model's decode step is host-bound, so a wider batch costs little per step
    eval=("--lengths", "512", "1024", "2048", "3072", "4096", "--seeds", "0", "1", "2", "--batch-size", "64"),
    densities=(0.5, 0.25),
    ablation_density=0.25,
    device="cuda",
    check_lengths=(1024, 2048),
    check_new_tokens=32)
# The same experiment at a size two CPU threads finish in ~30 minutes (--scale cpu): the data, warm-up and training
# of benchmarks/induction_warmup_cpu.py's warm-up arm, flag for flag (a 1.05M-parameter Llama, d 128, 4 layers, 4
# query / 2 KV heads, long items of 96-160 tokens), which answered 90-93% of retrieval and passkey probes at 128-192
# tokens; profiled at 160-224 tokens and evaluated up to 448 (twice the longest profile length, as on the GPU). The
# same model trained on items of up to 448 tokens in 512-token windows answered none at 128-512 (BENCHMARKS.md).
CPU = Scale(
    build=("--max-docs", "40", "--num-tasks", "200,50,50", "--long-tasks", "2000,100,100", "--long-chat-tasks",
           "60000,300,300", "--long-tokens", "96,160"),
    vocab_size=2048,
    shape=("--preset", "tiny", "--hidden-size", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2",
           "--intermediate-size", "384", "--max-len", "512"),
    warmup_build=("--max-docs", "40", "--num-tasks", "200,50,50", "--long-tasks", "60000,100,100",
                  "--long-chat-tasks", "0", "--long-tokens", "64,80", "--long-kinds", "repeat,retrieval,passkey,copy"),
    warmup=("--seq-len", "128", "--batch-size", "32", "--pretrain-steps", "1500", "--chat-steps", "0", "--lr", "2e-3",
            "--mix", "tasks=1", "--eval-every", "100000", "--save-every", "500"),
    train=("--seq-len", "256", "--batch-size", "16", "--pretrain-steps", "600", "--chat-steps", "1000", "--lr", "1e-3",
           "--chat-lr", "1e-3", "--mix", "code=1,docs=1,tasks=4", "--eval-every", "100000", "--save-every", "250"),
    # calibration items run from half the profile length up, prompt plus the dense reply: 160 tokens is the
    # shortest length whose half holds a task prompt beside a 16-token reply
    compress=("--profile-lengths", "160,192,224", "--block-size", "16", "--items", "50", "--max-new-tokens", "16"),
    eval=("--lengths", "128", "224", "320", "448", "--buckets", "5", "--items-per-bucket", "10", "--seeds", "0", "1",
          "2", "--ppl-items", "8", "--batch-size", "32"),
    densities=(0.5, 0.25),
    # at 160-224 tokens no per-layer plan of alpha-0 rules meets 0.25 beside the 16-token sink
    ablation_density=0.5,
    device="cpu",
    check_lengths=(128, 192),
    check_new_tokens=32)
SMOKE = Scale(
    build=("--max-docs", "6", "--num-tasks", "40,8,8", "--long-tasks", "12,4,4", "--long-tokens", "96,160"),
    vocab_size=400,
    shape=("--preset", "tiny", "--max-len", "256"),
    warmup_build=("--max-docs", "6", "--num-tasks", "40,8,8", "--long-tasks", "12,4,4", "--long-chat-tasks", "0",
                  "--long-tokens", "64,96", "--long-kinds", "repeat,copy"),
    warmup=("--seq-len", "128", "--batch-size", "4", "--pretrain-steps", "2", "--chat-steps", "0", "--mix", "tasks=1",
            "--eval-every", "1000", "--eval-batches", "1"),
    train=("--seq-len", "256", "--batch-size", "4", "--pretrain-steps", "4", "--chat-steps", "2", "--mix", "tasks=1",
           "--eval-every", "1000", "--eval-batches", "1"),
    compress=("--profile-lengths", "96,128,160", "--block-size", "16", "--items", "1", "--max-new-tokens", "4"),
    eval=("--lengths", "128", "192", "--buckets", "2", "--items-per-bucket", "1", "--seeds", "0",
          "--ppl-items", "1", "--max-new-tokens", "4", "--batch-size", "4"),
    densities=(0.5,),
    ablation_density=0.5,
    device="cpu",
    check_lengths=(192,),
    check_new_tokens=4)


def leanserve(*argv: str) -> None:
    from leanserve.cli import main

    if main(list(argv)) != 0:
        raise SystemExit(f"leanserve {' '.join(argv[:2])} failed")


def run(work: Path, scale: Scale, out: Path, stop_after: str | None, min_dense_retrieval: float,
        densities: tuple[float, ...]) -> None:
    data, tok, dense, warm = work / "data", work / "tok", work / "dense", work / "warmup"
    trained = (dense / "leanserve.json").is_file()
    stages = {
        # only training reads the data: a model trained elsewhere (brought back from another machine) needs none
        "data": lambda: None if trained else _data(data, tok, work / "data_warmup", scale),
        "warmup": lambda: None if trained else _train(work / "data_warmup", tok, warm, [*scale.shape, *scale.warmup],
                                                      scale.device),
        "train": lambda: _train(data, tok, dense, [*scale.shape, *scale.train, "--init", str(warm)], scale.device),
        "check": lambda: _check(dense, work, scale, min_dense_retrieval),
        "compress": lambda: _compress(dense, work, scale, densities),
        "eval": lambda: leanserve("eval", "moa", "--model", str(dense), "--plans",
                                  *(str(plan_dir(work, d)) for d in densities), "--out", str(out),
                                  "--device", scale.device, *scale.eval),
    }
    for name in STAGES:
        started = time.perf_counter()
        stages[name]()
        print(f"stage {name}: {time.perf_counter() - started:.0f} s", flush=True)
        if name == stop_after:
            return


def plan_dir(work: Path, density: float) -> Path:
    return work / f"moa-{round(100 * density)}"


def _data(data: Path, tok: Path, warmup_data: Path, scale: Scale) -> None:
    if not (data / "manifest.json").is_file():
        leanserve("data", "build", "--out", str(data), *scale.build)
    if not (tok / "tokenizer.json").is_file():
        leanserve("data", "tokenizer", "--data", str(data), "--out", str(tok), "--vocab-size", str(scale.vocab_size))
    if not (warmup_data / "manifest.json").is_file():
        leanserve("data", "build", "--out", str(warmup_data), *scale.warmup_build)


def _train(data: Path, tok: Path, out: Path, flags: list[str], device: str) -> None:
    if (out / "leanserve.json").is_file():
        return
    resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
    leanserve("train", "lm", "--data", str(data), "--tokenizer", str(tok), "--out", str(out), "--device", device,
              *flags, *resume)


def _check(dense: Path, work: Path, scale: Scale, min_accuracy: float) -> None:
    """Stop before compressing a model that cannot do the task: compression and eval would spend ~7 GPU
    minutes to report 0 for every arm."""
    from transformers import AutoTokenizer

    from leanserve.data.long_context import Corpus
    from leanserve.eval import moa as eval_moa
    from leanserve.eval import moa_items

    probes = moa_items.probes(AutoTokenizer.from_pretrained(dense), Corpus.load(held_out=True),
                              lengths=list(scale.check_lengths), seeds=[100], buckets=4, per_bucket=5,
                              kinds=["retrieval"], max_new_tokens=scale.check_new_tokens)
    correct, _ = eval_moa.run_arm(eval_moa.Arm("dense", 1.0, dense), probes, [], max_model_len=max(scale.check_lengths),
                                  max_new_tokens=scale.check_new_tokens, batch_size=64, device=scale.device,
                                  dtype="auto", gpu_memory_utilization=0.5)
    by_length = {n: sum(c for c, p in zip(correct, probes) if p.length == n) / sum(p.length == n for p in probes)
                 for n in scale.check_lengths}
    accuracy = sum(correct) / len(correct)
    # whether it copies at all (train lm's last validation): retrieval needs induction heads first
    induction = json.loads((dense / "leanserve.json").read_text())["metrics"]["val_history"][-1].get("induction")
    (work / "dense_check.json").write_text(json.dumps({"retrieval_accuracy": accuracy, "by_length": by_length,
                                                       "probes": len(probes), "min_accuracy": min_accuracy,
                                                       "induction": induction}) + "\n")
    print(f"dense retrieval {accuracy:.2f} ({by_length}); induction {induction}", flush=True)
    if accuracy < min_accuracy:
        raise SystemExit(f"the dense model answers {accuracy:.0%} of the check's retrieval probes (--min-dense-retrieval "
                         f"{min_accuracy}): not worth compressing; see {work / 'dense_check.json'}")


def _compress(dense: Path, work: Path, scale: Scale, densities: tuple[float, ...]) -> None:
    for density in densities:
        out = plan_dir(work, density)
        if (out / "moa_plan.json").is_file():
            continue
        resume = ["--resume"] if (out / "moa_work").is_dir() else []
        ablation = ["--ablation-plans"] if density == scale.ablation_density else []
        leanserve("compress", "moa", "--model", str(dense), "--out", str(out), "--density", str(density),
                  "--device", scale.device, *scale.compress, *ablation, *resume)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="data, tokenizer, model and plan directories (kept: rerun to continue)")
    p.add_argument("--out", help="the eval JSON (default results/moa_eval.json, or moa_eval-cpu.json at --scale cpu)")
    p.add_argument("--scale", choices=["full", "cpu"], default="full",
                   help="full: the 20M model on a GPU; cpu: a 1M model on items of 96-160 tokens (default out: "
                        "results/moa_eval-cpu.json)")
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes: the code paths in about a minute")
    p.add_argument("--stop-after", choices=STAGES, help="stop after this stage (continue later)")
    p.add_argument("--densities", type=float, nargs="+",
                   help="compress and evaluate only these of the recipe's densities (a short GPU lease: 0.5 first; "
                        "a later run adds the rest and evaluates all)")
    p.add_argument("--min-dense-retrieval", type=float,
                   help="stop after the check below this dense retrieval accuracy (default 0.2; --smoke 0)")
    args = p.parse_args()
    threshold = args.min_dense_retrieval if args.min_dense_retrieval is not None else (0.0 if args.smoke else 0.2)
    scale = SMOKE if args.smoke else CPU if args.scale == "cpu" else FULL
    out = Path(args.out or RESULTS / ("moa_eval-cpu.json" if args.scale == "cpu" else "moa_eval.json"))
    densities = tuple(args.densities or scale.densities)
    if not set(densities) <= set(scale.densities):
        p.error(f"--densities: the recipe has {scale.densities}")
    run(Path(args.work), scale, out, args.stop_after, threshold, densities)


if __name__ == "__main__":
    main()
