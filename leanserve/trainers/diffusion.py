"""`leanserve train diffusion`: train a text-to-image diffusion teacher on the shapes set.

The UNet (diffusers UNet2DConditionModel) and a small CLIP text encoder are trained together
from scratch with the MSE of the UNet's prediction (`--prediction-type`: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0)
at uniformly drawn timesteps t in [0, 999] of the teacher schedule (pixel_pipeline.teacher_scheduler:
scaled_linear betas 0.00085 -> 0.012, T = 1000; with `--rescale-betas-zero-snr` rescaled to zero SNR
at t = 999, which needs v-prediction). Both settings are saved in the scheduler config, so every
sampler and loader of the directory reads them. Why the zero-SNR v teacher: on SD's betas x_999
still holds 6.8% of the image, from which the denoiser learns to read the background and the
object's position instead of the prompt, and at sampling time pure noise carries neither
(`leanserve eval leakage`; docs/teacher_schedule.md). A fraction of
captions (`--cond-dropout`) is replaced by the empty prompt, so the same network is also the
unconditional model that classifier-free guidance needs. The weights written are an EMA of
the trained ones. AdamW, linear warm-up then cosine decay.

Output: a diffusers directory + leanserve.json. In pixel space (default) it is a
PixelDiffusionPipeline; with `--vae DIR` the UNet learns the VAE's latents (scaled by its
scaling_factor) and the output is a plain StableDiffusionPipeline.

Data: example i of step s is index s * batch_size + i of the shapes train stream (fresh images
every step, never an epoch), rendered by DataLoader workers. All other randomness (caption
dropout, timesteps, noise, VAE posterior samples) comes from one generator per rank on the
device, checkpointed with the model, EMA and optimizer: `--resume` continues exactly
(trainers/checkpoint.py). `torchrun`: each rank takes its slice of every global batch
(`--batch-size` is the global batch); rank 0 writes.

Recommended GPU run (one H100; the zoo teacher, 6.8M params):

    leanserve train diffusion --out runs/shapes-teacher-v --preset shapes-tiny --steps 15000 --batch-size 256 \
        --prediction-type v_prediction --rescale-betas-zero-snr

(zoo/shapes-sid's text encoder and scheduler are symlinks into zoo/shapes-teacher: a new teacher
replaces the zoo's only together with a SiD generator distilled from it.)

bf16 autocast is on by default on CUDA; DataLoader workers default to up to 14 per GPU. Not yet
measured on a GPU: compare it/s over the first few hundred steps with and without
--channels-last and --compile (which spends its first steps compiling). The progress bar's
`data=` is the share of wall time spent waiting for batches; above a few percent, raise --workers
(one 32x32 shapes example costs ~0.6 ms of CPU, so 256 x 50 steps/s needs ~8 busy cores).
Measured on CPU (one thread of a shared 2-core VM, batch 8, 32x32, training step only): preset
tiny 8 steps/s, shapes-tiny 1 step/s.

Reading the validation lines: captions only start to matter after the image statistics are
learnt; `val_loss_uncond` (EMA weights, every caption replaced by the empty prompt) above
`val_loss` measures how much the model uses them. (The `tiny` preset, batch 16 on CPU: a 3%
gap after 1500 steps, ε-MSE 0.014 vs 0.0145.)
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from leanserve.errors import UserError
from leanserve.runtime import DistInfo, all_reduce_sum, distributed
from leanserve.trainers.checkpoint import check_out_dir
from leanserve.trainers.loop import CHECKPOINT, TrainingLoop, bf16_autocast, local_batch_size
from leanserve.trainers.optim import make_optimizer, warmup_cosine

TOKENIZER_DIR = "tokenizer"
# options that may differ between a run and its resume without changing the result
RESUME_FREE = ("resume", "stop_at", "eval_every", "save_every", "out", "workers", "compile")
TOKENIZER_CAPTIONS = 4000  # shapes captions the default tokenizer learns from (its vocabulary saturates)
LOG_EVERY = 25  # steps between progress-bar loss updates (each one waits for the GPU)
FINGERPRINT_EXAMPLES = 64  # first train examples hashed as the data's identity in leanserve.json


@dataclass(frozen=True)
class DiffusionPreset:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_heads: int         # per transformer block (diffusers' attention_head_dim is the head count)
    norm_num_groups: int
    text_hidden_size: int        # also the UNet's cross_attention_dim
    text_layers: int
    text_heads: int
    text_max_len: int            # prompts are padded/truncated to this many tokens
    save_dtype: str = "float32"

    def unet_blocks(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Plain ResNet blocks at full resolution, cross-attention at every lower one (and the mid block)."""
        n = len(self.block_out_channels)
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
        return down, ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)


PRESETS: dict[str, DiffusionPreset] = {
    # unit tests and CPU smoke runs
    "tiny": DiffusionPreset(block_out_channels=(16, 32), layers_per_block=1, attention_heads=2, norm_num_groups=8,
                            text_hidden_size=32, text_layers=1, text_heads=2, text_max_len=48),
    # the zoo teacher at 32x32: cross-attention at 16x16 and 8x8. UNet 6.15M + text encoder 0.67M
    # (527-token shapes vocabulary) = 6.82M params -> 13.8 MB on disk in float16, under the zoo's
    # 15 MB per model; 128 channels at 16x16, or float32, would not fit. Shapes captions are at most
    # ~35 tokens; 48 leaves room for free-text prompts.
    "shapes-tiny": DiffusionPreset(block_out_channels=(64, 96, 96), layers_per_block=2, attention_heads=3,
                                   norm_num_groups=32, text_hidden_size=128, text_layers=3, text_heads=4,
                                   text_max_len=48, save_dtype="float16"),
}


class Denoiser(torch.nn.Module):
    """The UNet and its text encoder as one module: one DDP wrapper, one optimizer, one EMA.
    (The text encoder is trained from scratch with the UNet, not a frozen pretrained CLIP.)"""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.text_encoder(input_ids)[0], return_dict=False)[0]


def build_denoiser(preset: DiffusionPreset, tokenizer, sample_size: int, channels: int) -> Denoiser:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    down, up = preset.unet_blocks()
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=preset.block_out_channels, layers_per_block=preset.layers_per_block,
        down_block_types=down, up_block_types=up, cross_attention_dim=preset.text_hidden_size,
        attention_head_dim=preset.attention_heads, norm_num_groups=preset.norm_num_groups,
        use_linear_projection=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=preset.text_hidden_size, intermediate_size=4 * preset.text_hidden_size,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        max_position_embeddings=preset.text_max_len, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return Denoiser(unet, text_encoder)


# --------------------------------------------------------------------------- data

def shapes_tokenizer(out_dir: Path, data_seed: int, resolution: int):
    """A byte-level BPE trained on shapes train captions (leanserve/data/tokenizer.py)."""
    from leanserve.data.shapes import sample
    from leanserve.data.tokenizer import train_tokenizer

    captions = [sample(data_seed, i, resolution, split="train").caption for i in range(TOKENIZER_CAPTIONS)]
    return train_tokenizer(captions, out_dir, vocab_size=1024)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UserError(f"{path} is not a tokenizer directory (no tokenizer.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        raise UserError(f"tokenizer {path} has no pad token (prompts are padded to a fixed length)")
    return tokenizer


@dataclass
class Collate:
    """(image, caption) pairs -> (images [B, 3, H, W], token ids [B, max_len]); runs in the workers."""
    tokenizer: object
    max_len: int

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.max_len, truncation=True,
                              return_tensors="pt").input_ids

    def __call__(self, items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([x for x, _ in items]), self.tokenize([c for _, c in items])


@dataclass
class StepBatches:
    """Index lists of this rank's share of the global batches of steps [start, end)."""
    start: int
    end: int
    global_batch: int
    rank: int
    local_batch: int

    def __iter__(self):
        for step in range(self.start, self.end):
            first = step * self.global_batch + self.rank * self.local_batch
            yield list(range(first, first + self.local_batch))

    def __len__(self) -> int:
        return self.end - self.start


def data_fingerprint(data_seed: int, resolution: int) -> str:
    """sha256 of the first train examples (pixels and captions): changes whenever the shapes generator does."""
    from leanserve.data.shapes import sample

    h = hashlib.sha256()
    for i in range(FINGERPRINT_EXAMPLES):
        ex = sample(data_seed, i, resolution, split="train")
        h.update(ex.image.tobytes() + ex.caption.encode() + b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------- the command

def add_arguments(p: argparse.ArgumentParser):
    from leanserve.models.pixel_pipeline import PREDICTION_TYPES

    p.add_argument("--out", required=True, help="pipeline directory to write (diffusers layout + leanserve.json)")
    p.add_argument("--preset", default="shapes-tiny", choices=sorted(PRESETS), help="model shape (default shapes-tiny)")
    p.add_argument("--resolution", type=int, default=32, choices=[32, 64], help="shapes image size")
    p.add_argument("--tokenizer", help="tokenizer directory (default: train one on shapes captions, saved in OUT)")
    p.add_argument("--vae", help="diffusers AutoencoderKL directory (or a pipeline directory with vae/): "
                                 "train on its latents and write a StableDiffusionPipeline")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=15000)
    g.add_argument("--batch-size", type=int, default=256, help="images per optimizer step, over all ranks")
    g.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    g.add_argument("--warmup", type=float, default=0.03, help="linear warm-up, as a fraction of the steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights written (warmed up from 0)")
    g.add_argument("--cond-dropout", type=float, default=0.1,
                   help="fraction of captions replaced by the empty prompt (classifier-free guidance)")
    g.add_argument("--prediction-type", default="epsilon", choices=PREDICTION_TYPES,
                   help="what the UNet predicts: epsilon (the noise) or v_prediction (v = a*eps - s*x0)")
    g.add_argument("--rescale-betas-zero-snr", action="store_true",
                   help="rescale the betas to zero terminal SNR (x_999 is pure noise, nothing of the image "
                        "leaks through it); needs --prediction-type v_prediction")
    g.add_argument("--seed", type=int, default=0, help="initialisation, noise, timesteps, caption dropout")
    g.add_argument("--data-seed", type=int, default=0, help="the shapes stream (leanserve.data.shapes seed)")
    g.add_argument("--val-size", type=int, default=512, help="validation examples (fixed noise and timesteps)")
    g.add_argument("--eval-every", type=int, default=1000, help="steps between validation losses")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--resume", action="store_true", help=f"continue exactly from OUT/{CHECKPOINT}")
    g.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint (time-boxed jobs); resume later")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="bf16 autocast (auto: on CUDA)")
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC activations for the UNet (often faster convolutions on GPU; measure)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--workers", type=int, help="DataLoader processes rendering images (default: 0 on CPU, "
                                               "up to 14 per GPU)")
    g.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights dtype on disk (default: the preset's)")


def _check_args(args):
    for name in ("steps", "batch_size", "val_size", "eval_every", "save_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("lr", "clip"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be > 0")
    if args.weight_decay < 0:
        raise UserError("--weight-decay must be >= 0")
    if not 0 <= args.warmup < 1:
        raise UserError("--warmup is a fraction of the steps, in [0, 1)")
    if not 0 <= args.ema_decay < 1:
        raise UserError("--ema-decay must be in [0, 1)")
    if not 0 <= args.cond_dropout < 1:
        raise UserError("--cond-dropout must be in [0, 1)")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be >= 0")
    if args.rescale_betas_zero_snr and args.prediction_type == "epsilon":
        raise UserError("--rescale-betas-zero-snr needs --prediction-type v_prediction (at zero SNR x_T is the "
                        "noise itself: ε-prediction gives no image there)")
    if args.stop_at is not None and not 0 < args.stop_at < args.steps:
        raise UserError(f"--stop-at must be between 1 and {args.steps - 1} (the run has {args.steps} steps)")
    for name in ("tokenizer", "vae"):
        if getattr(args, name) is not None and not Path(getattr(args, name)).is_dir():
            raise UserError(f"--{name} {getattr(args, name)} does not exist")
    check_out_dir(args.out, CHECKPOINT, args.resume, finished="model_index.json")


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    sub = "vae" if (path / "vae" / "config.json").is_file() else None
    if sub is None and not (path / "config.json").is_file():
        raise UserError(f"--vae {path}: no config.json (an AutoencoderKL directory or a pipeline with vae/)")
    vae = AutoencoderKL.from_pretrained(path, subfolder=sub, use_safetensors=True)
    if getattr(vae.config, "shift_factor", None) is not None:
        raise UserError(f"--vae {path} has a shift_factor (SD3/FLUX latents); StableDiffusionPipeline "
                        "decodes latents with a scaling factor only")
    return vae.requires_grad_(False).eval()


def run(args):
    _check_args(args)
    with distributed(args.device) as (dist_info, device):
        return Trainer(args, dist_info, device).train()


class Trainer(TrainingLoop):
    command = "train diffusion"
    resume_free = RESUME_FREE

    def __init__(self, args, dist_info: DistInfo, device: torch.device):
        from leanserve.data.shapes import ShapesDataset

        super().__init__(args, dist_info, device, total_steps=args.steps)
        self.preset = PRESETS[args.preset]
        self.local_batch = local_batch_size(args.batch_size, dist_info)
        self.autocast = bf16_autocast(args.bf16, device)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        self.tokenizer = self._tokenizer()
        self.tokenizer.model_max_length = self.preset.text_max_len
        self.collate = Collate(self.tokenizer, self.preset.text_max_len)
        self.empty_ids = self.collate.tokenize([""]).to(device)  # the unconditional prompt
        self.vae = load_vae(Path(args.vae)).to(device) if args.vae else None
        if self.vae is not None:
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            sample_size, channels = args.resolution // scale, self.vae.config.latent_channels
        else:
            sample_size, channels = args.resolution, 3
        multiple = 2 ** (len(self.preset.block_out_channels) - 1)
        if sample_size % multiple:
            raise UserError(f"the UNet input ({sample_size}x{sample_size}) must be a multiple of {multiple} "
                            f"for preset {args.preset}")
        self.noise_scheduler = self._scheduler()
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self.train_set = ShapesDataset(args.data_seed, args.steps * args.batch_size, args.resolution, split="train")
        self.val = self._val_data()

        torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        model = build_denoiser(self.preset, self.tokenizer, sample_size, channels).to(device)
        model.unet.to(memory_format=self.memory_format)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.bare = model
        self.ema_pairs = (list(self.ema.parameters()), list(model.parameters()))
        self.model = model
        if dist_info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            self.model = torch.compile(self.model)
        self.optimizer = make_optimizer(model, args.lr, args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(warmup_cosine, steps=args.steps, warmup=args.warmup))
        # all training randomness but the data: one generator per rank, checkpointed
        self.generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + dist_info.rank)
        self.window_loss = torch.zeros((), device=device)  # summed on the device: no GPU sync per step
        self.window_steps = 0
        self.train_loss: float | None = None

    # ---- setup

    def _scheduler(self):
        from leanserve.models.pixel_pipeline import teacher_scheduler
        return teacher_scheduler(self.args.prediction_type, self.args.rescale_betas_zero_snr)

    def _tokenizer(self):
        if self.args.tokenizer:
            return load_tokenizer(Path(self.args.tokenizer))
        path = self.out / TOKENIZER_DIR
        if self.dist.is_main and not self.args.resume:
            shapes_tokenizer(path, self.args.data_seed, self.args.resolution)
        if self.dist.world_size > 1:
            torch.distributed.barrier()
        return load_tokenizer(path)

    def _encode(self, images: torch.Tensor, sample: bool) -> torch.Tensor:
        """Images in [-1, 1] -> what the UNet denoises: the images themselves, or scaled VAE latents."""
        if self.vae is None:
            return images
        with torch.no_grad(), self.autocast():
            posterior = self.vae.encode(images).latent_dist
            z = posterior.sample(generator=self.generator) if sample else posterior.mode()
        return z.float() * self.vae.config.scaling_factor

    def _val_data(self) -> list[tuple[torch.Tensor, ...]]:
        """This rank's share of the fixed validation batches: (x0, ids, t, noise), the same at every evaluation.
        Timesteps are stratified over [0, T) so the estimate weighs every noise level alike."""
        from leanserve.data.shapes import ShapesDataset

        n, rank, world = self.args.val_size, self.dist.rank, self.dist.world_size
        val_set = ShapesDataset(self.args.data_seed, n, self.args.resolution, split="val")
        images, ids = self.collate([val_set[i] for i in range(rank, n, world)])
        t = (torch.arange(n) * self.noise_scheduler.config.num_train_timesteps // n)[rank::world]
        x0 = torch.cat([self._encode(b.to(self.device), sample=False).cpu() for b in images.split(self.local_batch)])
        # drawn for all examples, then sliced: the loss does not depend on the number of ranks
        generator = torch.Generator().manual_seed(self.args.seed + 1)
        noise = torch.randn((n, *x0.shape[1:]), generator=generator)[rank::world]
        batches = zip(*(v.split(self.local_batch) for v in (x0, ids, t, noise)))
        return [tuple(v.to(self.device) for v in batch) for batch in batches]

    def _loader(self):
        from torch.utils.data import DataLoader

        workers = self.args.workers
        if workers is None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            workers = 0 if self.device.type == "cpu" else max(1, min(14, (os.cpu_count() or 2) // local - 1))
        if workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers tokenize; no nested threads
        batches = StepBatches(self.step, self.args.steps, self.args.batch_size, self.dist.rank, self.local_batch)
        return DataLoader(self.train_set, batch_sampler=batches, collate_fn=self.collate, num_workers=workers,
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
                          persistent_workers=False)

    # ---- steps

    def _loss(self, model, x0, ids, t, noise) -> torch.Tensor:
        """Mean MSE per example of the prediction (ε or v) against its target."""
        xt = self.noise_scheduler.add_noise(x0, noise, t).contiguous(memory_format=self.memory_format)
        target = noise if self.args.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(x0, noise, t)
        with self.autocast():
            prediction = model(xt, t, ids)
        return (prediction.float() - target).square().mean(dim=(1, 2, 3))

    def _train_step(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        ids = ids.to(self.device, non_blocking=True)
        x0 = self._encode(images, sample=True)
        n = x0.shape[0]
        drop = torch.rand(n, device=self.device, generator=self.generator) < self.args.cond_dropout
        ids = torch.where(drop[:, None], self.empty_ids, ids)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), device=self.device,
                          generator=self.generator)
        noise = torch.randn(x0.shape, device=self.device, generator=self.generator)
        loss = self._loss(self.model, x0, ids, t, noise).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.bare.parameters(), self.args.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self):
        # warmed up: early on the average follows the fast-moving weights instead of the random init
        decay = min(self.args.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(*self.ema_pairs, 1 - decay)

    @torch.no_grad()
    def _val_loss(self, model, empty_prompts: bool = False) -> float:
        was_training = model.training
        model.eval()
        total = 0.0
        for x0, ids, t, noise in self.val:
            ids = self.empty_ids.expand_as(ids) if empty_prompts else ids
            total += self._loss(model, x0, ids, t, noise).sum().item()
        model.train(was_training)
        return all_reduce_sum([total], self.dist, self.device)[0] / self.args.val_size

    def _evaluate(self) -> dict[str, float]:
        """Validation MSE (of ε or v, as trained) of the EMA and raw weights, and of the EMA weights with
        every caption replaced by the empty prompt: the gap to it is what the captions are worth to the
        model (text conditioning is learnt well after the unconditional image statistics)."""
        losses = {"val_loss": self._val_loss(self.ema), "val_loss_raw": self._val_loss(self.bare),
                  "val_loss_uncond": self._val_loss(self.ema, empty_prompts=True)}
        self.history.append({"step": self.step, **losses})
        self._log(f"step {self.step}: val loss {losses['val_loss']:.4f} (EMA), {losses['val_loss_raw']:.4f} (raw), "
                  f"{losses['val_loss_uncond']:.4f} (EMA, empty prompts)")
        return losses

    # ---- checkpoints

    def _checkpointed(self):
        return self.model, self.optimizer, self.scheduler

    def _checkpoint_state(self) -> tuple[dict, dict]:
        return ({"step": self.step, "window_steps": self.window_steps, "train_loss": self.train_loss,
                 "history": self.history, "ema": self.ema.state_dict()},
                {"generator": self.generator.get_state(), "window_loss": self.window_loss.item()})

    def _restore(self, state: dict, rank_state: dict):
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(rank_state["generator"])
        self.step, self.window_steps = state["step"], state["window_steps"]
        self.window_loss.fill_(rank_state["window_loss"])
        self.train_loss, self.history = state["train_loss"], state["history"]

    # ---- loop

    def _start(self):
        if not self.args.resume:
            self._evaluate()  # the baseline every later loss is read against
        self.model.train()
        self.batches = iter(self._loader())
        self.waited = self.elapsed = 0.0  # seconds spent waiting for batches, and in all, this session

    def _advance(self) -> dict | None:
        start = time.perf_counter()
        images, ids = next(self.batches)
        self.waited += time.perf_counter() - start
        self.window_loss += self._train_step(images, ids)
        self.window_steps += 1
        self.step += 1
        self.elapsed += time.perf_counter() - start
        if self.step % LOG_EVERY == 0 or self.step == self.args.steps:
            self._flush_loss()
            return {"loss": f"{self.train_loss:.4f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}",
                    "data": f"{self.waited / self.elapsed:.0%}"}
        return None

    def _flush_loss(self):
        """train_loss = mean loss over ranks and the steps since the last flush (every LOG_EVERY steps)."""
        total, count = all_reduce_sum([self.window_loss.item(), float(self.window_steps)], self.dist, self.device)
        self.train_loss = total / (count or 1)
        self.window_loss.zero_()
        self.window_steps = 0

    # ---- output

    def _write_output(self, losses: dict[str, float]):
        from diffusers import StableDiffusionPipeline

        from leanserve.models.model_dir import (
            ModelInfo,
            save_model_info,
            weights_sha256,
        )
        from leanserve.models.pixel_pipeline import PixelDiffusionPipeline

        args = self.args
        save_dtype = args.save_dtype or self.preset.save_dtype
        dtype = getattr(torch, save_dtype)
        unet, text_encoder = self.ema.unet, self.ema.text_encoder
        if dtype != torch.float32:
            unet, text_encoder = unet.to(dtype), text_encoder.to(dtype)
        num_params = {"unet": sum(p.numel() for p in unet.parameters()),
                      "text_encoder": sum(p.numel() for p in text_encoder.parameters())}
        if self.vae is None:
            pipe = PixelDiffusionPipeline(unet=unet, text_encoder=text_encoder, tokenizer=self.tokenizer,
                                          scheduler=self._scheduler())
            base = None
        else:
            vae = self.vae if dtype == torch.float32 else self.vae.to(dtype)
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=self.tokenizer,
                                           unet=unet, scheduler=self._scheduler(), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            base = {"path": str(args.vae), "sha256": weights_sha256(args.vae)}
        pipe.save_pretrained(self.out)
        scheduler = self._scheduler().config
        save_model_info(self.out, ModelInfo(
            kind="image", method="dense",
            settings={"pipeline": type(pipe).__name__, "space": "pixel" if self.vae is None else "latent",
                      "preset": args.preset, "resolution": args.resolution, "num_params": num_params,
                      "save_dtype": save_dtype, "text_max_len": self.preset.text_max_len,
                      "tokenizer": args.tokenizer or f"trained on {TOKENIZER_CAPTIONS} shapes train captions",
                      "prediction_type": scheduler.prediction_type,
                      "rescale_betas_zero_snr": scheduler.rescale_betas_zero_snr,
                      "num_train_timesteps": scheduler.num_train_timesteps, "beta_schedule": scheduler.beta_schedule,
                      "beta_start": scheduler.beta_start, "beta_end": scheduler.beta_end,
                      "cond_dropout": args.cond_dropout, "ema_decay": args.ema_decay,
                      "world_size": self.dist.world_size},
            base=base,
            recipe=self._recipe(),
            data={"description": f"leanserve.data.shapes train split, seed {args.data_seed}, "
                                 f"{args.resolution}x{args.resolution}, examples 0..{args.steps * args.batch_size - 1}",
                  "sha256": data_fingerprint(args.data_seed, args.resolution)},
            metrics={**losses, "train_loss": self.train_loss, "steps": args.steps,
                     "images_seen": args.steps * args.batch_size, "val_history": self.history}))
        total = sum(num_params.values())
        self._log(f"wrote {self.out} ({total / 1e6:.2f}M params, {save_dtype})")
