"""Loading a model directory into the running server and unloading one (POST and DELETE /v1/models).

Loading builds the engine off the event loop (weights are read and placed, safetensors only, as at
startup), starts it, and only then makes the name visible, so no request sees a half-loaded model.
Unloading hides the name first (new requests get 404), lets the engine finish its in-flight requests,
then stops it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from leanserve.errors import UserError
from leanserve.server.errors import APIError


class ModelPublisher:
    def __init__(self, state, make_engine: Callable[[str, str], object] | None):
        self.state = state
        self.make_engine = make_engine  # (model directory, served name) -> an unstarted engine
        self._loading: set[str] = set()

    async def load(self, path: Path, name: str) -> None:
        if self.make_engine is None:
            raise APIError(501, "This server cannot load models while it runs")
        if name in self.state.engines or name in self._loading:
            raise APIError(409, f"A model named {name!r} is already served", "name")
        self._loading.add(name)
        try:
            try:
                engine = await asyncio.to_thread(self.make_engine, str(path), name)
            except (UserError, OSError, ValueError) as e:
                raise APIError(400, f"Cannot load {path.name}: {e}", "path") from None
            try:
                await engine.start()
            except BaseException:
                await engine.shutdown(0)  # its process, if it has one, is started
                raise
        finally:
            self._loading.discard(name)
        self.state.engines[name] = engine
        self.state.kinds[name] = engine.kind
        self.state.metrics.add_engine(name, engine)

    async def unload(self, name: str) -> None:
        engine = self.state.engines.get(name)
        if engine is None:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        del self.state.engines[name], self.state.kinds[name]
        self.state.metrics.remove_engine(name)
        await engine.shutdown(None)  # None: as long as the in-flight requests take
