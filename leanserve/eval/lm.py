"""`leanserve eval lm`: held-out perplexity and calibration per domain, and exact-match accuracy on
task questions, of an LM or of an ensemble directory.

Perplexity reads the test splits exactly as training reads its validation data (packed
documents for code/docs/tasks, assistant tokens of chat pairs), so train-time val losses and
these test losses are comparable. Calibration (eval/calibration.py) scores the same tokens: NLL,
accuracy, ECE, Brier, and the NLL after one temperature per domain fitted on a strided subsample of
that domain's val split. Task accuracy asks the chat test questions that carry a
task, greedy-decodes an answer from the chat-templated prompt and checks it exactly
(leanserve.data.tasks.check).

An ensemble directory (models/ensemble_dir.py) is scored as its mixture (probability averaging):
its test loss, calibration and greedy answers are the mixture's; the report adds the logit-averaged
control, every member's metrics, the members' diversity and the mixtures of the first S members for
S = 1, 2, 4, ... below the ensemble's size (NLL against S from one pass). `--members K` scores the
first K members alone.
For a MoE / MoE++ model it also reports how the test tokens are routed (eval/moepp_routing.py).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from leanserve.data.build import load_manifest
from leanserve.data.lm_data import (
    IGNORE,
    batched,
    chat_examples,
    encode_documents,
    load_tokenizer,
    read_split,
    stream_windows,
)
from leanserve.data.tasks import Task, check
from leanserve.data.tokenizer import stop_token_ids
from leanserve.errors import UserError
from leanserve.eval.calibration import (
    EnsembleMetrics,
    HeldOutSample,
    TokenMetrics,
    logit_average_logprobs,
    mixture_logprobs,
)
from leanserve.eval.lm_members import Members, load_members, mixture_greedy_answers
from leanserve.eval.moepp_routing import routing_stats
from leanserve.eval.report import emit_json, hardware
from leanserve.eval.token_loss import labelled, next_token_targets
from leanserve.models.hf_causal_lm import padding_safe
from leanserve.models.model_dir import merge_metrics
from leanserve.models.moepp_hf import MODEL_TYPE as MOEPP_MODEL_TYPE  # importing it registers the Auto classes
from leanserve.runtime import DistInfo, resolve_device, resolve_dtype

DOC_DOMAINS = ("code", "docs", "tasks")
DOMAINS = DOC_DOMAINS + ("chat",)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="model directory (HF layout) or ensemble directory")
    p.add_argument("--data", required=True, help="output directory of `leanserve data build`")
    p.add_argument("--max-docs", type=int, help="use at most N test rows per domain (and N task questions)")
    p.add_argument("--out", help="write the results JSON here (default: print it)")
    p.add_argument("--seq-len", type=int, help="perplexity window (default: min(1024, the model's max length))")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit for task questions")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto",
                   help="weights dtype (auto: bfloat16 with autocast on CUDA, float32 on CPU); float32 on CUDA "
                        "keeps small weight differences, e.g. between an ensemble's members, exact")
    p.add_argument("--members", type=int, help="ensemble directory: score its first K members (default: all)")
    p.add_argument("--ts-tokens", type=int, default=4096,
                   help="val tokens per domain kept to fit the temperature of temperature scaling (0: none)")
    p.add_argument("--domains", default=",".join(DOMAINS), help="test domains to score (default: all)")
    p.add_argument("--no-tasks", action="store_true", help="skip the task questions")
    p.add_argument("--write-metrics", action="store_true",
                   help="merge the headline metrics into the model's leanserve.json (not with --members)")


def score_tasks(rows: list[dict],
                generate: Callable[[list[str]], list[str]]) -> tuple[dict[str, float], dict[str, int]]:
    """Exact-match accuracy per task kind and overall, and questions per kind.

    `rows` are task rows (kind, prompt, answer, params); `generate` maps prompts to responses.
    """
    tasks = [Task.from_row(r) for r in rows]
    responses = generate([t.prompt for t in tasks])
    correct: dict[str, int] = {}
    counts: dict[str, int] = {}
    for task, response in zip(tasks, responses, strict=True):
        counts[task.kind] = counts.get(task.kind, 0) + 1
        correct[task.kind] = correct.get(task.kind, 0) + check(task, response)
    accuracy = {kind: correct[kind] / counts[kind] for kind in counts}
    if counts:
        accuracy["overall"] = sum(correct.values()) / sum(counts.values())
    return accuracy, counts


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A single-turn user prompt as the server encodes it: chat template with the generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def greedy_answers(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, device) -> list[str]:
    """Greedy replies to single-turn user prompts, batched by length with left padding."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    replies = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attention_mask[row, width - len(encoded[i]):] = 1
        with torch.no_grad(), padding_safe(model):
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                                 pad_token_id=tokenizer.pad_token_id)
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return replies


def _labelled_count(batches: list[dict]) -> int:
    return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)


def fit_temperatures(members: Members, batches: list[dict], device, autocast, max_tokens: int) -> dict[str, float]:
    """One temperature per predictor ("mixture": the model or the ensemble's mixture; "logit_average"
    for an ensemble), fitted on a strided subsample of at most max_tokens tokens of `batches`."""
    names = ("mixture", "logit_average") if members.ensemble else ("mixture",)
    samples = {name: HeldOutSample(_labelled_count(batches), max_tokens) for name in names}
    for batch in batches:
        keep, targets = next_token_targets(batch["labels"], device)
        pos = samples["mixture"].positions(len(targets)).to(device)
        with torch.no_grad(), autocast():  # only the kept tokens' logits of each member stay alive
            chosen = torch.stack([lg[:, :-1][keep][pos].float()
                                  for lg in members.each_logits(input_ids=batch["input_ids"].to(device))])
        samples["mixture"].add(len(targets), mixture_logprobs(chosen.log_softmax(-1)), targets[pos])
        if members.ensemble:
            samples["logit_average"].add(len(targets), logit_average_logprobs(chosen), targets[pos])
    return {name: t for name, sample in samples.items() if (t := sample.fit()) is not None}


def score_batches(members: Members, batches: list[dict], device, autocast,
                  temperatures: dict[str, float]) -> dict:
    """TokenMetrics.result() of the model, or EnsembleMetrics.result() of an ensemble, over `batches`."""
    metrics = (EnsembleMetrics(len(members), temperatures) if members.ensemble
               else TokenMetrics(temperatures.get("mixture")))
    for batch in batches:
        ids = batch["input_ids"].to(device)
        with torch.no_grad(), autocast():
            if members.ensemble:
                keep, targets = next_token_targets(batch["labels"], device)
                metrics.update((lg[:, :-1][keep] for lg in members.each_logits(input_ids=ids)), targets)
            else:
                metrics.update(*labelled(members.logits(0, input_ids=ids), batch["labels"]))
    return metrics.result()


def run(args):
    model_dir, data = Path(args.model), Path(args.data)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir} does not exist or has no config.json")
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist")
    for name in ("max_docs", "seq_len", "batch_size", "max_new_tokens", "members"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.ts_tokens < 0:
        raise UserError("--ts-tokens must be >= 0")
    domains = [d.strip() for d in args.domains.split(",")]
    if not domains or set(domains) - set(DOMAINS):
        raise UserError(f"--domains: choose from {', '.join(DOMAINS)}, got {args.domains!r}")
    manifest = load_manifest(data)
    tokenizer = load_tokenizer(model_dir)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    members = load_members(model_dir, device, dtype, args.members)
    model = members.model
    max_len = model.config.max_position_embeddings
    seq_len = args.seq_len or min(1024, max_len)
    if seq_len > max_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max length {max_len}")

    def batches_of(split: str) -> dict[str, list[dict]]:
        def rows(domain: str) -> list[dict]:
            return read_split(data, manifest, domain, split)[:args.max_docs]

        examples = {d: stream_windows(encode_documents(tokenizer, [r["text"] for r in rows(d)]), seq_len)
                    for d in DOC_DOMAINS if d in domains}
        if "chat" in domains:
            examples["chat"] = chat_examples(tokenizer, rows("chat"), seq_len)[0]
        return {d: batched(e, args.batch_size, tokenizer.pad_token_id) for d, e in examples.items() if e}

    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    val = batches_of("val") if args.ts_tokens else {}
    scores = {}
    for domain, test in batches_of("test").items():
        temperatures = (fit_temperatures(members, val[domain], device, autocast, args.ts_tokens)
                        if domain in val else {})
        scores[domain] = score_batches(members, test, device, autocast, temperatures)
    calibration = {d: s["mixture"] if members.ensemble else s for d, s in scores.items()}
    test_loss = {d: c["nll"] for d, c in calibration.items()}
    routing = (routing_stats(model, batches_of("test"), device, autocast, DistInfo())
               if model.config.model_type == MOEPP_MODEL_TYPE else None)

    # questions whose prompt and answer budget fit the context; longer ones (large retrieval
    # tasks) are counted as skipped, not as wrong
    questions, skipped = [], 0
    for r in (r for r in read_split(data, manifest, "chat", "test") if r.get("task") and not args.no_tasks):
        if args.max_docs is not None and len(questions) + skipped >= args.max_docs:
            break
        if len(prompt_ids(tokenizer, r["task"]["prompt"])) + args.max_new_tokens > max_len:
            skipped += 1
        else:
            questions.append(r["task"])
    decode = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=device)
    if members.ensemble:
        def generate(prompts):
            return mixture_greedy_answers(members, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], **decode)
    else:
        def generate(prompts):
            return greedy_answers(model, tokenizer, prompts, **decode)
    accuracy, counts = score_tasks(questions, generate)

    result = {
        "model": str(model_dir), "hardware": hardware(device), "data_sha256": manifest.get("sha256"),
        "max_docs": args.max_docs, "seq_len": seq_len,
        "test_loss": test_loss, "test_ppl": {d: math.exp(v) for d, v in test_loss.items()},
        "calibration": calibration, "task_accuracy": accuracy, "task_count": counts, "task_skipped": skipped,
    }
    if members.ensemble:
        result["ensemble"] = {
            "num_members": len(members),
            "logit_average": {d: s["logit_average"] for d, s in scores.items()},
            "members": {d: s["members"] for d, s in scores.items()},
            "prefix_mixtures": {d: s["prefix_mixtures"] for d, s in scores.items()},
            "jensen_gap": {d: s["jensen_gap"] for d, s in scores.items()},
            "disagreement": {d: s["disagreement"] for d, s in scores.items()}}
    if routing is not None:
        result["test_routing"] = routing
    emit_json(result, args.out)
    if not args.write_metrics:
        return 0
    if args.members is not None:
        print(f"--members {args.members}: a subset of the ensemble, not recorded in {model_dir}/leanserve.json")
        return 0
    keys = ("test_loss", "test_ppl", "calibration", "task_accuracy", "task_count") + (("test_routing",) if routing else ())
    merged = merge_metrics(model_dir, {k: result[k] for k in keys}
                           | {"eval_data_sha256": result["data_sha256"], "eval_max_docs": args.max_docs})
    if not merged:
        print(f"{model_dir} has no leanserve.json: metrics not recorded there")
    return 0
