"""Clips extracted in supervised worker processes: one bad file costs its own time limit, never the run.

A decoder can hang inside native code (no Python signal or thread can stop it) or crash
the process outright. So every clip is extracted in a child process that loads the face
detector and encoder once and then takes clips one at a time; the parent keeps a deadline
per clip, scaled by the clip's duration once the child has read its header. A child past
its deadline is killed and the clip recorded as failed with that reason; a child that
dies is recorded the same way; either is replaced and the run goes on.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import signal
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

from avemo.features import ExtractionSettings
from avemo.io import NoSpaceError
from avemo.video import MediaError, media_duration, open_media

# The default limit per clip: a fixed allowance (process start-up is not counted) plus
# seconds per second of media, generous for a CPU sampling every frame of a long file.
BASE_LIMIT_S = 300.0
LIMIT_PER_MEDIA_S = 4.0
STARTUP_LIMIT_S = 600.0          # loading the detector and encoder in a fresh worker


def clip_time_limit(duration: float | None, override: float | None = None) -> float:
    """Seconds a clip may take: ``override`` (``--clip-timeout``) or the duration-scaled default."""
    if override is not None:
        return float(override)
    return BASE_LIMIT_S + LIMIT_PER_MEDIA_S * float(duration or 0.0)


def probe_duration(path: str) -> float | None:
    """The header's duration in seconds, or None (unreadable files are the extractor's to explain)."""
    try:
        with open_media(path) as c:
            return media_duration(c)
    except (MediaError, OSError, ValueError):
        return None


class UnusableSettings(ValueError):
    """The workers cannot extract with the settings asked for (no such encoder, no CUDA device)."""


def _child(conn, *config) -> None:
    """A worker: imports, then (unless given at spawn) waits for its configuration
    (settings, device, threads, cache_root), loads the models, reports the settings it
    extracts with (the encoder's identity filled in) and its device, and takes clips."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the parent's to handle
    # imported here: the spawned child starts from a bare interpreter, and the parent never loads torch
    import torch

    from avemo.checkpoint import CheckpointError
    from avemo.extraction import ClipExtractor, default_device
    from extract.cache import Cache
    from extract.run import clip_row

    if not config:
        config = conn.recv()
    settings, device, threads, cache_root = config
    torch.set_num_threads(threads)
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        conn.send(("unusable", f"--device {device} was asked for but no CUDA device is available"))
        return
    device = device or default_device()
    try:
        ex = ClipExtractor(ExtractionSettings.from_dict(settings), device)
    except (CheckpointError, ValueError) as e:
        conn.send(("unusable", f"cannot use face encoder: {e}"))
        return
    digest = ex.settings.digest()
    cache = Cache(cache_root)
    conn.send(("ready", (ex.settings.to_dict(), device)))
    while True:
        item = conn.recv()
        if item is None:
            return
        conn.send(("started", probe_duration(item.path) if Path(item.path).is_file() else None))
        try:
            row = clip_row(item, ex, cache, digest)
        except NoSpaceError as e:
            conn.send(("nospace", str(e.path)))
            return
        conn.send(("done", row))


def prestart() -> tuple[multiprocessing.Process, object]:
    """A worker started before the run's settings are known, so that its start-up (importing torch
    and the extractor, over a second on a CPU) overlaps the command's own; hand it to
    ``WorkerPool(spare=...)``, which sends it the configuration, or to ``discard``."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child,), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def discard(spare: tuple[multiprocessing.Process, object] | None) -> None:
    """Stop a pre-started worker that was not used."""
    if spare is None:
        return
    proc, conn = spare
    if proc.is_alive():
        proc.kill()         # it has done nothing but import: nothing to lose, no reason to wait for it
    proc.join(5)
    conn.close()


@dataclasses.dataclass
class _Worker:
    proc: multiprocessing.Process
    conn: object
    ready: bool = False
    item: object = None
    deadline: float = 0.0
    duration: float | None = None    # the current clip's, once the child has read its header


class WorkerPool:
    """``n`` supervised extraction processes. ``start()`` starts them and returns the settings
    they extract with, once the first has loaded its models; ``run(items, finished)`` then
    calls ``finished(row)`` per clip."""

    def __init__(self, n: int, settings: ExtractionSettings, device: str | None, threads: int, cache,
                 timeout: float | None = None, spare: tuple[multiprocessing.Process, object] | None = None):
        self.n, self.args = n, (settings.to_dict(), device, threads, str(cache.root))
        self.spare = spare                                # a worker from ``prestart``, used first
        self.cache, self.timeout = cache, timeout
        self.identity: tuple[dict, str] | None = None     # (settings, device) the workers reported
        self.digest = ""
        self.ctx = multiprocessing.get_context("spawn")   # fork + torch/OpenMP threads can deadlock
        self.workers: list[_Worker] = []

    def start(self) -> tuple[ExtractionSettings, str]:
        """Start the workers; once the first is ready, the settings it extracts with (the face
        encoder's hash and feature size filled in: the cache's identity) and its device.
        Raises ``UnusableSettings`` when a worker cannot load what the settings name."""
        if not self.workers:
            self.workers = [self._start() for _ in range(self.n)]
        while self.identity is None:
            self._wait_once(None)
        settings = ExtractionSettings.from_dict(self.identity[0])
        self.digest = settings.digest()
        return settings, self.identity[1]

    def _start(self) -> _Worker:
        if self.spare is not None:
            (proc, parent), self.spare = self.spare, None
            parent.send(self.args)
            return _Worker(proc, parent, deadline=time.monotonic() + STARTUP_LIMIT_S)
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_child, args=(child, *self.args), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent, deadline=time.monotonic() + STARTUP_LIMIT_S)

    def _stop(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(10)
        w.conn.close()

    def close(self) -> None:
        discard(self.spare)
        self.spare = None
        for w in self.workers:
            if w.proc.is_alive() and w.ready and w.item is None:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
                w.proc.join(5)
            self._stop(w)
        self.workers = []

    def _failed(self, item, reason: str) -> dict:
        from extract.run import failed_row
        return failed_row(item, self.cache, self.digest, reason)

    def run(self, items: list, finished: Callable[[dict], None]) -> None:
        todo = deque(items)
        try:
            self.start()
            for w in self.workers[len(todo):]:        # more workers than clips
                self._stop(w)
            self.workers = self.workers[:max(len(todo), 1)]
            while todo or any(w.item is not None for w in self.workers):
                for w in self.workers:
                    if w.ready and w.item is None and todo:
                        w.item, w.duration = todo.popleft(), None
                        w.conn.send(w.item)
                        w.deadline = time.monotonic() + clip_time_limit(None, self.timeout)
                self._wait_once(finished)
        finally:
            self.close()

    def _wait_once(self, finished: Callable[[dict], None] | None) -> None:
        """Handle what the workers have said, or the first deadline to pass."""
        now = time.monotonic()
        ready = wait([w.conn for w in self.workers], timeout=max(0.0, min(w.deadline for w in self.workers) - now))
        for i, w in enumerate(list(self.workers)):
            if w.conn in ready:
                self._receive(i, w, finished)
            elif time.monotonic() > w.deadline:
                self._expire(i, w, finished)

    def _replace(self, i: int, w: _Worker) -> None:
        self._stop(w)
        self.workers[i] = self._start()

    def _receive(self, i: int, w: _Worker, finished) -> None:
        try:
            kind, value = w.conn.recv()
        except (EOFError, OSError):
            code = w.proc.exitcode if not w.proc.is_alive() else None
            self._replace(i, w)
            if w.item is None:
                raise RuntimeError(f"an extraction worker could not start (exit code {code}); "
                                   "run with --workers 1 to see its error") from None
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            finished(self._failed(w.item, f"the extraction process crashed on this file ({how})"))
            return
        if kind == "ready":
            if self.identity is None:
                self.identity = value
            elif value != self.identity:   # the encoder file changed while the run started its workers
                raise RuntimeError(f"extraction workers disagree on the settings: {value} vs {self.identity}")
            w.ready = True
        elif kind == "unusable":
            raise UnusableSettings(value)
        elif kind == "started":
            w.duration = value
            w.deadline = time.monotonic() + clip_time_limit(value, self.timeout)
        elif kind == "done":
            w.item = None
            finished(value)
        elif kind == "nospace":
            raise NoSpaceError(value)

    def _expire(self, i: int, w: _Worker, finished) -> None:
        item = w.item
        self._replace(i, w)
        if item is None:
            raise RuntimeError(f"an extraction worker did not start within {STARTUP_LIMIT_S:.0f} s")
        limit = clip_time_limit(w.duration, self.timeout)
        finished(self._failed(item, f"timed out: extraction took longer than {limit:g} s "
                                    f"(--clip-timeout to change the limit); the worker was stopped"))
