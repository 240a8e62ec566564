"""The engines' graceful-shutdown wait, shared by the LLM engine client and both image engines."""
from __future__ import annotations

import asyncio


async def drain(idle: asyncio.Event, busy: bool, timeout: float | None) -> None:
    """Wait until `idle` is set, for at most `timeout` seconds (None: as long as it takes, 0: not at
    all); `busy` false returns at once. What is still in flight afterwards is the caller's to abort."""
    if not busy or timeout == 0:
        return
    try:
        await asyncio.wait_for(idle.wait(), timeout)
    except TimeoutError:
        pass
