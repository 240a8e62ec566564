"""Tiny models on a shared 2-core machine: one thread is several times faster than two contended
ones (OpenMP spinning)."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def single_thread():
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
