"""The API process's side of the engine core process: spawn it (child_process.py carries the pipe's
messages both ways) and hand its messages to the event loop."""
from __future__ import annotations

from leanserve.server.child_process import ChildProcessClient
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.core_proc import run_engine_core


class EngineCoreClient(ChildProcessClient):
    def __init__(self, config: EngineConfig):
        """Start the core process and wait until it has loaded the model."""
        super().__init__(run_engine_core, (config,), "leanserve-engine-core", "the engine core")
