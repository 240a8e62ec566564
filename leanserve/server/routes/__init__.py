"""Route modules by API: openai (chat, completions, models, tokenize), images (generations),
ops (health, metrics, version, load), jobs (the jobs API, publishing models). Each exposes an APIRouter named `router`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from leanserve.server.app import ServerState


def server_state(request: Request) -> ServerState:
    return request.app.state.server
