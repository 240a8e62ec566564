"""Operational routes: health, Prometheus metrics, version, load. Never behind auth."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from leanserve import __version__
from leanserve.server.errors import error_response
from leanserve.server.openapi import error_responses
from leanserve.server.routes import server_state

router = APIRouter()


@router.get("/health", responses=error_responses(503))
async def health(request: Request) -> Response:
    state = server_state(request)
    if state.healthy():
        return JSONResponse({})
    if state.draining:
        reason = "Server is shutting down"
    elif not state.ready:
        reason = "Server is not ready"
    else:
        dead = [name for name, e in state.engines.items() if not e.stats().healthy]
        reason = f"Engine dead: {', '.join(dead)}"
    return error_response(503, reason)


@router.get("/metrics", response_class=PlainTextResponse)  # documented as text/plain
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/load")
async def load(request: Request) -> dict:
    return {"server_load": server_state(request).num_in_flight}
