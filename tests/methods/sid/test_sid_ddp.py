"""`distill sid` under DDP: 2 CPU processes (gloo, torch.multiprocessing) on the tiny teacher of test_sid.py.

One spawn runs, on both ranks: an instrumented run (k, random draws, the gradients each optimizer step
sees), a run whose time limit only rank 0 has, then the instrumented run's options stopped half-way and
resumed. The parent checks that the ranks stay identical,
that the averaged gradients are those of one process on the two ranks' batches concatenated (same
captions, same noise), that stop/resume is exact, and that a resume at another world size is refused."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_sid import teacher_dir, tokenizer  # noqa: F401 - fixtures

from leanserve.errors import UserError
from leanserve.trainers import sid

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD, BATCH = 2, 2
# κ = 2: CFG and context dropout; the GAN from iteration 0: D's gradient clipping and the adversarial term
OPTIONS = ["--steps", "2", "--iterations", "4", "--lr", "1e-4", "--device", "cpu", "--save-every", "100",
           "--guidance", "lsg", "--kappa", "2", "--gan", "--gan-warmup", "0"]
DRAWS = ("_randn", "_rand", "_timesteps")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(teacher, out, *flags: str, batch: int = BATCH) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sid.add_arguments(parser)
    return parser.parse_args(["--teacher", str(teacher), "--out", str(out), "--batch-size", str(batch),
                              *OPTIONS, *flags])


def instrument(trainer: sid.Trainer) -> dict:
    """Record k per iteration, and the random draws, the loss window and the gradients (as the optimizer
    gets them: averaged, clipped, nan_to_num'd) of the first iteration."""
    log = {"k": [], "draws": [], "grads": [], "window": None}

    def recording(name):
        draw = getattr(trainer, name)

        def wrapped(*a):
            out = draw(*a)
            if trainer.step == 0:
                log["draws"].append((name, out.clone()))
            return out
        return wrapped

    for name in DRAWS:
        setattr(trainer, name, recording(name))
    finish, iteration = trainer._finish_step, trainer.train_iteration

    def finish_step(network):
        if trainer.step == 0:
            log["grads"].append([p.grad.clone() for p in network.parameters() if p.grad is not None])
        finish(network)

    def train_iteration():
        log["k"].append(iteration())
        if log["window"] is None:
            log["window"] = trainer.window.clone()
        return log["k"][-1]

    trainer._finish_step, trainer.train_iteration = finish_step, train_iteration
    return log


def worker(rank: int, ports: list[int], teacher, tmp):
    from leanserve.runtime import init_distributed

    torch.set_num_threads(1)

    def join(port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))

    join(ports[0])
    dist_info, device = init_distributed("cpu")
    try:
        trainer = sid.Trainer(parse(teacher, tmp / "straight"), device, dist_info)
        log = instrument(trainer)
        trainer.train()
        log["state"] = {k: v.clone() for k, v in trainer.state.state_dict().items()}
        # --time-limit on rank 0 only (already spent): its decision, sent every LOG_EVERY (here 2)
        # iterations, stops rank 1 too, at the same iteration
        every, sid.LOG_EVERY = sid.LOG_EVERY, 2
        timed = sid.Trainer(parse(teacher, tmp / "timed", *(["--time-limit", "1e-9"] if rank == 0 else [])),
                            device, dist_info)
        timed.train()
        log["timed_step"], sid.LOG_EVERY = timed.step, every
    finally:
        torch.distributed.destroy_process_group()
    join(ports[1])
    sid.run(parse(teacher, tmp / "resumed", "--stop-at", "2"))
    if rank == 0:  # a copy of the 2-rank checkpoint, for the world-size check
        shutil.copytree(tmp / "resumed", tmp / "stopped")
    join(ports[2])
    sid.run(parse(teacher, tmp / "resumed", "--resume"))
    torch.save(log, tmp / f"rank{rank}.pt")


def test_example_indices_are_disjoint_over_ranks_and_phases():
    seen = [i for step in range(3) for phase in (0, 1) for rank in range(3)
            for i in sid.example_indices(step, phase, 4, rank, 3)]
    assert sorted(seen) == list(range(3 * 2 * 3 * 4))
    # one process reads what all ranks together would, in rank order
    assert list(sid.example_indices(1, 1, 8)) == [i for rank in (0, 1) for i in sid.example_indices(1, 1, 4, rank, 2)]


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_concatenated_batch_and_resume_exactly(teacher_dir, tmp_path):  # noqa: F811
    mp.spawn(worker, args=([free_port() for _ in range(3)], teacher_dir, tmp_path), nprocs=WORLD)
    logs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # (b) the same k on both ranks, every iteration; (the run does train both k = 1 and k = 2)
    assert logs[0]["k"] == logs[1]["k"] and set(logs[0]["k"]) == {1, 2}
    # per-rank noise: the ranks' draws differ
    assert not torch.equal(logs[0]["draws"][0][1], logs[1]["draws"][0][1])
    # (a) generator, fake network and EMA identical on both ranks (and trained: not the teacher)
    states = [log["state"] for log in logs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["generator.conv_in.weight"], states[0]["ema.conv_in.weight"])
    for phase in range(2):
        assert all(torch.equal(a, b) for a, b in zip(logs[0]["grads"][phase], logs[1]["grads"][phase]))

    # (c) one process, batch 2 x BATCH, replaying the two ranks' draws concatenated: the same captions (the
    # ranks' slices of the stream, in rank order), the same noise, so the same mean gradient of each phase.
    # The fake network's is checked after the GAN's clipping at 1 (9% of its elements are clipped), so
    # clipping before the averaging would show too
    reference = sid.Trainer(parse(teacher_dir, tmp_path / "reference", batch=WORLD * BATCH), torch.device("cpu"))
    draws = [iter(log["draws"]) for log in logs]

    def replaying(name):
        def draw(*a):
            parts = [next(d) for d in draws]
            assert all(n == name for n, _ in parts)
            return torch.cat([t for _, t in parts])
        return draw

    for name in DRAWS:
        setattr(reference, name, replaying(name))
    grads = []
    finish = reference._finish_step
    reference._finish_step = lambda net: (grads.append([p.grad.clone() for p in net.parameters()
                                                        if p.grad is not None]), finish(net))
    assert reference.train_iteration() == logs[0]["k"][0]
    assert all(next(d, None) is None for d in draws)  # every draw replayed
    for phase in range(2):
        assert len(grads[phase]) == len(logs[0]["grads"][phase]) > 0
        assert any(g.abs().max() > 0 for g in grads[phase])
        for ours, ref in zip(logs[0]["grads"][phase], grads[phase]):
            # fp32 sums in another order (and, for the generator, the fake network after a step taken with
            # such a gradient): equal to ~1e-5 of each tensor's scale; summed instead of averaged would be 2x
            assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    # the logged losses are means over the ranks
    mean_window = (logs[0]["window"] + logs[1]["window"]) / WORLD
    torch.testing.assert_close(mean_window, reference.window, rtol=1e-5, atol=1e-6)

    # (d) stop at 2 and resume at world size 2 = the uninterrupted run, bit for bit
    a, b = (load_file(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], states[0][f"ema.{k}"]) for k in a)  # rank 0 wrote the EMA
    infos = [json.loads((tmp_path / d / "leanserve.json").read_text()) for d in ("straight", "resumed")]
    assert infos[0]["metrics"]["loss_history"] == infos[1]["metrics"]["loss_history"]
    assert [log["timed_step"] for log in logs] == [2, 2]
    assert json.loads((tmp_path / "timed" / "leanserve.json").read_text())["metrics"]["iterations"] == 2
    assert infos[0]["settings"]["world_size"] == 2 and infos[0]["metrics"]["images_seen"] == 4 * WORLD * BATCH

    # (e) a 2-rank checkpoint does not resume in one process
    with pytest.raises(UserError, match="same world size"):
        sid.run(parse(teacher_dir, tmp_path / "stopped", "--resume"))
