"""Emotion labels and speakers for clips: from a CSV, the parent folder, or dataset file names.

Dataset codes map to one vocabulary (FER2013's seven names, plus RAVDESS "calm" and
EmoDB "boredom"), so corpora can be mixed in one cache.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path, PurePosixPath

from avemo.tables import TableError, read_strict_csv

CREMAD = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
RAVDESS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fear",
           "07": "disgust", "08": "surprise"}
EMODB = {"W": "angry", "L": "boredom", "E": "disgust", "A": "fear", "F": "happy", "T": "sad", "N": "neutral"}

_CREMAD_RE = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
_RAVDESS_RE = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
_EMODB_RE = re.compile(r"^(\d{2})([a-z]\d{2})([A-Z])([a-z])$")

SCHEMES = ("folder", "ravdess", "cremad", "emodb")


class LabelError(ValueError):
    """A labels CSV that cannot be used; the message says what is wrong."""


def parse_cremad(stem: str):
    m = _CREMAD_RE.match(stem)
    if not m or m.group(3) not in CREMAD:
        return None, None, "file name does not follow CREMA-D's ACTOR_SENTENCE_EMOTION_LEVEL"
    return CREMAD[m.group(3)], m.group(1), None


def parse_ravdess(stem: str):
    m = _RAVDESS_RE.match(stem)
    if not m or m.group(3) not in RAVDESS:
        return None, None, "file name does not follow RAVDESS's MM-VC-EE-II-SS-RR-AA"
    return RAVDESS[m.group(3)], m.group(7), None


def parse_emodb(stem: str):
    m = _EMODB_RE.match(stem)
    if not m or m.group(3) not in EMODB:
        return None, None, "file name does not follow EmoDB's SSTTTEv"
    return EMODB[m.group(3)], m.group(1), None


def parse_folder(clip: str):
    parent = PurePosixPath(clip).parent.name
    if not parent:
        return None, None, "file is not inside a class folder"
    return parent, None, None


_PARSERS = {"cremad": parse_cremad, "ravdess": parse_ravdess, "emodb": parse_emodb}


class Labeller:
    """``labeller(clip_id) -> (label, speaker, note)``; note explains a missing label.

    A labels CSV names clips by their path relative to the input folder; a bare file name
    (no folder) also matches, after ``bind(clips)``, the one clip of that name anywhere
    below. A bare name that fits several clips is an error, never a silent relabelling:
    it would also merge those clips' speakers and break the speaker-independent split.
    """

    def __init__(self, scheme: str | None = None, csv: str | Path | None = None):
        if scheme and csv:
            raise LabelError("give either a file-name scheme or a labels CSV, not both")
        if scheme and scheme not in SCHEMES:
            raise LabelError(f"unknown label scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
        self.scheme = scheme
        self.csv = Path(csv) if csv else None
        self.entries = _read_csv(self.csv) if csv else None   # entry -> (line, (label, speaker, note))
        self.table = {e: v for e, (_, v) in self.entries.items()} if self.entries is not None else None

    def bind(self, clips: list[str]) -> None:
        """Resolve the CSV's entries against the clips actually found; ambiguity is a ``LabelError``."""
        if self.entries is None:
            return
        found = set(clips)
        by_name: dict[str, list[str]] = defaultdict(list)
        for c in clips:
            by_name[PurePosixPath(c).name].append(c)
        table: dict[str, tuple] = {}
        owner: dict[str, int] = {}
        for entry, (line, value) in self.entries.items():
            if entry in found:
                targets = [entry]
            elif "/" not in entry:
                targets = by_name.get(entry, [])
                if len(targets) > 1:
                    shown = ", ".join(sorted(targets)[:3]) + (", ..." if len(targets) > 3 else "")
                    raise LabelError(f"labels CSV {self.csv}, line {line}: '{entry}' names no folder and matches "
                                     f"{len(targets)} files ({shown}); write each one's path relative to the "
                                     "input folder")
            else:
                targets = []
            for t in targets:
                if t in owner:
                    raise LabelError(f"labels CSV {self.csv}: lines {owner[t]} and {line} both label '{t}'")
                owner[t] = line
                table[t] = value
        self.table = table

    def __call__(self, clip: str):
        if self.table is not None:
            row = self.table.get(clip)
            if row is None:
                return None, None, "not listed in the labels CSV"
            return row
        if self.scheme == "folder":
            return parse_folder(clip)
        if self.scheme:
            return _PARSERS[self.scheme](PurePosixPath(clip).stem)
        return None, None, None


def _read_csv(path: Path) -> dict:
    try:
        rows = read_strict_csv(path, ("clip", "label"), ("speaker", "split"), key="clip")
    except TableError as e:
        raise LabelError(f"labels CSV {e}") from None
    table = {}
    for line, r in rows:
        clip = r["clip"].replace("\\", "/")
        label, speaker = r["label"] or None, r.get("speaker") or None
        table[clip] = (line, (label, speaker, None if label else "empty label in the CSV"))
    return table
