"""The request path's CPU work (tokenizing, chat templating, detokenizing, image encoding, large
JSON bodies) runs here, off the event loop: one 2 MB body tokenizes for over a second, and on the
loop every other stream and /health would stall that long.

A small bounded pool, not asyncio.to_thread's shared default executor: a burst of large bodies
queues here instead of taking every default worker. HF fast tokenizers and zlib/libjpeg release
the GIL while they work, so the loop keeps running beside them. Every tokenizer call made through
this pool uses the tokenizer's own settings (no truncation or padding arguments), so none
reconfigures the shared Rust tokenizer while another thread encodes with it.
"""
from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# A large body tokenizes beside small ones; more would only contend for the GIL. On a machine of
# two cores or fewer, one: the pool must never take every core from the event loop's streams.
NUM_WORKERS = 2 if (os.cpu_count() or 1) > 2 else 1
_pool = ThreadPoolExecutor(max_workers=NUM_WORKERS, thread_name_prefix="leanserve-offload")


async def off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` in the pool; exceptions propagate to the awaiting request."""
    return await asyncio.get_running_loop().run_in_executor(_pool, functools.partial(fn, *args, **kwargs))
