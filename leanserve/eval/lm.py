"""`leanserve eval lm`: held-out perplexity per domain and exact-match accuracy on task questions.

Perplexity reads the test splits exactly as training reads its validation data (packed
documents for code/docs/tasks, assistant tokens of chat pairs), so train-time val losses and
these test losses are comparable. Task accuracy asks the chat test questions that carry a
task, greedy-decodes an answer from the chat-templated prompt and checks it exactly
(leanserve.data.tasks.check). For a MoE / MoE++ model it also reports how the test tokens are
routed (eval/moepp_routing.py).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from leanserve.data.build import load_manifest
from leanserve.data.lm_data import (
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
from leanserve.eval.moepp_routing import routing_stats
from leanserve.eval.report import emit_json
from leanserve.eval.token_loss import mean_losses
from leanserve.models.model_dir import merge_metrics
from leanserve.models.moepp_hf import MODEL_TYPE as MOEPP_MODEL_TYPE  # importing it registers the Auto classes
from leanserve.runtime import DistInfo, resolve_device

DOC_DOMAINS = ("code", "docs", "tasks")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="model directory (HF layout)")
    p.add_argument("--data", required=True, help="output directory of `leanserve data build`")
    p.add_argument("--max-docs", type=int, help="use at most N test rows per domain (and N task questions)")
    p.add_argument("--out", help="write the results JSON here (default: print it)")
    p.add_argument("--seq-len", type=int, help="perplexity window (default: min(1024, the model's max length))")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit for task questions")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


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
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                                 pad_token_id=tokenizer.pad_token_id)
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return replies


def run(args):
    model_dir, data = Path(args.model), Path(args.data)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model {model_dir} does not exist or has no config.json")
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist")
    for name in ("max_docs", "seq_len", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    manifest = load_manifest(data)
    tokenizer = load_tokenizer(model_dir)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    max_len = model.config.max_position_embeddings
    seq_len = args.seq_len or min(1024, max_len)
    if seq_len > max_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max length {max_len}")

    def rows(domain: str) -> list[dict]:
        return read_split(data, manifest, domain, "test")[:args.max_docs]

    examples = {d: stream_windows(encode_documents(tokenizer, [r["text"] for r in rows(d)]), seq_len)
                for d in DOC_DOMAINS}
    examples["chat"] = chat_examples(tokenizer, rows("chat"), seq_len)[0]
    batches = {d: batched(e, args.batch_size, tokenizer.pad_token_id) for d, e in examples.items() if e}
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    test_loss = mean_losses(model, batches, device, autocast, DistInfo())
    routing = routing_stats(model, batches, device, autocast, DistInfo()) \
        if model.config.model_type == MOEPP_MODEL_TYPE else None

    # questions whose prompt and answer budget fit the context; longer ones (large retrieval
    # tasks) are counted as skipped, not as wrong
    questions, skipped = [], 0
    for r in (r for r in read_split(data, manifest, "chat", "test") if r.get("task")):
        if args.max_docs is not None and len(questions) + skipped >= args.max_docs:
            break
        if len(prompt_ids(tokenizer, r["task"]["prompt"])) + args.max_new_tokens > max_len:
            skipped += 1
        else:
            questions.append(r["task"])
    accuracy, counts = score_tasks(questions, lambda prompts: greedy_answers(
        model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=device))

    result = {
        "model": str(model_dir), "data_sha256": manifest.get("sha256"), "max_docs": args.max_docs, "seq_len": seq_len,
        "test_loss": test_loss, "test_ppl": {d: math.exp(v) for d, v in test_loss.items()},
        "task_accuracy": accuracy, "task_count": counts, "task_skipped": skipped,
    }
    if routing is not None:
        result["test_routing"] = routing
    emit_json(result, args.out)
    keys = ("test_loss", "test_ppl", "task_accuracy", "task_count") + (("test_routing",) if routing else ())
    merged = merge_metrics(model_dir, {k: result[k] for k in keys}
                           | {"eval_data_sha256": result["data_sha256"], "eval_max_docs": args.max_docs})
    if not merged:
        print(f"{model_dir} has no leanserve.json: metrics not recorded there")
    return 0
