"""PixelDiffusionPipeline and load_image_pipeline: save/load, per-image seeds, guidance, unclipped x0,
samplers, and tiny random-weight SD / SDXL directories through the same loader and call."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from image_builders import v_pipeline_like

from leanserve.errors import UserError
from leanserve.models.image_pipeline import (
    SAMPLERS,
    load_image_pipeline,
    native_size,
    set_sampler,
)
from leanserve.models.pixel_pipeline import PixelDiffusionPipeline, teacher_scheduler

PROMPTS = ["a red circle in the top left", "a big blue square", "a small green star on a white background"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from leanserve.data.tokenizer import train_tokenizer
    return train_tokenizer(PROMPTS * 10 + ["a yellow triangle at the bottom", "a ring"] * 10,
                           tmp_path_factory.mktemp("tok"), vocab_size=300, model_max_length=24)


def clip_text(tokenizer, hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=24,
                            projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


@pytest.fixture(scope="module")
def pipe(tokenizer):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8).eval()
    pipe = PixelDiffusionPipeline(unet=unet, text_encoder=clip_text(tokenizer), tokenizer=tokenizer,
                                  scheduler=teacher_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def generate(pipe, prompts, seeds, **kwargs):
    """Final x, unclamped: a random UNet's images are mostly saturated at 0 or 1, its x is not."""
    kwargs = {"num_inference_steps": 4, "guidance_scale": 2.5, "output_type": "latent", **kwargs}
    images = pipe(prompt=prompts, generator=gens(*seeds), **kwargs).images
    return images.numpy() if kwargs["output_type"] == "latent" else images


def assert_same_x(actual: np.ndarray, expected: np.ndarray):
    """Equal up to float32 rounding (batched kernels round differently): 1e-5 of the largest |x|."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_save_load_round_trip_gives_the_same_images(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pixel_pipeline", "PixelDiffusionPipeline"]
    unet_files = sorted(p.name for p in (tmp_path / "unet").iterdir())
    assert unet_files == ["config.json", "diffusion_pytorch_model.safetensors"]
    before = generate(pipe, PROMPTS[:2], [1, 2], output_type="np")
    assert before.shape == (2, 16, 16, 3) and before.dtype == np.float32
    assert 0 <= before.min() and before.max() <= 1 and before.std() > 0.01

    # leanserve never runs the pipeline file saved in the directory: poisoning it changes nothing
    (tmp_path / "pixel_pipeline.py").write_text((tmp_path / "pixel_pipeline.py").read_text()
                                                + "\nraise RuntimeError('directory code was executed')\n")
    loaded = load_image_pipeline(tmp_path)
    assert isinstance(loaded, PixelDiffusionPipeline) and loaded.default_size == native_size(loaded) == 16
    np.testing.assert_array_equal(generate(loaded, PROMPTS[:2], [1, 2], output_type="np"), before)

    # plain diffusers runs that file only when trusted, and then builds the same pipeline
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)
    pipe.save_pretrained(tmp_path)  # a clean copy again
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(generic).__name__ == "PixelDiffusionPipeline"
    generic.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(generic, PROMPTS[:2], [1, 2], output_type="np"), before)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])  # ddpm also draws per-step noise from each image's generator
def test_an_image_does_not_depend_on_its_batch(pipe, sampler):
    pipe = PixelDiffusionPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    set_sampler(pipe, sampler)
    batch = generate(pipe, PROMPTS, [7, 8, 9])
    alone = generate(pipe, PROMPTS[1:2], [8])
    assert_same_x(alone[0], batch[1])
    assert np.abs(batch[0] - batch[1]).max() > 1  # different seeds/prompts: different images


def reference_sample(pipe, prompts, seeds, guidance, negative=None, steps=4):
    """A plain denoising loop, one UNet call per branch, for what the pipeline batches."""
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    x = randn_tensor((len(prompts), 3, 16, 16), generator=gens(*seeds), dtype=torch.float32)
    cond = pipe._encode(prompts, torch.device("cpu"))
    uncond = pipe._encode(negative or [""] * len(prompts), torch.device("cpu"))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = pipe.unet(x, t, encoder_hidden_states=cond).sample
            if guidance > 1:
                eps_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
                eps = eps_u + guidance * (eps - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (0.0, None), (3.0, None), (3.0, ["a ring", ""])])
def test_guidance_matches_a_plain_loop(pipe, guidance, negative):
    batch_sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        images = generate(pipe, PROMPTS[:2], [3, 4], guidance_scale=guidance, negative_prompt=negative)
    finally:
        hook.remove()
    # guidance <= 1 runs the conditional branch alone; above 1, both branches in one UNet batch
    assert set(batch_sizes) == {4 if guidance > 1 else 2}
    expected = reference_sample(pipe, PROMPTS[:2], [3, 4], guidance, negative)
    assert_same_x(images, expected)


@pytest.mark.parametrize("padding_side, mask_output", [("right", True), ("left", True), ("right", False)])
def test_only_a_prompt_past_the_token_limit_is_reported_truncated(pipe, caplog, padding_side, mask_output):
    pipe = copy.copy(pipe)  # a tokenizer that pads on the left, or returns no attention mask by default
    pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
    pipe.tokenizer.padding_side = padding_side
    if not mask_output:
        pipe.tokenizer.model_input_names = ["input_ids"]
    limit = pipe.tokenizer.model_max_length
    words = ["red", "a", "circle"]
    # the longest prompt that fits exactly (BOS and EOS included), and one word more
    fits = next(" ".join((words * limit)[:n]) for n in range(limit, 0, -1)
                if len(pipe.tokenizer(" ".join((words * limit)[:n])).input_ids) <= limit)
    assert len(pipe.tokenizer(fits).input_ids) == limit  # it fills the row: the case that is checked again
    with caplog.at_level("WARNING", logger="leanserve.models.pixel_pipeline"):
        pipe._encode([fits, "a ring"], torch.device("cpu"))
        assert "truncated" not in caplog.text
        embeds = pipe._encode([fits + " ring ring", "a ring"], torch.device("cpu"))
        assert "truncated" in caplog.text
    assert embeds.shape[:2] == (2, limit)


def test_x0_is_never_clipped(pipe):
    # a UNet that predicts zero noise claims x0 = x_t / sqrt(alpha_bar_t): far outside [-1, 1] at high t
    unet = copy.deepcopy(pipe.unet)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    zero = PixelDiffusionPipeline(unet=unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  scheduler=teacher_scheduler())
    zero.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = zero(prompt=PROMPTS[:2], latents=noise, num_inference_steps=4, output_type="latent").images
    # DDIM with eps = 0 only rescales: x_0 = x_T * sqrt(alpha_bar_final / alpha_bar_999), alpha_bar_final = 1
    alpha_bar = zero.scheduler.alphas_cumprod
    np.testing.assert_allclose(x.numpy(), (noise / alpha_bar[999].sqrt()).numpy(), rtol=1e-4)
    for name in SAMPLERS:
        set_sampler(zero, name)
        x = zero(prompt=PROMPTS[:2], latents=noise, num_inference_steps=4, output_type="latent").images
        assert x.abs().max() > 3, name  # clipping x0 to [-1, 1] would keep every sample inside it


def test_set_sampler_keeps_the_schedule(pipe):
    pipe = PixelDiffusionPipeline(**pipe.components)
    for name, (class_name, _) in SAMPLERS.items():
        set_sampler(pipe, name)
        config = pipe.scheduler.config
        assert type(pipe.scheduler).__name__ == class_name
        assert (config.beta_schedule, config.beta_start, config.beta_end, config.num_train_timesteps) == \
            ("scaled_linear", 0.00085, 0.012, 1000)
        assert config.prediction_type == "epsilon" and config.timestep_spacing == "trailing"
        assert config.get("algorithm_type", "dpmsolver++") == "dpmsolver++"
        assert not config.get("clip_sample", False) and not config.get("thresholding", False)
        pipe.scheduler.set_timesteps(4)
        assert int(pipe.scheduler.timesteps[0]) == 999  # trailing: every grid starts at pure noise
    with pytest.raises(ValueError, match="unknown sampler"):
        set_sampler(pipe, "plms")


def test_timesteps_latents_callback_and_output_types(pipe):
    pipe = PixelDiffusionPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    set_sampler(pipe, "dpmsolver++")
    seen = []

    def callback(p, i, t, tensors):
        seen.append(int(t))
        return tensors

    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    from_latents = pipe(PROMPTS[0], latents=noise, timesteps=[999, 600, 200], callback_on_step_end=callback,
                        output_type="pt").images
    assert seen == [999, 600, 200]
    from_generator = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(5), timesteps=[999, 600, 200],
                          output_type="pt").images
    assert from_latents.shape == (1, 3, 16, 16)
    torch.testing.assert_close(from_latents, from_generator, atol=0, rtol=0)

    def stop(p, i, t, tensors):
        p._interrupt = True
        return tensors

    seen.clear()
    pipe(PROMPTS[0], num_inference_steps=4, callback_on_step_end=lambda *a: (callback(*a), stop(*a))[1])
    assert len(seen) == 1
    pil = pipe(PROMPTS[:2], num_images_per_prompt=2, num_inference_steps=1, height=8, width=24).images
    assert len(pil) == 4 and pil[0].size == (24, 8)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(PROMPTS[0], height=15, width=16)
    with pytest.raises(ValueError, match="one per image"):
        pipe(PROMPTS[:2], generator=gens(1))


# --------------------------------------------------------------------------- v-prediction, zero terminal SNR

def v_pipe(pipe, rescale_betas_zero_snr: bool = False) -> PixelDiffusionPipeline:
    """`pipe`'s UNet read as v-prediction (random weights: what matters is that every sampler reads it so)."""
    v = PixelDiffusionPipeline(unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                               scheduler=teacher_scheduler("v_prediction", rescale_betas_zero_snr))
    v.set_progress_bar_config(disable=True)
    return v


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_v_unet_that_agrees_with_an_eps_unet_makes_the_same_images(pipe, sampler):
    """Every sampler converts v as it converts ε: a v-prediction UNet built to denoise exactly like the
    ε UNet (v = (ε − s·x_t) / a) gives the same images, guidance included."""
    eps_pipe = PixelDiffusionPipeline(**pipe.components)
    eps_pipe.set_progress_bar_config(disable=True)
    v = v_pipeline_like(pipe, teacher_scheduler().alphas_cumprod)
    for p in (eps_pipe, v):
        set_sampler(p, sampler)
    assert v.scheduler.config.prediction_type == "v_prediction"
    assert_same_x(generate(v, PROMPTS[:2], [3, 4]), generate(eps_pipe, PROMPTS[:2], [3, 4]))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_zero_terminal_snr_starts_every_sampler_at_pure_noise(pipe, sampler):
    v = v_pipe(pipe, rescale_betas_zero_snr=True)
    set_sampler(v, sampler)
    config = v.scheduler.config
    assert config.rescale_betas_zero_snr and config.prediction_type == "v_prediction"
    v.scheduler.set_timesteps(4)
    assert int(v.scheduler.timesteps[0]) == 999 and v.scheduler.alphas_cumprod[999] < 1e-7
    for steps in (1, 4, 25):
        x = generate(v, PROMPTS[:2], [3, 4], num_inference_steps=steps)
        assert np.isfinite(x).all(), (sampler, steps)


def gaussian_data_sample(prediction_type: str, rescale_betas_zero_snr: bool, sampler: str, steps: int,
                         mean: float = 0.8, std: float = 0.5, n: int = 20_000) -> torch.Tensor:
    """Samples of `sampler` driven by the exact denoiser of 1-D Gaussian data N(mean, std²) (E[ε | x_t] and
    E[x0 | x_t] in closed form at the training schedule's ᾱ_t), through the loop the pipeline runs."""
    import diffusers

    base = teacher_scheduler(prediction_type, rescale_betas_zero_snr)
    class_name, overrides = SAMPLERS[sampler]
    scheduler = getattr(diffusers, class_name).from_config(base.config, **overrides)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, dtype=torch.float64, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        ab = base.alphas_cumprod[int(t)].double()
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x_t = scheduler.scale_model_input(x, t)
        residual = (x_t - a * mean) / (a * a * std * std + s * s)
        eps, x0 = s * residual, mean + a * std * std * residual
        output = eps if prediction_type == "epsilon" else a * eps - s * x0
        x = scheduler.step(output, t, x, **({"generator": g} if sampler == "ddpm" else {})).prev_sample
    return x


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samplers_reach_the_data_mean_from_zero_terminal_snr(sampler):
    """diffusers' samplers at ᾱ_999 = 0 (DPM-Solver++ and UniPC use ᾱ = 2^-24 there, σ = 4096, and their
    default last-step handling; Euler scales x_T by its init_noise_sigma): with the exact denoiser every
    one lands on the data mean; on SD's betas x_T ~ N(0, I) is not the schedule's x_T (its mean is
    0.068·mean) and the deterministic samplers miss the mean by ~4%, as Lin et al. describe."""
    for steps in (4, 25):
        x = gaussian_data_sample("v_prediction", True, sampler, steps)
        assert torch.isfinite(x).all()
        assert abs(x.mean().item() - 0.8) < 0.01, (steps, x.mean().item())
        assert 0.2 < x.std().item() < 0.55  # few-step samplers shrink the spread; nothing blows up at σ = ∞
    if sampler != "ddpm":  # ancestral sampling corrects most of the start's offset
        assert gaussian_data_sample("epsilon", False, sampler, 25).mean().item() < 0.78


def test_a_zero_snr_directory_loads_with_its_schedule(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    v_pipe(pipe, rescale_betas_zero_snr=True).save_pretrained(tmp_path)
    for loaded in (load_image_pipeline(tmp_path), DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)):
        config = loaded.scheduler.config
        assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
        assert loaded.scheduler.alphas_cumprod[999] == 0
    with pytest.raises(ValueError, match="v_prediction"):
        teacher_scheduler("epsilon", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="prediction_type"):
        teacher_scheduler("sample")


def test_guidance_rescale_matches_diffusers_rescale(pipe):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    from diffusers.utils.torch_utils import randn_tensor

    v = v_pipe(pipe, rescale_betas_zero_snr=True)
    plain = generate(v, PROMPTS[:2], [3, 4])
    assert_same_x(generate(v, PROMPTS[:2], [3, 4], guidance_rescale=0.0), plain)
    # the same loop by hand: CFG, then the guided output rescaled towards the conditional one's std
    scheduler = copy.deepcopy(v.scheduler)
    scheduler.set_timesteps(4)
    x = randn_tensor((2, 3, 16, 16), generator=gens(3, 4), dtype=torch.float32)
    cond = v._encode(PROMPTS[:2], torch.device("cpu"))
    uncond = v._encode(["", ""], torch.device("cpu"))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out_c = v.unet(x, t, encoder_hidden_states=cond).sample
            out_u = v.unet(x, t, encoder_hidden_states=uncond).sample
            guided = rescale_noise_cfg(out_u + 2.5 * (out_c - out_u), out_c, guidance_rescale=0.7)
            x = scheduler.step(guided, t, x).prev_sample
    rescaled = generate(v, PROMPTS[:2], [3, 4], guidance_rescale=0.7)
    assert_same_x(rescaled, x.numpy())
    assert np.abs(rescaled - plain).max() > 1e-3
    with pytest.raises(ValueError, match="guidance_rescale"):
        generate(v, PROMPTS[:1], [3], guidance_rescale=1.5)


# --------------------------------------------------------------------------- SD / SDXL directories

def tiny_sd(tokenizer, xl: bool):
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    unet_kwargs = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=16)
    scheduler = teacher_scheduler()
    if not xl:
        return StableDiffusionPipeline(vae=vae, text_encoder=clip_text(tokenizer), tokenizer=tokenizer,
                                       unet=UNet2DConditionModel(cross_attention_dim=32, **unet_kwargs),
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    # SDXL: the UNet reads both encoders' hidden states (16 + 32) and the pooled projection + 6 size ids
    unet = UNet2DConditionModel(cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True,
                                **unet_kwargs)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=clip_text(tokenizer, hidden=16), tokenizer=tokenizer,
                                     text_encoder_2=clip_text(tokenizer, projection=True), tokenizer_2=tokenizer,
                                     unet=unet, scheduler=scheduler)


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_stable_diffusion_directories_load_and_run(tokenizer, tmp_path, xl):
    tiny_sd(tokenizer, xl).save_pretrained(tmp_path)
    pipe = load_image_pipeline(tmp_path)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline")
    assert native_size(pipe) == 16
    for sampler in ("ddim", "dpmsolver++"):
        set_sampler(pipe, sampler)
        images = pipe(prompt=PROMPTS[:2], negative_prompt=None, num_inference_steps=2, guidance_scale=2.0,
                      generator=gens(1, 2), height=16, width=16, output_type="np").images
        assert images.shape == (2, 16, 16, 3) and 0 <= images.min() and images.max() <= 1


def write_index(path, class_name, **components):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name, **components}))
    return path


def test_unsupported_directories_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image_pipeline(tmp_path / "missing")
    with pytest.raises(UserError, match="no model_index.json"):
        load_image_pipeline(tmp_path)
    with pytest.raises(UserError, match="'FluxPipeline' is not supported.*StableDiffusionXLPipeline"):
        load_image_pipeline(write_index(tmp_path / "flux", "FluxPipeline"))
    with pytest.raises(UserError, match="not supported"):  # someone else's code, saved beside the weights
        load_image_pipeline(write_index(tmp_path / "custom", ["my_pipeline", "MyPipeline"]))
    with pytest.raises(UserError, match="component unet is custom code"):
        load_image_pipeline(write_index(tmp_path / "unet", "StableDiffusionPipeline", unet=["my_unet", "MyUNet"]))
    llm = write_index(tmp_path / "llm", "StableDiffusionPipeline")
    (llm / "leanserve.json").write_text(json.dumps({"kind": "llm", "method": "dense"}))
    with pytest.raises(UserError, match="not an image model"):
        load_image_pipeline(llm)
