"""Worker processes that end with the process that started them.

A pool's spawned workers outlive a parent that is killed rather than interrupted: ``kill PID``, a
batch scheduler's SIGTERM, the kernel's out-of-memory kill. Ctrl-C reaches the whole process group,
but those do not, and an orphaned training worker goes on holding cores and memory for as long as its
fit takes. On Linux a worker can ask the kernel for a signal when its parent dies (PR_SET_PDEATHSIG);
elsewhere nothing changes.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have this process receive SIGTERM when ``parent_pid`` (the process that started it) dies.

    For a pool's ``initializer`` with ``initargs=(os.getpid(),)``: a parent that died before this
    ran is caught by comparing the parent pid.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)
