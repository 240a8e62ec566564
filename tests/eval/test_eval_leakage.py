"""`leanserve eval leakage`: the probes read clean images, SD's schedule leaks background and position
through x_T, the zero-terminal-SNR schedule leaks nothing at t = T, and the command's outputs."""
from __future__ import annotations

import json

import pytest
import torch

from leanserve.errors import UserError
from leanserve.eval import leakage

pytestmark = pytest.mark.usefixtures("one_thread")

N = 300  # images per split: the probes' 95% intervals are about ±0.05 wide


@pytest.fixture(scope="module")
def sets():
    return leakage.probe_set(N, 32, 0, "train"), leakage.probe_set(N, 32, 0, "val")


def rows(name: str, timesteps: list[int], sets) -> dict[int, dict]:
    ac = leakage.load_schedule(name).alphas_cumprod
    return {r["t"]: r for r in leakage.schedule_rows(ac, timesteps, *sets, seed=0)}


def test_lda_separates_gaussian_classes_and_is_at_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    y_fit, y_test = torch.arange(2000) % 4, torch.arange(2000) % 4
    fit, test = means[y_fit] + torch.randn(2000, 3, generator=g), means[y_test] + torch.randn(2000, 3, generator=g)
    assert leakage.lda_accuracy(fit, y_fit, test, y_test, 4) > 0.85  # Bayes rate: ~0.87
    noise_fit, noise_test = torch.randn(2000, 3, generator=g), torch.randn(2000, 3, generator=g)
    assert abs(leakage.lda_accuracy(noise_fit, y_fit, noise_test, y_test, 4) - 0.25) < 0.05
    with pytest.raises(ValueError, match="2\\+ fit examples"):
        leakage.lda_accuracy(fit[:5], y_fit[:5], test, y_test, 4)


def test_the_probes_read_clean_images(sets):
    fit, test = sets
    clean = rows("sd", [0], sets)[0]
    assert clean["background"]["accuracy"] > 0.98 and clean["position"]["accuracy"] > 0.98
    assert leakage.cell_discs(32).sum(dim=(1, 2)).unique().numel() == 1  # nine equal discs: no cell favoured
    assert fit.x0.shape == (N, 3, 32, 32) and fit.direction.shape == (N, 3)


def test_sd_betas_leak_and_zero_terminal_snr_does_not(sets):
    fit, test = sets
    sd, zero = rows("sd", [999, 900], sets), rows("sd-zero-snr", [999, 900], sets)
    assert sd[999]["background"]["accuracy"] > 0.6 and sd[999]["background"]["leaks"]  # ~0.75 at √ᾱ_T = 0.068
    assert sd[900]["position"]["leaks"]
    assert sd[999]["sqrt_alpha_bar"] == pytest.approx(0.0683, abs=1e-4)
    assert zero[999]["alpha_bar"] == 0 and zero[999]["snr"] == 0
    for probe, labels in (("background", test.background), ("position", test.position)):
        assert not zero[999][probe]["leaks"]
        assert zero[999][probe]["accuracy"] < leakage.chance(labels) + 0.06
    # x_t keeps less of the image at every late t once the schedule ends at zero SNR
    assert zero[900]["background"]["accuracy"] < sd[900]["background"]["accuracy"]


def test_the_command_writes_json_and_plot_for_a_model_directory(tmp_path):
    from leanserve.cli import main
    from leanserve.models.pixel_pipeline import teacher_scheduler

    teacher_scheduler("v_prediction", rescale_betas_zero_snr=True).save_pretrained(tmp_path / "model" / "scheduler")
    out, png = tmp_path / "leak.json", tmp_path / "leak.png"
    assert main(["eval", "leakage", "--schedule", "sd", str(tmp_path / "model"), "--timesteps", "999",
                 "--num-images", "60", "--out", str(out), "--plot", str(png)]) == 0
    results = json.loads(out.read_text())
    assert [s["name"] for s in results["schedules"]] == ["sd", str(tmp_path / "model")]
    assert results["schedules"][1]["config"]["rescale_betas_zero_snr"] is True
    assert results["schedules"][1]["terminal"]["alpha_bar"] == 0
    assert set(results["chance"]) == {"background", "position"} and "git_commit" in results
    assert png.stat().st_size > 0
    with pytest.raises(UserError, match="scheduler_config.json"):
        leakage.load_schedule(str(tmp_path / "missing"))
    assert main(["eval", "leakage", "--num-images", "10"]) == 2
