"""Does a short-window warm-up on short items teach a small model trained from scratch what long-task training
alone does not? The CPU-sized control behind the MoA experiment's warm-up stage (moa_experiment.py).

Two arms share one data build of long-context items (retrieval, passkey, copy, functions; 96-160 tokens) and
one training recipe (a 1.05M-parameter Llama: d 128, 4 layers; 600 pretraining steps of 16 x 256 tokens,
then 1,000 chat steps):
  control  from a fresh init
  warmup   from `warmup`: the same shape trained 1,500 steps on `data build --long-kinds KINDS` items of
           64-80 tokens in 128-token windows, 32 a step (train lm --init); KINDS is --warmup-kinds: repeat
           (random words asked back, the default) or e.g. the MoA experiment's repeat,retrieval,passkey,copy
Scored on held-out items: the induction probe (eval/induction.py: loss on a repeat of random words against
its first copy), copy items answered word by word (words in place, first word right; greedy, 30 items of
128 tokens) and exact answers of retrieval, passkey and copy probes at 128 and 192 tokens (eval moa's probes,
through the engine). -> benchmarks/results/induction_warmup[-KINDS]-<cpu>.json

    python benchmarks/induction_warmup_cpu.py --work build/induction     # ~20 minutes on 2 cores
    python benchmarks/induction_warmup_cpu.py --smoke --work /tmp/iw-smoke --out-dir /tmp/iw-smoke  # the code path
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from common import hardware_slug, run_processes, write_result

SHAPE = ["--preset", "tiny", "--hidden-size", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2",
         "--intermediate-size", "384", "--max-len", "512", "--device", "cpu", "--eval-every", "100000",
         "--save-every", "100000"]
TRAIN = ["--seq-len", "256", "--batch-size", "16", "--pretrain-steps", "600", "--chat-steps", "1000", "--lr", "1e-3",
         "--chat-lr", "1e-3", "--mix", "code=1,docs=1,tasks=4"]
WARMUP = ["--seq-len", "128", "--batch-size", "32", "--pretrain-steps", "1500", "--chat-steps", "0", "--lr", "2e-3",
          "--mix", "tasks=1"]
BUILD = ["--max-docs", "40", "--num-tasks", "200,50,50", "--long-tasks", "2000,100,100", "--long-chat-tasks",
         "60000,300,300", "--long-tokens", "96,160"]
WARMUP_BUILD = ["--max-docs", "40", "--num-tasks", "200,50,50", "--long-tasks", "60000,100,100", "--long-chat-tasks",
                "0", "--long-tokens", "64,80", "--long-kinds", "repeat"]


# --smoke: the same stages at toy sizes (flag values replaced by name)
SMOKE = {"--max-docs": "3", "--num-tasks": "20,4,4", "--long-tasks": "8,4,4", "--long-chat-tasks": "8,4,4",
         "--pretrain-steps": "2", "--chat-steps": "2", "--batch-size": "2"}


def smoke(flags: list[str]) -> list[str]:
    return [SMOKE.get(flags[i - 1], f) if i else f for i, f in enumerate(flags)]


def leanserve(*argv: str) -> list[str]:
    return [sys.executable, "-m", "leanserve.cli", *argv]


def copy_words(model_dir: Path, n: int, length: int = 128) -> dict:
    """Greedy answers to held-out copy items: the fraction of words in place, and of first words right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanserve.data.long_context import Corpus, PromptEncoder, long_task

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    encode, corpus = PromptEncoder(tok), Corpus.load(held_out=True)
    in_place = total = first = 0
    for i in range(n):
        task = long_task("copy", random.Random(1000 + i), corpus, length, lambda s: len(encode(s)))
        ids = encode(task.prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        got, want = tok.decode(out[0, len(ids):], skip_special_tokens=True).split(), task.answer.split()
        in_place += sum(g == w for g, w in zip(got, want))
        total += len(want)
        first += got[:1] == want[:1]
    return {"items": n, "length": length, "words_in_place": in_place / total, "first_word": first / n}


def exact_answers(model_dir: Path, per_bucket: int, lengths=(128, 192)) -> dict:
    from transformers import AutoTokenizer

    from leanserve.data.long_context import Corpus
    from leanserve.eval import moa as eval_moa
    from leanserve.eval import moa_items

    out = {}
    for kind in ("retrieval", "passkey", "copy"):
        probes = moa_items.probes(AutoTokenizer.from_pretrained(model_dir), Corpus.load(held_out=True),
                                  lengths=list(lengths), seeds=[100], buckets=4, per_bucket=per_bucket, kinds=[kind],
                                  max_new_tokens=16)
        correct, _ = eval_moa.run_arm(eval_moa.Arm("dense", 1.0, model_dir), probes, [], max_model_len=max(lengths),
                                      max_new_tokens=16, batch_size=64, device="cpu", dtype="auto",
                                      gpu_memory_utilization=0.5)
        out[kind] = {str(n): sum(c for c, p in zip(correct, probes) if p.length == n) / sum(p.length == n
                                                                                          for p in probes)
                     for n in lengths}
    return out


def induction(model_dir: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leanserve.eval.induction import repeat_losses

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return [repeat_losses(model, tok, words) for words in (8, 16, 32)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--smoke", action="store_true", help="toy sizes: the code path in about a minute")
    p.add_argument("--warmup-kinds", default="repeat",
                   help="the warm-up items' kinds (data build --long-kinds; default repeat): e.g. the MoA "
                        "experiment's repeat,retrieval,passkey,copy")
    p.add_argument("--warmup-init", metavar="DIR",
                   help="start the warm-up from this model (train lm --init) instead of a fresh init: a curriculum, "
                        "e.g. the mixed warm-up's model, then repeat,copy items")
    p.add_argument("--no-control", action="store_true",
                   help="skip the from-scratch arm (it does not depend on the warm-up; its numbers are in the "
                        "first run's JSON)")
    args = p.parse_args()
    work = Path(args.work)
    size = smoke if args.smoke else list
    build, warmup_build, train, warmup = size(BUILD), size(WARMUP_BUILD), size(TRAIN), size(WARMUP)
    warmup_build[warmup_build.index("--long-kinds") + 1] = args.warmup_kinds
    if args.warmup_init:
        warmup = [*warmup, "--init", args.warmup_init]
    data, warm_data, tok = work / "data", work / "data_warmup", work / "tok"
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # two runs side by side on a 2-core machine
    for path, flags in ((data, build), (warm_data, warmup_build)):
        if not (path / "manifest.json").is_file():
            run_processes([(path.name, leanserve("data", "build", "--out", str(path), *flags))], 1, work / "logs")
    if not (tok / "tokenizer.json").is_file():
        run_processes([("tok", leanserve("data", "tokenizer", "--data", str(data), "--out", str(tok),
                                         "--vocab-size", "2048"))], 1, work / "logs")
    common = ["--tokenizer", str(tok), *SHAPE]
    jobs = [(name, leanserve("train", "lm", "--data", str(d), "--out", str(work / name), *common, *flags))
            for name, d, flags in (("control", data, train), ("warmup", warm_data, warmup))
            if not (work / name / "config.json").is_file() and not (name == "control" and args.no_control)]
    run_processes(jobs, 2, work / "logs", env=env)
    if not (work / "warm" / "config.json").is_file():
        run_processes([("warm", leanserve("train", "lm", "--data", str(data), "--out", str(work / "warm"), *common,
                                          *train, "--init", str(work / "warmup")))], 1, work / "logs")
    results = {"recipe": {"build": build, "warmup_build": warmup_build, "shape": SHAPE, "train": train,
                          "warmup": warmup},
               "arms": {"warmup_only": {"induction": induction(work / "warmup")}}}
    for arm, model in (("control", work / "control"), ("warmup", work / "warm"))[int(args.no_control):]:
        results["arms"][arm] = {"induction": induction(model), "copy_words": copy_words(model, 2 if args.smoke else 30),
                                "exact": exact_answers(model, 1 if args.smoke else 10)}
        print(arm, results["arms"][arm], flush=True)
    kinds = "" if args.warmup_kinds == "repeat" else f"-{args.warmup_kinds.replace(',', '+')}"
    if args.warmup_init:
        results["recipe"]["warmup_init"] = args.warmup_init
        kinds += "-after-" + Path(args.warmup_init).name
    path = write_result("induction_warmup", results, args.out_dir, f"induction_warmup{kinds}-{hardware_slug()}.json")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
