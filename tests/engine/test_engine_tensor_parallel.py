"""Starting a tensor-parallel engine on CPU (gloo): a size that does not split the model fails at once
with a clear error and kills the workers it started; a worker's own load error comes back to rank 0
as itself, naming the rank. Serving at TP=2 is tested through the server
(tests/server/test_server_tensor_parallel.py)."""
from __future__ import annotations

import os
import subprocess

import pytest

from leanserve.errors import UserError
from leanserve.models.tensor_parallel import tp
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.core import EngineCore

# run at the start of every Python process that has it on its path: in a tensor-parallel worker it
# makes loading fail as an out-of-memory GPU would
_FAILING_WORKER = """
import sys
if "leanserve.server.engine.tp_worker" in sys.orig_argv:
    from leanserve.errors import UserError
    from leanserve.models import loader

    def load_model(*args, **kwargs):
        raise UserError("simulated: no room for the shards")

    loader.load_model = load_model
"""


@pytest.fixture
def started(monkeypatch) -> list[subprocess.Popen]:
    """The worker processes started from now on."""
    procs = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        procs.append(real_popen(*args, **kwargs))
        return procs[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    return procs


def test_a_size_that_does_not_split_the_model_fails_fast_and_leaves_no_worker(tiny_llm_dir, started):
    with pytest.raises(UserError, match="--tensor-parallel-size 3 must divide the model's number of KV heads"):
        EngineCore(EngineConfig(model=str(tiny_llm_dir), device="cpu", tensor_parallel_size=3))  # 2 KV heads
    # rank 0's own load failed while ranks 1 and 2 were starting: they are killed, not awaited
    assert len(started) == 2 and all(p.poll() is not None for p in started)
    assert tp().size == 1  # the process is one rank again


def test_a_worker_load_error_is_raised_by_rank_0(tiny_llm_dir, started, tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(_FAILING_WORKER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    with pytest.raises(UserError, match="tensor-parallel rank 1: simulated: no room for the shards"):
        EngineCore(EngineConfig(model=str(tiny_llm_dir), device="cpu", tensor_parallel_size=2))
    assert len(started) == 1 and started[0].poll() is not None
    assert tp().size == 1
