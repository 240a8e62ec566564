"""Ranks 1..N-1 of a tensor-parallel engine, as seen from rank 0 (the engine core process, which
runs the scheduler, its own model shard and the sampler): it starts them, sends each the same
ModelRunner operations it runs itself, and notices when one dies.

Each worker (tp_worker.py) is a `python -m` subprocess (the engine core is a daemon process, which
multiprocessing does not let have children) holding one end of a socket pair. Over it, msgpack:
rank 0 -> worker: (CONFIG, EngineConfig fields, rank, store port, log level) once, then
                  (PROFILE, max_model_len) | (ALLOCATE, num_blocks) | (STEP, step inputs) | (SHUTDOWN,);
worker -> rank 0: (READY,) | (FAILED, error class name or None, message), once, after loading.
Every other byte between the ranks goes through torch.distributed: the process group forms through
a TCPStore that rank 0 serves on a free port (no fixed port: several servers may share a host), and
only once every rank has loaded its shards, so a worker's load error comes back here as itself.

Once a worker is up, its socket turns readable only when it exits: the engine core's loop waits on
the sockets next to its own pipe (`connections`), and a watchdog ends the core if a worker dies
while rank 0 sits in a collective that will never complete (NCCL would wait for its peer forever).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait

import msgpack
import torch.distributed as dist

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.errors import startup_error_from_wire

logger = logging.getLogger(__name__)

CONFIG, PROFILE, ALLOCATE, STEP, SHUTDOWN = range(5)
READY, FAILED = range(2)
EXIT_TIMEOUT_S = 30
# how long a dead worker's peers get to fail their collective and report it themselves (gloo does
# at once) before the watchdog ends the engine core process
WATCHDOG_GRACE_S = 10.0


def encode(message) -> bytes:
    return msgpack.packb(message)


def decode(data: bytes):
    return msgpack.unpackb(data, strict_map_key=False)


class TPWorkers:
    def __init__(self, config: EngineConfig):
        """Start ranks 1..N-1; they load their shards while rank 0 loads its own."""
        size = config.tensor_parallel_size
        self.store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)
        self.procs: list[subprocess.Popen] = []
        self.connections: list[Connection] = []
        self._closing = False
        fields = dataclasses.asdict(config)
        level = logging.getLogger().getEffectiveLevel()
        try:
            for rank in range(1, size):
                ours, theirs = socket.socketpair()
                with theirs:
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "leanserve.server.engine.tp_worker", str(theirs.fileno())],
                        pass_fds=[theirs.fileno()]))
                conn = Connection(ours.detach())
                self.connections.append(conn)
                conn.send_bytes(encode((CONFIG, fields, rank, self.store.port, level)))
        except BaseException:
            self.close(timeout=0)
            raise

    def wait_ready(self) -> None:
        """Wait until every worker has loaded its shards; raise the first startup error (as its own
        class when it is bad input, as RuntimeError otherwise), or that a worker exited. Then watch them."""
        for rank, (conn, proc) in enumerate(zip(self.connections, self.procs), 1):
            try:
                message = decode(conn.recv_bytes())
            except EOFError:
                raise RuntimeError(f"tensor-parallel rank {rank} exited during startup "
                                   f"(exit code {proc.wait()})") from None
            if message[0] == FAILED:
                raise startup_error_from_wire(message[1], f"tensor-parallel rank {rank}: {message[2]}",
                                              f"tensor-parallel rank {rank}")
        threading.Thread(target=self._watchdog, name="leanserve-tp-watchdog", daemon=True).start()

    def send(self, message) -> None:
        """The same message to every worker (each runs what rank 0 runs next)."""
        data = encode(message)
        for conn in self.connections:
            conn.send_bytes(data)

    def check_alive(self, grace: float = 0.0) -> None:
        """RuntimeError naming a worker that has exited, waiting up to `grace` seconds for one that is
        exiting (rank 0 may see a peer's socket close before the peer is gone)."""
        deadline = time.monotonic() + grace
        while True:
            for rank, proc in enumerate(self.procs, 1):
                if proc.poll() is not None:
                    raise RuntimeError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited unexpectedly "
                                       f"(exit code {proc.returncode})")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _watchdog(self) -> None:
        try:
            wait(self.connections)  # readable: a worker exited (it sends nothing once ready)
        except (OSError, ValueError):  # closed under us by close()
            return
        if self._closing:
            return
        time.sleep(WATCHDOG_GRACE_S)
        if not self._closing:
            logger.error("a tensor-parallel worker exited and rank 0 did not notice in %.0f s (stuck in a "
                         "collective): ending the engine core", WATCHDOG_GRACE_S)
            os._exit(1)

    def close(self, timeout: float = EXIT_TIMEOUT_S) -> None:
        """Ask every worker to exit, wait up to `timeout` seconds, then kill the rest."""
        self._closing = True
        for conn in self.connections:
            try:
                conn.send_bytes(encode((SHUTDOWN,)))
            except OSError:
                pass  # already gone
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                if timeout:
                    logger.warning("tensor-parallel worker %d did not exit in %s s: killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        for conn in self.connections:
            conn.close()
