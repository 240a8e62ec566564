"""`leanserve train lm`: pretrain a Llama on packed code/docs/tasks text, then chat-finetune it.

`--arch moe|moepp` trains the same decoder with MoE FFNs instead (leanserve/models/moepp_hf.py):
plain top-k MoE, or MoE++ with zero/copy/constant experts, the gating residual and the
heterogeneous load-balance loss. Their validations also record how tokens are routed
(eval/moepp_routing.py).

Phase 1 (pretrain) reads random windows of packed token streams (`<bos> doc <end_of_text> ...`),
one stream per data group, each batch split over the groups by the mixture (natural, stratified,
static or Aioli's, re-estimated online: trainers/lm_mixture.py). Phase 2 (chat) trains on
chat pairs rendered through the tokenizer's chat template with the loss on assistant tokens
only (each reply and its end-of-turn token). One AdamW and one LR schedule span both phases:
linear warm-up then cosine decay, restarted at the phase boundary. `--init MODEL_DIR` starts from
another run's weights instead of a fresh init (a curriculum: short windows first, then long ones).

Resumable exactly (see trainers/checkpoint.py): all randomness of the data order is one
torch.Generator per rank whose state is checkpointed. `torchrun` DDP: each rank reads its
own shard of the documents/conversations; `--batch-size` is the global batch; rank 0 writes.
The data is read as leanserve/data/lm_data.py reads it for `eval lm` too, and validation losses
are eval/token_loss.py's; the loop (resume, checkpoints, progress) is trainers/loop.py's.
"""
from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from leanserve.data.build import load_manifest
from leanserve.data.lm_data import (
    IGNORE,
    ChatExamples,
    batched,
    chat_examples,
    encode_documents,
    load_tokenizer,
    read_split,
    stream_windows,
)
from leanserve.data.tokenizer import stop_token_ids
from leanserve.errors import UserError
from leanserve.eval.induction import induction_words, repeat_losses
from leanserve.eval.moepp_routing import routing_stats, summary
from leanserve.eval.token_loss import mean_losses
from leanserve.kernels.moepp_reference import RENORM_MODES
from leanserve.models.model_dir import ModelInfo, save_model_info, weights_sha256
from leanserve.models.moepp_hf import MoEPPConfig, MoEPPForCausalLM
from leanserve.runtime import DistInfo, all_reduce_sum, distributed
from leanserve.trainers import lm_mixture
from leanserve.trainers.checkpoint import check_out_dir, unwrap
from leanserve.trainers.lm_mixture import PRETRAIN_DOMAINS, MixturePlan, PretrainData, plan_mixture
from leanserve.trainers.loop import CHECKPOINT, TrainingLoop, bf16_autocast, local_batch_size
from leanserve.trainers.optim import make_optimizer, warmup_cosine
from leanserve.trainers.presets import PRESETS

ARCHS = ("llama", "moe", "moepp")
# the MoE options (None unless given; _resolve_moe_args fills them in for --arch moe|moepp)
MOE_OPTIONS = ("experts", "top_k", "zc", "tau", "lb_coef", "gating_residual", "renorm_mode")
ZC_KINDS = ("zero", "copy", "const")
EVAL_DOMAINS = PRETRAIN_DOMAINS + ("chat",)
# options that may differ between a run and its resume without changing the result
RESUME_FREE = ("resume", "stop_at", "eval_every", "save_every", "out", "compile")


# --------------------------------------------------------------------------- data mixture

def mix_domains(manifest: dict, mix: dict[str, float] | None) -> list[str]:
    """The domains a mixture trains on: its own, or for natural every pretraining domain with train rows."""
    return list(mix) if mix else [d for d in PRETRAIN_DOMAINS
                                  if manifest["splits"].get(d, {}).get("train", {}).get("num_rows")]


def train_streams(data: Path, manifest: dict, tokenizer, domains: list[str], shard=lambda rows: rows) -> list:
    """One packed stream of train documents per domain (of this rank's `shard` of the documents)."""
    streams = []
    for domain in domains:
        texts = [row["text"] for row in shard(read_split(data, manifest, domain, "train"))]
        if not texts:
            raise UserError(f"{data}/{domain}/train.jsonl has no documents for this process (too few to shard "
                            f"over the ranks?); leave {domain} out of --mix")
        streams.append(encode_documents(tokenizer, texts))
    return streams


def labelled_chats(tokenizer, rows: list[dict], seq_len: int, split: str, log) -> list[tuple[list[int], list[int]]]:
    """Chat examples of `rows` (lm_data.chat_examples), logging how many were cut to seq_len."""
    examples, truncated = chat_examples(tokenizer, rows, seq_len)
    if truncated:
        log(f"chat/{split}: {truncated} conversation(s) cut to --seq-len {seq_len}")
    return examples


def validation_examples(data: Path, manifest: dict, tokenizer, seq_len: int, num_examples: int,
                        log) -> dict[str, list[tuple[list[int], list[int]]]]:
    """The fixed validation examples per domain that train-time losses read: the first num_examples
    windows of each document domain's val stream, the first num_examples chat conversations."""
    val = {}
    for domain in EVAL_DOMAINS:
        rows = read_split(data, manifest, domain, "val")
        if domain == "chat":
            examples = labelled_chats(tokenizer, rows[:num_examples], seq_len, "val", log)
        else:
            examples = stream_windows(encode_documents(tokenizer, [r["text"] for r in rows]), seq_len, num_examples)
        if examples:
            val[domain] = examples
    return val


def parse_zc(text: str) -> dict[str, int]:
    """`zero=N,copy=N,const=N` (kinds left out: 0) -> {"zero": N, "copy": N, "const": N}."""
    counts = dict.fromkeys(ZC_KINDS, 0)
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in ZC_KINDS:
            raise UserError(f"--zc: unknown expert kind {name!r} (choose from {', '.join(ZC_KINDS)})")
        try:
            counts[name] = int(value)
        except ValueError:
            raise UserError(f"--zc: {part!r} is not KIND=COUNT") from None
        if counts[name] < 0:
            raise UserError(f"--zc: the count of {name} must be >= 0")
    return counts


# --------------------------------------------------------------------------- model and schedule

def _resolve_moe_args(args):
    """Fill in the MoE options' defaults for the chosen --arch (in place, so the recipe and a resume
    see the values used); refuse the ones that do not apply to it."""
    given = [name for name in MOE_OPTIONS if getattr(args, name) is not None]
    if args.arch == "llama":
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} needs --arch moe or moepp")
        return
    if args.arch == "moe":
        for name in ("zc", "tau"):
            if getattr(args, name) is not None:
                raise UserError(f"--{name} sets the zero-computation experts of --arch moepp; --arch moe has none")
    defaults = {"experts": 8, "top_k": 2, "lb_coef": 0.01, "renorm_mode": "released",
                "gating_residual": "on" if args.arch == "moepp" else "off"}
    if args.arch == "moepp":
        defaults |= {"zc": "zero=1,copy=1,const=2", "tau": 0.75}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.experts < 1 or args.top_k < 1:
        raise UserError("--experts and --top-k must be >= 1")
    if args.lb_coef < 0 or (args.tau is not None and not args.tau > 0):
        raise UserError("--lb-coef must be >= 0 and --tau > 0")


def _moe_fields(args) -> dict:
    """MoEPPConfig's expert fields from the resolved options (plain MoE: no ZC experts, every
    expert weighted 1 in the load-balance loss)."""
    zc = parse_zc(args.zc) if args.arch == "moepp" else dict.fromkeys(ZC_KINDS, 0)
    return dict(n_ffn_experts=args.experts, n_zero=zc["zero"], n_copy=zc["copy"], n_const=zc["const"],
                num_experts_per_tok=args.top_k, tau=args.tau or 1.0,  # moe: no ZC expert to weigh
                lb_coef=args.lb_coef,
                gating_residual=args.gating_residual == "on", renorm_mode=args.renorm_mode)


def model_config(args, tokenizer):
    """LlamaConfig (or MoEPPConfig for --arch moe|moepp) from the preset with any shape flags overriding it."""
    preset = PRESETS[args.preset]
    hidden = args.hidden_size or preset.hidden_size
    heads = args.heads or preset.num_heads
    kv_heads = args.kv_heads or preset.num_kv_heads
    max_len = args.max_len or preset.max_position_embeddings
    if hidden % heads or (hidden // heads) % 2:
        raise UserError(f"--hidden-size {hidden} must split into {heads} heads of an even size (rotary embeddings)")
    if heads % kv_heads:
        raise UserError(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
    if args.seq_len is not None and args.seq_len > max_len:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's --max-len {max_len}")
    shape = dict(
        vocab_size=len(tokenizer), hidden_size=hidden,
        intermediate_size=args.intermediate_size or preset.intermediate_size,  # per expert for MoE
        num_hidden_layers=args.layers or preset.num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, tie_word_embeddings=preset.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id)
    if args.arch == "llama":
        return LlamaConfig(**shape)
    try:
        return MoEPPConfig(**shape, **_moe_fields(args))
    except ValueError as e:  # e.g. --top-k larger than the experts
        raise UserError(f"--arch {args.arch}: {e}") from None


def lr_multiplier(step: int, *, pretrain_steps: int, chat_steps: int, warmup: float, chat_scale: float) -> float:
    if step < pretrain_steps:
        return warmup_cosine(step, pretrain_steps, warmup)
    return chat_scale * warmup_cosine(step - pretrain_steps, chat_steps, warmup)


# --------------------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--data", required=True, help="output directory of `leanserve data build`")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (`leanserve data tokenizer`)")
    p.add_argument("--out", required=True, help="model directory to write (HF layout + leanserve.json)")
    p.add_argument("--preset", default="chat-tiny", choices=sorted(PRESETS), help="model shape (default chat-tiny)")
    g = p.add_argument_group("shape overrides (default: the preset's)")
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--layers", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--kv-heads", type=int)
    g.add_argument("--intermediate-size", type=int)
    g.add_argument("--max-len", type=int, help="max_position_embeddings")
    p.add_argument("--arch", default="llama", choices=ARCHS,
                   help="llama (dense), moe (top-k MoE FFNs) or moepp (MoE++: MoE plus zero/copy/constant experts)")
    g = p.add_argument_group("MoE (--arch moe|moepp; --intermediate-size is per expert)")
    g.add_argument("--experts", type=int, help="FFN experts per layer (default 8)")
    g.add_argument("--top-k", type=int, help="experts per token (default 2)")
    g.add_argument("--zc", help="zero-computation experts of moepp: zero=N,copy=N,const=N "
                                "(default zero=1,copy=1,const=2)")
    g.add_argument("--tau", type=float,
                   help="moepp: load-balance weight of ZC experts relative to FFN experts; sets the FFN share of "
                        "routed slots to tau*experts/(tau*experts + ZC experts) (default 0.75)")
    g.add_argument("--lb-coef", type=float, help="weight of the load-balance loss, mean over layers (default 0.01)")
    g.add_argument("--gating-residual", choices=["on", "off"],
                   help="add each layer's router logits, mapped, to the next layer's "
                        "(default: on for moepp, off for moe)")
    g.add_argument("--renorm-mode", choices=RENORM_MODES,
                   help="top-k gate weights: released (zero-expert gates dropped, the rest summing to 1; default), "
                        "paper (raw softmax probabilities) or mixtral (softmax over the top-k logits)")
    g = p.add_argument_group("training")
    g.add_argument("--pretrain-steps", type=int, default=3000)
    g.add_argument("--chat-steps", type=int, default=1000)
    g.add_argument("--mix", default="natural",
                   help="pretraining mixture: DOMAIN=WEIGHT,... (e.g. code=2,docs=1,tasks=1) or natural: "
                        "in proportion to each domain's train tokens (default); the older form of --groups/--mixture")
    lm_mixture.add_arguments(p, g)
    g.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step, over all ranks")
    g.add_argument("--seq-len", type=int, help="training sequence length (default: the model's max length)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak LR of the pretraining phase")
    # lower than --lr: at the pretraining LR the chat phase erases much of what pretraining learnt
    g.add_argument("--chat-lr", type=float, default=3e-4, help="peak LR of the chat phase")
    g.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of each phase's steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    g.add_argument("--eval-every", type=int, default=250, help="steps between validation losses")
    g.add_argument("--eval-batches", type=int, default=8, help="validation batches per domain")
    g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="bf16 autocast (auto: on CUDA)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fused kernels, fewer launches: a small model's step is launch-bound "
                        "on a GPU; the first steps and each new batch shape compile)")
    g.add_argument("--save-dtype", choices=["float32", "bfloat16"],
                   help="weights dtype on disk (default: the preset's)")
    g.add_argument("--init", metavar="MODEL_DIR",
                   help="start from this model directory's weights (the same shape and tokenizer; --max-len may "
                        "differ), with a fresh optimizer and LR schedule: e.g. long-context training from a "
                        "short-window warm-up (a curriculum)")
    g.add_argument("--resume", action="store_true", help=f"continue exactly from OUT/{CHECKPOINT}")
    g.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint (time-boxed jobs); resume later")


def _check_args(args):
    data, tok = Path(args.data), Path(args.tokenizer)
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist")
    if not tok.is_dir():
        raise UserError(f"--tokenizer {tok} does not exist")
    for name in ("pretrain_steps", "chat_steps"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("batch_size", "eval_every", "eval_batches", "save_every", "group_eval_seqs"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("seq_len", "hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "max_len"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("lr", "chat_lr", "clip"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.weight_decay < 0:
        raise UserError("--weight-decay must be >= 0")
    if not 0 <= args.warmup < 1:
        raise UserError("--warmup is a fraction of each phase's steps, in [0, 1)")
    total = args.pretrain_steps + args.chat_steps
    if args.stop_at is not None and not 0 < args.stop_at < total:
        raise UserError(f"--stop-at must be between 1 and {total - 1} (the run has {total} steps)")
    if args.init and not (Path(args.init) / "config.json").is_file():
        raise UserError(f"--init {args.init}: not a model directory (no config.json)")
    check_out_dir(args.out, CHECKPOINT, args.resume, finished="config.json")
    _resolve_moe_args(args)


def run(args):
    _check_args(args)
    tokenizer = load_tokenizer(args.tokenizer)
    config = model_config(args, tokenizer)
    # resolved here so that the recipe and a resume see the length actually used
    args.seq_len = args.seq_len or config.max_position_embeddings
    manifest = load_manifest(args.data)
    plan = plan_mixture(args, manifest)
    with distributed(args.device) as (dist_info, device):
        return Trainer(args, manifest, plan, tokenizer, config, dist_info, device).train()


def _load_init(model: torch.nn.Module, init: str) -> None:
    """model <- the weights of the model directory `init` (loaded as model's own class, safetensors)."""
    source = type(model).from_pretrained(init, dtype=torch.float32)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:  # a different shape or vocabulary
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise UserError(f"--init {init} does not fit this model's shape: {first[0].strip()}") from None


class Trainer(TrainingLoop):
    command = "train lm"
    resume_free = RESUME_FREE

    def __init__(self, args, manifest: dict, plan: MixturePlan, tokenizer, config,
                 dist_info: DistInfo, device):
        super().__init__(args, dist_info, device, total_steps=args.pretrain_steps + args.chat_steps)
        self.tokenizer, self.config = tokenizer, config
        self.data = Path(args.data)
        self.manifest = manifest
        self.local_batch = local_batch_size(args.batch_size, dist_info)
        self.autocast = bf16_autocast(args.bf16, device)
        self.pretrain, self.chat = self._train_data(plan)
        self.group_loss: dict[str, float] = {}
        self.val = self._val_data()

        torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        model = (LlamaForCausalLM if args.arch == "llama" else MoEPPForCausalLM)(config).to(device)
        if args.init:
            _load_init(model, args.init)
        if args.compile:
            model.compile()  # in place: state_dict keys, checkpoints and the saved model stay the bare model's
        self.model = model
        if dist_info.world_size > 1:
            # MoE: layer 0's gate_map never gets a gradient (it has no previous layer), nor does a layer's
            # expert stack in a step that routes all of its tokens to ZC experts
            self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                 find_unused_parameters=args.arch != "llama")
        self.optimizer = make_optimizer(model, args.lr, args.weight_decay)
        schedule = partial(lr_multiplier, pretrain_steps=args.pretrain_steps, chat_steps=args.chat_steps,
                           warmup=args.warmup, chat_scale=args.chat_lr / args.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        # all data-order randomness: one generator per rank, checkpointed
        self.generator = torch.Generator().manual_seed(args.seed * 1_000_003 + dist_info.rank)
        self.tokens = 0
        self.loss_ema: dict[str, float] = {}

    # ---- data

    def _shard(self, rows: list) -> list:
        return rows[self.dist.rank::self.dist.world_size]

    def _train_data(self, plan: MixturePlan) -> tuple[PretrainData | None, ChatExamples | None]:
        pretrain = chat = None
        if self.args.pretrain_steps:
            pretrain = PretrainData(self, plan)
        if self.args.chat_steps:
            rows = self._shard(read_split(self.data, self.manifest, "chat", "train"))
            examples = labelled_chats(self.tokenizer, rows, self.args.seq_len, "train", self._log)
            if not examples:
                raise UserError(f"{self.data}/chat/train.jsonl has no conversations for rank {self.dist.rank}")
            chat = ChatExamples(examples, self.tokenizer.pad_token_id, self.args.seq_len)
            self._log(f"chat conversations (this rank): {len(examples):,}")
        return pretrain, chat

    def _val_data(self) -> dict[str, list[dict]]:
        """Fixed validation batches per domain: the same examples every evaluation, split over ranks."""
        examples = validation_examples(self.data, self.manifest, self.tokenizer, self.args.seq_len,
                                       self.args.eval_batches * self.args.batch_size, self._log)
        return {d: batched(self._shard(e), self.local_batch, self.tokenizer.pad_token_id) for d, e in examples.items()}

    # ---- loop

    def _phase(self, step: int) -> str:
        return "pretrain" if step < self.args.pretrain_steps else "chat"

    def _batch(self, phase: str) -> dict:
        if phase == "pretrain":
            return self.pretrain.sample(self.step, self.local_batch, self.args.seq_len, self.generator, self.model)
        return self.chat.sample(self.local_batch, self.generator)

    def _evaluate(self) -> dict[str, float]:
        losses = mean_losses(self.model, self.val, self.device, self.autocast, self.dist)
        if self.pretrain is not None:
            self.group_loss = self.pretrain.group_losses(self.model)
        # whether the model copies yet (eval/induction.py): long-context tasks stay unlearnt until it does
        induction = [repeat_losses(unwrap(self.model), self.tokenizer, words, device=self.device)
                     for words in induction_words(self.args.seq_len)]
        self.history.append({"step": self.step, "val_loss": losses, "group_val_loss": self.group_loss,
                             "induction": induction})
        self._log(f"step {self.step}: val loss " + ", ".join(f"{d} {v:.3f}" for d, v in losses.items())
                  + "; copy gain " + ", ".join(f"{r['copy_gain']:.2f} at {r['words']} words" for r in induction))
        if self.args.arch != "llama":
            routing = routing_stats(self.model, self.val, self.device, self.autocast, self.dist)
            self.history[-1]["routing"] = routing
            self._log(f"step {self.step}: {summary(routing)}")
        return losses

    def _start(self):
        self.model.train()

    def _advance(self) -> dict:
        phase = self._phase(self.step)
        batch = {k: v.to(self.device) for k, v in self._batch(phase).items()}
        with self.autocast():
            out = self.model(**batch)
        loss = out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens, loss_value = all_reduce_sum(
            [float((batch["labels"][:, 1:] != IGNORE).sum()), loss.item() / self.dist.world_size],
            self.dist, self.device)
        self.tokens += int(tokens)
        prev = self.loss_ema.get(phase)
        self.loss_ema[phase] = loss_value if prev is None else 0.9 * prev + 0.1 * loss_value
        postfix = {"phase": phase, "loss": f"{self.loss_ema[phase]:.3f}",
                   "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"}
        if getattr(out, "aux_loss", None) is not None:  # MoE: this rank's load-balance loss (part of loss)
            postfix["aux"] = f"{out.aux_loss.item():.3f}"
        return postfix

    # ---- checkpoints

    def _checkpointed(self):
        return self.model, self.optimizer, self.scheduler

    def _checkpoint_state(self) -> tuple[dict, dict]:
        return ({"step": self.step, "tokens": self.tokens, "loss_ema": self.loss_ema, "history": self.history,
                 "mixture": self.pretrain.state_dict() if self.pretrain is not None else None},
                {"generator": self.generator.get_state()})

    def _restore(self, state: dict, rank_state: dict):
        self.generator.set_state(rank_state["generator"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.loss_ema, self.history = state["loss_ema"], state["history"]
        if self.pretrain is not None:
            self.pretrain.load_state_dict(state["mixture"])

    # ---- output

    def _write_output(self, val_loss: dict[str, float]):
        args = self.args
        model = unwrap(self.model)
        save_dtype = args.save_dtype or PRESETS[args.preset].save_dtype
        num_params = sum(p.numel() for p in model.parameters())
        model.to(getattr(torch, save_dtype)).save_pretrained(self.out)
        self.tokenizer.model_max_length = self.config.max_position_embeddings
        self.tokenizer.save_pretrained(self.out)
        GenerationConfig(bos_token_id=self.tokenizer.bos_token_id, eos_token_id=stop_token_ids(self.tokenizer),
                         pad_token_id=self.tokenizer.pad_token_id, do_sample=True, temperature=0.6,
                         top_p=0.9).save_pretrained(self.out)
        train_rows = ", ".join(f"{d} {s['train']['num_rows']}" for d, s in self.manifest["splits"].items())
        routing = {"routing": self.history[-1]["routing"]} if args.arch != "llama" else {}
        # MoE++ is an architecture (config.json's model_type), not a serving-time method: "dense"
        save_model_info(self.out, ModelInfo(
            kind="llm", method="dense",
            settings={"architecture": type(model).__name__, "arch": args.arch, "preset": args.preset,
                      "num_params": num_params, "save_dtype": save_dtype, "world_size": self.dist.world_size,
                      "init": {"dir": args.init, "weights_sha256": weights_sha256(args.init)} if args.init else None,
                      "mix": self.pretrain.mix if self.pretrain else None,
                      "mixture": self.pretrain.settings() if self.pretrain else None},
            recipe=self._recipe(),
            data={"description": f"leanserve data build (seed {self.manifest.get('seed')}); train rows: {train_rows}",
                  "sha256": self.manifest["sha256"]},
            metrics={"val_loss": val_loss, "val_ppl": {d: math.exp(v) for d, v in val_loss.items()},
                     "train_loss": self.loss_ema, "train_tokens": self.tokens,
                     "steps": {"pretrain": args.pretrain_steps, "chat": args.chat_steps},
                     "val_history": self.history, **routing,
                     "mixture": self.pretrain.metrics(self.group_loss) if self.pretrain else None}))
        if self.pretrain is not None and self.pretrain.plot(self.out, args.pretrain_steps):
            self._log(f"wrote {self.out / lm_mixture.PLOT} (the mixture over pretraining)")
        self._log(f"wrote {self.out} ({num_params / 1e6:.2f}M params, {save_dtype})")
