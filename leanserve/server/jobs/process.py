"""Subprocesses that do not outlive the server, and ending a job's whole process group."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded before any fork


def die_with_server() -> None:
    """preexec_fn: on Linux the child gets SIGKILL when the server dies, even by SIGKILL, so a restarted
    server never finds an orphan still writing to a job it marked `interrupted`. Elsewhere a no-op."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False once no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
