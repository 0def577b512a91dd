"""Extract a folder of clips into a cache: walk, shard, resume, run (in workers), summarise."""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import multiprocessing
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from avemo.extraction import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS, ClipError, ClipExtractor, expects_video
from avemo.checkpoint import CheckpointError
from avemo.features import ExtractionSettings
from extract.cache import INTERNAL_ERROR, Cache
from extract.labels import Labeller

MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | AUDIO_EXTENSIONS


class UsageError(ValueError):
    """A problem with the request itself (paths, flags); nothing was extracted."""


@dataclass(frozen=True)
class Item:
    clip: str                # path relative to the input folder, with "/"
    path: str
    label: str | None
    speaker: str | None
    label_note: str | None


@dataclass
class Walk:
    items: list[Item]        # media and non-media files, sorted by clip id
    hidden: int              # dot-files and dot-folders, ignored


def walk_folder(root: Path, exclude: list[Path], labeller: Labeller) -> Walk:
    """Every file under ``root`` except hidden ones and the ``exclude`` paths (the cache itself)."""
    excluded = [p.resolve() for p in exclude]
    items, hidden = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            full = (here / d).resolve()
            if d.startswith("."):
                hidden += 1
            elif not any(full == e or e in full.parents for e in excluded if e.is_dir()) and full not in excluded:
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            p = here / f
            if f.startswith("."):
                hidden += 1
                continue
            if p.resolve() in excluded:
                continue
            clip = p.relative_to(root).as_posix()
            label, speaker, note = labeller(clip) if p.suffix.lower() in MEDIA_EXTENSIONS else (None, None, None)
            items.append(Item(clip, str(p), label, speaker, note))
    items.sort(key=lambda it: it.clip)
    return Walk(items, hidden)


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
    return int(hashlib.sha1(clip.encode("utf-8")).hexdigest()[:12], 16) % n == i - 1


def clip_row(item: Item, ex: ClipExtractor | None, cache: Cache, digest: str) -> dict:
    """Extract one file, write its features and then its row; never raises for a bad file."""
    row = {"clip": item.clip, "label": item.label, "speaker": item.speaker, "settings_hash": digest,
           "feature_file": None, "duration": None, "frames_sampled": 0, "face_coverage": 0.0,
           "audio_seconds": 0.0, "has_video": False, "has_audio": False, "crops": False}
    notes = [f"label: {item.label_note}"] if item.label_note else []
    suffix = Path(item.path).suffix.lower()
    if suffix not in MEDIA_EXTENSIONS:
        row.update(status="failed", reason=f"not a media file (extension '{suffix or '(none)'}' is not one of "
                                           f"{', '.join(sorted(MEDIA_EXTENSIONS))})")
        cache.write_row(row, Path(item.path))
        return row
    try:
        feats = ex.extract(item.path, clip_id=item.clip, label=item.label, speaker=item.speaker)
    except ClipError as e:
        row.update(status="failed", reason="; ".join([str(e)] + notes))
    except Exception as e:  # a bug or an exotic file must cost one clip, not the run
        traceback.print_exc(file=sys.stderr)
        row.update(status="failed", reason=f"{INTERNAL_ERROR} ({type(e).__name__}): {str(e).splitlines()[0] if str(e) else ''}")
    else:
        complete = feats.has_audio and (feats.has_video or not expects_video(item.path))
        row.update(status="ok" if complete else "partial", reason="; ".join(feats.warnings + notes) or None,
                   feature_file=cache.feature_file(item.clip), duration=round(feats.duration, 4),
                   frames_sampled=feats.frames_sampled, face_coverage=round(feats.face_coverage, 4),
                   audio_seconds=round(feats.audio_seconds, 4), has_video=feats.has_video,
                   has_audio=feats.has_audio, crops="crops" in feats.arrays)
        feats.save(cache.root / row["feature_file"])
    cache.write_row(row, Path(item.path))
    return row


# ---- worker processes: each loads the detector and encoder once ----

_worker: dict = {}


def _init_worker(settings: dict, device: str, threads: int, cache_root: str, digest: str) -> None:
    torch.set_num_threads(threads)
    _worker["ex"] = ClipExtractor(ExtractionSettings.from_dict(settings), device)
    _worker["cache"], _worker["digest"] = Cache(cache_root), digest


def _work(item: Item) -> dict:
    return clip_row(item, _worker["ex"], _worker["cache"], _worker["digest"])


def extract_folder(video_dir: str | os.PathLike, out: str | os.PathLike, *, frames: int | None = None,
                   fps: float | None = None, label_from: str | None = None,
                   labels: str | os.PathLike | None = None, face_encoder: str = "default",
                   device: str | None = None, workers: int = 1, shard: str | tuple[int, int] | None = None,
                   keep_crops: bool = False, retry_failed: bool = False,
                   settings: ExtractionSettings | None = None, progress: bool = True,
                   log=None) -> pd.DataFrame:
    """Extract every clip under ``video_dir`` into the cache ``out``; returns the manifest.

    Finished clips with the same settings are skipped, so an interrupted run is resumed by
    running it again. ``frames``/``fps``/``face_encoder``/``keep_crops`` override the
    corresponding fields of ``settings`` (default ``ExtractionSettings()``, 16 frames a clip).
    Raises ``UsageError`` for bad arguments and ``SettingsMismatch`` when ``out`` holds a
    cache made with other settings.
    """
    log = log or sys.stderr
    root = Path(video_dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder" if root.exists() else f"{root}: no such folder")
    if frames is not None and fps is not None:
        raise UsageError("give --frames or --fps, not both")
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    shard = parse_shard(shard) if not isinstance(shard, tuple) else shard
    settings = settings or ExtractionSettings()
    if frames is not None or fps is not None:
        settings = dataclasses.replace(settings, frames=frames, fps=fps)
    settings = dataclasses.replace(settings, encoder=str(face_encoder), keep_crops=keep_crops)
    try:
        labeller = Labeller(label_from, labels)
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")

    walk = walk_folder(root, [Path(out)] + ([Path(labels)] if labels else []), labeller)
    if not walk.items:
        raise UsageError(f"no files found under {root}" + (f" ({walk.hidden} hidden ones ignored)" if walk.hidden else ""))
    t_load = time.perf_counter()
    try:
        ex = ClipExtractor(settings, device)   # fills in the encoder hash: part of the cache identity
    except (CheckpointError, ValueError) as e:
        raise UsageError(f"cannot use face encoder: {e}") from None
    settings = ex.settings
    digest = settings.digest()
    cache = Cache(out)
    cache.claim(settings)
    cache.remove_stale_temporaries(all_of_them=shard is None)

    mine = [it for it in walk.items if in_shard(it.clip, shard)]
    todo, done = [], []
    for it in mine:
        row = cache.is_done(it.clip, Path(it.path), digest, keep_crops, retry_failed)
        (done if row is not None else todo).append(row if row is not None else it)
    print(f"avemo-extract: {len(walk.items)} files under {root}"
          + (f", shard {shard[0]}/{shard[1]} has {len(mine)}" if shard else "")
          + f"; {len(done)} already done, {len(todo)} to extract on {device}"
          + (f" with {workers} workers" if workers > 1 else ""), file=log)

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

    try:
        if workers == 1 or len(todo) <= 1:
            for it in todo:
                finished(clip_row(it, ex, cache, digest))
        else:
            del ex  # the workers load their own; free this one's memory
            threads = max(1, (os.cpu_count() or 1) // workers)
            ctx = multiprocessing.get_context("spawn")  # fork + torch/OpenMP threads can deadlock
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(settings.to_dict(), device, threads, str(cache.root), digest)) as pool:
                for row in pool.map(_work, todo, chunksize=1):
                    finished(row)
    finally:
        bar.close()
        manifest = cache.write_manifest([it.clip for it in walk.items])
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
