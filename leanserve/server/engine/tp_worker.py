"""A tensor-parallel worker process (rank 1..N-1): `python -m leanserve.server.engine.tp_worker FD`,
started by rank 0's TPWorkers (tp_workers.py, which also describes the messages on socket FD).

It loads its shards into a ModelRunner, says READY, joins the process group, then runs every
operation rank 0 sends, in order: the same forwards, so their collectives pair up. It never
samples or schedules. It exits when rank 0 says SHUTDOWN, when rank 0's end of the socket closes,
when a collective fails (a peer died), or, if stuck in a collective whose peer is gone, when
it finds itself orphaned."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

import torch.distributed as dist

from leanserve.models.tensor_parallel import leave_process_group
from leanserve.server.engine import tp_workers as tp
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.errors import startup_error_to_wire
from leanserve.server.engine.model_runner import ModelRunner, step_from_wire
from leanserve.server.settings import LOG_FORMAT
from leanserve.server.stack_dump import dump_stacks_on_sigusr1

logger = logging.getLogger(__name__)


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)  # rank 0 is gone: whatever this process waits on will never come


def main(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the engine core: the API process drains first
    dump_stacks_on_sigusr1()
    conn = Connection(fd)
    _, fields, rank, port, log_level = tp.decode(conn.recv_bytes())
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    config = EngineConfig(**fields)
    try:
        store = dist.TCPStore("127.0.0.1", port, config.tensor_parallel_size, is_master=False)
        runner = ModelRunner(config, rank=rank, store=store,
                             on_loaded=lambda: conn.send_bytes(tp.encode((tp.READY,))))
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which raises it
        kind, text = startup_error_to_wire(e)
        if kind is None:
            logger.exception("tensor-parallel rank %d failed to start", rank)
        try:
            conn.send_bytes(tp.encode((tp.FAILED, kind, text)))
        except OSError:
            pass  # rank 0 is gone
        return 1
    try:
        while True:
            message = tp.decode(conn.recv_bytes())
            op = message[0]
            if op == tp.PROFILE:
                runner.profile_num_blocks(message[1])
            elif op == tp.ALLOCATE:
                runner.allocate_kv_cache(message[1])
            elif op == tp.STEP:
                runner.run_step(step_from_wire(message[1]))
            elif op == tp.SHUTDOWN:
                break
            else:
                raise ValueError(f"unknown message {op!r} from rank 0")
    except EOFError:
        return 1  # rank 0 exited without a SHUTDOWN: the engine is gone
    except Exception:
        logger.exception("tensor-parallel rank %d died", rank)
        return 1
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
