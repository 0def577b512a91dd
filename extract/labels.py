"""Emotion labels and speakers for clips: from a CSV, the parent folder, or dataset file names.

Dataset codes map to one vocabulary (FER2013's seven names, plus RAVDESS "calm" and
EmoDB "boredom"), so corpora can be mixed in one cache.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pandas as pd

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
    """``labeller(clip_id) -> (label, speaker, note)``; note explains a missing label."""

    def __init__(self, scheme: str | None = None, csv: str | Path | None = None):
        if scheme and csv:
            raise LabelError("give either a file-name scheme or a labels CSV, not both")
        if scheme and scheme not in SCHEMES:
            raise LabelError(f"unknown label scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
        self.scheme = scheme
        self.table = _read_csv(Path(csv)) if csv else None

    def __call__(self, clip: str):
        if self.table is not None:
            row = self.table.get(clip) or self.table.get(PurePosixPath(clip).name)
            if row is None:
                return None, None, "not listed in the labels CSV"
            return row
        if self.scheme == "folder":
            return parse_folder(clip)
        if self.scheme:
            return _PARSERS[self.scheme](PurePosixPath(clip).stem)
        return None, None, None


def _read_csv(path: Path) -> dict:
    if not path.is_file():
        raise LabelError(f"labels CSV {path} not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise LabelError(f"labels CSV {path} is not a readable CSV: {e}") from None
    missing = {"clip", "label"} - set(df.columns)
    if missing:
        raise LabelError(f"labels CSV {path} needs columns 'clip' and 'label' (optional 'speaker'); "
                         f"missing {', '.join(sorted(missing))}; found {', '.join(df.columns)}")
    dup = df["clip"][df["clip"].duplicated()]
    if len(dup):
        raise LabelError(f"labels CSV {path} lists clip '{dup.iloc[0]}' more than once")
    table = {}
    for r in df.itertuples(index=False):
        speaker = getattr(r, "speaker", "") or None
        table[r.clip.replace("\\", "/")] = (r.label or None, speaker, None if r.label else "empty label in the CSV")
    return table
