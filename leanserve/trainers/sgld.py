"""`leanserve train sgld`: posterior samples of a trained LM by stochastic-gradient Langevin dynamics,
written as an ensemble directory (models/ensemble_dir.py).

The chain starts at the MAP weights (a `train lm` output or any transformers Llama directory) and
runs SGLD (trainers/sgld_optim.py) on the train tokens of the pretraining mixture, with fp32 master
weights, dropout off and no gradient clipping (either would change the sampled distribution). The
posterior it targets is exp(−U/T), U = N·L̄ − log p(θ): N the train tokens (--n-data), a Gaussian
prior written as coupled weight decay λ on the matrices (norm gains get a flat prior, as the MAP's
AdamW left them undecayed). After --burn-in steps at the full step size (which also estimates the
pSGLD preconditioner, then frozen) it keeps one member every --thin steps (constant or polynomial
step size), or, with the cyclical schedule, the last members of each cycle's sampling phase, until
--num-members. Only the parameters of --scope move, and only they are stored per member.

Streaming evaluation on fixed val windows (as `train lm` reads them): every --eval-every steps the
current sample's val NLL; as each member arrives, its own val NLL and the running ensemble's (the
probability average of the members so far, a per-token running log-sum-exp of their true-token
log-probs). Resumable exactly (trainers/loop.py, trainers/checkpoint.py): the collected members and the
running sums are in the checkpoint. One process (no DDP).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from leanserve.data.build import load_manifest
from leanserve.data.lm_data import batched, load_tokenizer
from leanserve.data.mixture import MixtureSampler
from leanserve.errors import UserError
from leanserve.eval.token_loss import labelled, mean_losses
from leanserve.models.ensemble_dir import MEMBERS_FILE, METHOD, member_param_names, parse_scope, write_members
from leanserve.models.model_dir import (
    FILENAME,
    ModelInfo,
    load_model_info,
    make_recipe,
    save_model_info,
    weights_sha256,
)
from leanserve.runtime import DistInfo, resolve_device
from leanserve.trainers.checkpoint import check_out_dir
from leanserve.trainers.lm import mix_domains, train_streams, validation_examples
from leanserve.trainers.lm_mixture import parse_mix
from leanserve.trainers.loop import CHECKPOINT, TrainingLoop, bf16_autocast
from leanserve.trainers.progress import PROGRESS
from leanserve.trainers.sgld_optim import SGLD, cyclical_scale, in_exploration, polynomial_scale

SCHEDULES = ("constant", "cyclical", "polynomial")
RESUME_FREE = ("resume", "stop_at", "eval_every", "save_every", "out")
# what of the MAP directory is not part of the ensemble's base model
NOT_COPIED = (FILENAME, PROGRESS, MEMBERS_FILE, CHECKPOINT)


# --------------------------------------------------------------------------- the sampling plan

@dataclass(frozen=True)
class SamplingPlan:
    """Which steps run at which step size, with or without noise, and after which steps a member is kept."""
    schedule: str
    burn_in: int
    total_steps: int
    member_steps: tuple[int, ...]  # self.step values (steps done) at which a member is kept
    cycle_len: int = 0  # cyclical
    explore: float = 0.0  # cyclical
    decay_steps: float = 1.0  # polynomial
    decay_gamma: float = 0.55  # polynomial

    @classmethod
    def make(cls, args) -> SamplingPlan:
        s, thin, burn_in = args.num_members, args.thin, args.burn_in
        if args.schedule != "cyclical":
            return cls(args.schedule, burn_in, burn_in + s * thin, tuple(burn_in + thin * (i + 1) for i in range(s)),
                       decay_steps=args.decay_steps, decay_gamma=args.decay_gamma)
        # each cycle: an exploration phase without noise, then a sampling phase of per_cycle x thin steps
        # whose members are the cycle's last steps, thin apart
        per_cycle = s // args.cycles
        cycle_len = math.ceil(per_cycle * thin / (1 - args.explore))
        steps = tuple(burn_in + c * cycle_len + cycle_len - j * thin
                      for c in range(args.cycles) for j in reversed(range(per_cycle)))
        return cls("cyclical", burn_in, burn_in + args.cycles * cycle_len, steps, cycle_len=cycle_len,
                   explore=args.explore)

    def lr_scale(self, step: int) -> float:
        """Multiplier of --lr for the step taken at `step` (steps done so far)."""
        if self.schedule == "polynomial":
            return polynomial_scale(step, self.decay_steps, self.decay_gamma)
        if self.schedule == "cyclical" and step >= self.burn_in:
            return cyclical_scale(step - self.burn_in, self.cycle_len)
        return 1.0

    def noise(self, step: int) -> bool:
        if self.schedule == "cyclical" and step >= self.burn_in:
            return not in_exploration(step - self.burn_in, self.cycle_len, self.explore)
        return True


# --------------------------------------------------------------------------- defaults read from the MAP

def recipe_option(info: ModelInfo | None, flag: str) -> str | None:
    """The value of `flag` in the command that made a model directory, if recorded."""
    words = shlex.split(info.recipe.get("command", "")) if info is not None else []
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def saved_dtype(model_dir: Path, info: ModelInfo | None) -> str:
    """The dtype the MAP's weights are stored in (members are written alike)."""
    if info is not None and info.settings.get("save_dtype"):
        return info.settings["save_dtype"]
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "float32"


# --------------------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--from", dest="model", required=True, help="the MAP model directory to start from (HF layout)")
    p.add_argument("--data", required=True, help="output directory of `leanserve data build`")
    p.add_argument("--out", required=True, help="ensemble directory to write")
    g = p.add_argument_group("posterior")
    g.add_argument("--mix", help="train data: DOMAIN=WEIGHT,... or natural, as for train lm "
                                 "(default: the mixture the MAP recorded, else natural)")
    g.add_argument("--n-data", type=int, help="N, the train tokens the posterior conditions on "
                                              "(default: the tokens of the mixture's train splits)")
    g.add_argument("--temperature", type=float, default=1.0, help="T: 1 is the Bayes posterior, < 1 cold")
    g.add_argument("--weight-decay", type=float,
                   help="λ, coupled (prior N(0, 1/(N λ)) on the matrices); default: the MAP recipe's, else 0")
    g = p.add_argument_group("sampler")
    g.add_argument("--lr", type=float, default=1e-4, help="step size η in mean-token-loss units")
    g.add_argument("--precond", default="none", choices=["none", "frozen_rmsprop"],
                   help="pSGLD: RMSprop preconditioner estimated during burn-in, then frozen")
    # G = 1/(sqrt(v) + eps): a coordinate whose gradient all but vanishes (the embedding of a token the data
    # lacks) gets G ~ 1/eps, so its noise sqrt(2ηT·G/N) and step η·G grow with 1/eps; Adam's 1e-8 would let
    # such rows random-walk far and the step go unstable once their logits rise
    g.add_argument("--precond-eps", type=float, default=1e-5,
                   help="pSGLD: eps of G = 1/(sqrt(v) + eps), which bounds G by 1/eps (default 1e-5)")
    g.add_argument("--momentum", type=float, default=0.0, help="SGHMC momentum (friction 1 - momentum)")
    g.add_argument("--schedule", default="constant", choices=SCHEDULES, help="step size after burn-in")
    g.add_argument("--cycles", type=int, default=4, help="cyclical: cycles (members split evenly over them)")
    g.add_argument("--explore", type=float, default=0.5,
                   help="cyclical: fraction of each cycle without noise (exploration)")
    g.add_argument("--decay-steps", type=float, default=1000.0, help="polynomial: b of lr·(1 + t/b)^-γ")
    g.add_argument("--decay-gamma", type=float, default=0.55, help="polynomial: γ in (0.5, 1]")
    g.add_argument("--burn-in", type=int, default=1000, help="steps before the first member counts")
    g.add_argument("--thin", type=int, default=200, help="steps between kept members")
    g.add_argument("--num-members", type=int, default=8, help="S, members to keep")
    g.add_argument("--scope", default="full", help="parameters sampled and stored: full or last:K (decoder blocks)")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seq-len", type=int, help="sequence length (default: the model's max length)")
    g.add_argument("--seed", type=int, default=0, help="seed of the chain (noise and data order)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                   help="bf16 autocast of the forward (auto: on CUDA); weights and noise stay fp32")
    g.add_argument("--eval-every", type=int, default=100, help="steps between single-sample val losses")
    g.add_argument("--eval-batches", type=int, default=8, help="validation batches per domain")
    g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--resume", action="store_true", help=f"continue exactly from OUT/{CHECKPOINT}")
    g.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint; resume later")


def _check_args(args, num_layers: int, max_len: int):
    for name in ("num_members", "thin", "batch_size", "eval_every", "eval_batches", "save_every", "cycles"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.burn_in < 0:
        raise UserError("--burn-in must be >= 0")
    if not args.lr > 0 or not args.temperature > 0:
        raise UserError("--lr and --temperature must be > 0")
    if args.n_data is not None and args.n_data <= 0:
        raise UserError("--n-data must be > 0")
    if args.weight_decay is not None and args.weight_decay < 0:
        raise UserError("--weight-decay must be >= 0")
    if not args.precond_eps > 0:
        raise UserError("--precond-eps must be > 0")
    if not 0 <= args.momentum < 1:
        raise UserError("--momentum must be in [0, 1)")
    if not 0 <= args.explore < 1:
        raise UserError("--explore is a fraction of each cycle, in [0, 1)")
    if args.schedule == "cyclical" and args.num_members % args.cycles:
        raise UserError(f"--num-members {args.num_members} must split evenly over --cycles {args.cycles}")
    if not args.decay_steps > 0 or not 0.5 < args.decay_gamma <= 1:
        raise UserError("--decay-steps must be > 0 and --decay-gamma in (0.5, 1]")
    if args.precond != "none" and args.burn_in == 0:
        raise UserError("--precond frozen_rmsprop estimates its preconditioner during --burn-in: give it steps")
    parse_scope(args.scope, num_layers)
    if args.seq_len is not None and not 0 < args.seq_len <= max_len:
        raise UserError(f"--seq-len must be between 1 and the model's max length {max_len}")


def run(args):
    model_dir, data = Path(args.model), Path(args.data)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--from {model_dir} does not exist or has no config.json")
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist")
    info = load_model_info(model_dir)
    if info is not None and info.method == METHOD:
        raise UserError(f"--from {model_dir} is an ensemble directory; start from a single (MAP) model")
    config = AutoConfig.from_pretrained(model_dir)
    _check_args(args, config.num_hidden_layers, config.max_position_embeddings)
    # resolved here, so that the recipe and a resume see the values actually used
    if args.mix is None:
        recorded = info.settings.get("mix") if info is not None else None
        args.mix = ",".join(f"{d}={w}" for d, w in recorded.items()) if recorded else "natural"
    mix = parse_mix(args.mix)
    if args.weight_decay is None:
        args.weight_decay = float(recipe_option(info, "--weight-decay") or 0.0)
    args.seq_len = args.seq_len or config.max_position_embeddings
    check_out_dir(args.out, CHECKPOINT, args.resume, finished="config.json")
    manifest = load_manifest(data)
    tokenizer = load_tokenizer(model_dir)
    return Trainer(args, manifest, mix, tokenizer, info, resolve_device(args.device)).train()


class Trainer(TrainingLoop):
    command = "train sgld"
    resume_free = RESUME_FREE

    def __init__(self, args, manifest: dict, mix: dict[str, float] | None, tokenizer, map_info: ModelInfo | None,
                 device: torch.device):
        self.manifest, self.tokenizer, self.map_info = manifest, tokenizer, map_info
        self.data, self.map_dir = Path(args.data), Path(args.model)
        domains = mix_domains(manifest, mix)
        streams = train_streams(self.data, manifest, tokenizer, domains)
        tokens = sum(len(s) for s in streams)
        if mix is None:  # natural: each domain in proportion to its tokens
            mix = {d: len(s) / tokens for d, s in zip(domains, streams)}
        self.mix = mix
        self.train_data = MixtureSampler(streams, list(mix.values()))
        if args.n_data is None:
            args.n_data = tokens
        self.plan = SamplingPlan.make(args)
        if args.stop_at is not None and not 0 < args.stop_at < self.plan.total_steps:
            raise UserError(f"--stop-at must be between 1 and {self.plan.total_steps - 1} "
                            f"(the run has {self.plan.total_steps} steps)")
        super().__init__(args, DistInfo(), device, total_steps=self.plan.total_steps)
        self._log(f"train sgld: {', '.join(f'{d} {len(s):,}' for d, s in zip(domains, streams))} train tokens, "
                  f"N = {args.n_data:,}; {self.plan.total_steps} steps, members after steps "
                  f"{list(self.plan.member_steps)}")
        self.val = {d: batched(e, args.batch_size, tokenizer.pad_token_id)
                    for d, e in validation_examples(self.data, manifest, tokenizer, args.seq_len,
                                                    args.eval_batches * args.batch_size, self._log).items()}
        self.autocast = bf16_autocast(args.bf16, device)
        self.save_dtype = saved_dtype(self.map_dir, map_info)

        model = AutoModelForCausalLM.from_pretrained(self.map_dir, dtype=torch.float32).to(device)
        model.eval()  # dropout off, for the whole chain
        config = model.config
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        all_names = [n for n, _ in model.named_parameters()]
        self.member_names = member_param_names(all_names, args.scope, config.num_hidden_layers, tied)
        if tied and parse_scope(args.scope, config.num_hidden_layers) > 0:
            # the members' heads move, the shared trunk's tied input embedding stays (ensemble_dir.py)
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        sampled = {n: p for n, p in model.named_parameters() if n in self.member_names}
        for name, p in model.named_parameters():
            p.requires_grad_(name in sampled)
        self.model = model
        self.optimizer = SGLD(
            [{"params": [p for p in sampled.values() if p.dim() >= 2]},
             {"params": [p for p in sampled.values() if p.dim() < 2], "weight_decay": 0.0}],
            lr=args.lr, n_data=args.n_data, temperature=args.temperature, weight_decay=args.weight_decay,
            precond=None if args.precond == "none" else args.precond, momentum=args.momentum,
            precond_eps=args.precond_eps)
        self.num_sampled = sum(p.numel() for p in sampled.values())

        torch.manual_seed(args.seed)  # the chain's noise (the checkpoint keeps this generator's state)
        self.generator = torch.Generator().manual_seed(args.seed * 1_000_003)  # data order
        self.loss_ema: float | None = None
        self.map_val: dict[str, float] = {}
        self.members: list[dict[str, torch.Tensor]] = []
        self.member_log: list[dict] = []
        # per val domain and batch: logsumexp over the members so far of their true-token log-probs
        self.running: dict[str, list[torch.Tensor]] = {}

    def _recipe(self) -> dict:
        # spelled with the option's name, --from, not its dest
        args = argparse.Namespace(**{"from" if k == "model" else k: v for k, v in vars(self.args).items()})
        return make_recipe(f"leanserve {self.command}", args, self.args.seed, skip=("resume", "stop_at"))

    # ---- evaluation

    def _check_finite(self, value: float, what: str):
        """A chain that left for infinity would write NaN members with exit status 0: stop it instead."""
        if not math.isfinite(value):
            raise UserError(f"the chain diverged at step {self.step} ({what} {value}): --lr {self.args.lr:g} is too "
                            "large for this model and preconditioner; lower it (short pilot chains find the largest "
                            "step size whose single sample stays within a few % of the MAP's val NLL)")

    def _evaluate(self) -> dict[str, float]:
        losses = mean_losses(self.model, self.val, self.device, self.autocast, self.dist)
        for domain, value in losses.items():
            self._check_finite(value, f"{domain} val NLL")
        self.history.append({"step": self.step, "val_loss": losses})
        self._log(f"step {self.step}: single-sample val NLL " + ", ".join(f"{d} {v:.4f}" for d, v in losses.items()))
        return losses

    @torch.no_grad()
    def _true_token_logprobs(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            logits = self.model(input_ids=batch["input_ids"].to(self.device)).logits
        lg, targets = labelled(logits, batch["labels"])
        return -F.cross_entropy(lg.float(), targets, reduction="none").cpu()

    def _add_member(self):
        member = {n: self.model.get_parameter(n).detach().to("cpu", getattr(torch, self.save_dtype), copy=True)
                  for n in self.member_names}
        self.members.append(member)
        single, ensemble = {}, {}
        s = len(self.members)
        for domain, batches in self.val.items():
            logprobs = [self._true_token_logprobs(b) for b in batches]
            prev = self.running.get(domain)
            self.running[domain] = (logprobs if prev is None
                                    else [torch.logaddexp(r, lp) for r, lp in zip(prev, logprobs)])
            count = sum(len(lp) for lp in logprobs)
            single[domain] = -float(sum(lp.double().sum() for lp in logprobs)) / count
            self._check_finite(single[domain], f"member {s}'s {domain} val NLL")
            ensemble[domain] = -float(sum((r.double() - math.log(s)).sum() for r in self.running[domain])) / count
        self.member_log.append({"member": s, "step": self.step, "val_nll": single, "ensemble_val_nll": ensemble})
        self._log(f"member {s} at step {self.step}: val NLL " +
                  ", ".join(f"{d} {single[d]:.4f} (ensemble {ensemble[d]:.4f}, MAP {self.map_val[d]:.4f})"
                            for d in single))

    # ---- loop

    def _start(self):
        if self.step == 0:
            self.map_val = mean_losses(self.model, self.val, self.device, self.autocast, self.dist)
            self._log("MAP val NLL " + ", ".join(f"{d} {v:.4f}" for d, v in self.map_val.items()))

    def _advance(self) -> dict:
        lr = self.args.lr * self.plan.lr_scale(self.step)
        noise = self.plan.noise(self.step)
        for group in self.optimizer.param_groups:
            group["lr"], group["noise"] = lr, noise
        batch = self.train_data.sample(self.args.batch_size, self.args.seq_len, self.generator)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()  # no clipping: it would change the target
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.step == self.plan.burn_in and self.args.precond != "none":
            self.optimizer.freeze_preconditioner()
        if self.step in self.plan.member_steps:
            self._add_member()
        value = loss.item()
        self._check_finite(value, "training loss")
        self.loss_ema = value if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * value
        phase = "burn-in" if self.step <= self.plan.burn_in else "sample" if noise else "explore"
        return {"phase": phase, "loss": f"{self.loss_ema:.3f}", "lr": f"{lr:.2e}", "members": len(self.members)}

    # ---- checkpoints

    def _checkpointed(self):
        return self.model, self.optimizer, None

    def _checkpoint_state(self) -> tuple[dict, dict]:
        return ({"step": self.step, "loss_ema": self.loss_ema, "history": self.history, "map_val": self.map_val,
                 "members": self.members, "member_log": self.member_log, "running": self.running},
                {"generator": self.generator.get_state()})

    def _restore(self, state: dict, rank_state: dict):
        self.generator.set_state(rank_state["generator"])
        self.step, self.loss_ema, self.history = state["step"], state["loss_ema"], state["history"]
        self.map_val, self.members = state["map_val"], state["members"]
        self.member_log, self.running = state["member_log"], state["running"]

    # ---- output

    def _write_output(self, val_loss: dict[str, float]):
        args = self.args
        for path in sorted(self.map_dir.iterdir()):  # the base: the MAP model as it is, a plain transformers dir
            if path.is_file() and path.name not in NOT_COPIED:
                shutil.copyfile(path, self.out / path.name)
        write_members(self.out, self.members, getattr(torch, self.save_dtype))
        ensemble_val = self.member_log[-1]["ensemble_val_nll"]
        sampler = {"lr": args.lr, "temperature": args.temperature, "n_data": args.n_data,
                   "weight_decay": args.weight_decay, "precond": args.precond, "momentum": args.momentum,
                   **({"precond_eps": args.precond_eps} if args.precond != "none" else {}),
                   "schedule": args.schedule, "burn_in": args.burn_in, "thin": args.thin,
                   "member_steps": list(self.plan.member_steps), "mix": self.mix, "save_dtype": self.save_dtype,
                   "batch_size": args.batch_size, "seq_len": args.seq_len, "sampled_params": self.num_sampled}
        if args.schedule == "cyclical":
            sampler |= {"cycles": args.cycles, "explore": args.explore, "cycle_len": self.plan.cycle_len}
        if args.schedule == "polynomial":
            sampler |= {"decay_steps": args.decay_steps, "decay_gamma": args.decay_gamma}
        save_model_info(self.out, ModelInfo(
            kind="llm", method=METHOD,
            settings={"num_members": len(self.members), "scope": args.scope, "member_params": self.member_names,
                      "ensemble_mode": "token_mean", "sampler": sampler},
            base={"path": str(self.map_dir), "sha256": weights_sha256(self.map_dir)},
            recipe=self._recipe(),
            data={"description": f"leanserve data build (seed {self.manifest.get('seed')}); train tokens of "
                                 f"{', '.join(self.mix)}", "sha256": self.manifest["sha256"]},
            metrics={"val_nll": {"map": self.map_val, "ensemble": ensemble_val, "last_sample": val_loss},
                     "ensemble_minus_map": {d: ensemble_val[d] - self.map_val[d] for d in ensemble_val},
                     "members": self.member_log, "val_history": self.history, "train_loss": self.loss_ema,
                     "steps": self.step}))
        self._log(f"wrote {self.out}: {len(self.members)} members of {self.num_sampled / 1e6:.2f}M sampled "
                  f"parameters; val NLL MAP -> ensemble: " +
                  ", ".join(f"{d} {self.map_val[d]:.4f} -> {ensemble_val[d]:.4f}" for d in ensemble_val))
