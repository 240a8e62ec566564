"""Cancel a non-streaming handler when its client disconnects (vLLM's with_cancellation)."""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine

from fastapi import Request
from fastapi.responses import Response


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def with_cancellation(request: Request, handler: Coroutine) -> Response:
    """Race a non-streaming handler against the client disconnecting (vLLM's with_cancellation):
    on disconnect the handler is cancelled, which closes its engine streams and aborts them."""
    task = asyncio.ensure_future(handler)
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return task.result()
