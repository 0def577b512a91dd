"""How many CPUs this process may really use, and torch's threads set from that.

Researchers run avemo on shared nodes, in containers and as several shards at once. torch
sizes its thread pool from the machine's cores, not from the process's affinity mask or
its cgroup CPU quota, and OpenMP threads that spin while waiting burn the cores another
process needs: measured on a 2-core machine with another CPU-bound job running, the face
encoder ran 2.2x faster with waiting threads that sleep (OMP_WAIT_POLICY=PASSIVE) than with
spinning ones (``benchmarks/bench_encoder.py``). ``avemo/__init__.py`` asks for passive
waiting before torch loads OpenMP, unless the user has chosen otherwise.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        # a quota of 1.5 CPUs runs 2 threads throttled half the time: round down
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors, or None if unlimited.

    cgroup v2: ``cpu.max`` holds "QUOTA PERIOD" or "max PERIOD"; v1: ``cpu.cfs_quota_us`` (-1 when
    unlimited) over ``cpu.cfs_period_us``.
    """
    return _tightest("cpu", _v2_quota, _v1_quota, ("cpu,cpuacct", "cpu"), root, proc_cgroup)


def cgroup_memory_headroom(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's cgroup and its ancestors may still take before their memory limit
    (the least over the path), or None if none is limited.

    cgroup v2: ``memory.max`` ("max" when unlimited) minus ``memory.current``; v1:
    ``memory.limit_in_bytes`` (a huge number when unlimited) minus ``memory.usage_in_bytes``.
    """
    return _tightest("memory", _v2_headroom, _v1_headroom, ("memory",), root, proc_cgroup)


def _tightest(controller: str, read_v2, read_v1, v1_names: tuple[str, ...], root: Path, proc_cgroup: Path):
    """The least value ``read`` gives over this process's cgroup and its ancestors (None: no limit)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":                                       # v2 unified hierarchy
            base, read = root, read_v2
        elif controller in controllers.split(","):
            base = next((root / name for name in (controllers, *v1_names) if (root / name).is_dir()), None)
            if base is None:
                continue
            read = read_v1
        else:
            continue
        path = base / rel.lstrip("/")
        while True:
            q = read(path)
            if q is not None:
                best = q if best is None else min(best, q)
            if path == base or base not in path.parents:
                break
            path = path.parent
    return best


def _v2_headroom(folder: Path) -> int | None:
    try:
        limit = (folder / "memory.max").read_text().strip()
        return None if limit == "max" else max(0, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def _v1_headroom(folder: Path) -> int | None:
    try:
        limit = int((folder / "memory.limit_in_bytes").read_text())
        if limit >= 1 << 60:                # v1 writes "unlimited" as a page-rounded maximum
            return None
        return max(0, limit - int((folder / "memory.usage_in_bytes").read_text()))
    except (OSError, ValueError):
        return None


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes new processes can have without swapping: the kernel's MemAvailable, capped by the
    cgroup's memory headroom; None where neither can be read."""
    free = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    cap = cgroup_memory_headroom()
    return cap if free is None else free if cap is None else min(free, cap)


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


# Extraction workers when none are asked for: each is its own process with torch, the detector
# and the encoder (0.8 GB resident at most on the bundled clips, more while a long recording's
# waveform is held), so they are counted at WORKER_MEMORY each against the memory available,
# and even a large node gets at most MAX_AUTO_WORKERS.
MAX_AUTO_WORKERS = 8
WORKER_MEMORY = 1 << 30


def default_workers() -> int:
    """Extraction processes when not asked for: one per usable CPU, each with one torch thread,
    as many as the available memory holds at ``WORKER_MEMORY`` each, at most ``MAX_AUTO_WORKERS``.

    A clip's work is many small steps (decoding, MTCNN's small networks on a few crops, one
    encoder batch) that intra-op threads barely speed up, while processes keep every core
    busy: on 2 cores, 2 workers of 1 thread extracted 36 clips in 5.5 s against 7.1 s for one
    worker of 2 threads. A laptop with many cores and little memory must not swap for it.
    """
    n = min(usable_cpus(), MAX_AUTO_WORKERS)
    memory = available_memory()
    if memory is not None:
        n = min(n, memory // WORKER_MEMORY)
    return max(1, n)


def threads_for(workers: int = 1, requested: int | None = None) -> int:
    """torch threads per process: ``requested`` (a --threads flag), else OMP_NUM_THREADS if the user
    set it, else the usable CPUs shared among ``workers`` processes (one each when they outnumber them)."""
    if requested:
        return max(1, int(requested))
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cpus() // max(1, workers))


def set_torch_threads(workers: int = 1, requested: int | None = None) -> int:
    """Size torch's intra-op pool from :func:`threads_for`; returns the thread count."""
    import torch
    n = threads_for(workers, requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# Top-of-heap memory kept for the next step rather than handed back; measured: a 256 MB and a
# 100 GB threshold trained equally fast, so keeping more buys nothing.
TRIM_THRESHOLD = 512 * 2 ** 20


def _glibc():
    """The C library when it is glibc (musl and macOS have other allocators), else None."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
        return libc
    except (OSError, AttributeError):
        return None


def _user_set_malloc() -> bool:
    return "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ)


def reuse_freed_memory() -> bool:
    """Let glibc's malloc serve torch's large CPU tensors from its heap, and keep freed memory.

    By default glibc gives every block over 32 MB fresh pages of its own (mmap) and returns them
    on free, so each training step's activations (78 MB for one 32-channel map of a batch of
    32 three-second spectrograms) are page-faulted and zeroed by the kernel anew: measured on
    2 cores, that kernel time was about 40 % of avemo-train's CPU time, and heap-served blocks
    trained the default model 1.5x faster (``benchmarks/bench_train.py``). Blocks then stay
    with the process for the next step; :func:`release_free_memory` hands back what a phase
    left free. Only for processes that repeat large allocations: the training commands. A
    user's own MALLOC_* or GLIBC_TUNABLES settings win. Returns whether the setting was made.
    """
    libc = None if _user_set_malloc() else _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> None:
    """Hand the pages of free heap blocks back to the kernel (glibc's malloc_trim), between phases
    whose blocks differ in size (training steps, then evaluation at another batch size), so that
    what one phase left free does not add to the next one's peak. A no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic in hardware (AVX512-BF16 or AMX), where torch's
    bf16 convolutions and matrix products beat float32; elsewhere bf16 is emulated and slower."""
    import torch
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:              # a torch without these probes: assume not
        return False
