"""runtime.keep_freed_host_memory: freed large blocks stay with the process (glibc)."""
import platform
import subprocess
import sys

import pytest

# allocate and free a 64 MiB block, then print how much of it the process still holds (MiB)
PROBE = """
import os, sys
from leanserve.runtime import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = rss_mib()
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)  # touch every page
libc.free(block)
print(rss_mib() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_kept_only_when_asked():
    def held(mode: str) -> float:
        return float(subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True,
                                    text=True).stdout)
    assert held("default") < 8  # unmapped on free: the next step would page-fault it again
    assert held("keep") > 56
