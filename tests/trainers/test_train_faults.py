"""kill -9 and `--resume`, for every trainer: a run killed at a random point after a checkpoint, or
while it writes one, resumes to final weights bit-identical to an uninterrupted run (CPU, fp32).

Each killed run is a real `leanserve` process (the CLI entry point under a small wrapper, below)
that dies by SIGKILL; the uninterrupted run and the resumes go through the same entry point in this
process, on one thread like the killed ones. A truncated checkpoint is refused with one line."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch_threads import single_thread

from leanserve.cli import main

REPO = Path(__file__).resolve().parents[2]

# `python -c WRAPPER CHECKPOINT N WHEN leanserve-args...`: runs the command, counting the renames
# that put CHECKPOINT in place. WHEN < 0: at the Nth, the temporary file is cut in half and the
# process SIGKILLs itself before the rename (a kill in the middle of the write). WHEN in [0, 1):
# a SIGKILL lands WHEN of one checkpoint interval (the last one measured) after the Nth rename,
# wherever the run then is (a step, an evaluation, the next write). No hook in leanserve itself.
WRAPPER = """
import os, signal, sys, threading, time
checkpoint, n, when = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rename, renames, last = os.replace, 0, None

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst, **kwargs):
    global renames, last
    if os.path.basename(dst) != checkpoint:
        return rename(src, dst, **kwargs)
    renames += 1
    if renames == n and when < 0:
        os.truncate(src, os.path.getsize(src) // 2)
        die()
    rename(src, dst, **kwargs)
    now = time.perf_counter()
    if renames == n:
        timer = threading.Timer(when * (now - last), die)
        timer.daemon = True  # a run that ends first exits (and the test says so)
        timer.start()
    last = now

os.replace = replace
from leanserve.cli import main
sys.exit(main(sys.argv[4:]))
"""


@dataclass(frozen=True)
class Trainer:
    inputs: str                                  # the fixture that builds what the command reads
    command: Callable[[Path, Path], list[str]]   # (inputs, out) -> leanserve arguments
    checkpoint: str                              # its file name in OUT
    checkpoints: int                             # how many an uninterrupted run writes


# the smallest runs of the trainers' own tests, a checkpoint every step (or five solver iterations)
TRAINERS = {
    "train lm": Trainer("lm_inputs", lambda inputs, out: [
        "train", "lm", "--data", str(inputs / "data"), "--tokenizer", str(inputs / "tok"), "--out", str(out),
        "--device", "cpu", "--preset", "tiny", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3",
        "--eval-batches", "2", "--pretrain-steps", "6", "--chat-steps", "4", "--eval-every", "3", "--save-every", "1"],
        "checkpoint.pt", 10),
    "train diffusion": Trainer("shapes_tokenizer", lambda tokenizer, out: [
        "train", "diffusion", "--tokenizer", str(tokenizer), "--out", str(out), "--device", "cpu", "--preset", "tiny",
        "--steps", "6", "--batch-size", "4", "--val-size", "8", "--eval-every", "4", "--lr", "2e-3", "--save-every", "1"],
        "checkpoint.pt", 6),
    "distill sid": Trainer("teacher", lambda teacher, out: [
        "distill", "sid", "--teacher", str(teacher), "--out", str(out), "--device", "cpu", "--steps", "2",
        "--batch-size", "2", "--lr", "1e-4", "--iterations", "5", "--guidance", "lsg", "--kappa", "2",
        "--save-every", "1"],
        "checkpoint.pt", 5),
    "train dpm-ot": Trainer("teacher", lambda teacher, out: [
        "train", "dpm-ot", "--model", str(teacher), "--out", str(out), "--device", "cpu", "--t-prime", "300",
        "--targets", "data", "--num-targets", "8", "--max-iters", "40", "--eval-every", "10", "--tol-max-rel", "0.01",
        "--save-every", "5"],
        "ot_checkpoint.safetensors", 7),  # not at the last iteration: the map is written instead
}


@pytest.fixture(scope="module")
def lm_inputs(tmp_path_factory):
    from lm_builders import train_texts, write_data

    from leanserve.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("lm")
    train_tokenizer(train_texts(write_data(root / "data")), root / "tok", vocab_size=400, model_max_length=512)
    return root


@pytest.fixture(scope="module")
def shapes_tokenizer(tmp_path_factory):
    from leanserve.trainers.diffusion import shapes_tokenizer

    path = tmp_path_factory.mktemp("shapes-tok")
    shapes_tokenizer(path, data_seed=0, resolution=32)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import build_tiny_teacher
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@dataclass
class Reference:
    name: str
    trainer: Trainer
    inputs: Path
    weights: dict[str, str]  # the uninterrupted run's tensors (weight_digests)


@pytest.fixture(scope="module", params=list(TRAINERS))
def reference(request, tmp_path_factory) -> Reference:
    trainer = TRAINERS[request.param]
    inputs = request.getfixturevalue(trainer.inputs)
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    with single_thread():
        assert main(trainer.command(inputs, out)) == 0
    assert not (out / trainer.checkpoint).exists()
    return Reference(request.param, trainer, inputs, weight_digests(out))


def weight_digests(model_dir: Path) -> dict[str, str]:
    """`file:tensor` -> sha256 of its dtype, shape and bytes, for every safetensors file in the directory
    (not of the files: their metadata is a hash map, serialised in a different order by each process)."""
    from safetensors.torch import load_file

    digests = {}
    for file in sorted(model_dir.rglob("*.safetensors")):
        for name, t in load_file(file).items():
            data = t.contiguous().view(torch.uint8).numpy().tobytes()
            digests[f"{file.relative_to(model_dir)}:{name}"] = hashlib.sha256(
                f"{t.dtype} {tuple(t.shape)} ".encode() + data).hexdigest()
    assert digests, f"no weights in {model_dir}"
    return digests


def run_killed(ref: Reference, out: Path, n: int, when: float) -> None:
    """Run the command in a new process that SIGKILLs itself at the Nth checkpoint (see WRAPPER)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = out.with_name("killed.log")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", WRAPPER, ref.trainer.checkpoint, str(n), str(when),
                               *ref.trainer.command(ref.inputs, out)], env=env, stdout=f, stderr=f, timeout=300)
    assert proc.returncode == -signal.SIGKILL, \
        f"{ref.name} exited with {proc.returncode} instead of being killed:\n{log.read_text()[-3000:]}"
    assert (out / ref.trainer.checkpoint).is_file()  # the Nth (when < 0: the N-1th) checkpoint


def resume(ref: Reference, out: Path) -> int:
    with single_thread():
        return main([*ref.trainer.command(ref.inputs, out), "--resume"])


def test_killed_at_a_random_point_resumes_bit_identical(reference, tmp_path):
    rng = random.Random(f"{reference.name} random point")  # reproducible
    n = rng.randint(2, reference.trainer.checkpoints - 2)  # an interval to measure, and at least one after
    out = tmp_path / "out"
    run_killed(reference, out, n, when=rng.random())
    assert resume(reference, out) == 0
    assert weight_digests(out) == reference.weights


def test_killed_while_writing_a_checkpoint_resumes_bit_identical(reference, tmp_path):
    n = random.Random(f"{reference.name} checkpoint write").randint(2, reference.trainer.checkpoints)
    out = tmp_path / "out"
    run_killed(reference, out, n, when=-1)
    assert (out / (reference.trainer.checkpoint + ".tmp")).stat().st_size > 0  # the half-written one
    assert resume(reference, out) == 0
    assert weight_digests(out) == reference.weights


def test_a_truncated_checkpoint_is_refused_in_one_line(reference, tmp_path, capsys):
    out = tmp_path / "out"
    with single_thread():
        assert main([*reference.trainer.command(reference.inputs, out), "--stop-at", "2"]) == 0
    checkpoint = out / reference.trainer.checkpoint
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    capsys.readouterr()
    assert resume(reference, out) == 2
    err = capsys.readouterr().err  # libraries' progress bars may come first: the error is the last line
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"leanserve {reference.name}: error: {checkpoint} is truncated or corrupt")
