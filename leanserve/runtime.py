"""Where code runs: the device and dtype named by a `--device` / `--dtype` option, and the
torch.distributed process group a `torchrun` launch sets up. The one place every layer (server
engines, trainers, evals, benchmarks) resolves these, so `auto` means the same everywhere."""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from leanserve.errors import UserError

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` = CUDA when visible, else CPU. `local_rank` picks the GPU of a torchrun rank."""
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
        if name == "cuda":
            raise UserError("--device cuda but no CUDA device is visible")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}: {e}") from e


def resolve_dtype(name: str, device: torch.device, cuda_default: torch.dtype = torch.bfloat16,
                  checkpoint: torch.dtype | None = None) -> torch.dtype:
    """`auto` = `cuda_default` on CUDA (bfloat16 for LLMs; image pipelines ask for float16, what
    diffusers checkpoints ship in). On CPU, `auto` = bfloat16 for a `checkpoint` stored in bfloat16
    on a CPU that computes it natively (cpu_computes_bf16), else float32: without native bf16 dot
    products half types are emulated, slower than float32, or unsupported."""
    if name == "auto":
        if device.type == "cuda":
            return cuda_default
        if device.type == "cpu" and checkpoint == torch.bfloat16 and cpu_computes_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unsupported dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), which oneDNN's bf16
    matmuls use: 2.7-5.3x float32's speed at 64 rows of the tiny chat model's shapes on an AMD EPYC with
    AVX512-BF16, slower at one row (benchmarks/bench_cpu_matmul.py); without them bf16 is emulated."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default a block above the mmap threshold (128 KiB, adapting up to 32 MiB) is mmapped on
    allocation and unmapped on free, and the heap's free top is trimmed. A CPU engine step allocates
    the same large activations (gathered K/V, scores, logits) every step, so each one page-faults
    afresh (PyTorch's CPU guide and vLLM's CPU backend preload tcmalloc or jemalloc for the same
    reason; benchmarks/bench_cpu_malloc.py measures the engine both ways). The cost: the process's
    resident memory stays at its peak.
    Process-wide; returns whether it took (False off glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # 1 GiB: larger than any per-step tensor; older glibc refuses more than 32 MiB (HEAP_MAX_SIZE / 2)
    mmap_set = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap_set and mallopt(M_TRIM_THRESHOLD, 1 << 30))


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(), resolve_device(device_name, local_rank=0)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size()), device


@contextmanager
def distributed(device_name: str):
    """(DistInfo, device) for a run: init_distributed, and the process group torn down at the end."""
    try:
        yield init_distributed(device_name)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], dist_info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64, so counts and loss sums stay exact)."""
    if dist_info.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
