"""runtime: `--dtype auto` per device and checkpoint; keep_freed_host_memory (freed large blocks stay
with the process, glibc)."""
import json
import platform
import subprocess
import sys

import pytest
import torch

from leanserve import runtime
from leanserve.models.loader import checkpoint_dtype

# allocate and free a 64 MiB block, then print how much of it the process still holds (MiB)
PROBE = """
import os, sys
from leanserve.runtime import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = rss_mib()
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)  # touch every page
libc.free(block)
print(rss_mib() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_kept_only_when_asked():
    def held(mode: str) -> float:
        return float(subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True,
                                    text=True).stdout)
    assert held("default") < 8  # unmapped on free: the next step would page-fault it again
    assert held("keep") > 56


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_cpu_keeps_bf16_checkpoints_only_where_the_cpu_computes_bf16(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_computes_bf16", lambda: native)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native else torch.float32
    assert runtime.resolve_dtype("auto", cpu, checkpoint=torch.bfloat16) == expected
    # float16 and float32 checkpoints, and callers that name none (image pipelines), stay float32
    for checkpoint in (torch.float16, torch.float32, None):
        assert runtime.resolve_dtype("auto", cpu, checkpoint=checkpoint) == torch.float32
    assert runtime.resolve_dtype("float32", cpu, checkpoint=torch.bfloat16) == torch.float32
    assert runtime.resolve_dtype("auto", torch.device("cuda"), checkpoint=torch.float32) == torch.bfloat16


@pytest.mark.parametrize("config, expected", [({"dtype": "bfloat16"}, torch.bfloat16),
                                              ({"torch_dtype": "float16"}, torch.float16),  # transformers 4
                                              ({}, None), ({"dtype": "bogus"}, None), ({"dtype": "Tensor"}, None)])
def test_checkpoint_dtype_reads_config_json(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(str(tmp_path)) == expected
    assert checkpoint_dtype(str(tmp_path / "missing")) is None
