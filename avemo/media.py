"""What counts as a clip, and why a file cannot be one: shared by the extraction workers and
the process that supervises them, which never loads torch (its start-up would delay theirs)."""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from avemo.io import first_line, shown_name

# Every container the FFmpeg inside PyAV reads that recordings come in: camcorders (AVCHD .mts /
# .m2ts, DV, MXF), phones (.3gp, voice notes in .amr, .opus, .aac), broadcast captures (.ts,
# .vob), Windows (.wmv, .wma) and Macs (.aiff, .caf). A folder of them was passed over whole
# when only the common nine and five were listed.
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v", ".mpg", ".mpeg",
                              ".mts", ".m2ts", ".ts", ".3gp", ".3g2", ".wmv", ".asf", ".ogv", ".vob",
                              ".mxf", ".dv", ".f4v", ".qt", ".divx"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus", ".aac", ".aif", ".aiff",
                              ".aifc", ".wma", ".amr", ".caf", ".mka", ".oga", ".weba", ".au", ".m4b",
                              ".mp2", ".ac3", ".wv", ".spx"})
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | AUDIO_EXTENSIONS


class ClipError(Exception):
    """A file from which nothing usable can be extracted; ``str(e)`` is the reason in words."""


def is_media(path) -> bool:
    return Path(path).suffix.lower() in MEDIA_EXTENSIONS


@dataclass
class Listing:
    files: list[Path]                 # sorted
    hidden: int                       # dot-files and dot-folders skipped
    unlisted: dict[Path, str] = field(default_factory=dict)   # folders that could not be read -> why
    others: list[Path] = field(default_factory=list)           # files not named as media, where those are left out


def list_folder(root: Path, exclude: list[Path] = ()) -> Listing:
    """Every file under ``root``, and what was skipped.

    Dot-files and dot-folders are skipped (a macOS copy's ``._clip.mp4`` resource forks, ``.git``);
    so are the ``exclude`` paths (a cache inside its own input folder). A folder linked in from
    elsewhere (``clips/ravdess -> /data/ravdess``, as datasets are often assembled) is walked like
    one of its own, once; a link to a folder already walked, or back into ``root``, is not
    followed, so a link loop cannot walk forever. A folder that cannot be read (another user's,
    on a shared disk) is named with the reason rather than silently passed over, so its clips
    are not lost without a word. Nothing here opens a file: broken links, link loops and files
    that vanish are listed like any other and get their reason when their turn comes.
    """
    # realpath never raises (a link loop resolves to itself), unlike Path.resolve in 3.10/3.11
    excluded = [os.path.realpath(p) for p in exclude]
    inside = os.path.realpath(root)

    def is_excluded(p: Path) -> bool:
        full = os.path.realpath(p)
        return any(full == e or full.startswith(e + os.sep) for e in excluded)

    def follow(link: Path) -> bool:
        target = os.path.realpath(link)
        if target in seen or target == inside or target.startswith(inside + os.sep):
            return False
        seen.add(target)     # now, so that a second link beside it to the same folder is not followed too
        return True

    listing = Listing([], 0)
    seen: set[str] = set()

    def unreadable(e: OSError) -> None:
        listing.unlisted[Path(e.filename)] = (f"cannot list this folder ({e.strerror or first_line(e)}); "
                                              "the files in it were not read")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen and here != root and not os.path.islink(here):
            dirnames[:] = []     # reached first through a link walked earlier: its files are listed there
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                listing.hidden += 1
            elif not is_excluded(here / d) and (not os.path.islink(here / d) or follow(here / d)):
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f.startswith("."):
                listing.hidden += 1
            elif not is_excluded(here / f):
                listing.files.append(here / f)
    listing.files.sort()
    return listing


def expects_video(path) -> bool:
    """Audio files (by extension) are complete without video; anything else should have both."""
    return Path(path).suffix.lower() not in AUDIO_EXTENSIONS


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be opened as a regular file (broken link, link loop, FIFO, ...), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (its target {shown_name(os.readlink(path))} does not exist)"
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
