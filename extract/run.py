"""Extract a folder of clips into a cache: walk, shard, resume, run (in workers), summarise."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm import tqdm

# no torch here: this process only supervises, and the workers' start-up must not wait for its imports
from avemo.cpu import default_workers, threads_for
from avemo.encoders import file_sha256, is_shipped_name, resolve_encoder_path
from avemo.features import UPGRADE_SETTINGS, ExtractionSettings
from avemo.io import NoSpaceError, display_name, first_line, shown_name
from avemo.media import MEDIA_EXTENSIONS, ClipError, expects_video, is_media, list_folder
from extract.cache import INTERNAL_ERROR, Cache
from extract.labels import Labeller
from extract.workers import UnusableSettings, WorkerPool, discard

if TYPE_CHECKING:      # for annotations only: importing it here would pull torch into this process
    from avemo.extraction import ClipExtractor


class UsageError(ValueError):
    """A problem with the request itself (paths, flags); nothing was extracted."""


@dataclass(frozen=True)
class Item:
    clip: str                # path relative to the input folder, with "/"
    path: str
    label: str | None
    speaker: str | None
    label_note: str | None
    error: str | None = None     # known from the walk (a folder that cannot be listed): nothing to decode


@dataclass
class Walk:
    items: list[Item]        # media and non-media files, sorted by clip id
    hidden: int              # dot-files and dot-folders, ignored


def walk_folder(root: Path, exclude: list[Path], labeller: Labeller) -> Walk:
    """Every file under ``root`` except hidden ones and the ``exclude`` paths (the cache itself);
    files that are not media get a row too, saying so, and so does a folder that cannot be listed."""
    listing = list_folder(root, exclude)
    if root in listing.unlisted:
        raise UsageError(f"{shown_name(root)}: {listing.unlisted[root].split(';')[0]}")
    clips = {p.relative_to(root).as_posix(): p for p in listing.files}
    labeller.bind([c for c, p in clips.items() if is_media(p)])
    items = []
    for clip, p in sorted(clips.items()):
        label, speaker, note = labeller(clip) if is_media(p) else (None, None, None)
        items.append(Item(clip, str(p), label, speaker, note))
    items += [Item(p.relative_to(root).as_posix(), str(p), None, None, None, error=why)
              for p, why in listing.unlisted.items()]
    return Walk(sorted(items, key=lambda it: it.clip), listing.hidden)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"I/N" (1-based, as SLURM array indices 1..N) -> (I, N)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UsageError(f"--shard must look like I/N (e.g. 2/8), got '{text}'")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise UsageError(f"--shard {text}: I must be between 1 and N (N >= 1)")
    return i, n


def in_shard(clip: str, shard: tuple[int, int] | None) -> bool:
    """Deterministic by clip id alone, so adding files never moves a clip to another shard."""
    if shard is None:
        return True
    i, n = shard
    return int(hashlib.sha1(os.fsencode(clip)).hexdigest()[:12], 16) % n == i - 1


def _empty_row(item: Item, digest: str) -> dict:
    return {"clip": item.clip, "label": item.label, "speaker": item.speaker, "settings_hash": digest,
            "feature_file": None, "duration": None, "frames_sampled": 0, "face_coverage": 0.0,
            "audio_seconds": 0.0, "has_video": False, "has_audio": False, "crops": False,
            "feature_maps": False}


def _notes(item: Item) -> list[str]:
    notes = [f"label: {item.label_note}"] if item.label_note else []
    if display_name(item.clip) != item.clip:
        notes.append("file name is not valid UTF-8 (shown with \\x escapes)")
    return notes


def failed_row(item: Item, cache: Cache, digest: str, reason: str) -> dict:
    """Record ``item`` as failed with ``reason`` (and its label notes); returns the row."""
    row = dict(_empty_row(item, digest), status="failed", reason="; ".join([reason] + _notes(item)))
    cache.write_row(row, Path(item.path))
    return row


def clip_row(item: Item, ex: "ClipExtractor | None", cache: Cache, digest: str) -> dict:
    """Extract one file, write its features and then its row; never raises for a bad file
    (a full disk raises ``NoSpaceError``: every later clip would fail the same way)."""
    if item.error:
        return failed_row(item, cache, digest, item.error)
    suffix = Path(item.path).suffix.lower()
    if suffix not in MEDIA_EXTENSIONS:
        return failed_row(item, cache, digest, f"not a media file (extension '{display_name(suffix) or '(none)'}' "
                                               f"is not one of {', '.join(sorted(MEDIA_EXTENSIONS))})")
    try:
        feats = ex.extract(item.path, clip_id=item.clip, label=item.label, speaker=item.speaker)
    except ClipError as e:
        return failed_row(item, cache, digest, str(e))
    except Exception as e:  # a bug or an exotic file must cost one clip, not the run
        traceback.print_exc(file=sys.stderr)
        return failed_row(item, cache, digest, f"{INTERNAL_ERROR} ({type(e).__name__}): {first_line(e)}")
    row = _empty_row(item, digest)
    complete = feats.has_audio and (feats.has_video or not expects_video(item.path))
    row.update(status="ok" if complete else "partial", reason="; ".join(feats.warnings + _notes(item)) or None,
               feature_file=cache.feature_file(item.clip), duration=round(feats.duration, 4),
               frames_sampled=feats.frames_sampled, face_coverage=round(feats.face_coverage, 4),
               audio_seconds=round(feats.audio_seconds, 4), has_video=feats.has_video,
               has_audio=feats.has_audio, crops="crops" in feats.arrays, feature_maps="feature_maps" in feats.arrays)
    feats.save(cache.root / row["feature_file"])
    cache.write_row(row, Path(item.path))
    return row


def extract_folder(video_dir: str | os.PathLike, out: str | os.PathLike, *, frames: int | None = None,
                   fps: float | None = None, label_from: str | None = None,
                   labels: str | os.PathLike | None = None, face_encoder: str = "default",
                   device: str | None = None, workers: int | None = None, shard: str | tuple[int, int] | None = None,
                   keep_crops: bool = False, track_faces: bool | None = None, retry_failed: bool = False,
                   clip_timeout: float | None = None, feature_maps: bool = False,
                   settings: ExtractionSettings | None = None, progress: bool = True,
                   log=None, spare=None, small_face_side: int | None = None) -> pd.DataFrame:
    """Extract every clip under ``video_dir`` into the cache ``out``; returns the manifest.

    Finished clips with the same settings are skipped, so an interrupted run is resumed by
    running it again. ``frames``/``fps``/``face_encoder``/``keep_crops``/``feature_maps``/``track_faces``/
    ``small_face_side`` override the corresponding fields of ``settings`` (default ``ExtractionSettings()``,
    16 frames a clip; None leaves a field as it is there, or for ``UPGRADE_SETTINGS`` as the cache
    being resumed has it).
    Clips are extracted in ``workers`` supervised processes (default:
    ``avemo.cpu.default_workers``, one per usable CPU within memory and a cap); one that takes
    longer than ``clip_timeout`` seconds (default: scaled by its duration, ``extract.workers``)
    is stopped and recorded as failed. Raises ``UsageError``
    for bad arguments, ``SettingsMismatch`` when ``out`` holds a cache made with other
    settings, ``CacheBusy`` when another run holds it, and ``NoSpaceError`` when the disk
    fills (finished clips stay).
    ``spare``: a worker from ``extract.workers.prestart()``, used first (stopped if not needed).
    """
    spares = [spare] if spare is not None else []
    try:
        return _extract_folder(video_dir, out, frames, fps, label_from, labels, face_encoder, device, workers,
                               shard, keep_crops, track_faces, retry_failed, clip_timeout, settings, progress,
                               log, spares, feature_maps, small_face_side)
    finally:
        for s in spares:
            discard(s)


def _extract_folder(video_dir, out, frames, fps, label_from, labels, face_encoder, device, workers, shard,
                    keep_crops, track_faces, retry_failed, clip_timeout, settings, progress, log,
                    spares: list, feature_maps: bool = False, small_face_side: int | None = None) -> pd.DataFrame:
    log = log or sys.stderr
    root = Path(video_dir)
    if not root.is_dir():
        if root.exists():
            raise UsageError(f"{shown_name(root)} is a file; avemo-extract reads a folder of clips (put the file in one, "
                             "or ask avemo-predict about a single clip)")
        raise UsageError(f"{shown_name(video_dir)}: no such folder"
                         + ("; avemo-extract reads local folders only (download the clips first)"
                            if "://" in str(video_dir) else ""))
    if frames is not None and fps is not None:
        raise UsageError("give --frames or --fps, not both")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if clip_timeout is not None and not (math.isfinite(clip_timeout) and clip_timeout > 0):
        raise UsageError(f"--clip-timeout must be a positive number of seconds, got {clip_timeout}")
    shard = parse_shard(shard) if not isinstance(shard, tuple) else shard
    settings = settings or ExtractionSettings()
    try:
        if frames is not None or fps is not None:
            settings = dataclasses.replace(settings, frames=frames, fps=fps)
        settings = dataclasses.replace(settings, encoder=str(face_encoder), keep_crops=keep_crops,
                                       feature_maps=feature_maps)
        given = {k: v for k, v in (("track_faces", track_faces), ("small_face_side", small_face_side))
                 if v is not None}
        settings = dataclasses.replace(settings, **given)
        labeller = Labeller(label_from, labels)
        walk = walk_folder(root, [Path(out)] + ([Path(labels)] if labels else []), labeller)
    except ValueError as e:     # bad frames/fps values, a labels CSV that cannot be used
        raise UsageError(str(e)) from None
    if not walk.items:
        raise UsageError(f"no files found under {shown_name(root)}" + (f" ({walk.hidden} hidden ones ignored)" if walk.hidden else ""))
    media = [it for it in walk.items if in_shard(it.clip, shard) and is_media(it.path)]
    t_load = time.perf_counter()
    n_workers = min(workers, max(len(media), 1))
    cache = Cache(out)
    settings = _with_cache_upgrades(cache, _with_cache_encoder(cache, settings, log), set(given), log)
    # the workers load the models while this process reads the cache; the first one ready says
    # which encoder file (its hash: part of the cache identity) and device they use
    pool = WorkerPool(n_workers, settings, device, threads_for(n_workers), cache, clip_timeout,
                      spare=spares.pop() if spares else None)
    try:
        try:
            settings, device = pool.start()
        except UnusableSettings as e:
            raise UsageError(str(e)) from None
        return _extract_with(pool, root, walk, cache, settings, device, shard, workers, keep_crops, feature_maps,
                             retry_failed, progress, log, t_load)
    finally:
        pool.close()


def _with_cache_encoder(cache: Cache, settings: ExtractionSettings, log) -> ExtractionSettings:
    """A cache begun with a shipped encoder that a later release replaced (``default``) goes on
    with the file it began with, which the package keeps under another name and the workers
    find by its hash: one cache, one encoder, across an upgrade."""
    recorded = cache.recorded_settings() or {}
    sha = recorded.get("encoder_sha256")
    if not sha or recorded.get("encoder") != settings.encoder or not is_shipped_name(settings.encoder):
        return settings
    current = resolve_encoder_path(settings.encoder)
    if current.is_file() and file_sha256(current) != sha:
        print(f"avemo-extract: {cache.root} was begun with an earlier '{settings.encoder}' face encoder "
              f"(sha256 {sha[:12]}...); going on with that one so the cache stays consistent (use a new "
              "--out for the current one)", file=log)
    return dataclasses.replace(settings, encoder_sha256=sha)


def _with_cache_upgrades(cache: Cache, settings: ExtractionSettings, given: set[str], log) -> ExtractionSettings:
    """A cache begun before a release changed how faces are looked for (``UPGRADE_SETTINGS``) goes on
    as it was begun, unless the command sets that field: one cache, one way of finding faces."""
    recorded = cache.recorded_settings()
    try:
        was = ExtractionSettings.from_dict(recorded) if recorded is not None else None
    except ValueError:          # written by another avemo: Cache.claim says how it differs
        was = None
    if was is None:
        return settings
    kept = {k: getattr(was, k) for k in UPGRADE_SETTINGS if k not in given and getattr(was, k) != getattr(settings, k)}
    if kept:
        print(f"avemo-extract: {cache.root} was begun by an earlier avemo; going on as it was begun "
              f"({', '.join(f'{k}={v}' for k, v in kept.items())}) so the cache stays consistent (use a new --out "
              "for today's defaults)", file=log)
    return dataclasses.replace(settings, **kept)


def _extract_with(pool: WorkerPool, root: Path, walk: Walk, cache: Cache, settings: ExtractionSettings,
                  device: str, shard, workers: int, keep_crops: bool, feature_maps: bool, retry_failed: bool,
                  progress: bool, log, t_load: float) -> pd.DataFrame:
    digest = settings.digest()
    with cache.locked(exclusive=shard is None):
        cache.claim(settings)
        cache.remove_stale_temporaries(all_of_them=shard is None)
        mine = [it for it in walk.items if in_shard(it.clip, shard)]
        todo, done = [], []
        for it in mine:
            # a folder that cannot be listed is looked at again by every run's walk: its row is rewritten
            row = None if it.error else cache.is_done(it.clip, Path(it.path), digest, keep_crops, retry_failed,
                                                      feature_maps)
            (done if row is not None else todo).append(row if row is not None else it)
        print(f"avemo-extract: {len(walk.items)} files under {shown_name(root)}"
              + (f", shard {shard[0]}/{shard[1]} has {len(mine)}" if shard else "")
              + f"; {len(done)} already done, {len(todo)} to extract on {device}"
              + (f" with {n} workers" if (n := min(workers, sum(is_media(it.path) for it in todo))) > 1 else ""), file=log)

        rows: list[dict] = []
        t0 = time.perf_counter()
        # rate as clips/s even when below one (tqdm would flip it to s/clip)
        bar = tqdm(total=len(todo), unit="clip", disable=not progress, file=log, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
        counts: collections.Counter = collections.Counter()

        def finished(row: dict) -> None:
            rows.append(row)
            counts[row["status"]] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)

        media = [it for it in todo if is_media(it.path)]
        completed = False
        try:
            for it in todo:
                if it not in media:     # named and refused without decoding anything
                    finished(clip_row(it, None, cache, digest))
            if media:
                pool.run(media, finished)
            completed = True
        finally:
            bar.close()
            try:
                manifest = cache.write_manifest([it.clip for it in walk.items])
            except NoSpaceError:
                if completed:
                    raise
                # the run is already stopping (for want of space, or interrupted): rows/ hold every finished clip
                manifest = None
    elapsed = time.perf_counter() - t0
    _print_summary(log, manifest, rows, done, len(walk.items), walk.hidden, elapsed, time.perf_counter() - t_load, cache)
    return manifest


def _print_summary(log, manifest: pd.DataFrame, rows, done, n_files, hidden, elapsed, total, cache) -> None:
    by_status = collections.Counter(r["status"] for r in rows)
    rate = len(rows) / elapsed if elapsed > 0 and rows else 0.0
    print(f"avemo-extract: extracted {len(rows)} clip(s) in {elapsed:.1f} s ({rate:.2f} clips/s; "
          f"{total:.1f} s with model loading); skipped {len(done)} already done", file=log)
    all_counts = collections.Counter(manifest["status"])
    print("  manifest: " + ", ".join(f"{s} {all_counts.get(s, 0)}" for s in ("ok", "partial", "failed"))
          + f" of {n_files} files -> {cache.manifest_path}"
          + (f" ({n_files - len(manifest)} not yet extracted, e.g. by other shards)" if len(manifest) < n_files else "")
          + (f"; {hidden} hidden file(s) ignored" if hidden else ""), file=log)
    reasons: collections.Counter = collections.Counter()
    for r in manifest["reason"].dropna():
        for part in str(r).split("; "):
            if part:
                reasons[re.sub(r"(?<![\w.])\d+(\.\d+)?", "#", part)] += 1   # tally kinds, not exact numbers
    for reason, n in reasons.most_common(12):
        print(f"  {n:6d} x {reason}", file=log)
    if by_status:
        print("  this run: " + ", ".join(f"{s} {by_status.get(s, 0)}" for s in ("ok", "partial", "failed")), file=log)
