"""`train lm` under torchrun: 2 CPU processes (gloo) train, checkpoint, resume exactly and write the model."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_builders import train_texts, write_data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(data: Path, tok: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "leanserve.cli", "train", "lm", "--data", str(data),
           "--tokenizer", str(tok), "--out", str(out), "--preset", "tiny", "--batch-size", "8", "--seq-len", "64",
           "--pretrain-steps", "4", "--chat-steps", "2", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu",
           *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
def test_torchrun_two_ranks_train_resume_and_write(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from leanserve.data.tokenizer import train_tokenizer

    data = write_data(tmp_path / "data")
    train_tokenizer(train_texts(data), tmp_path / "tok", vocab_size=400, model_max_length=512)

    straight = torchrun(data, tmp_path / "tok", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = torchrun(data, tmp_path / "tok", tmp_path / "resumed", "--stop-at", "3")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    resumed = torchrun(data, tmp_path / "tok", tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # both ranks' data positions and RNG states came back: the resumed run is the straight one
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "straight" / "leanserve.json").read_text())
    assert info["settings"]["world_size"] == 2
    assert set(info["metrics"]["val_loss"]) == {"code", "docs", "tasks", "chat"}
    AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    assert not (tmp_path / "straight" / "checkpoint.pt").exists()
