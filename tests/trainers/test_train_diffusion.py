"""`leanserve train diffusion`: learning, the pipeline directory, exact resume, the VAE (latent) path,
the zoo preset's size and bad options."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from leanserve.errors import UserError
from leanserve.models.image_pipeline import load_image_pipeline
from leanserve.runtime import DistInfo
from leanserve.trainers import diffusion

FLAGS = ["--preset", "tiny", "--device", "cpu", "--batch-size", "8", "--val-size", "16", "--lr", "2e-3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes-tok")
    diffusion.shapes_tokenizer(path, data_seed=0, resolution=32)
    return path


def train(out, *flags: str) -> int:
    # through the command's own parser, as `leanserve train diffusion` runs it
    parser = argparse.ArgumentParser()
    diffusion.add_arguments(parser)
    return diffusion.run(parser.parse_args(["--out", str(out), *FLAGS, *flags]))


def weights(model_dir) -> dict[str, torch.Tensor]:
    tensors = load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    tensors.update({"text." + k: v for k, v in load_file(model_dir / "text_encoder" / "model.safetensors").items()})
    return tensors


def test_training_lowers_the_loss_and_writes_a_pipeline(tmp_path):
    out = tmp_path / "teacher"
    assert train(out, "--steps", "30", "--eval-every", "15") == 0
    info = json.loads((out / "leanserve.json").read_text())
    assert (info["kind"], info["method"]) == ("image", "dense")
    history = info["metrics"]["val_history"]
    assert [h["step"] for h in history] == [0, 15, 30]
    # ε-MSE of the untrained net vs. after 30 steps (predicting zero noise scores 1.0)
    assert history[-1]["val_loss_raw"] < 0.6 * history[0]["val_loss_raw"]
    assert info["metrics"]["val_loss"] == history[-1]["val_loss"] < history[0]["val_loss"]
    # the same examples, noise and timesteps with empty prompts: a different loss, since the text is an input
    assert history[0]["val_loss_uncond"] != history[0]["val_loss"] and "val_loss_uncond" in info["metrics"]
    assert info["metrics"]["images_seen"] == 240 and info["metrics"]["train_loss"] > 0
    assert info["settings"]["pipeline"] == "PixelDiffusionPipeline" and info["settings"]["space"] == "pixel"
    assert info["recipe"]["command"].startswith("leanserve train diffusion --out")
    assert len(info["data"]["sha256"]) == 64
    assert not (out / diffusion.CHECKPOINT).exists()

    pipe = load_image_pipeline(out)
    assert pipe.default_size == 32 and pipe.tokenizer.model_max_length == diffusion.PRESETS["tiny"].text_max_len
    assert pipe.scheduler.config.clip_sample is False
    images = pipe(prompt=["a red circle", "a blue square on a white background"], num_inference_steps=3,
                  guidance_scale=2.0, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1


def test_resume_is_exact(tmp_path, tokenizer_dir):
    flags = ["--tokenizer", str(tokenizer_dir), "--steps", "6", "--batch-size", "4", "--val-size", "8",
             "--eval-every", "4"]
    assert train(tmp_path / "straight", *flags) == 0
    # the first half renders in a worker process, the second in the main one: the data is the same
    assert train(tmp_path / "resumed", *flags, "--stop-at", "3", "--workers", "1") == 0
    assert (tmp_path / "resumed" / diffusion.CHECKPOINT).is_file()
    assert not (tmp_path / "resumed" / "model_index.json").exists()
    with pytest.raises(UserError, match="different options.*--lr"):
        train(tmp_path / "resumed", *flags, "--resume", "--lr", "1e-3")
    assert train(tmp_path / "resumed", *flags, "--resume") == 0

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "leanserve.json").read_text())["metrics"] for d in ("straight", "resumed"))
    assert ma == mb


def test_v_prediction_zero_snr_teacher(tmp_path, tokenizer_dir):
    out = tmp_path / "v-teacher"
    flags = ["--tokenizer", str(tokenizer_dir), "--prediction-type", "v_prediction", "--rescale-betas-zero-snr"]
    assert train(out, *flags, "--steps", "2", "--batch-size", "4", "--val-size", "4") == 0
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["rescale_betas_zero_snr"]) == ("v_prediction", True)
    info = json.loads((out / "leanserve.json").read_text())
    assert (info["settings"]["prediction_type"], info["settings"]["rescale_betas_zero_snr"]) == ("v_prediction", True)
    pipe = load_image_pipeline(out)
    assert pipe.scheduler.alphas_cumprod[999] == 0
    images = pipe(prompt=["a red circle"], num_inference_steps=3, guidance_scale=2.0,
                  generator=[torch.Generator().manual_seed(0)], output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_target_follows_the_prediction_type(tmp_path, tokenizer_dir, prediction_type):
    parser = argparse.ArgumentParser()
    diffusion.add_arguments(parser)
    zero_snr = ["--rescale-betas-zero-snr"] if prediction_type == "v_prediction" else []
    args = parser.parse_args(["--out", str(tmp_path / "t"), *FLAGS, "--tokenizer", str(tokenizer_dir),
                              "--prediction-type", prediction_type, *zero_snr, "--val-size", "2"])
    trainer = diffusion.Trainer(args, DistInfo(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([999, 300])
    loss = trainer._loss(lambda x, t, ids: torch.zeros_like(x), x0, None, t, noise)  # = mean square of the target
    ab = trainer.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    torch.testing.assert_close(loss, target.square().mean(dim=(1, 2, 3)))
    if prediction_type == "v_prediction":  # x_999 is pure noise and v = -x0 there
        torch.testing.assert_close(loss[0], x0[0].square().mean())


def test_vae_latent_path_writes_a_stable_diffusion_pipeline(tmp_path, tokenizer_dir):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=8, layers_per_block=1, sample_size=32).save_pretrained(tmp_path / "vae")
    out = tmp_path / "latent"
    assert train(out, "--vae", str(tmp_path / "vae"), "--tokenizer", str(tokenizer_dir), "--steps", "2",
                 "--batch-size", "4", "--val-size", "4") == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["sample_size"]) == (4, 16)  # the VAE halves 32x32 once
    info = json.loads((out / "leanserve.json").read_text())
    assert info["settings"]["space"] == "latent" and len(info["base"]["sha256"]) == 64

    pipe = load_image_pipeline(out)
    images = pipe(prompt=["a red circle"], num_inference_steps=2, guidance_scale=2.0,
                  generator=[torch.Generator().manual_seed(0)], height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_zoo_preset_fits_the_size_budget(tmp_path, tokenizer_dir):
    from leanserve.models.pixel_pipeline import (
        PixelDiffusionPipeline,
        teacher_scheduler,
    )

    preset = diffusion.PRESETS["shapes-tiny"]
    tokenizer = diffusion.load_tokenizer(tokenizer_dir)
    model = diffusion.build_denoiser(preset, tokenizer, sample_size=32, channels=3)
    dtype = getattr(torch, preset.save_dtype)
    PixelDiffusionPipeline(unet=model.unet.to(dtype), text_encoder=model.text_encoder.to(dtype), tokenizer=tokenizer,
                           scheduler=teacher_scheduler()).save_pretrained(tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert 12e6 < size <= 15e6  # the zoo's per-model limit; below 12 MB the preset would be needlessly small


def test_bad_options(tmp_path, capsys):
    from leanserve.cli import main

    with pytest.raises(UserError, match="no checkpoint"):
        train(tmp_path / "a", "--resume")
    with pytest.raises(UserError, match="--stop-at"):
        train(tmp_path / "a", "--steps", "4", "--stop-at", "4")
    with pytest.raises(UserError, match="needs --prediction-type v_prediction"):
        train(tmp_path / "a", "--rescale-betas-zero-snr")
    with pytest.raises(UserError, match="--tokenizer .* does not exist"):
        train(tmp_path / "a", "--tokenizer", str(tmp_path / "missing"))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a pipeline"):
        train(tmp_path / "done")
    # the registered command prints the same mistake as one line
    assert main(["train", "diffusion", "--out", str(tmp_path / "done"), "--device", "cpu"]) == 2
    assert "already holds a pipeline" in capsys.readouterr().err
