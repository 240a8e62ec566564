"""GPU: images/s and ms per UNet evaluation of SD 1.5- and SDXL-shaped pipelines through leanserve's
image engine (direct calls, no HTTP), next to the plain diffusers call on the same pipeline, in one run.

    python benchmarks/bench_images_gpu.py [--models sd15 sdxl] [--steps 25] [--runs 3] [--dtype bfloat16]

The pipelines have the real component shapes (SD 1.5 UNet 860M parameters with CLIP ViT-L/14's text
encoder; SDXL UNet 2.6B with CLIP-L and OpenCLIP bigG; the SD VAE) and random weights: speed does not
depend on the values (the images are noise). The tokenizer is a small local BPE padding to 77 tokens,
so the text encoders see full-length inputs as with CLIP's tokenizer.

One UNet evaluation = one denoising step: with CFG the conditional and unconditional branches run as
one UNet batch of 2 x images. Step times come from CUDA events recorded in the step callback (no host
sync inside the loop, see leanserve.server.image_engine.StageClock); call times are wall clock around
a whole call, which ends with the images copied to the host. Each configuration is warmed up once.
Anchor (H200, bf16, SDXL 1024x1024, CFG): 57.7 ms per UNet evaluation at batch 1, 18 ms per image at batch 8.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import tempfile
import time

import torch
from common import RESULTS, write_result

from leanserve.data.tokenizer import train_tokenizer
from leanserve.models.image_model import ImageModel
from leanserve.models.image_params import ImageParams
from leanserve.server.image_config import ImageEngineConfig
from leanserve.server.image_engine import AsyncImageEngine, BatchStats, StageClock

PROMPT = "a small red circle in the top left on a white background"
NEGATIVE = "blurry, low quality"
BATCHES = (1, 8)

# the published configs (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0);
# everything not listed is UNet2DConditionModel's / AutoencoderKL's default, which is SD 1.5's
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                 num_hidden_layers=32, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1)
MODELS = {
    "sd15": dict(size=512, guidance_scale=7.5, xl=False, vae=dict(sample_size=512, scaling_factor=0.18215),
                 unet=dict(sample_size=64, cross_attention_dim=768)),
    "sdxl": dict(size=1024, guidance_scale=5.0, xl=True, vae=dict(sample_size=1024, scaling_factor=0.13025),
                 unet=dict(sample_size=128, block_out_channels=(320, 640, 1280),
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                           cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
}
# the same component classes at toy sizes, for CPU smoke runs of the scripts that reuse these builders
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
TINY_VAE = dict(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8)
TINY_UNET = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8,
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
TINY_MODELS = {
    "sd15": dict(MODELS["sd15"], size=16, vae=dict(sample_size=16, scaling_factor=0.18215), unet=TINY_UNET),
    "sdxl": dict(MODELS["sdxl"], size=16, vae=dict(sample_size=16, scaling_factor=0.13025),
                 unet=dict(TINY_UNET, cross_attention_dim=64, use_linear_projection=True,
                           addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=6 * 8 + 32)),
}


def make_tokenizer():
    """A small local BPE padding to 77 tokens (CLIP's length), trained in a second on docstrings."""
    return train_tokenizer([json.__doc__ or "", random.__doc__ or "", time.__doc__ or "", PROMPT] * 20,
                           tempfile.mkdtemp(prefix="bench-images-tok-"), vocab_size=512, model_max_length=77)


def build_pipeline(name: str, tokenizer, device: torch.device, dtype: torch.dtype, tiny: bool = False):
    """Random-weight pipeline `name` (MODELS), or its toy-size twin (TINY_MODELS) with tiny=True."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = (TINY_MODELS if tiny else MODELS)[name]
    clip_l, clip_g, vae_config = (TINY_CLIP, TINY_CLIP, TINY_VAE) if tiny else (CLIP_L, CLIP_BIGG, SD_VAE)
    with torch.device(device):  # random init straight on the device: seconds, not minutes
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**vae_config, **spec["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_l))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)) if spec["xl"] else None
    if spec["xl"]:
        pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer,
                                         scheduler=EulerDiscreteScheduler(**SCHEDULER))
    else:
        pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=DDIMScheduler(**SCHEDULER, clip_sample=False, set_alpha_to_one=False),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(walls: list[float], steps_s: list[float], n: int, stats: list[BatchStats] = ()) -> dict:
    """s_per_call is the median (p50) latency of one call of n images. Step times run from one step's end
    to the next (the first from the end of text encoding where that is marked): a 1-step plain diffusers
    call has no span, so its UNet ms are None there."""
    wall = statistics.median(walls)
    step = statistics.median(steps_s) if steps_s else None
    out = {"s_per_call": wall, "images_per_s": n / wall, "unet_ms_per_eval": step and 1e3 * step,
           "ms_per_image_per_eval": step and 1e3 * step / n, "runs": len(walls)}
    for key, values in (("text_encode_ms", [s.text_encode_s for s in stats]),
                        ("vae_decode_ms", [s.vae_decode_s for s in stats])):
        values = [v for v in values if v is not None]
        if values:
            out[key] = 1e3 * statistics.median(values)
    return out


def time_diffusers(pipe, n: int, steps: int, guidance: float, size: int, runs: int,
                   negative: str | None = NEGATIVE) -> dict:
    clock = StageClock(pipe.device)

    def on_step(_pipe, _i, _t, tensors):
        clock.mark("step")
        return tensors

    def call():
        clock.marks.clear()
        sync(pipe.device)
        t = time.perf_counter()
        pipe(prompt=[PROMPT] * n, negative_prompt=None if negative is None else [negative] * n,
             num_inference_steps=steps, guidance_scale=guidance,
             generator=[torch.Generator("cpu").manual_seed(i) for i in range(n)], height=size, width=size,
             output_type="np", callback_on_step_end=on_step)
        sync(pipe.device)
        return time.perf_counter() - t

    call()  # warm-up
    walls, steps_s = [], []
    for _ in range(runs):
        walls.append(call())
        steps_s += clock.steps()
    return summary(walls, steps_s, n)


async def time_engine(engine: AsyncImageEngine, n: int, params: ImageParams, runs: int) -> dict:
    stats: list[BatchStats] = []
    engine.batch_observer = stats.append
    await engine.generate("warm-up", PROMPT, n, params, time.monotonic())
    stats.clear()
    walls = []
    for r in range(runs):
        t = time.perf_counter()
        await engine.generate(f"run-{r}", PROMPT, n, params, time.monotonic())
        walls.append(time.perf_counter() - t)
    return summary(walls, [s for st in stats for s in st.denoise_steps_s], n, stats)


async def time_concurrent(engine: AsyncImageEngine, k: int, params: ImageParams, runs: int) -> dict:
    """k requests of one image each, submitted at once to an idle engine: it takes the first alone
    (it does not wait for more) and batches the rest while that runs."""
    stats: list[BatchStats] = []
    engine.batch_observer = stats.append
    walls = []
    for r in range(runs):
        stats.clear()
        t = time.perf_counter()
        await asyncio.gather(*(engine.generate(f"c{r}-{i}", PROMPT, 1, params, time.monotonic()) for i in range(k)))
        walls.append(time.perf_counter() - t)
    wall = statistics.median(walls)
    return {"requests": k, "s_total": wall, "images_per_s": k / wall, "runs": runs,
            "images_per_pipeline_call_last_run": [s.num_images for s in stats]}


async def bench_engine(pipe, name: str, steps: int, guidance: float, size: int, runs: int) -> dict:
    engine = AsyncImageEngine(ImageEngineConfig(model=name, max_image_batch=max(BATCHES)), model=ImageModel(pipe, name))
    await engine.start()
    try:
        params = ImageParams(width=size, height=size, num_inference_steps=steps, guidance_scale=guidance,
                             negative_prompt=NEGATIVE, seed=0)
        out = {f"batch_{n}": await time_engine(engine, n, params, runs) for n in BATCHES}
        out["concurrent"] = await time_concurrent(engine, max(BATCHES), params, runs)
        return out
    finally:
        await engine.shutdown(0)


def bench_model(name: str, tokenizer, device: torch.device, dtype: torch.dtype, steps: int, runs: int) -> dict:
    spec = MODELS[name]
    t0 = time.perf_counter()
    pipe = build_pipeline(name, tokenizer, device, dtype)
    build_s = time.perf_counter() - t0
    size, guidance = spec["size"], spec["guidance_scale"]
    engine_results = asyncio.run(bench_engine(pipe, name, steps, guidance, size, runs))
    text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    result = {"size": f"{size}x{size}", "steps": steps, "guidance_scale": guidance,
              "dtype": str(dtype).removeprefix("torch."), "unet_params": num_params(pipe.unet),
              "vae_params": num_params(pipe.vae), "text_encoder_params": [num_params(m) for m in text_encoders],
              "build_s": build_s}
    for n in BATCHES:
        theirs = time_diffusers(pipe, n, steps, guidance, size, runs)
        ours = engine_results[f"batch_{n}"]
        result[f"batch_{n}"] = {"engine": ours, "diffusers": theirs,
                                "engine_over_diffusers_images_per_s": ours["images_per_s"] / theirs["images_per_s"]}
    result["concurrent_engine"] = engine_results["concurrent"]
    del pipe
    gc.collect()
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    start = time.perf_counter()
    tokenizer = make_tokenizer()
    results = {name: bench_model(name, tokenizer, device, dtype, args.steps, args.runs) for name in args.models}
    results["anchor"] = ("H200, bf16, SDXL 1024x1024 with CFG: 57.7 ms per UNet evaluation at batch 1, "
                         "18 ms per image at batch 8")
    results["wall_s"] = time.perf_counter() - start
    path = write_result("images_gpu", results, args.out)

    print(f"{'model':>5} {'batch':>5} | {'img/s: engine':>13} {'diffusers':>9} {'ratio':>6} | "
          f"{'UNet ms/eval: engine':>20} {'diffusers':>9} {'per img':>7} | {'text ms':>7} {'VAE ms':>7}")
    for name in args.models:
        for n in BATCHES:
            r = results[name][f"batch_{n}"]
            o, t = r["engine"], r["diffusers"]
            print(f"{name:>5} {n:>5} | {o['images_per_s']:>13.2f} {t['images_per_s']:>9.2f} "
                  f"{r['engine_over_diffusers_images_per_s']:>6.3f} | {o['unet_ms_per_eval']:>20.1f} "
                  f"{t['unet_ms_per_eval']:>9.1f} {o['ms_per_image_per_eval']:>7.1f} | "
                  f"{o.get('text_encode_ms', 0):>7.1f} {o.get('vae_decode_ms', 0):>7.1f}")
        c = results[name]["concurrent_engine"]
        print(f"{name:>5} {c['requests']} concurrent requests: {c['images_per_s']:.2f} img/s, "
              f"images per pipeline call {c['images_per_pipeline_call_last_run']}")
    print(f"total {results['wall_s']:.0f} s -> {path}")


if __name__ == "__main__":
    main()
