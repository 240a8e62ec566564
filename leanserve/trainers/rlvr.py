"""`leanserve train rlvr`: RL with verifiable rewards (GRPO, trainers/grpo.py) of a chat LM on a mixture of
task groups, starting from an SFT'd model directory (MoDoMoDo's inner loop).

Prompts are the train rows of the data build's `tasks` domain, cut into groups as `train lm --groups` cuts
them (`add=tasks:add,sort=tasks:sort,...`; default: one group per task kind); every step splits its
--prompts over the groups by the mixture (stratified, static:NAME=WEIGHT,... or natural: in proportion to
each group's rows; data/mixture.py's systematic counts) and draws each group's prompts with replacement,
so a run's length never depends on its mixture. Each prompt gets --group-size sampled completions
(the chat template's user turn, as the server renders it); rewards are data/rewards.py's (format-gated:
1·format + 2·accuracy); the KL penalty is to the starting model, frozen.

Every --eval-every steps and at the end the policy answers fixed val prompts of each group greedily
(eval/lm.py's batched decoding); the per-group accuracy and format rate are the eval curve. leanserve.json
records the mixture, the settings, the train reward curve (per step) and the eval curve; rewards.png
plots them beside the weights. The output is an ordinary model directory: `leanserve serve` serves it.
Resumable exactly (trainers/loop.py): the data generator, torch's RNG (sampling) and the curves are in the
checkpoint; the reference model is reloaded from --from.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
from transformers import GenerationConfig

from leanserve.data.build import load_manifest
from leanserve.data.lm_data import load_tokenizer
from leanserve.data.mixture import Group, format_groups, parse_groups, parse_mixture, systematic_counts, uniform
from leanserve.data.rewards import reward
from leanserve.data.tasks import Task
from leanserve.data.tokenizer import stop_token_ids
from leanserve.errors import UserError
from leanserve.eval.lm import greedy_answers, prompt_ids
from leanserve.eval.plots import Series, line_plot
from leanserve.models.hf_causal_lm import load_for_padded_batches
from leanserve.models.model_dir import ModelInfo, load_model_info, make_recipe, save_model_info, weights_sha256
from leanserve.runtime import DistInfo, resolve_device
from leanserve.trainers import grpo
from leanserve.trainers.checkpoint import check_out_dir
from leanserve.trainers.loop import CHECKPOINT, TrainingLoop, bf16_autocast
from leanserve.trainers.sgld import saved_dtype

TASKS = "tasks"
PLOT = "rewards.png"
RESUME_FREE = ("resume", "stop_at", "eval_every", "save_every", "out")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--from", dest="model", required=True, help="the chat model to start from (HF layout), e.g. SFT'd")
    p.add_argument("--data", required=True, help="output directory of `leanserve data build` (its tasks domain)")
    p.add_argument("--out", required=True, help="model directory to write (HF layout + leanserve.json)")
    g = p.add_argument_group("mixture")
    g.add_argument("--groups", help="task groups: NAME=tasks:KIND+KIND,... (default: one group per task kind "
                                    "with train rows, named by the kind)")
    g.add_argument("--mixture", default="stratified",
                   help="share of each step's prompts per group: stratified (uniform; default) | "
                        "static:NAME=WEIGHT,... | natural (in proportion to each group's train rows)")
    g = p.add_argument_group("GRPO")
    g.add_argument("--steps", type=int, default=300, help="policy updates (a fixed budget for every mixture)")
    g.add_argument("--prompts", type=int, default=8, help="prompts per step")
    g.add_argument("--group-size", type=int, default=8, help="G: sampled completions per prompt")
    g.add_argument("--lr", type=float, default=3e-5, help="peak LR (10%% linear warm-up, then linear decay to 0)")
    g.add_argument("--beta", type=float, default=0.04, help="weight of the k3 KL to the starting model")
    g.add_argument("--clip-eps", type=float, default=0.2, help="ε of the clipped ratio")
    g.add_argument("--inner-updates", type=int, default=1,
                   help="optimizer steps on each batch of completions (1: ratio 1, the clip is inactive)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the completions")
    g.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=50, help="steps between greedy evaluations on val prompts")
    g.add_argument("--eval-prompts", type=int, default=32, help="fixed val prompts per group of the eval curve")
    g.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompt order and of the sampling")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="bf16 autocast (auto: on CUDA)")
    g.add_argument("--resume", action="store_true", help=f"continue exactly from OUT/{CHECKPOINT}")
    g.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint; resume later")


def _check_args(args):
    for name in ("steps", "prompts", "group_size", "inner_updates", "max_new_tokens", "eval_every", "eval_prompts",
                 "save_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.group_size < 2:
        raise UserError("--group-size must be >= 2: advantages compare completions of one prompt")
    for name in ("lr", "temperature", "grad_clip"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.beta < 0 or args.weight_decay < 0 or not 0 < args.clip_eps < 1:
        raise UserError("--beta and --weight-decay must be >= 0 and --clip-eps in (0, 1)")
    if args.stop_at is not None and not 0 < args.stop_at < args.steps:
        raise UserError(f"--stop-at must be between 1 and {args.steps - 1}")


def linear_schedule(step: int, steps: int, warmup: float = 0.1) -> float:
    """LR multiplier: linear warm-up over `warmup` of the steps, then linear decay to 0 (the paper's)."""
    warm = max(1, int(warmup * steps))
    return (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))


def task_groups(args, manifest: dict, data: Path) -> list[Group]:
    if args.groups is None:
        kinds = sorted({r["kind"] for r in Group(TASKS, TASKS).rows(data, manifest, "train")})
        if not kinds:
            raise UserError(f"--data {data} has no train tasks")
        args.groups = ",".join(f"{k}={TASKS}:{k}" for k in kinds)
    groups = parse_groups(args.groups, (TASKS,))
    args.groups = format_groups(groups)  # the recipe names the groups used
    return groups


def run(args):
    model_dir, data = Path(args.model), Path(args.data)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--from {model_dir} does not exist or has no config.json")
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist")
    _check_args(args)
    check_out_dir(args.out, CHECKPOINT, args.resume, finished="config.json")
    manifest = load_manifest(data)
    groups = task_groups(args, manifest, data)
    mixture = parse_mixture(args.mixture, [g.name for g in groups])
    if mixture.kind == "aioli":
        raise UserError("--mixture aioli is a pretraining mixture (train lm); RLVR takes stratified, static or "
                        "natural")
    return Trainer(args, manifest, groups, mixture, resolve_device(args.device)).train()


class Trainer(TrainingLoop):
    command = "train rlvr"
    resume_free = RESUME_FREE

    def __init__(self, args, manifest: dict, groups: list[Group], mixture, device: torch.device):
        super().__init__(args, DistInfo(), device, total_steps=args.steps)
        self.manifest, self.groups, self.model_dir = manifest, groups, Path(args.model)
        self.data = Path(args.data)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.autocast = bf16_autocast(args.bf16, device)
        # rollouts are left-padded batches: sampling, log-probs and eval all need padding-safe attention
        self.model = load_for_padded_batches(self.model_dir, torch.float32, device)
        self.reference = load_for_padded_batches(self.model_dir, torch.float32, device)
        self.reference.requires_grad_(False)
        max_prompt = self.model.config.max_position_embeddings - args.max_new_tokens
        self.train_tasks = [self._tasks(g, "train", max_prompt) for g in groups]
        self.val_tasks = {g.name: self._tasks(g, "val", max_prompt)[:args.eval_prompts] for g in groups}
        if mixture.kind == "natural":
            sizes = torch.tensor([len(t) for t in self.train_tasks], dtype=torch.float64)
            self.p = sizes / sizes.sum()
        else:
            self.p = (torch.tensor(mixture.weights, dtype=torch.float64) if mixture.kind == "static"
                      else uniform(len(groups)))
        self.mixture_kind = mixture.kind
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           partial(linear_schedule, steps=args.steps))
        torch.manual_seed(args.seed)  # the completions' sampling (checkpointed with the global RNG)
        self.generator = torch.Generator().manual_seed(args.seed * 1_000_003)  # which prompts
        self.reward_history: list[dict] = []
        self._log("train rlvr: " + ", ".join(f"{g.name} [{g.source}] {len(t)} prompts ({float(w):.0%})"
                                             for g, t, w in zip(groups, self.train_tasks, self.p)))

    def _tasks(self, group: Group, split: str, max_prompt: int) -> list[tuple[Task, list[int]]]:
        """(task, prompt ids) of a group's rows whose prompt leaves room for a completion."""
        tasks = [Task.from_row(r) for r in group.rows(self.data, self.manifest, split)]
        encoded = [(t, prompt_ids(self.tokenizer, t.prompt)) for t in tasks]
        kept = [(t, ids) for t, ids in encoded if len(ids) <= max_prompt]
        if split == "train" and not kept:
            raise UserError(f"group {group.name} ({group.source}) has no train task whose prompt fits the model's "
                            f"context with --max-new-tokens {self.args.max_new_tokens}")
        return kept

    # ---- one step

    def _draw(self) -> list[tuple[int, Task, list[int]]]:
        """This step's prompts: (group index, task, ids), systematic counts per group, with replacement."""
        counts = systematic_counts(self.p, self.args.prompts, self.generator).tolist()
        drawn = []
        for i, (count, tasks) in enumerate(zip(counts, self.train_tasks)):
            for j in torch.randint(len(tasks), (count,), generator=self.generator).tolist():
                drawn.append((i, *tasks[j]))
        return drawn

    def _advance(self) -> dict:
        args, G = self.args, self.args.group_size
        drawn = self._draw()
        encoded = [ids for _, _, ids in drawn for _ in range(G)]
        with self.autocast():
            rollout = grpo.sample(self.model, encoded, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, stop_ids=self.stop_ids,
                                  pad_id=self.tokenizer.pad_token_id, device=self.device)
        # generate pads after a completion's stop token: the special tokens dropped, the reply is what came before
        replies = self.tokenizer.batch_decode(rollout.completion_ids(), skip_special_tokens=True)
        scored = [reward(task, reply) for (_, task, _), reply in zip((d for d in drawn for _ in range(G)), replies)]
        totals = torch.tensor([r.total for r in scored], dtype=torch.float32).view(len(drawn), G)
        advantages = grpo.group_advantages(totals).flatten().to(self.device)
        with torch.no_grad(), self.autocast():
            ref_logp = grpo.token_logprobs(self.reference, rollout, args.temperature)
            old_logp = (grpo.token_logprobs(self.model, rollout, args.temperature)
                        if args.inner_updates > 1 else None)
        for _ in range(args.inner_updates):
            with self.autocast():
                logp = grpo.token_logprobs(self.model, rollout, args.temperature)
            # one update: π_old is the policy that sampled, i.e. the current one (ratio 1, its gradient kept)
            loss, stats = grpo.grpo_loss(logp, logp.detach() if old_logp is None else old_logp, ref_logp,
                                         advantages, rollout.completion_mask, clip_eps=args.clip_eps, beta=args.beta)
            if not torch.isfinite(loss):  # a NaN update would poison the weights and fail later, in sampling
                raise UserError(f"the policy diverged at step {self.step} (loss {loss.item()}): lower --lr "
                                f"{args.lr:g} or raise --beta {args.beta:g}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        record = self._record(drawn, scored, totals, stats, rollout)
        self.reward_history.append(record)
        return {"reward": f"{record['reward']:.3f}", "acc": f"{record['accuracy']:.3f}",
                "kl": f"{record['kl']:.4f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"}

    def _record(self, drawn, scored, totals, stats, rollout) -> dict:
        G = self.args.group_size
        by_group: dict[str, list[float]] = {}
        for k, r in enumerate(scored):
            by_group.setdefault(self.groups[drawn[k // G][0]].name, []).append(r.accuracy)
        return {"step": self.step, "reward": float(totals.mean()),
                "format": sum(r.format for r in scored) / len(scored),
                "accuracy": sum(r.accuracy for r in scored) / len(scored),
                "accuracy_by_group": {n: sum(v) / len(v) for n, v in by_group.items()},
                # groups whose rewards are all equal: no signal (GRPO needs pass rates strictly inside (0, 1))
                "flat_groups": float((totals.std(1) == 0).float().mean()),
                "completion_tokens": float(rollout.completion_mask.sum(1).mean()), **stats}

    # ---- evaluation

    def _evaluate(self) -> dict:
        scores = {}
        for name, tasks in self.val_tasks.items():
            if not tasks:
                continue
            with self.autocast():
                replies = greedy_answers(self.model, self.tokenizer, [t.prompt for t, _ in tasks],
                                         batch_size=64, max_new_tokens=self.args.max_new_tokens, device=self.device)
            rewards = [reward(t, r) for (t, _), r in zip(tasks, replies)]
            scores[name] = {"accuracy": sum(r.accuracy for r in rewards) / len(rewards),
                            "format": sum(r.format for r in rewards) / len(rewards)}
        self.history.append({"step": self.step, "val": scores})
        self._log(f"step {self.step}: val accuracy " + ", ".join(f"{n} {s['accuracy']:.3f}" for n, s in scores.items()))
        return scores

    def _start(self):
        if self.step == 0:
            self._evaluate()  # the starting policy: the eval curve's first point

    # ---- checkpoints

    def _checkpointed(self):
        return self.model, self.optimizer, self.scheduler

    def _checkpoint_state(self) -> tuple[dict, dict]:
        return ({"step": self.step, "history": self.history, "reward_history": self.reward_history},
                {"generator": self.generator.get_state()})

    def _restore(self, state: dict, rank_state: dict):
        self.generator.set_state(rank_state["generator"])
        self.step, self.history, self.reward_history = state["step"], state["history"], state["reward_history"]

    # ---- output

    def _recipe(self) -> dict:
        args = argparse.Namespace(**{"from" if k == "model" else k: v for k, v in vars(self.args).items()})
        return make_recipe(f"leanserve {self.command}", args, self.args.seed, skip=("resume", "stop_at"))

    def mixture_settings(self) -> dict:
        return {"kind": self.mixture_kind, "groups": {g.name: g.source for g in self.groups},
                "weights": {g.name: float(w) for g, w in zip(self.groups, self.p)}}

    def _write_output(self, val: dict):
        args = self.args
        save_dtype = saved_dtype(self.model_dir, load_model_info(self.model_dir))
        self.model.to(getattr(torch, save_dtype)).save_pretrained(self.out)
        self.tokenizer.save_pretrained(self.out)
        if (self.model_dir / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(self.model_dir).save_pretrained(self.out)
        settings = {"architecture": type(self.model).__name__, "save_dtype": save_dtype,
                    "mixture": self.mixture_settings(),
                    "rlvr": {k: getattr(args, k) for k in ("steps", "prompts", "group_size", "lr", "beta", "clip_eps",
                                                           "inner_updates", "temperature", "max_new_tokens",
                                                           "grad_clip", "weight_decay")}
                    | {"rewards": "format-gated 1*format + 2*accuracy (data/rewards.py)"}}
        start = self.history[0]["val"]
        save_model_info(self.out, ModelInfo(
            kind="llm", method="dense", settings=settings,
            base={"path": str(self.model_dir), "sha256": weights_sha256(self.model_dir)},
            recipe=self._recipe(),
            data={"description": f"leanserve data build (seed {self.manifest.get('seed')}); train tasks of "
                                 f"{args.groups}", "sha256": self.manifest["sha256"]},
            metrics={"val": val, "val_start": start,
                     "val_accuracy_gain": {n: val[n]["accuracy"] - start[n]["accuracy"] for n in val},
                     "reward_history": self.reward_history, "val_history": self.history, "steps": self.step}))
        self._plot()
        self._log(f"wrote {self.out}: val accuracy " + ", ".join(
            f"{n} {start[n]['accuracy']:.3f} -> {s['accuracy']:.3f}" for n, s in val.items()))

    def _plot(self):
        steps = [r["step"] for r in self.reward_history]
        window = max(1, len(steps) // 20)  # a moving average: per-step rewards of a few prompts are noisy
        smooth = [sum(r["accuracy"] for r in self.reward_history[max(0, i - window + 1):i + 1])
                  / min(window, i + 1) for i in range(len(steps))]
        series = [Series(f"train accuracy (mean of {window} steps)", steps, smooth, fmt="-")]
        for name in self.val_tasks:
            points = [(h["step"], h["val"][name]["accuracy"]) for h in self.history if name in h["val"]]
            if points:
                series.append(Series(f"val {name}", [s for s, _ in points], [a for _, a in points], fmt="--o"))
        line_plot(series, self.out / PLOT, title="train rlvr: accuracy over the steps", xlabel="step",
                  ylabel="accuracy (format-gated)")
