"""The cache folder: settings identity, one row file per clip, the merged manifest.csv.

Layout::

    CACHE/settings.json        the ExtractionSettings every clip here was made with
    CACHE/features/*.npz       one ClipFeatures per clip (avemo.features.feature_filename)
    CACHE/rows/*.json          one manifest row per source file, written after its .npz
    CACHE/manifest.csv         all rows, rebuilt from rows/ at the end of every run
    CACHE/.lock                held by every run: exclusively by an unsharded one, shared by shards

Every file is written atomically, the row only after the features it points to, so a
run killed at any instant leaves finished clips complete and unfinished ones absent.
Shards of one job (``--shard I/N``) write disjoint row files into the same folder, and
whichever finishes last writes the full manifest (``merge_manifest`` rebuilds it any time).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import pandas as pd

from avemo.features import (ADDITIVE_SETTINGS, LEGACY_SETTINGS, ClipFeatures, ExtractionSettings, FeatureFileError,
                            feature_filename)
from avemo.io import Busy, display_name, held_lock, write_json_atomic
from avemo.tables import restore, write_csv_atomic

COLUMNS = ["clip", "status", "reason", "label", "speaker", "feature_file", "duration", "frames_sampled",
           "face_coverage", "audio_seconds", "has_video", "has_audio", "crops", "feature_maps",
           "settings_hash"]
STATUSES = ("ok", "partial", "failed")
INTERNAL_ERROR = "internal error"
# Temporary files from a killed writer; in a sharded job another shard may be mid-write,
# so only leftovers older than this are removed there.
STALE_TMP_S = 3600


class SettingsMismatch(ValueError):
    """The cache was made with other extraction settings; mixing them would corrupt it."""


class CacheBusy(Busy):
    """Another avemo-extract is working on this cache in a way this run cannot share."""


def source_stamp(source: Path) -> list[int] | None:
    """Size and modification time of a source file, or None if it cannot be read (gone, a broken link)."""
    try:
        st = source.stat()
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def source_sha256(source: Path) -> str | None:
    """The content hash of a source file, or None if it cannot be read. The stamp alone would redo
    a whole folder copied without its times (``cp -r``); the hash tells a copy from an edit."""
    h = hashlib.sha256()
    try:
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except (OSError, ValueError):
        return None
    return h.hexdigest()


class Cache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.features_dir = self.root / "features"
        self.rows_dir = self.root / "rows"
        self.manifest_path = self.root / "manifest.csv"
        self.settings_path = self.root / "settings.json"

    @contextlib.contextmanager
    def locked(self, exclusive: bool):
        """Hold the cache's lock for a run: an unsharded run alone (it may clear any temporary
        file), shards of one job together. A run that cannot have it is refused at once."""
        if self.root.exists() and not self.root.is_dir():
            raise SettingsMismatch(f"--out {self.root} exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        with held_lock(self.root / ".lock", exclusive, CacheBusy,
                       f"{self.root} is in use by another avemo-extract run"
                       + (" (shards of one job may share a cache: use --shard I/N in every one)" if exclusive
                          else " without --shard") + "; wait for it to finish, or use another --out"):
            yield

    def recorded_settings(self) -> dict | None:
        """The settings this cache was made with (None for a new cache or an unreadable record)."""
        try:
            return json.loads(self.settings_path.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def claim(self, settings: ExtractionSettings) -> None:
        """Record ``settings`` for a new cache, or refuse if the cache holds other settings."""
        if self.root.exists() and not self.root.is_dir():
            raise SettingsMismatch(f"--out {self.root} exists and is not a folder")
        if self.settings_path.is_file():
            old = json.loads(self.settings_path.read_text(encoding="utf-8"))
            if old.get("digest") != settings.digest():
                new, was = settings.to_dict(), {**LEGACY_SETTINGS, **old["settings"]}
                diff = [f"{k}: {was.get(k)!r} in the cache, {new[k]!r} now"
                        for k in new if k not in ADDITIVE_SETTINGS and was.get(k) != new[k]]
                hint = " (--no-face-tracking for its face detection)" if was.get("track_faces") is False else ""
                raise SettingsMismatch(
                    f"{self.root} was extracted with different settings ({'; '.join(diff) or 'unknown fields'}). "
                    f"One cache holds one set of settings: use another --out folder, or the same settings{hint}.")
            return
        self.features_dir.mkdir(parents=True, exist_ok=True)
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.settings_path, {"digest": settings.digest(), "settings": settings.to_dict()})

    def remove_stale_temporaries(self, all_of_them: bool) -> int:
        now, n = time.time(), 0
        for d in (self.features_dir, self.rows_dir, self.root):
            for p in d.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):    # a shard may finish it meanwhile
                    if all_of_them or now - p.stat().st_mtime > STALE_TMP_S:
                        p.unlink()
                        n += 1
        return n

    def feature_file(self, clip: str) -> str:
        return f"features/{feature_filename(clip)}"

    def row_path(self, clip: str) -> Path:
        return self.rows_dir / (Path(feature_filename(clip)).stem + ".json")

    def read_row(self, clip: str) -> dict | None:
        p = self.row_path(clip)
        try:
            row = json.loads(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return row if row.get("clip") == clip else None

    def write_row(self, row: dict, source: Path) -> None:
        extra = {"source_stamp": source_stamp(source)}
        if row.get("feature_file"):
            extra["feature_bytes"] = os.path.getsize(self.root / row["feature_file"])
            # only for extracted clips: a failed one is cheap to redo, and may be a huge file of anything
            extra["source_sha256"] = source_sha256(source)
        write_json_atomic(self.row_path(row["clip"]), {**{k: row.get(k) for k in COLUMNS}, **extra})

    def is_done(self, clip: str, source: Path, digest: str, need_crops: bool, retry_failed: bool,
                need_maps: bool = False) -> dict | None:
        """The finished row for ``clip`` with these settings, or None if it must be (re)done (also when
        crops or feature maps are asked for and a video clip was extracted without them)."""
        row = self.read_row(clip)
        if row is None or row.get("settings_hash") != digest:
            return None
        stamp = source_stamp(source)
        restamp = row.get("source_stamp") != stamp
        if restamp and not self._same_content(row, source, stamp):
            return None     # the file was replaced or edited since
        if row["status"] == "failed":
            # an internal error may be transient (out of memory, a bug since fixed): always retry it
            internal = str(row.get("reason") or "").startswith(INTERNAL_ERROR)
            return None if retry_failed or internal else row
        if not self.features_intact(row, digest):
            return None
        if need_crops and row.get("has_video") and not row.get("crops"):
            return None
        if need_maps and row.get("has_video") and not row.get("feature_maps"):
            return None
        if restamp:         # the same bytes under a new time (a copy): the new stamp saves hashing next time
            write_json_atomic(self.row_path(clip), {**row, "source_stamp": stamp})
        return row

    @staticmethod
    def _same_content(row: dict, source: Path, stamp: list[int] | None) -> bool:
        old = row.get("source_stamp")
        if stamp is None or not old or old[0] != stamp[0] or row.get("source_sha256") is None:
            return False
        return row["source_sha256"] == source_sha256(source)

    def features_intact(self, row: dict, digest: str) -> bool:
        """The row's feature file is there, whole (its size as written) and made with these settings."""
        path = self.root / row["feature_file"]
        try:
            if row.get("feature_bytes") is not None and os.path.getsize(path) != row["feature_bytes"]:
                return False
            meta = ClipFeatures.read_meta(path)
            return ExtractionSettings.from_dict(meta["settings"]).digest() == digest
        except (OSError, FeatureFileError, ValueError, TypeError):
            return False

    def write_manifest(self, clips: list[str]) -> pd.DataFrame:
        """manifest.csv with the finished row of every clip in ``clips`` (sorted); returns it.

        Names that are not UTF-8 appear with ``\\x`` escapes (in the file and the frame);
        the file also neutralises spreadsheet formulas (``avemo.tables``).
        """
        # text as it is shown: a lone surrogate from a non-UTF-8 name cannot even enter an
        # Arrow-backed pandas string column
        rows = [{k: display_name(v) if isinstance(v, str) else v for k, v in ((k, r.get(k)) for k in COLUMNS)}
                for r in (self.read_row(c) for c in sorted(clips)) if r is not None]
        df = pd.DataFrame(rows, columns=COLUMNS)
        write_csv_atomic(self.manifest_path, df, index=False)
        return df


def read_manifest(cache: str | os.PathLike) -> pd.DataFrame:
    """The manifest of a cache folder (clip, label, speaker and reason read as text; empty -> NaN)."""
    text = ("clip", "status", "reason", "label", "speaker", "feature_file", "settings_hash")
    df = pd.read_csv(Path(cache) / "manifest.csv", dtype={c: str for c in text})
    for col in text:
        if col in df.columns:
            df[col] = df[col].map(restore)
    return df
