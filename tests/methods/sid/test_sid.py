"""SiD distillation: the loss identities of spec sid.md §9 on a tiny random UNet teacher, and the
`leanserve distill sid` command end to end (a few iterations on CPU, exact resume, the generator directory)."""
from __future__ import annotations

import argparse
import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from leanserve.errors import UserError
from leanserve.models.pixel_pipeline import PixelDiffusionPipeline, teacher_scheduler
from leanserve.models.sid_pipeline import SiDPipeline
from leanserve.trainers import sid
from leanserve.trainers.sid_loss import (
    Kappas,
    add_noise,
    adversarial_loss,
    chain_timesteps,
    discriminator_logits,
    discriminator_loss,
    ema_beta,
    fake_loss,
    finite_samples,
    gan_discriminator_loss,
    generator_chain,
    generator_loss,
    guidance_kappas,
    guided_output,
    noise_coefs,
    sid_loss_terms,
    unet_fn,
    x0_from_output,
    x0_gap,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle in the top left", "a big blue square", "a small green star on a white background"]
SIZE = 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from leanserve.data.tokenizer import train_tokenizer
    return train_tokenizer(PROMPTS * 10 + ["a yellow triangle at the bottom", "a ring"] * 10,
                           tmp_path_factory.mktemp("tok"), vocab_size=300, model_max_length=24)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def teacher_dir(tokenizer, tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=24, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    pipe = PixelDiffusionPipeline(unet=tiny_unet(), text_encoder=CLIPTextModel(config).eval(), tokenizer=tokenizer,
                                  scheduler=teacher_scheduler())
    path = tmp_path_factory.mktemp("teacher")
    pipe.save_pretrained(path)
    return path


def alphas_cumprod():
    return teacher_scheduler().alphas_cumprod


def embeds(batch: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)


def counting(model_fn, calls: list):
    """Wrap a ModelFn; record (batch size, grad recorded) per call and keep the outputs."""
    def wrapped(x, t, c):
        out = model_fn(x, t, c)
        calls.append((x.shape[0], out.requires_grad, out))
        return out
    return wrapped


# ---------------------------------------------------------------------------- pure functions

def test_chain_timesteps():
    assert chain_timesteps(4, 625) == [625, 468, 312, 156]
    assert chain_timesteps(2, 625) == [625, 312]
    assert chain_timesteps(3, 625) == [625, 416, 208]
    assert chain_timesteps(1, 625) == [625]
    with pytest.raises(ValueError):
        chain_timesteps(0, 625)


def test_x0_is_never_clipped_even_if_the_scheduler_says_so():
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=True)
    assert scheduler.config.clip_sample
    g = torch.Generator().manual_seed(0)
    x_t, eps = 3 * torch.randn(4, 3, SIZE, SIZE, generator=g), torch.randn(4, 3, SIZE, SIZE, generator=g)
    t = torch.tensor([20, 300, 625, 979])
    x0 = x0_from_output(eps, x_t, t, scheduler.alphas_cumprod, "epsilon")
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x0, (x_t - (1 - ab).sqrt() * eps) / ab.sqrt())
    assert x0.abs().max() > 1.5  # would have been clamped to [-1, 1]
    # and the gradient reaches every element (clamping would zero it outside [-1, 1])
    x_t.requires_grad_(True)
    x0_from_output(eps, x_t, t, scheduler.alphas_cumprod, "epsilon").sum().backward()
    assert (x_t.grad != 0).all()


def test_guided_output_passes():
    unet = tiny_unet()
    eps = unet_fn(unet)
    cond, uncond = embeds(2)
    x = torch.randn(2, 3, SIZE, SIZE)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        for kappa, batch in ((1.0, 2), (0.0, 2), (2.0, 4)):
            calls = []
            out = guided_output(counting(eps, calls), x, t, cond, uncond, kappa)
            assert [c[0] for c in calls] == [batch]
            e_c, e_u = eps(x, t, cond), eps(x, t, uncond.expand_as(cond))
            torch.testing.assert_close(out, e_u + kappa * (e_c - e_u), atol=1e-5, rtol=1e-5)


def test_guidance_strategies():
    assert guidance_kappas("lsg", 2.0) == Kappas(2.0, 2.0, 2.0, 2.0)
    assert guidance_kappas("lsg") == Kappas(1.5, 1.5, 1.5, 1.5)
    zero = guidance_kappas("zero-cfg")
    assert (zero.real, zero.fake_eval, zero.fake_train) == (1.0, 0.0, 0.0) and zero.needs_uncond_fake
    anti = guidance_kappas("anti-cfg", -2.0)
    assert (anti.real, anti.fake_eval, anti.fake_eval_l2) == (1.0, -2.0, -2.0)
    assert not guidance_kappas("lsg", 1.0).needs_uncond_fake
    for bad in (("anti-cfg", 0.5), ("zero-cfg", 2.0), ("cfg", None)):
        with pytest.raises(ValueError):
            guidance_kappas(*bad)


def test_sid_terms_alpha_one_shortcut_and_detached_normaliser():
    g = torch.Generator().manual_seed(3)
    x_g, y_r, y_f = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    x_g.requires_grad_(True)
    w = (x_g - y_r).abs().mean(dim=(1, 2, 3)).detach()
    torch.testing.assert_close(sid_loss_terms(x_g, y_r, y_r - y_f, y_r - y_f, 1.0),
                               ((y_r - y_f) * (y_f - x_g)).sum(dim=(1, 2, 3)) / w)
    alpha = 0.5
    general = ((y_r - y_f) * ((y_r - x_g) - alpha * (y_r - y_f))).sum(dim=(1, 2, 3)) / w
    torch.testing.assert_close(sid_loss_terms(x_g, y_r, y_r - y_f, y_r - y_f, alpha), general)
    # w carries no graph: the gradient wrt x_g is -(y_r - y_f) / w, nothing from w
    sid_loss_terms(x_g, y_r, y_r - y_f, y_r - y_f, alpha).sum().backward()
    torch.testing.assert_close(x_g.grad, -(y_r - y_f) / w.view(-1, 1, 1, 1))


def test_x0_gap_is_the_difference_of_x0s():
    g = torch.Generator().manual_seed(8)
    x_t, e_r, e_f = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t, ac = torch.tensor([40, 800]), alphas_cumprod()
    for kind in ("epsilon", "v_prediction"):
        torch.testing.assert_close(x0_gap(e_r, e_f, t, ac, kind),
                                   x0_from_output(e_r, x_t, t, ac, kind) - x0_from_output(e_f, x_t, t, ac, kind))


@pytest.mark.parametrize("kappa", [1.0, 2.0])
def test_generator_loss_and_gradient_are_zero_when_fake_equals_teacher(kappa):
    teacher = tiny_unet().requires_grad_(False)
    fake = copy.deepcopy(teacher)
    generator = copy.deepcopy(teacher).requires_grad_(True)
    ac = alphas_cumprod()
    cond, uncond = embeds(2)
    g = torch.Generator().manual_seed(4)
    x_g = generator_chain(unet_fn(generator), torch.randn(2, 3, SIZE, SIZE, generator=g), [625], cond, ac, "epsilon",
                          grad=True)
    out = generator_loss(unet_fn(teacher), unet_fn(fake), x_g, torch.tensor([50, 900]),
                         torch.randn(2, 3, SIZE, SIZE, generator=g), cond, uncond, guidance_kappas("lsg", kappa),
                         1.0, ac, "epsilon")
    assert out.y_real.requires_grad and out.y_fake.requires_grad  # not computed under no_grad
    assert (out.per_sample == 0).all()
    out.per_sample.sum().backward()
    grads = [p.grad for p in generator.parameters()]
    assert all(gr is not None for gr in grads)
    assert all((gr == 0).all() for gr in grads)


def test_only_the_last_generator_call_gets_gradient_and_it_flows_through_teacher_and_fake():
    teacher = tiny_unet(0).requires_grad_(False)
    fake = tiny_unet(5).requires_grad_(False)  # differs from the teacher: a non-zero loss
    generator = copy.deepcopy(teacher).requires_grad_(True)
    ac = alphas_cumprod()
    cond, uncond = embeds(2)
    g = torch.Generator().manual_seed(6)
    calls = []
    x_g = generator_chain(counting(unet_fn(generator), calls), torch.randn(2, 3, SIZE, SIZE, generator=g),
                          chain_timesteps(4, 625)[:3], cond, ac, "epsilon",
                          noise=lambda: torch.randn(2, 3, SIZE, SIZE, generator=g), grad=True)
    assert [c[1] for c in calls] == [False, False, True]
    backward_calls = []
    calls[-1][2].register_hook(lambda grad: backward_calls.append(grad))
    out = generator_loss(unet_fn(teacher), unet_fn(fake), x_g, torch.tensor([300, 700]),
                         torch.randn(2, 3, SIZE, SIZE, generator=g), cond, uncond, guidance_kappas("lsg", 2.0), 1.0, ac,
                         "epsilon")
    out.x_t.retain_grad()
    out.per_sample.sum().backward()
    assert len(backward_calls) == 1 and backward_calls[0].abs().sum() > 0
    assert all(p.grad is None for p in [*teacher.parameters(), *fake.parameters()])
    assert out.x_t.grad is not None and out.x_t.grad.abs().sum() > 0
    assert any(p.grad.abs().sum() > 0 for p in generator.parameters())


def test_gradient_checkpointing_gives_the_same_generator_gradient():
    grads = []
    for checkpointing in (False, True):
        teacher = tiny_unet(0).requires_grad_(False)
        fake = tiny_unet(5).requires_grad_(False)
        if checkpointing:
            for unet in (teacher, fake):
                unet.enable_gradient_checkpointing()
        generator = copy.deepcopy(teacher).requires_grad_(True)
        cond, uncond = embeds(2)
        g = torch.Generator().manual_seed(11)
        x_g = generator_chain(unet_fn(generator), torch.randn(2, 3, SIZE, SIZE, generator=g), [625], cond,
                              alphas_cumprod(), "epsilon", grad=True)
        out = generator_loss(unet_fn(teacher), unet_fn(fake), x_g, torch.tensor([300, 700]),
                             torch.randn(2, 3, SIZE, SIZE, generator=g), cond, uncond, guidance_kappas("lsg", 2.0),
                             1.0, alphas_cumprod(), "epsilon")
        out.per_sample.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in generator.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_fake_loss_at_init_is_the_teacher_eps_mse():
    teacher = tiny_unet().requires_grad_(False)
    ac = alphas_cumprod()
    cond, uncond = embeds(2)
    g = torch.Generator().manual_seed(7)
    x_g, eps = torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randn(2, 3, SIZE, SIZE, generator=g)
    t = torch.tensor([30, 500])
    with torch.no_grad():
        loss = fake_loss(unet_fn(copy.deepcopy(teacher)), x_g, t, eps, cond, uncond, 1.0, ac, "epsilon")
        a, s = ac[t].sqrt().view(-1, 1, 1, 1), (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        expected = (unet_fn(teacher)(a * x_g + s * eps, t, cond) - eps).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)


def as_v(eps_fn, ac):
    """The v-prediction network that denoises exactly like `eps_fn`: v̂ = a·ε̂ − s·x̂0 = (ε̂ − s·x_t) / a."""
    def v_fn(x_t, t, c):
        a, s = noise_coefs(ac, t)
        return (eps_fn(x_t, t, c) - s * x_t) / a
    return v_fn


@pytest.mark.parametrize("kappa", [1.0, 2.0])
def test_a_v_teacher_that_agrees_with_an_eps_teacher_gives_the_same_sid_targets(kappa):
    teacher, fake, generator = tiny_unet(0), tiny_unet(5), tiny_unet(3)
    ac = alphas_cumprod()
    cond, uncond = embeds(2)
    t = torch.tensor([300, 900])
    runs = {}
    for kind, wrap in (("epsilon", lambda f: f), ("v_prediction", lambda f: as_v(f, ac))):
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            x_g = generator_chain(wrap(unet_fn(generator)), torch.randn(2, 3, SIZE, SIZE, generator=g),
                                  chain_timesteps(2, 625), cond, ac, kind,
                                  noise=lambda: torch.randn(2, 3, SIZE, SIZE, generator=g))
            eps = torch.randn(2, 3, SIZE, SIZE, generator=g)
            out = generator_loss(wrap(unet_fn(teacher)), wrap(unet_fn(fake)), x_g, t, eps, cond, uncond,
                                 guidance_kappas("lsg", kappa), 1.0, ac, kind)
            psi = fake_loss(wrap(unet_fn(fake)), x_g, t, eps, cond, uncond, kappa, ac, kind)
        runs[kind] = x_g, out, psi
    (x_e, out_e, psi_e), (x_v, out_v, psi_v) = runs["epsilon"], runs["v_prediction"]
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_v, x_e, **close)  # the generator's chain
    for name in ("y_real", "y_fake", "w", "per_sample"):  # the SiD targets and loss
        torch.testing.assert_close(getattr(out_v, name), getattr(out_e, name), **close)
    assert out_e.per_sample.abs().min() > 0  # the networks differ: a real loss, not 0 = 0
    # the fake network is trained in its own parameterisation: v-MSE = ε-MSE / ᾱ_t
    torch.testing.assert_close(psi_v, psi_e / ac[t], **close)


def test_v_prediction_gives_x0_at_zero_terminal_snr():
    ac = teacher_scheduler("v_prediction", rescale_betas_zero_snr=True).alphas_cumprod
    assert ac[999] == 0
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([999, 999])
    torch.testing.assert_close(x0_from_output(v, x_t, t, ac, "v_prediction"), -v)  # x_T = ε, v = -x0
    assert not torch.isfinite(x0_from_output(v, x_t, t, ac, "epsilon")).all()  # why ε cannot be used there
    with pytest.raises(ValueError, match="prediction_type"):
        x0_from_output(v, x_t, t, ac, "sample")


def test_nan_guard_and_ema_beta():
    x = torch.zeros(3, 2)
    x[1, 0] = float("nan")
    y = torch.zeros(3, 2)
    y[2, 1] = float("inf")
    assert finite_samples(x, y).tolist() == [True, False, False]
    assert ema_beta(100, 1000, 50_000, 0.05) == pytest.approx(0.5 ** (100 / 50))  # ramp: h = 0.05 * 1000
    assert ema_beta(100, 10**7, 50_000, 0.05) == pytest.approx(0.5 ** (100 / 50_000))


def test_discriminator_logits_come_from_the_conditional_mid_block():
    unet = tiny_unet()
    cond, uncond = embeds(2)
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(2, 3, SIZE, SIZE, generator=g), torch.tensor([100, 600])
    captured = []
    unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        logits = discriminator_logits(unet, x, t, cond)
        unet(x, t, encoder_hidden_states=uncond.expand_as(cond))
    assert logits.shape == (2, 1, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(logits, captured[0].mean(dim=1, keepdim=True))
    assert not torch.allclose(logits, captured[1].mean(dim=1, keepdim=True))
    assert len(unet.mid_block._forward_hooks) == 1  # its own hook was removed


def test_gan_losses_share_t_and_eps_between_real_and_fake():
    unet = tiny_unet()
    cond, _ = embeds(2)
    g = torch.Generator().manual_seed(10)
    x_real, x_g, eps = (torch.randn(2, 3, SIZE, SIZE, generator=g) for _ in range(3))
    t, ac = torch.tensor([50, 700]), alphas_cumprod()
    with torch.no_grad():
        loss = gan_discriminator_loss(unet, x_real, x_g, t, eps, cond, ac)
        real = discriminator_logits(unet, add_noise(x_real, eps, t, ac), t, cond)
        fake = discriminator_logits(unet, add_noise(x_g, eps, t, ac), t, cond)
    torch.testing.assert_close(loss, discriminator_loss(real, fake))
    torch.testing.assert_close(discriminator_loss(real, fake),
                               0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real), reduction="none")
                                      + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake),
                                                                           reduction="none")).mean(dim=(1, 2, 3)))
    huge = torch.full((1, 1, 2, 2), -50.0)  # clamped at -10: the term stays finite and bounded
    torch.testing.assert_close(adversarial_loss(huge), F.softplus(torch.tensor([10.0])))


# ---------------------------------------------------------------------------- the command

FLAGS = ["--steps", "2", "--batch-size", "2", "--lr", "1e-4", "--device", "cpu", "--save-every", "100"]


def distill(teacher_dir, out, *flags: str) -> int:
    parser = argparse.ArgumentParser()
    sid.add_arguments(parser)
    return sid.run(parser.parse_args(["--teacher", str(teacher_dir), "--out", str(out), *FLAGS, *flags]))


def unet_weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_distill_writes_a_generator_usable_at_1_and_k_steps(teacher_dir, tmp_path):
    out = tmp_path / "sid"
    assert distill(teacher_dir, out, "--iterations", "3", "--guidance", "anti-cfg", "--kappa", "-1") == 0
    assert not (out / sid.CHECKPOINT).exists()
    info = json.loads((out / "leanserve.json").read_text())
    assert info["kind"] == "image" and info["method"] == "sid"
    settings = info["settings"]
    assert (settings["num_steps"], settings["t_init"], settings["alpha"]) == (2, 625, 1.0)
    assert (settings["kappa1"], settings["kappa2"], settings["kappa4"]) == (-1.0, -1.0, 1.0)
    assert info["metrics"]["images_seen"] == 6
    # the generator moved away from the teacher
    teacher = load_file(teacher_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(v, teacher[k]) for k, v in unet_weights(out).items())

    pipe = SiDPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.config.num_steps, pipe.config.t_init) == (2, 625)
    images = {}
    for steps in (1, 2):
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        images[steps] = pipe(PROMPTS[:2], num_inference_steps=steps, generator=gens, output_type="np").images
        assert images[steps].shape == (2, SIZE, SIZE, 3) and np.isfinite(images[steps]).all()
    assert not np.array_equal(images[1], images[2])
    with pytest.raises(ValueError):
        pipe(PROMPTS[:1], num_inference_steps=3)


def test_distill_a_zero_snr_v_prediction_teacher(teacher_dir, tmp_path):
    # the same teacher weights, read as a v-prediction UNet on the zero-terminal-SNR schedule
    v_teacher = tmp_path / "v-teacher"
    pipe = PixelDiffusionPipeline.from_pretrained(teacher_dir)
    pipe.scheduler = teacher_scheduler("v_prediction", rescale_betas_zero_snr=True)
    pipe.save_pretrained(v_teacher)
    out = tmp_path / "sid-v"
    assert distill(v_teacher, out, "--iterations", "2", "--t-init", "999") == 0
    assert json.loads((out / "leanserve.json").read_text())["settings"]["prediction_type"] == "v_prediction"
    generator = SiDPipeline.from_pretrained(out)
    generator.set_progress_bar_config(disable=True)
    assert generator.scheduler.config.prediction_type == "v_prediction"
    assert generator.scheduler.alphas_cumprod[999] == 0  # the first step starts from pure noise
    images = generator(PROMPTS[:2], num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                       output_type="np").images
    assert images.shape == (2, SIZE, SIZE, 3) and np.isfinite(images).all()


def test_distill_with_the_gan_loss_in_bf16_with_checkpointing(teacher_dir, tmp_path):
    out = tmp_path / "sid-gan"
    assert distill(teacher_dir, out, "--iterations", "2", "--guidance", "zero-cfg", "--gan", "--gan-warmup",
                   "0.5", "--bf16", "--gradient-checkpointing") == 0
    settings = json.loads((out / "leanserve.json").read_text())["settings"]
    assert settings["gan"]["warmup_iterations"] == 1 and settings["gan"]["weight"] == 1e-3
    assert settings["precision"] == "bf16-autocast"
    assert (settings["kappa1"], settings["kappa2"], settings["kappa4"]) == (0.0, 0.0, 1.0)
    images = SiDPipeline.from_pretrained(out)(PROMPTS[:1], output_type="np").images
    assert np.isfinite(images).all()


def test_a_nan_sample_is_dropped_and_the_step_still_happens(teacher_dir, tmp_path):
    parser = argparse.ArgumentParser()
    sid.add_arguments(parser)
    trainer = sid.Trainer(parser.parse_args(["--teacher", str(teacher_dir), "--out", str(tmp_path / "nan"), *FLAGS]),
                          torch.device("cpu"))
    model_fn = trainer._fn

    def poisoned(unet):  # the teacher predicts NaN for the first sample
        fn = model_fn(unet)
        if unet is not trainer.teacher:
            return fn

        def poisoned_fn(x, t, c):
            out = fn(x, t, c).clone()
            out[0] = float("nan")
            return out
        return poisoned_fn

    trainer._fn = poisoned
    trainer.train_iteration()
    assert trainer.step == 1
    assert torch.isfinite(trainer.window).all()  # the logged generator loss is that of the good sample
    for p in [*trainer.generator.parameters(), *trainer.fake.parameters(), *trainer.ema.parameters()]:
        assert torch.isfinite(p).all()


def test_resume_is_exact(teacher_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--iterations", "4", "--guidance", "lsg", "--kappa", "2")
    assert distill(teacher_dir, straight, *common) == 0
    assert distill(teacher_dir, resumed, *common, "--stop-at", "2") == 0
    assert (resumed / sid.CHECKPOINT).is_file() and not (resumed / "model_index.json").exists()
    with pytest.raises(UserError, match="--alpha"):
        distill(teacher_dir, resumed, *common, "--resume", "--alpha", "0.5")
    assert distill(teacher_dir, resumed, *common, "--resume") == 0
    a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((d / "leanserve.json").read_text())["metrics"]["loss_history"] for d in (straight, resumed)]
    assert history[0] == history[1]


def test_channels_last_trains_the_same_generator(teacher_dir, tmp_path):
    common = ("--iterations", "2", "--guidance", "lsg", "--kappa", "1.5")
    assert distill(teacher_dir, tmp_path / "nchw", *common) == 0
    assert distill(teacher_dir, tmp_path / "nhwc", *common, "--channels-last") == 0
    a, b = unet_weights(tmp_path / "nchw"), unet_weights(tmp_path / "nhwc")
    teacher = load_file(teacher_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    # same math, another convolution algorithm: float rounding only, but Adam with β1 = 0 turns a
    # rounding-sized gradient into a full lr-sized step, so compare the updates as a whole
    update = torch.cat([(a[k] - teacher[k]).flatten() for k in a])
    gap = torch.cat([(b[k] - a[k]).flatten() for k in a])
    assert update.norm() > 0 and gap.norm() < 0.02 * update.norm()
    images = SiDPipeline.from_pretrained(tmp_path / "nhwc")(PROMPTS[:1], output_type="np").images
    assert np.isfinite(images).all()


def test_compiled_unets_train_the_same_generator(teacher_dir, tmp_path, monkeypatch):
    # dynamo's graphs and AOTAutograd's forward/backward split as on a GPU, without inductor's code generation
    # (its CPU compile of these UNets takes ~2.5 minutes; the GPU benchmark measures the compiled speed)
    compile_module = torch.nn.Module.compile
    modes = []

    def aot_eager(self, mode):
        modes.append(mode)
        return compile_module(self, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    # with the GAN: its discriminator hooks the fake UNet's mid block, which a compiled UNet's graph would skip
    common = ("--iterations", "2", "--guidance", "lsg", "--kappa", "1.5", "--gan", "--gan-warmup", "0")
    assert distill(teacher_dir, tmp_path / "eager", *common) == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert distill(teacher_dir, tmp_path / "compiled", *common, "--compile") == 0
    # the three UNets share one forward, compiled once per use: without gradients (the fake phase's
    # generator chain), for their weights' gradients (the fake loss, the generator's last call), for the
    # input's gradient alone (teacher and frozen fake in the generator loss). One mode for all: no more
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    a, b = unet_weights(tmp_path / "eager"), unet_weights(tmp_path / "compiled")
    teacher = load_file(teacher_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert modes == ["default"] * 3 and a.keys() == b.keys()  # compiled in place: the saved names are the UNet's
    # fused kernels round differently; as with channels_last, compare the updates as a whole
    update = torch.cat([(a[k] - teacher[k]).flatten() for k in a])
    gap = torch.cat([(b[k] - a[k]).flatten() for k in a])
    assert update.norm() > 0 and gap.norm() < 0.02 * update.norm()


def test_the_trained_unets_keep_the_teachers_mode_unless_dropout_is_on(teacher_dir, tmp_path):
    """train() and eval() differ only in dropout: at p = 0 the copies stay in eval mode (one compiled graph
    per use, not per mode); with active dropout they train in train mode."""
    dropout_dir = tmp_path / "teacher-dropout"
    shutil.copytree(teacher_dir, dropout_dir)
    config = json.loads((dropout_dir / "unet" / "config.json").read_text())
    (dropout_dir / "unet" / "config.json").write_text(json.dumps({**config, "dropout": 0.1}))
    parser = argparse.ArgumentParser()
    sid.add_arguments(parser)
    for teacher, training in ((teacher_dir, False), (dropout_dir, True)):
        trainer = sid.Trainer(parser.parse_args(["--teacher", str(teacher), "--out", str(tmp_path / "out"), *FLAGS]),
                              torch.device("cpu"))
        trainer.train_iteration(1)
        assert trainer.generator.training is training and trainer.fake.training is training
        assert not trainer.teacher.training


def test_explicit_kappas(teacher_dir, tmp_path):
    out = tmp_path / "kappas"
    assert distill(teacher_dir, out, "--iterations", "1", "--guidance", "anti-cfg", "--kappas", "1,-1,-0.5,1") == 0
    settings = json.loads((out / "leanserve.json").read_text())["settings"]
    assert [settings[f"kappa{i}"] for i in range(1, 5)] == [1.0, -1.0, -0.5, 1.0]
    with pytest.raises(UserError, match="four"):
        distill(teacher_dir, tmp_path / "bad", "--kappas", "1,2")


def test_bad_options(teacher_dir, tmp_path):
    with pytest.raises(UserError, match="negative kappa"):
        distill(teacher_dir, tmp_path / "a", "--guidance", "anti-cfg", "--kappa", "1.5")
    with pytest.raises(UserError, match="does not exist"):
        distill(tmp_path / "missing", tmp_path / "b")
    with pytest.raises(UserError, match="--resume"):
        distill(teacher_dir, tmp_path / "c", "--resume")
