"""`leanserve distill sid`: distil a pixel-space diffusion teacher into a 1..K-step generator with
Score identity Distillation (Zhou et al., SiD and its few-step, LSG and Diffusion-GAN extensions; losses in
trainers/sid_loss.py).

The generator θ and the fake score network ψ start as copies of the teacher's UNet (an ε- or a
v-prediction teacher: all three networks then predict the same, and the losses convert each output
to x0 by the scheduler config's prediction_type); the teacher φ and the text encoder stay frozen.
Data-free: only prompts are needed (shapes train captions), except with `--gan`, which also uses
the real images of the fake phase's captions.
Every iteration draws one k ~ U{1..K}, shared by both phases, then strictly alternates
1. fake phase: k-step generator samples without gradient, ψ's denoising loss (guided at κ1, 10%
   empty prompts whenever a fake κ is not 1), Adam step on ψ;
2. generator phase: fresh prompts and noise, the k-step chain with gradient through its last call
   only, the SiD loss with the per-sample 1/w normaliser (the gradient goes through the teacher's
   and the fake network's Jacobians), samples with non-finite values dropped, non-finite gradients
   zeroed, Adam step on θ;
then an EMA of θ (EDM-style half-life in images with a ramp); the EMA is what gets written.
With `--gan` (Diffusion-GAN, spec §7) the fake phase also trains ψ's encoder as a discriminator
(real and generated images noised with the same t and ε), and after `--gan-warmup` the generator
loss becomes 0.5·SiD + 0.5·weight·adversarial.
Adam β = (0, 0.999), no weight decay, constant LR (spec §5). fp32 by default with TF32 off (the
SiD signal is a difference of two nearly equal network outputs); `--bf16` autocasts the UNets.

Randomness: one generator per rank on the device for noise, timesteps and dropout (rank 0 keeps
the single-process seed); one CPU generator for k, seeded and advanced identically on every
rank, so all ranks train the same k each iteration. All are checkpointed with the networks, EMA
and optimizer: `--resume` continues exactly (trainers/checkpoint.py), at the same world size only.

`torchrun` DDP (gloo on CPU, nccl on CUDA): `--batch-size` is the batch of each rank and each
phase (the global batch is that times the ranks); every rank reads its own disjoint slice of the
caption stream. Gradients are averaged over ranks after each phase's backward, before gradient
clipping, nan_to_num and Adam, so the networks and the EMA stay identical on every rank. Logged
losses are means over ranks; rank 0 writes checkpoints and the pipeline, and decides when
`--time-limit` is spent.

Output: a SiDPipeline directory (models/sid_pipeline.py) usable at 1..K steps, + leanserve.json
(K, the four kappas, alpha, t_init, images seen).

    leanserve distill sid --teacher zoo/shapes-teacher --steps 4 --guidance lsg --kappa 1.5 \\
        --iterations 5000 --batch-size 128 --out runs/shapes-sid
"""
from __future__ import annotations

import argparse
import copy
from functools import partial
from pathlib import Path

import numpy as np
import torch

from leanserve.errors import UserError
from leanserve.runtime import DistInfo
from leanserve.trainers.checkpoint import check_out_dir
from leanserve.trainers.loop import CHECKPOINT, TrainingLoop

# options that may differ between a run and its resume without changing the result
RESUME_FREE = ("resume", "stop_at", "save_every", "out", "save_dtype", "gradient_checkpointing", "time_limit",
               "channels_last", "compile")
LOG_EVERY = 10  # iterations between progress-bar loss updates (each one waits for the GPU)


def add_arguments(p: argparse.ArgumentParser):
    from leanserve.trainers.sid_loss import GUIDANCES

    p.add_argument("--teacher", required=True, help="pixel-space teacher pipeline directory (leanserve train diffusion)")
    p.add_argument("--out", required=True, help="generator pipeline directory to write (SiDPipeline + leanserve.json)")
    p.add_argument("--steps", type=int, default=4, help="K: the generator is trained on a uniform mixture of 1..K steps")
    p.add_argument("--guidance", default="lsg", choices=GUIDANCES,
                   help="lsg: all four kappas = --kappa; zero-cfg: teacher 1, fake 0; anti-cfg: teacher 1, fake --kappa < 0")
    p.add_argument("--kappa", type=float, help="guidance scale (lsg default 1.5, anti-cfg default -1; not for zero-cfg)")
    p.add_argument("--kappas", help="explicit κ1,κ2,κ3,κ4 (fake training, fake in α·L1, fake in L2, teacher), "
                                    "overriding --guidance's; e.g. Anti-CFG with κ1 = 1: 1,-1,-1,1")
    p.add_argument("--alpha", type=float, default=1.0, help="SiD bias-correction weight (sweep 0.5, 1.0, 1.2)")
    p.add_argument("--t-init", type=int, default=625,
                   help="timestep of the generator's first step (625: sigma 2.5 on SD's scaled_linear betas; "
                        "on the same betas rescaled to zero terminal SNR sigma 2.5 is at t = 589)")
    g = p.add_argument_group("Diffusion-GAN (data-aided: real shapes images paired with their captions)")
    g.add_argument("--gan", action="store_true", help="add the Diffusion-GAN loss, the fake network's encoder "
                                                      "(mid-block output, channel mean) as discriminator")
    g.add_argument("--gan-weight", type=float, default=1e-3, help="adversarial term relative to the SiD term")
    g.add_argument("--gan-warmup", type=float, default=0.1,
                   help="fraction of the iterations before the generator gets the adversarial term (D trains from 0)")
    g = p.add_argument_group("training")
    g.add_argument("--iterations", type=int, default=5000, help="fake + generator updates")
    g.add_argument("--batch-size", type=int, default=64,
                   help="images per phase and per rank (each phase draws its own batch; under torchrun the "
                        "global batch is this times the ranks)")
    g.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate of both networks")
    g.add_argument("--ema-half-life", type=float, default=50_000, help="EMA half-life of the generator, in images")
    g.add_argument("--ema-ramp", type=float, default=0.05, help="half-life is at most this times the images seen")
    g.add_argument("--cond-dropout", type=float, default=0.1,
                   help="fraction of fake-phase prompts replaced by the empty prompt when a fake kappa is not 1")
    g.add_argument("--seed", type=int, default=0, help="noise, timesteps, k, dropout")
    g.add_argument("--data-seed", type=int, default=0, help="the shapes caption stream")
    g.add_argument("--save-every", type=int, default=500, help="iterations between checkpoints")
    g.add_argument("--resume", action="store_true", help=f"continue exactly from OUT/{CHECKPOINT}")
    g.add_argument("--stop-at", type=int, help="stop after this iteration with a checkpoint; resume later")
    g.add_argument("--time-limit", type=float,
                   help=f"minutes: end training early when they are spent (checked every {LOG_EVERY} iterations, "
                        "on rank 0's clock) and write the generator as it is (the iterations done are recorded; "
                        "the EMA and GAN schedules still follow --iterations)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the UNets (default fp32, TF32 off)")
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC memory format for the UNets (cuDNN's tensor-core convolutions are NHWC; "
                        "NCHW weights cost a layout transform around each convolution)")
    g.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead"],
                   help="torch.compile the teacher, generator and fake UNets (fused kernels, far fewer launches: "
                        "a small UNet's iteration is otherwise bound by Python and kernel launches; the first "
                        "iterations pay the compilation); reduce-overhead also replays them as CUDA graphs")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in backward: the generator loss backpropagates through the "
                        "generator, the teacher and the fake network, so memory is ~3 UNets' activations (x2 with CFG)")
    g.add_argument("--save-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights dtype on disk (float16 keeps a shapes generator under the zoo's 15 MB)")


def _check_args(args):

    for name in ("steps", "iterations", "batch_size", "save_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("lr", "ema_half_life", "ema_ramp"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if not args.gan_weight > 0:
        raise UserError("--gan-weight must be > 0")
    if not 0 <= args.gan_warmup < 1:
        raise UserError("--gan-warmup is a fraction of the iterations, in [0, 1)")
    if not 0 <= args.cond_dropout < 1:
        raise UserError("--cond-dropout must be in [0, 1)")
    if not 0 < args.t_init < 1000:
        raise UserError("--t-init must be in [1, 999]")
    if args.steps > args.t_init:
        raise UserError(f"--steps {args.steps} exceeds --t-init {args.t_init} (steps would repeat timesteps)")
    if args.kappas is not None and args.kappa is not None:
        raise UserError("give --kappa or --kappas, not both")
    try:
        run_kappas(args)
    except ValueError as e:
        raise UserError(f"--guidance {args.guidance}: {e}") from None
    if args.time_limit is not None and not args.time_limit > 0:
        raise UserError("--time-limit must be > 0 minutes")
    if args.stop_at is not None and not 0 < args.stop_at < args.iterations:
        raise UserError(f"--stop-at must be between 1 and {args.iterations - 1}")
    if not Path(args.teacher).is_dir():
        raise UserError(f"--teacher {args.teacher} does not exist")
    check_out_dir(args.out, CHECKPOINT, args.resume, finished="model_index.json")


def run_kappas(args):
    """The four κ of this run: --kappas verbatim, else --guidance's preset at --kappa."""
    from leanserve.trainers.sid_loss import Kappas, guidance_kappas

    if args.kappas is None:
        return guidance_kappas(args.guidance, args.kappa)
    try:
        values = [float(v) for v in args.kappas.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"--kappas takes four comma-separated numbers, got {args.kappas!r}")
    return Kappas(*values)


def load_teacher(path: Path):
    from leanserve.models.image_pipeline import PIXEL_PIPELINE, pipeline_class_name
    from leanserve.models.pixel_pipeline import PREDICTION_TYPES, PixelDiffusionPipeline

    if pipeline_class_name(path) != PIXEL_PIPELINE:
        raise UserError(f"--teacher {path}: SiD distils pixel-space teachers ({PIXEL_PIPELINE}) only for now")
    pipe = PixelDiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    config = pipe.scheduler.config
    if config.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"--teacher {path}: prediction_type {config.prediction_type!r}; SiD distils "
                        f"{' or '.join(PREDICTION_TYPES)} teachers")
    if not hasattr(pipe.scheduler, "alphas_cumprod"):
        raise UserError(f"--teacher {path}: scheduler {type(pipe.scheduler).__name__} has no discrete alphas_cumprod")
    return pipe


def run(args):
    from leanserve.runtime import distributed

    _check_args(args)
    with distributed(args.device) as (dist_info, device):
        return Trainer(args, device, dist_info).train()


def example_indices(step: int, phase: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """A rank's slice of iteration `step`'s phase (0 fake, 1 generator) of the shapes train stream: fresh,
    never reused, disjoint over phases and ranks (one process reads what all ranks together would)."""
    first = ((2 * step + phase) * world_size + rank) * batch_size
    return range(first, first + batch_size)


def average_gradients(params, world_size: int):
    """Mean of each .grad over the ranks, in place. Manual, not DDP: the fake network is used both as a
    trained module (fake phase) and frozen inside the generator loss, whose backward goes through its
    Jacobian; DDP's reducer would expect gradients of its (frozen) parameters there, and its hooks would
    have to live with gradient checkpointing and several forwards per backward. Called once after
    each phase's single backward (no accumulation, so pitfall 10's sync context does not arise). The set of
    parameters with a gradient is the same on every rank: all ranks build the same graph (same k,
    options and iteration; NaN samples are masked, not removed from the graph)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if world_size == 1 or not grads:
        return
    works = [dist.all_reduce(g, async_op=True) for g in grads]
    for work in works:
        work.wait()
    torch._foreach_div_(grads, world_size)


class Trainer(TrainingLoop):
    command = "distill sid"
    unit = "iteration"
    resume_free = RESUME_FREE

    def __init__(self, args, device: torch.device, dist_info: DistInfo | None = None):
        super().__init__(args, dist_info or DistInfo(), device, total_steps=args.iterations)
        self.global_batch = args.batch_size * self.dist.world_size
        self.kappas = run_kappas(args)
        if device.type == "cuda" and not args.bf16:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        self.autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if args.bf16 else None

        self.teacher_pipe = load_teacher(Path(args.teacher))
        self.teacher_pipe.text_encoder.to(device).requires_grad_(False).eval()
        self.alphas_cumprod = self.teacher_pipe.scheduler.alphas_cumprod.to(device)
        # ε or v: the generator and the fake network are copies of the teacher and predict the same
        self.prediction_type = self.teacher_pipe.scheduler.config.prediction_type
        teacher = self.teacher_pipe.unet.to(device).requires_grad_(False).eval()
        if args.gradient_checkpointing:
            # diffusers gates it on torch.is_grad_enabled(), not on .training: the eval-mode teacher is covered too
            teacher.enable_gradient_checkpointing()  # the copies below inherit it
        if args.channels_last:
            teacher.to(memory_format=torch.channels_last)  # so are the copies' weights
        self.teacher = teacher
        # with every dropout at p = 0, train() and eval() compute the same function: the trained UNets then
        # stay in eval mode like the teacher, so a compiled UNet needs no graph per mode (dynamo guards on
        # .training). A teacher with active dropout (a class label's dropout_prob too) trains its copies in
        # train mode, as SiD does.
        self.train_mode = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
                              or getattr(m, "dropout_prob", 0) > 0 for m in teacher.modules())
        self.generator = copy.deepcopy(teacher).requires_grad_(True)
        self.fake = copy.deepcopy(teacher).requires_grad_(True)
        self.ema = copy.deepcopy(teacher)
        if args.compile:  # in place, after the copies: state_dict keys and checkpoints stay those of the UNets
            for unet in (self.teacher, self.generator, self.fake):
                unet.compile(mode=args.compile)
        # one module and one optimizer for the checkpoint; Adam steps only parameters with a .grad,
        # and each phase leaves exactly its own network's gradients
        self.state = torch.nn.ModuleDict({"generator": self.generator, "fake": self.fake, "ema": self.ema})
        self.optimizer = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": self.fake.parameters()}],
                                          lr=args.lr, betas=(0.0, 0.999), eps=1e-8)
        with torch.no_grad():
            self.uncond = self._encode([""])
        # per rank: noise, timesteps and dropout differ between ranks (rank 0 keeps the single-process seed)
        self.rng = torch.Generator(device).manual_seed(args.seed + 1_000_003 * self.dist.rank)
        # the same on every rank, one draw per iteration everywhere: every rank trains the same k
        self.k_rng = torch.Generator().manual_seed(args.seed + 1)
        self.gan_start = int(args.gan_warmup * args.iterations)  # first iteration with the adversarial term
        self.window = torch.zeros(2, device=device)  # summed fake/generator losses since the last log

    # ---- pieces

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        return self.teacher_pipe._encode(prompts, self.device).float()

    def _example_indices(self, phase: int) -> range:
        return example_indices(self.step, phase, self.args.batch_size, self.dist.rank, self.dist.world_size)

    def _captions(self, phase: int) -> list[str]:
        from leanserve.data.shapes import scene
        return [scene(self.args.data_seed, i, split="train")[1] for i in self._example_indices(phase)]

    def _real_images(self, phase: int) -> torch.Tensor:
        """The images behind `_captions(phase)` (the GAN's real data), [B, 3, H, W] in [-1, 1] on the device."""
        from leanserve.data.shapes import sample, to_tensor
        size = self.teacher_pipe.default_size
        images = [sample(self.args.data_seed, i, size, split="train").image for i in self._example_indices(phase)]
        return to_tensor(np.stack(images)).to(self.device)

    # every random draw of an iteration goes through these three (one generator, a fixed order)
    def _randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng, device=self.device)

    def _rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.rng, device=self.device)

    def _timesteps(self, n: int) -> torch.Tensor:
        from leanserve.trainers.sid_loss import sample_timesteps
        return sample_timesteps(n, self.rng, self.device)

    def _fn(self, unet):
        from leanserve.trainers.sid_loss import unet_fn
        return unet_fn(unet, self.autocast)

    def _shape(self) -> tuple[int, ...]:
        size = self.teacher_pipe.default_size
        return (self.args.batch_size, 3, size, size)

    # ---- one iteration

    def _fake_phase(self, timesteps: list[int]) -> torch.Tensor:
        from leanserve.trainers.sid_loss import (
            fake_loss,
            gan_discriminator_loss,
            generator_chain,
        )

        cond = text = self._encode(self._captions(0))
        if self.kappas.needs_uncond_fake:
            drop = self._rand(cond.shape[0]) < self.args.cond_dropout
            cond = torch.where(drop[:, None, None], self.uncond, cond)
        shape = self._shape()
        with torch.no_grad():
            x_g = generator_chain(self._fn(self.generator), self._randn(shape), timesteps, cond, self.alphas_cumprod,
                                  self.prediction_type, noise=lambda: self._randn(shape))
        t, eps = self._timesteps(shape[0]), self._randn(shape)
        loss = fake_loss(self._fn(self.fake), x_g, t, eps, cond, self.uncond, self.kappas.fake_train,
                         self.alphas_cumprod, self.prediction_type)
        if self.args.gan:
            x_real = self._real_images(0)
            # L_ψ + L_D, L_D a plain mean over logit positions (spec §7). SiD-DiT's × C·H·W made D's term
            # ~2100 (0.69 × 3072) against ~10 for ψ's denoising loss on the shapes teacher
            loss = loss + gan_discriminator_loss(self.fake, x_real, x_g, t, eps, text, self.alphas_cumprod,
                                                 self.autocast)
        loss = loss.mean()
        loss.backward()
        average_gradients(self.fake.parameters(), self.dist.world_size)
        if self.args.gan:
            torch.nn.utils.clip_grad_value_(self.fake.parameters(), 1.0)  # SiDA, with the GAN on
        self._finish_step(self.fake)
        return loss.detach()

    def _generator_phase(self, timesteps: list[int]) -> torch.Tensor:
        from leanserve.trainers.sid_loss import (
            adversarial_loss,
            discriminator_logits,
            finite_samples,
            generator_chain,
            generator_loss,
        )

        cond = self._encode(self._captions(1))
        shape = self._shape()
        x_g = generator_chain(self._fn(self.generator), self._randn(shape), timesteps, cond, self.alphas_cumprod,
                              self.prediction_type, noise=lambda: self._randn(shape), grad=True)
        t = self._timesteps(shape[0])
        self.fake.requires_grad_(False)  # frozen for this phase; its Jacobian still carries θ's gradient
        try:
            out = generator_loss(self._fn(self.teacher), self._fn(self.fake), x_g, t, self._randn(shape), cond,
                                 self.uncond, self.kappas, self.args.alpha, self.alphas_cumprod, self.prediction_type)
            per_sample = out.per_sample
            if self.args.gan and self.step >= self.gan_start:
                logits = discriminator_logits(self.fake, out.x_t, t, cond, self.autocast)
                adversarial = adversarial_loss(logits) * x_g[0].numel() / out.w  # SiDA: 1/w like the SiD term
                per_sample = 0.5 * per_sample + 0.5 * self.args.gan_weight * adversarial
            ok = finite_samples(x_g, out.y_real, out.y_fake, per_sample[:, None])
            loss = torch.where(ok, per_sample, 0.0).sum() / shape[0]
            loss.backward()
        finally:
            self.fake.requires_grad_(True)
        average_gradients(self.generator.parameters(), self.dist.world_size)
        self._finish_step(self.generator)
        return loss.detach()

    def _finish_step(self, network: torch.nn.Module):
        # after the averaging: every rank zeroes the same elements and takes the same step
        for p in network.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _update_ema(self):
        from leanserve.trainers.sid_loss import ema_beta

        beta = ema_beta(self.global_batch, self.step * self.global_batch, self.args.ema_half_life,
                        self.args.ema_ramp)
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.generator.parameters()), 1 - beta)

    def train_iteration(self, k: int | None = None) -> int:
        """One fake update then one generator update at a shared k ~ U{1..K} (or the k given: benchmarks
        time each chain length); returns k."""
        from leanserve.trainers.sid_loss import chain_timesteps

        if k is None:
            k = int(torch.randint(1, self.args.steps + 1, (), generator=self.k_rng))
        timesteps = chain_timesteps(k, self.args.t_init)
        self.generator.train(self.train_mode)
        self.fake.train(self.train_mode)
        self.window[0] += self._fake_phase(timesteps)
        self.window[1] += self._generator_phase(timesteps)
        self.step += 1
        self._update_ema()
        return k

    def _advance(self) -> dict | None:
        k = self.train_iteration()
        if self.step % LOG_EVERY == 0 or self.step == self.args.iterations:
            # the time limit is checked here only: rank 0's clock, sent with the losses, stops all ranks
            # at the same iteration
            fake, gen, self.out_of_time = self._flush_losses(self._time_is_up())
            return {"fake": f"{fake:.4f}", "gen": f"{gen:.4f}", "k": k}
        return None

    # ---- checkpoints

    def _checkpointed(self):
        return self.state, self.optimizer, None

    def _checkpoint_state(self) -> tuple[dict, dict]:
        return ({"step": self.step, "k_rng": self.k_rng.get_state(), "history": self.history},
                {"noise": self.rng.get_state(), "window": self.window.cpu()})

    def _restore(self, state: dict, rank_state: dict):
        # every rank restores its own noise generator and loss window; k_rng is the same on all
        self.rng.set_state(rank_state["noise"])
        self.window.copy_(rank_state["window"])
        self.k_rng.set_state(state["k_rng"])
        self.step, self.history = state["step"], state["history"]

    def _flush_losses(self, stop: bool) -> tuple[float, float, bool]:
        """Mean fake and generator losses over the ranks and the iterations since the last flush, appended
        to the history; and whether any rank (in practice rank 0) asked to stop."""
        from leanserve.runtime import all_reduce_sum

        fake, gen, stops = all_reduce_sum([*self.window.tolist(), float(stop)], self.dist, self.device)
        self.window.zero_()
        n = (self.step % LOG_EVERY or LOG_EVERY) * self.dist.world_size
        self.history.append({"iteration": self.step, "fake_loss": fake / n, "generator_loss": gen / n})
        return fake / n, gen / n, stops > 0

    # ---- output

    def _write_output(self, metrics: None):  # no validation loss: metrics is None
        from leanserve.models.model_dir import (
            ModelInfo,
            save_model_info,
            weights_sha256,
        )
        from leanserve.models.sid_pipeline import SiDPipeline

        args, teacher = self.args, self.teacher_pipe
        dtype = getattr(torch, args.save_dtype)
        # safetensors stores contiguous (NCHW) tensors only
        unet = self.ema.requires_grad_(False).eval().to(dtype=dtype, memory_format=torch.contiguous_format)
        pipe = SiDPipeline(unet=unet,
                           text_encoder=teacher.text_encoder.to(dtype), tokenizer=teacher.tokenizer, scheduler=teacher.scheduler, t_init=args.t_init,
                           num_steps=args.steps)
        pipe.save_pretrained(self.out)
        images_seen = self.step * self.global_batch
        save_model_info(self.out, ModelInfo(
            kind="image", method="sid",
            settings={"pipeline": "SiDPipeline", "space": "pixel", "num_steps": args.steps, "t_init": args.t_init,
                      "prediction_type": self.prediction_type,
                      "guidance": args.guidance, **self.kappas.as_dict(), "alpha": args.alpha,
                      "noise": "fresh", "lr": args.lr, "batch_size": args.batch_size,
                      "world_size": self.dist.world_size,
                      "ema_half_life": args.ema_half_life, "ema_ramp": args.ema_ramp,
                      "cond_dropout": args.cond_dropout if self.kappas.needs_uncond_fake else 0.0,
                      "precision": "bf16-autocast" if args.bf16 else "fp32", "save_dtype": args.save_dtype,
                      "gan": {"weight": args.gan_weight, "warmup_iterations": self.gan_start,
                              "discriminator": "fake UNet mid-block output, channel mean, conditional pass",
                              "real_data": f"shapes train, seed {args.data_seed}"} if args.gan else None},
            base={"path": str(args.teacher), "sha256": weights_sha256(args.teacher)},
            recipe=self._recipe(),
            data={"description": f"{'captions and images' if args.gan else 'prompts only'}: leanserve.data.shapes "
                                 f"train, seed {args.data_seed}, examples 0..{2 * images_seen - 1}"},
            metrics={"iterations": self.step, "planned_iterations": args.iterations, "images_seen": images_seen,
                     "seconds_per_iteration": self.seconds_per_step,
                     "peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30
                     if self.device.type == "cuda" else None, "loss_history": self.history}))
        self._log(f"wrote {self.out} ({args.steps}-step SiD generator, {images_seen} images seen)")
