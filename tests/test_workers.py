"""avemo.workers: a pool's workers end when the process that started them is killed."""
import os
import signal
import subprocess
import sys
import time

import pytest

CHILD = """
import multiprocessing as mp, os, time
from concurrent.futures import ProcessPoolExecutor
from avemo.workers import die_with_parent
if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=die_with_parent,
                               initargs=(os.getpid(),))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 120)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by init) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_ends_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.DEVNULL,   # its resource tracker complains when it dies
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)       # no handler runs, no executor shutdown: only the kernel knows
        parent.wait(10)
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        parent.kill()
        try:
            os.kill(worker, signal.SIGKILL)
        except (ProcessLookupError, NameError, UnboundLocalError):
            pass
