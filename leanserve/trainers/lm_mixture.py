"""The pretraining data of `train lm`: named groups of the data build (data/mixture.py), the mixture
their rows are drawn from (natural, stratified, static or Aioli, trainers/aioli.py), the fixed
per-group validation batches that Aioli and the record read, and what the mixture leaves in
leanserve.json and beside the model.

The older `--mix DOMAIN=WEIGHT,...` is kept for existing recipes: it means one group per named
domain and a static mixture.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from leanserve.data.lm_data import batched, encode_documents, stream_windows
from leanserve.data.mixture import (
    Group,
    Mixture,
    MixtureSampler,
    format_groups,
    parse_groups,
    parse_mixture,
    uniform,
)
from leanserve.errors import UserError
from leanserve.eval.plots import Series, line_plot
from leanserve.eval.token_loss import mean_losses
from leanserve.runtime import all_reduce_sum
from leanserve.trainers.aioli import Aioli, AioliConfig

PRETRAIN_DOMAINS = ("code", "docs", "tasks")
PLOT = "mixture.png"  # p over the pretraining steps, beside the model (Aioli runs)


def add_arguments(p: argparse.ArgumentParser, g):
    """--groups, --mixture and the per-group evaluator into `g`; the Aioli settings in a group of their own."""
    g.add_argument("--groups", help="pretraining data groups: NAME=SOURCE,... where SOURCE is a domain of the "
                                    "build or tasks:KIND+KIND, and a bare domain names itself "
                                    "(e.g. code,docs,arith=tasks:add+sub); default: one group per domain with "
                                    "train rows")
    g.add_argument("--mixture", default="natural",
                   help="how rows are split over the groups: natural (in proportion to each group's train tokens; "
                        "default) | stratified (uniform) | static:NAME=WEIGHT,... (every group, normalised) | aioli "
                        "(re-estimated online: --aioli-*)")
    g.add_argument("--group-eval-seqs", type=int, default=32,
                   help="fixed held-out (val split) windows per group: Aioli's evaluator and the per-group record")
    a = p.add_argument_group("Aioli (--mixture aioli)")
    d = AioliConfig()
    a.add_argument("--aioli-round-steps", type=int, default=d.round_steps, help="R: steps per round")
    a.add_argument("--aioli-sweeps", type=int, default=d.sweeps,
                   help="k: LearnParams passes over the groups per round")
    a.add_argument("--aioli-lp-steps", type=int, default=d.lp_steps, help="steps per LearnParams interval")
    a.add_argument("--aioli-one-hot", type=float, default=d.one_hot,
                   help="f: share of the favoured group in each LearnParams mixture")
    a.add_argument("--aioli-eta", type=float, default=d.eta, help="exponentiated-gradient step size")
    a.add_argument("--aioli-ema", type=float, help="gamma of the EMA variant (weight on the past; default: off)")
    a.add_argument("--aioli-p-min", type=float, default=d.p_min, help="floor on every group's share (default 0: off)")
    a.add_argument("--aioli-diagonal", action="store_true", help="ablation: no transfer between groups in A")
    a.add_argument("--aioli-prior", default="stratified",
                   help="mixture of the first --aioli-prior-steps: stratified | static:NAME=WEIGHT,...")
    a.add_argument("--aioli-prior-steps", type=int, default=d.prior_steps)
    a.add_argument("--aioli-max-rounds", type=int,
                   help="rounds that re-estimate A; later rounds keep the last mixture (1 with a prior: Aioli-static)")


def parse_mix(text: str) -> dict[str, float] | None:
    """`DOMAIN=WEIGHT,...` normalised to sum 1 (zero weights dropped); None for "natural"."""
    if text == "natural":
        return None
    mix = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in PRETRAIN_DOMAINS:
            raise UserError(f"--mix: unknown domain {name!r} (choose from {', '.join(PRETRAIN_DOMAINS)})")
        try:
            mix[name] = float(value)
        except ValueError:
            raise UserError(f"--mix: {part!r} is not DOMAIN=WEIGHT") from None
        if not math.isfinite(mix[name]) or mix[name] < 0:
            raise UserError(f"--mix: weight of {name} must be a finite number >= 0")
    total = sum(mix.values())
    if total <= 0:
        raise UserError("--mix: at least one weight must be positive")
    return {k: v / total for k, v in mix.items() if v > 0}


@dataclass(frozen=True)
class MixturePlan:
    groups: list[Group]
    mixture: Mixture
    aioli: AioliConfig | None


def plan_mixture(args, manifest: dict) -> MixturePlan:
    """The groups and mixture the options ask for, checked; `args.groups` is set to the groups used so
    that the recipe names them."""
    mix = parse_mix(args.mix)
    if mix is not None:
        if args.groups is not None or args.mixture != "natural":
            raise UserError("--mix is the older form of --groups with --mixture static:...; give one or the other")
        return MixturePlan([Group(d, d) for d in mix], Mixture("static", tuple(mix.values())), None)
    domains = tuple(d for d in PRETRAIN_DOMAINS if manifest["splits"].get(d, {}).get("train", {}).get("num_rows"))
    groups = parse_groups(args.groups, domains) if args.groups else [Group(d, d) for d in domains]
    args.groups = format_groups(groups)
    names = [g.name for g in groups]
    mixture = parse_mixture(args.mixture, names)
    if mixture.kind != "aioli":
        return MixturePlan(groups, mixture, None)
    prior = parse_mixture(args.aioli_prior, names, "--aioli-prior")
    if prior.kind not in ("stratified", "static"):
        raise UserError("--aioli-prior: stratified or static:NAME=WEIGHT,...")
    config = AioliConfig(round_steps=args.aioli_round_steps, sweeps=args.aioli_sweeps, lp_steps=args.aioli_lp_steps,
                         one_hot=args.aioli_one_hot, eta=args.aioli_eta, ema=args.aioli_ema, p_min=args.aioli_p_min,
                         diagonal=args.aioli_diagonal, prior=prior.weights, prior_steps=args.aioli_prior_steps,
                         max_rounds=args.aioli_max_rounds)
    config.check(len(groups))
    return MixturePlan(groups, mixture, config)


class PretrainData:
    """This rank's train streams of the groups, the sampler, the mixture schedule and the fixed
    per-group validation batches. Built from the `train lm` Trainer: its args, data, tokenizer, local
    batch, rank shard, autocast and log."""

    def __init__(self, trainer, plan: MixturePlan):
        args, self.dist, self.device, self.autocast = trainer.args, trainer.dist, trainer.device, trainer.autocast
        self.plan = plan
        self.names = [g.name for g in plan.groups]
        tokenizer, data, manifest = trainer.tokenizer, trainer.data, trainer.manifest
        streams = []
        for group in plan.groups:
            texts = [row["text"] for row in trainer._shard(group.rows(data, manifest, "train"))]
            if not texts:
                raise UserError(f"group {group.name} ({group.source}) has no train documents for rank "
                                f"{self.dist.rank} of {self.dist.world_size}: too few to shard; leave it out")
            streams.append(encode_documents(tokenizer, texts))
        self.val = {}
        for group in plan.groups:
            stream = encode_documents(tokenizer, [row["text"] for row in group.rows(data, manifest, "val")])
            windows = stream_windows(stream, args.seq_len, args.group_eval_seqs)
            if windows:
                self.val[group.name] = batched(trainer._shard(windows), trainer.local_batch, tokenizer.pad_token_id)
        missing = [n for n in self.names if n not in self.val]
        if missing and plan.aioli is not None:
            raise UserError("--mixture aioli needs held-out rows of every group; "
                            f"no val split for {', '.join(missing)}")

        kind, m = plan.mixture.kind, len(streams)
        if kind == "natural":  # each group in proportion to its tokens over all ranks
            counts = all_reduce_sum([float(len(s)) for s in streams], self.dist, self.device)
            p = torch.tensor(counts, dtype=torch.float64) / sum(counts)
        else:
            p = torch.tensor(plan.mixture.weights, dtype=torch.float64) if kind == "static" else uniform(m)
        self.sampler = MixtureSampler(streams, p)
        self.aioli = (Aioli(plan.aioli, m, args.pretrain_steps, args.seed, log=trainer._log)
                      if plan.aioli is not None else None)
        trainer._log("pretrain (this rank): " + ", ".join(
            f"{g.name} [{g.source}] {len(s):,} tokens" + ("" if self.aioli else f" ({float(w):.0%} of rows)")
            for g, s, w in zip(plan.groups, streams, p)))

    @property
    def mix(self) -> dict[str, float]:
        """The mixture in use (for Aioli, after the last step: its final p)."""
        return dict(zip(self.names, self.sampler.p.tolist()))

    def group_losses(self, model) -> dict[str, float]:
        """Mean token loss per group on the fixed validation windows (collective under DDP)."""
        return mean_losses(model, self.val, self.device, self.autocast, self.dist)

    def sample(self, step: int, batch_size: int, seq_len: int, generator, model) -> dict:
        if self.aioli is not None:
            self.sampler.set_mixture(self.aioli.weights(
                step, lambda: [self.group_losses(model)[n] for n in self.names]))
        return self.sampler.sample(batch_size, seq_len, generator)

    # ---- checkpoints and the record

    def state_dict(self) -> dict | None:
        return self.aioli.state_dict() if self.aioli is not None else None

    def load_state_dict(self, state: dict | None):
        if self.aioli is not None:
            self.aioli.load_state_dict(state)

    def settings(self) -> dict:
        return {"kind": self.plan.mixture.kind, "groups": {g.name: g.source for g in self.plan.groups},
                "aioli": asdict(self.plan.aioli) if self.plan.aioli is not None else None}

    def metrics(self, group_loss: dict[str, float]) -> dict:
        ppl = {n: math.exp(v) for n, v in group_loss.items()}
        record = {"val_loss_by_group": group_loss, "val_ppl_by_group": ppl,
                  "mean_val_ppl": sum(ppl.values()) / len(ppl) if ppl else None}
        if self.aioli is not None:
            record |= {"rounds": self.aioli.rounds, "p_history": self.aioli.p_history}
        return record

    def plot(self, out: Path, total_steps: int) -> Path | None:
        """p over the steps (a step plot: each mixture from the step it takes effect); Aioli runs only."""
        if self.aioli is None:
            return None
        history = self.aioli.p_history
        steps = [h["step"] for h in history] + [total_steps]
        x = [s for start, end in zip(steps, steps[1:]) for s in (start, end)]
        series = [Series(name, x, [h["p"][i] for h in history for _ in (0, 1)], fmt="-")
                  for i, name in enumerate(self.names)]
        line_plot(series, out / PLOT, title="Aioli mixture over pretraining", xlabel="step", ylabel="share of rows")
        return out / PLOT
