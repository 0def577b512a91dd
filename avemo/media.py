"""What counts as a clip, and why a file cannot be one: shared by the extraction workers and
the process that supervises them, which never loads torch (its start-up would delay theirs)."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from avemo.io import display_name, first_line

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v", ".mpg", ".mpeg"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".m4a"})


class ClipError(Exception):
    """A file from which nothing usable can be extracted; ``str(e)`` is the reason in words."""


def expects_video(path) -> bool:
    """Audio files (by extension) are complete without video; anything else should have both."""
    return Path(path).suffix.lower() not in AUDIO_EXTENSIONS


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be opened as a regular file (broken link, link loop, FIFO, ...), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (its target {display_name(os.readlink(path))} does not exist)"
        return "file not found (removed after the folder was listed?)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (the link points, through other links, back to itself)"
        return f"cannot read the file: {e.strerror or first_line(e)}"
    if not stat.S_ISREG(st.st_mode):
        # opening a FIFO or a device would wait for a writer forever
        return "not a regular file (a folder, pipe or device)"
    if not os.access(path, os.R_OK):
        return "permission denied (the file is not readable by this user)"
    return None
