"""Atomic file writes (a reader, or a resumed run, sees the old file or the new one, never half),
and the small text helpers every output shares: file names shown as text, error messages
cleaned of terminal escapes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, TypeVar

T = TypeVar("T")


class NoSpaceError(OSError):
    """The disk (or quota) holding ``path`` is full; what was finished before is intact."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, f"no space left on {Path(path).parent}", str(path))
        self.path = Path(path)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    # os.umask can only be read by setting it; put it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The temporary file lives in the same directory so that ``os.replace`` is a
    rename on one filesystem (atomic on POSIX). On error it is removed. The file gets
    the permissions a plain ``open(path, "w")`` would (mkstemp makes 0600, which would
    hide a shared cache from colleagues). A full disk raises ``NoSpaceError``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise NoSpaceError(path) from e
        raise
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and not isinstance(e, NoSpaceError) and e.errno in NO_SPACE:
            raise NoSpaceError(path) from e
        raise


class Busy(RuntimeError):
    """Another process holds the lock this one asked for."""


@contextlib.contextmanager
def held_lock(path: str | os.PathLike, exclusive: bool = True, busy: type[Busy] = Busy,
              message: str = "") -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created if needed) for the block: exclusive, or shared
    with other shared holders. Refused at once with ``busy(message)``, never waited for; the
    kernel lets go of it when the process ends, however it ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise busy(message or f"{path} is locked by another process") from None
        yield
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    # numpy scalars and arrays show up in metrics; write them as plain numbers.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dataclass_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    """Rebuild a settings dataclass read back from a file; unknown keys are an error, not ignored."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)} (written by a newer avemo?)")
    return cls(**d)


def display_name(name: str | os.PathLike) -> str:
    """A file name as printable text: bytes that are not UTF-8 (kept by Python as lone
    surrogates) are shown as ``\\xff`` escapes, so JSON, CSV and terminals always get valid text."""
    text = os.fspath(name)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:   # a surrogate that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shown_name(name: str | os.PathLike) -> str:
    """A file name for a terminal or a log: as ``display_name``, and control characters shown as
    escapes (``\\n``, ``\\x1b``), so a name with a newline cannot break a line in two and one with
    an escape sequence cannot recolour or rewrite the terminal. JSON and CSV escape those
    themselves and keep ``display_name``."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], display_name(name))


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def clean_message(text: object) -> str:
    """Error text from a library, safe to show: terminal escape sequences and control characters removed."""
    return _ANSI.sub("", str(text))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, cleaned; the exception's type if it has none."""
    lines = clean_message(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
