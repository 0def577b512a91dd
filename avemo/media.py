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
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | AUDIO_EXTENSIONS


class ClipError(Exception):
    """A file from which nothing usable can be extracted; ``str(e)`` is the reason in words."""


def is_media(path) -> bool:
    return Path(path).suffix.lower() in MEDIA_EXTENSIONS


def list_folder(root: Path, exclude: list[Path] = ()) -> tuple[list[Path], int]:
    """Every file under ``root``, sorted, and how many hidden entries were skipped.

    Dot-files and dot-folders are skipped (a macOS copy's ``._clip.mp4`` resource forks, ``.git``);
    so are the ``exclude`` paths (a cache inside its own input folder). Nothing here opens or
    follows a file: broken links, link loops and files that vanish are listed like any other and
    get their reason when their turn comes.
    """
    # realpath never raises (a link loop resolves to itself), unlike Path.resolve in 3.10/3.11
    excluded = [os.path.realpath(p) for p in exclude]

    def is_excluded(p: Path) -> bool:
        full = os.path.realpath(p)
        return any(full == e or full.startswith(e + os.sep) for e in excluded)

    paths, hidden = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                hidden += 1
            elif not is_excluded(here / d):
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f.startswith("."):
                hidden += 1
            elif not is_excluded(here / f):
                paths.append(here / f)
    return sorted(paths), hidden


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
