"""The engine core's process (vLLM V1's EngineCoreProc): a busy loop that takes adds and aborts
from the API process, steps the core, and sends back one batched message per step.

With tensor_parallel_size N > 1 this process is rank 0: its ModelRunner starts and drives the
other ranks (tp_workers.py), and a worker's death ends this loop like a failed step does.

Its start (signals, logging, startup errors) is child_process.py's: the API process stops it with a
SHUTDOWN message, and when the API process dies its end of the pipe closes, which ends this loop too.
"""
from __future__ import annotations

import logging
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

from leanserve.server.child_process import build_in_child
from leanserve.server.engine import wire
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.outputs import CoreOutput

if TYPE_CHECKING:
    from leanserve.server.engine.core import EngineCore

logger = logging.getLogger(__name__)


def run_engine_core(config: EngineConfig, conn: Connection, log_level: int, log_format: str) -> None:
    """The process target (spawned: CUDA does not survive a fork). The core (torch, the model code)
    is imported here, in the child: the API process that names this target never loads torch."""
    from leanserve.server.engine.core import EngineCore

    if (core := build_in_child(conn, log_level, log_format, lambda: EngineCore(config), "engine core")) is None:
        return
    conn.send_bytes(wire.encode((wire.READY, {"max_model_len": core.max_model_len, "vocab_size": core.vocab_size,
                                              "eos_token_ids": core.eos_token_ids,
                                              "stats": wire.to_wire(core.stats())})))
    try:
        _busy_loop(core, conn)
    except EOFError:  # the API process is gone
        pass
    except BaseException as e:  # noqa: BLE001 - anything that escapes a step kills the core
        logger.exception("engine core died")
        conn.send_bytes(wire.encode((wire.DEAD, f"{type(e).__name__}: {e}")))
        raise SystemExit(1) from None
    finally:
        core.close()


def _busy_loop(core: EngineCore, conn: Connection) -> None:
    adds_received = 0
    # tensor parallel: a worker's exit wakes the loop even while idle, so /health stops answering
    # 200 at once, not at the next request
    workers = core.worker_connections()

    def poll(timeout: float | None) -> bool:
        ready = wait([conn, *workers], timeout)
        if len(ready) > (conn in ready):
            core.check_workers()
        return conn in ready

    while True:
        # block while idle; between steps only take what has already arrived
        timeout = 0 if core.has_unfinished() else None
        outputs: list[CoreOutput] = []
        received = False
        while poll(timeout):
            message = wire.decode(conn.recv_bytes())
            kind = message[0]
            if kind == wire.ADD:
                _, request_id, prompt, params, arrival = message
                # the API process validated it and enforced the queue bound
                core.add_request(request_id, prompt, wire.params_from_wire(params), arrival,
                                 check_queue=False, validated=True)
                adds_received += 1
            elif kind == wire.ABORT:
                outputs += filter(None, map(core.abort, message[1]))
            elif kind == wire.SHUTDOWN:
                return
            received, timeout = True, 0
        if core.has_unfinished():
            outputs += core.step()
        if outputs or received:
            conn.send_bytes(wire.encode((wire.STEP, [wire.output_to_wire(o) for o in outputs],
                                         wire.to_wire(core.stats()), adds_received)))
