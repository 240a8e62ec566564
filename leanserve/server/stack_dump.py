"""`kill -USR1 PID` writes every thread's Python stack to the process's stderr (the server log) and
the process goes on: where a stuck server waits, without a debugger. Each of the server's processes
(the API process, the engine core, tensor-parallel workers) registers it for itself; faulthandler's
handler is C-level, so it answers even while the interpreter is blocked in a call."""
from __future__ import annotations

import faulthandler
import signal


def dump_stacks_on_sigusr1() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
