"""DPM-OT: the semi-discrete OT solver equalises cell masses, the map round-trips through
safetensors, the sampler jumps with 0 network calls then runs K steps, and `leanserve train
dpm-ot` writes a loadable model directory."""
from __future__ import annotations

import json

import pytest
import torch
from image_builders import v_pipeline_like

from leanserve.cli import main
from leanserve.kernels.ot_argmax import ot_argmax
from leanserve.models.dpm_ot_sampler import (
    OT_MAP_FILE,
    OTMap,
    TailUniPCScheduler,
    dpm_ot_generate,
    tail_scheduler,
    tail_timesteps,
)
from leanserve.models.pixel_pipeline import PixelDiffusionPipeline, teacher_scheduler
from leanserve.trainers.dpm_ot import (
    SolverConfig,
    cell_counts,
    evaluate,
    mass_error,
    noised_targets,
    solve,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = SolverConfig(max_iters=1500, tol_max_rel=0.35)


def quiet(_: str):
    pass


# --------------------------------------------------------------------------- solver

@pytest.mark.parametrize("num_targets,dim", [(32, 2), (64, 8)])
def test_solver_equalises_cell_masses(num_targets, dim):
    # targets off-centre and of unequal spread: far from equal masses at every initialisation
    y = torch.randn(num_targets, dim, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.3
    before = min(evaluate(y, h, 100_000, seed=7).max_rel for h in (torch.zeros(num_targets), -0.5 * y.pow(2).sum(1)))

    result = solve(y, FAST, log=quiet)

    assert result.converged and result.error.max_rel <= FAST.tol_max_rel
    # judged again on a large independent batch (MC floor ≈ 0.03): the solve did not just fit its eval noise
    after = evaluate(y, result.h, 200_000, seed=7)
    assert before > 1.0
    assert after.empty == 0 and after.max_rel < 0.3 and after.chi2_excess < 0.01
    assert abs(float(result.h.mean())) < 1e-4  # re-centred


def test_bfloat16_solve_gives_float32_potentials_that_equalise_fp32_masses():
    y = torch.randn(32, 2, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.3
    result = solve(y.bfloat16(), FAST, log=quiet)
    assert result.h.dtype == torch.float32 and result.converged
    # the map is then applied in fp32 to the fp32 targets
    assert evaluate(y, result.h, 200_000, seed=7).max_rel < 0.3


def test_symmetric_targets_keep_equal_potentials():
    # ±e_k with a centred Gaussian source: equal masses at h = const, the solver must not drift
    eye = torch.eye(4)
    y = torch.cat([eye, -eye]) * 2.0
    result = solve(y, SolverConfig(max_iters=200, tol_chi2=1e-9, tol_max_rel=1e-9), log=quiet)
    assert result.h.abs().max() < 0.05 * 2.0
    assert evaluate(y, result.h, 100_000, seed=3).max_rel < 0.1


def test_potentials_move_cell_masses_and_constants_do_not():
    gen = torch.Generator().manual_seed(0)
    y, h = torch.randn(10, 3, generator=gen), torch.randn(10, generator=gen)
    x = torch.randn(5000, 3, generator=gen)
    assert torch.equal(ot_argmax(x, y, h)[1], ot_argmax(x, y, h + 3.25)[1])
    counts = cell_counts(y, h, 20_000, torch.Generator().manual_seed(1))
    raised = h.clone()
    raised[4] += 0.5
    assert cell_counts(y, raised, 20_000, torch.Generator().manual_seed(1))[4] > counts[4]
    assert counts.sum() == 20_000


def test_chi2_excess_is_unbiased_for_uniform_masses():
    gen = torch.Generator().manual_seed(0)
    n, m = 50, 2000
    values = [mass_error(torch.bincount(torch.randint(n, (m,), generator=gen), minlength=n)).chi2_excess
              for _ in range(300)]
    # raw chi² would be (N - 1) / M ≈ 0.0245 here; the excess is zero up to its sampling error
    assert abs(sum(values) / len(values)) < 0.003


def test_ot_coupling_is_cheaper_than_random_and_balanced_unlike_nearest():
    """What OT adds over a random target is its coupling: among assignments that draw every target
    equally often it moves x_T least. Nearest-target moves it less still, by drawing targets unequally."""
    y = torch.randn(32, 8, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.3
    shape = (2, 2, 2)
    ot_map = OTMap(targets=y.view(32, *shape), x0=y.view(32, *shape), h=solve(y, FAST, log=quiet).h, t_prime=400,
                   alpha_bar=0.5)
    x_T = torch.randn(20_000, *shape, generator=torch.Generator().manual_seed(6))
    cost, masses = {}, {}
    for assignment in ("ot", "random", "nearest"):
        idx = ot_map.assign(x_T, assignment, torch.Generator().manual_seed(7))
        cost[assignment] = float((x_T.flatten(1) - y[idx]).pow(2).sum(1).mean())
        masses[assignment] = torch.bincount(idx, minlength=32).float() / len(idx) * 32
    assert cost["nearest"] < cost["ot"] < 0.8 * cost["random"]
    assert float((masses["ot"] - 1).abs().max()) < 0.4 and float((masses["random"] - 1).abs().max()) < 0.4
    assert float((masses["nearest"] - 1).abs().max()) > 1.0


# --------------------------------------------------------------------------- the map

def random_map(num: int = 12, shape=(3, 8, 8), t_prime: int = 400, fresh_noise: bool = False) -> OTMap:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(num, *shape, generator=gen) * 2 - 1
    alpha_bar = float(teacher_scheduler().alphas_cumprod[t_prime])
    return OTMap(targets=noised_targets(x0, alpha_bar, fresh_noise, seed=1), x0=x0, h=torch.randn(num, generator=gen),
                 t_prime=t_prime, alpha_bar=alpha_bar, fresh_noise=fresh_noise, metadata={"targets": "data"})


@pytest.mark.parametrize("fresh_noise", [False, True])
def test_ot_map_round_trips_through_safetensors(tmp_path, fresh_noise):
    ot_map = random_map(fresh_noise=fresh_noise)
    ot_map.save(tmp_path / OT_MAP_FILE)
    loaded = OTMap.load(tmp_path / OT_MAP_FILE)
    for name in ("targets", "x0", "h"):
        assert torch.equal(getattr(loaded, name), getattr(ot_map, name))
    assert (loaded.t_prime, loaded.alpha_bar, loaded.fresh_noise, loaded.metadata) == \
        (ot_map.t_prime, ot_map.alpha_bar, fresh_noise, {"targets": "data"})


def test_jump_assignments_and_fresh_noise():
    ot_map = random_map()
    x_T = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x, idx = ot_map.jump(x_T)
    expected = (x_T.flatten(1) @ ot_map.targets.flatten(1).T + ot_map.h).argmax(1)
    assert torch.equal(idx, expected) and torch.equal(x, ot_map.targets[idx])
    assert torch.equal(ot_map.jump(x_T)[1], idx)  # same x_T, same target
    nearest = ((x_T.flatten(1)[:, None] - ot_map.targets.flatten(1)[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(ot_map.assign(x_T, "nearest"), nearest)
    gens = [torch.Generator().manual_seed(s) for s in range(16)]
    random_idx = ot_map.assign(x_T, "random", gens)
    assert random_idx.shape == (16,) and 0 <= random_idx.min() and random_idx.max() < 12

    fresh = random_map(fresh_noise=True)
    x, idx = fresh.jump(torch.randn(400, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
                        generator=torch.Generator().manual_seed(4))
    std = float((x - fresh.targets[idx]).std())
    assert abs(std - (1 - fresh.alpha_bar) ** 0.5) < 0.02


def test_tail_timesteps():
    assert tail_timesteps(400, 4) == [400, 300, 200, 100]
    assert tail_timesteps(7, 7) == [7, 6, 5, 4, 3, 2, 1]
    with pytest.raises(ValueError):
        tail_timesteps(3, 4)


# --------------------------------------------------------------------------- sampling with a tiny teacher

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from leanserve.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("teacher")
    tokenizer = train_tokenizer(["a red circle", "a big blue square", "a green star"] * 10, root / "tok",
                                vocab_size=300, model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8).eval()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    pipe = PixelDiffusionPipeline(unet=unet, text_encoder=text, tokenizer=tokenizer, scheduler=teacher_scheduler())
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def pipe(teacher_dir):
    from leanserve.models.image_pipeline import load_image_pipeline
    return load_image_pipeline(teacher_dir)


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "unipc", "ddpm"])
def test_sampler_makes_k_network_calls_and_the_right_shape(pipe, sampler):
    ot_map = random_map()
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[1]))
    original_scheduler = pipe.scheduler
    try:
        out = dpm_ot_generate(pipe, ot_map, ["", ""], num_inference_steps=3, sampler=sampler,
                              generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="pt")
        again = dpm_ot_generate(pipe, ot_map, ["", ""], num_inference_steps=3, sampler=sampler,
                                generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="pt")
    finally:
        hook.remove()
    assert out.images.shape == (2, 3, 8, 8)
    assert torch.isfinite(out.images).all()
    # the jump costs no network call; the K steps start at t′ on the uniform grid
    assert [int(t) for t in calls[:3]] == [400, 267, 133] and len(calls) == 6
    assert torch.equal(out.target_indices, again.target_indices) and torch.equal(out.images, again.images)
    assert pipe.scheduler is original_scheduler


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "unipc", "ddpm"])
def test_every_tail_reads_a_v_prediction_teacher(pipe, sampler):
    """A v-prediction teacher built to denoise exactly like the ε one gives the same DPM-OT images."""
    v = v_pipeline_like(pipe, teacher_scheduler().alphas_cumprod)
    ot_map = random_map()
    out = {}
    for name, p in (("eps", pipe), ("v", v)):
        out[name] = dpm_ot_generate(p, ot_map, ["", "a red circle"], num_inference_steps=3, sampler=sampler,
                                    guidance_scale=2.0, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                                    output_type="latent").images
    torch.testing.assert_close(out["v"], out["eps"], rtol=1e-4, atol=1e-4)


def test_random_target_control_and_schedule_check(pipe):
    ot_map = random_map()
    out = dpm_ot_generate(pipe, ot_map, "", num_inference_steps=2, assignment="random", num_images_per_prompt=3,
                          generator=[torch.Generator().manual_seed(s) for s in range(3)], output_type="pt")
    assert out.images.shape == (3, 3, 8, 8) and out.target_indices.shape == (3,)
    x_T = torch.cat([torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    jump = (ot_map.targets[out.target_indices] - x_T).flatten(1).norm(dim=1) / (3 * 8 * 8) ** 0.5
    torch.testing.assert_close(out.jump_rms, jump)
    ot_map.alpha_bar = 0.5
    with pytest.raises(ValueError, match="built for"):
        dpm_ot_generate(pipe, ot_map, "", num_inference_steps=2)


def test_order_one_tail_is_ddim(pipe):
    """The "ddim" tail (DPM-Solver++ order 1 on a custom grid) equals a hand-written DDIM η = 0 loop."""
    ot_map = random_map()
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    out = dpm_ot_generate(pipe, ot_map, "", num_inference_steps=3, sampler="ddim",
                          generator=torch.Generator().manual_seed(5), output_type="latent")
    x, _ = ot_map.jump(x_T)
    embeds = pipe.encode_prompt([""], torch.device("cpu"), 1, False)[0]
    alphas = pipe.scheduler.alphas_cumprod
    grid = tail_timesteps(400, 3)
    with torch.no_grad():
        for t, prev in zip(grid, [*grid[1:], None], strict=True):
            eps = pipe.unet(x, t, encoder_hidden_states=embeds).sample
            x0 = (x - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
            x = x0 if prev is None else alphas[prev].sqrt() * x0 + (1 - alphas[prev]).sqrt() * eps
    torch.testing.assert_close(out.images, x, rtol=1e-4, atol=1e-4)
    assert tail_scheduler(pipe, "ddim").config.solver_order == 1


def test_tail_unipc_on_its_own_grid_is_stock_unipc(pipe):
    from diffusers import UniPCMultistepScheduler

    stock = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    stock.set_timesteps(5)
    tail = TailUniPCScheduler.from_config(pipe.scheduler.config)
    tail.set_timesteps(timesteps=stock.timesteps.tolist())
    assert torch.equal(tail.timesteps, stock.timesteps)
    torch.testing.assert_close(tail.sigmas, stock.sigmas)
    # the same steps on the same inputs give the same results
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, generator=gen)
    x_stock = x_tail = x
    for t in stock.timesteps:
        eps = torch.randn(1, 3, 8, 8, generator=gen)
        x_stock = stock.step(eps, t, x_stock).prev_sample
        x_tail = tail.step(eps, t, x_tail).prev_sample
    torch.testing.assert_close(x_tail, x_stock)


# --------------------------------------------------------------------------- the command

@pytest.mark.parametrize("targets", ["data", "model"])
def test_train_dpm_ot_writes_a_loadable_directory(teacher_dir, tmp_path, targets):
    from leanserve.models.image_pipeline import load_image_pipeline
    from leanserve.models.model_dir import load_model_info

    out = tmp_path / "ot"
    rc = main(["train", "dpm-ot", "--model", str(teacher_dir), "--out", str(out), "--t-prime", "300",
               "--targets", targets, "--num-targets", "8", "--target-steps", "2", "--batch-size", "4",
               "--max-iters", "300", "--tol-max-rel", "0.45", "--device", "cpu"])
    assert rc == 0
    info = load_model_info(out)
    assert info.method == "dpm_ot" and info.settings["t_prime"] == 300 and info.settings["targets"] == targets
    assert info.metrics["target_nfe"] == (16 if targets == "model" else 0)
    ot_map = OTMap.load(out / OT_MAP_FILE)
    assert ot_map.targets.shape == (8, 3, 8, 8) and ot_map.t_prime == 300
    # faithful targets: a·x0 + s·ε with fixed noise, x0 in the model's [-1, 1] scale
    residual = (ot_map.targets - ot_map.alpha_bar ** 0.5 * ot_map.x0) / (1 - ot_map.alpha_bar) ** 0.5
    assert 0.8 < float(residual.std()) < 1.2
    if targets == "data":
        assert ot_map.x0.min() >= -1 and ot_map.x0.max() <= 1
        assert info.metrics["converged"] and info.metrics["final_max_rel"] <= 0.45
    pipe = load_image_pipeline(out)
    images = dpm_ot_generate(pipe, ot_map, "", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 3)
    assert json.loads((out / "model_index.json").read_text()) == json.loads((teacher_dir / "model_index.json").read_text())


def test_a_t_prime_sweep_reuses_the_teacher_samples(teacher_dir, tmp_path, capsys):
    from leanserve.models.model_dir import load_model_info

    def train(out: str, t_prime: str, *extra: str, num: str = "8", targets: str = "model") -> int:
        return main(["train", "dpm-ot", "--model", str(teacher_dir), "--out", str(tmp_path / out), "--t-prime", t_prime,
                     "--targets", targets, "--num-targets", num, "--target-steps", "2", "--batch-size", "4",
                     "--max-iters", "20", "--device", "cpu", *extra])

    assert train("first", "300") == 0 and train("data", "300", targets="data") == 0
    assert train("second", "600", "--targets-from", str(tmp_path / "first")) == 0
    first, second = (OTMap.load(tmp_path / name / OT_MAP_FILE) for name in ("first", "second"))
    assert torch.equal(first.x0, second.x0) and second.t_prime == 600
    torch.testing.assert_close(second.targets, second.alpha_bar ** 0.5 * second.x0
                               + (1 - second.alpha_bar) ** 0.5 * (first.targets - first.alpha_bar ** 0.5 * first.x0)
                               / (1 - first.alpha_bar) ** 0.5)  # same x0 and noise seed, noised to the new t′
    info = load_model_info(tmp_path / "second")
    assert info.metrics["target_nfe"] == 16 and str(tmp_path / "first") in info.data["description"]
    capsys.readouterr()
    assert train("n", "600", "--targets-from", str(tmp_path / "first"), num="6") == 2
    assert "holds 8 targets" in capsys.readouterr().err
    assert train("d", "600", "--targets-from", str(tmp_path / "data")) == 2
    assert "not samples of" in capsys.readouterr().err
    assert train("t", "600", "--targets-from", str(teacher_dir)) == 2
    assert "not a directory written by" in capsys.readouterr().err
    assert train("m", "600", "--targets-from", str(tmp_path / "first"), targets="data") == 2
    assert "needs --targets model" in capsys.readouterr().err


def test_train_dpm_ot_refuses_bad_arguments(teacher_dir, tmp_path, capsys):
    base = ["train", "dpm-ot", "--model", str(teacher_dir), "--targets", "data", "--num-targets", "8"]
    assert main([*base, "--out", str(tmp_path / "a"), "--t-prime", "1000"]) == 2
    assert "--t-prime" in capsys.readouterr().err
    assert main([*base, "--out", str(teacher_dir), "--t-prime", "10"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_train_dpm_ot_on_a_zero_snr_teacher(teacher_dir, tmp_path, capsys):
    from leanserve.models.image_pipeline import load_image_pipeline

    teacher = PixelDiffusionPipeline.from_pretrained(teacher_dir)
    teacher.scheduler = teacher_scheduler("v_prediction", rescale_betas_zero_snr=True)
    teacher.save_pretrained(tmp_path / "v-teacher")
    base = ["train", "dpm-ot", "--model", str(tmp_path / "v-teacher"), "--targets", "data", "--num-targets", "8",
            "--max-iters", "50", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), "--t-prime", "999"]) == 2
    assert "nothing to jump to" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--t-prime", "300"]) == 0
    pipe = load_image_pipeline(tmp_path / "b")
    ot_map = OTMap.load(tmp_path / "b" / OT_MAP_FILE)
    assert ot_map.alpha_bar == pytest.approx(float(pipe.scheduler.alphas_cumprod[300]))
    images = dpm_ot_generate(pipe, ot_map, "", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 3)


def test_stop_and_resume_gives_the_uninterrupted_map(teacher_dir, tmp_path):
    from leanserve.models.model_dir import load_model_info

    common = ["train", "dpm-ot", "--model", str(teacher_dir), "--t-prime", "300", "--targets", "data",
              "--num-targets", "8", "--max-iters", "40", "--eval-every", "10", "--tol-max-rel", "0.01", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--out", str(tmp_path / "resumed"), "--stop-at", "15", "--save-every", "10"]) == 0
    assert (tmp_path / "resumed" / "ot_checkpoint.safetensors").is_file()
    assert not (tmp_path / "resumed" / OT_MAP_FILE).exists()
    # a changed option that alters the result is refused
    assert main([*common, "--out", str(tmp_path / "resumed"), "--resume", "--seed", "1"]) == 2
    assert main([*common, "--out", str(tmp_path / "resumed"), "--resume"]) == 0

    straight, resumed = (OTMap.load(tmp_path / name / OT_MAP_FILE) for name in ("straight", "resumed"))
    assert torch.equal(straight.h, resumed.h) and torch.equal(straight.targets, resumed.targets)
    history = [load_model_info(tmp_path / name).metrics["history"] for name in ("straight", "resumed")]
    assert history[0] == history[1]
    assert [e["iter"] for e in history[0]] == [0, 10, 20, 30, 40]  # never converged: all 40 iterations ran
    assert not (tmp_path / "resumed" / "ot_checkpoint.safetensors").exists()
