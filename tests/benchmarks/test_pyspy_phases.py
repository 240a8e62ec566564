"""benchmarks/pyspy_phases.py: each py-spy sample lands in the phase its whole stack says, not its leaf."""
from __future__ import annotations

import sys

from bench_smoke import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from pyspy_phases import phases, split_stack  # noqa: E402

ENGINE = "thread (1): leanserve-image-engine;Thread.run (threading.py:1010);AsyncImageEngine._run (leanserve/x.py:1)"
GENERATE = ENGINE + ";AsyncImageEngine._run_batch (leanserve/x.py:2);ImageModel.generate (leanserve/y.py:3)"
RAW = [
    f"{ENGINE};AsyncImageEngine._wait_for_returning_clients (leanserve/x.py:9);Condition.wait (threading.py:359) 2",
    f"{ENGINE};Condition.wait (threading.py:355) 1",
    f"{GENERATE};Pipe.encode_prompt (leanserve/p.py:4);TokenizersBackend._encode_plus (t.py:1) 1",
    f"{GENERATE};Pipe.encode_prompt (leanserve/p.py:4);Linear.forward (linear.py:134) 3",
    # a GPU sync inside the loop has a Condition-free leaf: it is the loop's time
    f"{GENERATE};noise_coefs (leanserve/models/sid_pipeline.py:43) 3",
    "thread (2): MainThread;<module> (m.py:1);run (u.py:1);Runner.run (asyncio/runners.py:118) 3",
    "thread (2): MainThread;<module> (m.py:1);run (u.py:1);H11Protocol.handle_events (h11_impl.py:1) 1",
    "thread (3): leanserve-offload_0;Thread.run (threading.py:1010);_worker (concurrent/futures/thread.py:89) 1",
    "thread (3): leanserve-offload_0;_worker (concurrent/futures/thread.py:92);encode_images (leanserve/r.py:1);"
    "_encode_tile (PIL/ImageFile.py:693) 1",
    "thread (4): leanserve-engine-core-receiver;Connection._recv (multiprocessing/connection.py:395) 5",
    "thread (5): leanserve-image-engine;AsyncImageEngine._run (leanserve/x.py:1);Condition.wait (threading.py:355) 7",
]


def test_phases_by_whole_stack():
    out = phases(RAW)
    assert set(out) == {"thread (1): leanserve-image-engine", "thread (2): MainThread",
                        "thread (3): leanserve-offload_0"}  # thread 5 only ever waited
    engine = out["thread (1): leanserve-image-engine"]
    assert engine["samples"] == 10
    assert engine["phases"] == {"wait: clients in flight": 0.2, "wait: no request": 0.1, "prompts: tokenizer": 0.1,
                                "prompts: text encoder": 0.3, "denoising loop": 0.3}
    assert out["thread (2): MainThread"]["phases"] == {"in the loop": 0.75, "in Python": 0.25}
    assert out["thread (3): leanserve-offload_0"]["phases"] == {"idle": 0.5, "busy": 0.5}


def test_threads_of_child_processes_are_named_by_their_process():
    """py-spy --subprocesses: the server's threads keep their names, an engine process's threads get its pid."""
    api = 'process 10:"python -m leanserve serve"'
    child = 'process 11:"python -c from multiprocessing.spawn import spawn_main; spawn_main(pipe_handle=8)"'
    assert split_stack(f"{api};thread (10): MainThread;Runner.run (r.py:1)") == (
        "thread (10): MainThread", ["Runner.run (r.py:1)"])
    assert split_stack(f"{api};{child};thread (12): leanserve-image-engine;Thread.run (t.py:1)") == (
        "child 11: thread (12): leanserve-image-engine", ["Thread.run (t.py:1)"])
    assert split_stack("thread (1): MainThread;f (m.py:1)") == ("thread (1): MainThread", ["f (m.py:1)"])
    out = phases([f"{api};{child};{line}" for line in RAW])
    assert out["child 11: thread (1): leanserve-image-engine"] == phases(RAW)["thread (1): leanserve-image-engine"]
