"""Reading a feature cache (``CACHE/manifest.csv`` + one ``.npz`` per clip) for training."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avemo.features import AUDIO_SETTING_KEYS, ClipFeatures, ExtractionSettings, FeatureFileError
from avemo.tables import TableError, read_csv_text, read_strict_csv

log = logging.getLogger("avemo.train")
USABLE_STATUS = ("ok", "partial")


class CacheError(ValueError):
    """A cache (or labels file) that cannot be trained on, with the reason in words."""


@dataclass
class TrainingData:
    clips: list[ClipFeatures]
    labels: np.ndarray            # [N] int class index
    classes: list[str]
    speakers: list[str | None]
    split_column: list[str] | None  # train/val/test per clip when the labels carry one
    settings: dict
    n_mels: int
    video_dim: int
    files: list[Path] = field(default_factory=list)   # each clip's feature file (its crops are read from it)
    video_cells: int = 0          # cells per frame of the clips' feature maps (0: the cache has none)

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def has_audio(self) -> np.ndarray:
        return np.array([c.has_audio for c in self.clips], bool)

    @property
    def has_video(self) -> np.ndarray:
        return np.array([c.has_video for c in self.clips], bool)


def _read_labels(path: Path) -> dict[str, dict[str, str]]:
    try:
        rows = read_strict_csv(path, ("clip", "label"), ("speaker", "split"), key="clip")
    except TableError as e:
        raise CacheError(f"labels file {e}") from None
    return {r["clip"]: r for _, r in rows}


def _cache_settings(cache: Path) -> dict | None:
    """The settings the cache was made with (settings.json), if it says."""
    try:
        return json.loads((cache / "settings.json").read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_training_data(cache: str | Path, labels: str | Path | None = None, with_maps: bool = False) -> TrainingData:
    """Every usable, labelled clip of ``cache``; labels/speakers/split from the manifest or ``labels`` CSV.

    ``with_maps``: also read the clips' feature maps (STT's spatial tokens), when the cache has them.
    """
    cache = Path(cache)
    manifest_path = cache / "manifest.csv"
    if not manifest_path.is_file():
        raise CacheError(f"{cache}: no manifest.csv here; is this a cache written by avemo-extract?")
    manifest = read_csv_text(manifest_path)
    for col in ("clip", "status", "feature_file"):
        if col not in manifest.columns:
            raise CacheError(f"{manifest_path}: column '{col}' is missing (found {list(manifest.columns)})")
    usable = manifest[manifest["status"].isin(USABLE_STATUS) & (manifest["feature_file"] != "")]
    if usable.empty:
        raise CacheError(f"{cache}: the cache is empty: no clip with status ok/partial among "
                         f"{len(manifest)} manifest rows")
    if len(usable) < len(manifest):
        log.info("skipping %d failed clips of %d", len(manifest) - len(usable), len(manifest))
    table = _read_labels(Path(labels)) if labels is not None else None
    # the cache's own record of its settings decides; without one, the first clip does
    settings = _cache_settings(cache)
    try:
        digest = ExtractionSettings.from_dict(settings).digest() if settings is not None else None
    except (TypeError, ValueError):
        settings = digest = None

    clips, names, speakers, splits, files = [], [], [], [], []
    unlabelled = 0
    for row in usable.itertuples(index=False):
        path = Path(row.feature_file)
        path = path if path.is_absolute() else cache / path
        if not path.is_file():
            raise CacheError(f"{path}: feature file listed in the manifest for '{row.clip}' is missing; "
                             "re-run avemo-extract on this cache to repair it")
        try:
            clip = ClipFeatures.load(path, with_maps=with_maps)
            clip_digest = ExtractionSettings.from_dict(clip.settings).digest()
        except (FeatureFileError, ValueError, TypeError) as e:
            log.warning("skipping %s: %s (avemo-extract on this cache redoes it)", path, e)
            continue
        bad = clip.nonfinite()
        if bad:
            log.warning("skipping %s: %s hold NaN or infinite values", path, " and ".join(bad))
            continue
        if digest is None:
            settings, digest = clip.settings, clip_digest
        elif clip_digest != digest:
            raise CacheError(f"{path} (clip '{row.clip}') was extracted with other settings than the rest of "
                             f"{cache}; a cache must come from one avemo-extract configuration: remove that file "
                             "and run avemo-extract on the cache again")
        label, speaker, split = clip.label, clip.speaker, None
        mrow = row._asdict()
        label = mrow.get("label") or label
        speaker = mrow.get("speaker") or speaker
        if table is not None:
            t = table.get(row.clip)
            if t is None:
                unlabelled += 1
                continue
            label = t["label"] or None
            speaker = t.get("speaker") or speaker
            split = t.get("split") or None
        if not label:
            unlabelled += 1
            continue
        clips.append(clip)
        files.append(path)
        names.append(str(label))
        speakers.append(str(speaker) if speaker else None)
        splits.append(split)
    if not clips:
        raise CacheError(f"{cache}: no labels: none of the {len(usable)} usable clips has a label "
                         "(label them at extraction, e.g. --label-from, or pass --labels CSV)")
    if unlabelled:
        log.warning("%d usable clips have no label and are left out", unlabelled)
    classes = sorted(set(names))
    if len(classes) < 2:
        raise CacheError(f"{cache}: only one class ('{classes[0]}') among {len(clips)} labelled clips; "
                         "a classifier needs at least two")
    split_column = None
    if any(s is not None for s in splits):
        bad = sorted({s for s in splits if s not in ("train", "val", "test")}, key=str)
        if bad:
            raise CacheError(f"split column values must be train, val or test (every clip); found {bad}")
        split_column = splits
    n_mels = int(settings.get("n_mels", 0))
    video_dims = {c.arrays["video_features"].shape[1] for c in clips
                  if "video_features" in c.arrays and c.arrays["video_features"].size}
    if len(video_dims) > 1:
        raise CacheError(f"{cache}: clips have different face-feature sizes {sorted(video_dims)}")
    video_dim = video_dims.pop() if video_dims else int(settings.get("feature_dim", 0) or 0)
    index = {c: i for i, c in enumerate(classes)}
    return TrainingData(clips=clips, labels=np.array([index[n] for n in names], np.int64), classes=classes,
                        speakers=speakers, split_column=split_column, settings=settings, n_mels=n_mels,
                        video_dim=video_dim, files=files,
                        video_cells=_map_cells(clips, cache) if with_maps else 0)


def _map_cells(clips: list[ClipFeatures], cache: Path) -> int:
    """Cells per frame of the clips' feature maps; 0 when a clip with a face has none (a cache
    extracted without --feature-maps, or only partly re-extracted with it)."""
    video = [c for c in clips if c.has_video]
    if not video or any("feature_maps" not in c.arrays for c in video):
        return 0
    grids = {c.arrays["feature_maps"].shape[1:3] for c in video}
    if len(grids) > 1:
        raise CacheError(f"{cache}: clips have feature maps of different grids {sorted(grids)}")
    h, w = grids.pop()
    return h * w


def merge_training_data(parts: list[TrainingData], names: list[str]) -> TrainingData:
    """Several caches as one audio training set: classes united by name, speakers named ``NAME:speaker``
    (two corpora may both have a speaker '01'), clips without audio left out.

    The caches must share the spectrogram's settings (``AUDIO_SETTING_KEYS``); their face-side
    settings may differ, since only the audio is used.
    """
    if len(parts) != len(names) or len(set(names)) != len(names):
        raise CacheError(f"each cache needs its own name, got {names}")
    ref = parts[0].settings
    for part, name in zip(parts[1:], names[1:]):
        diff = [f"{k} {part.settings.get(k)!r} vs {ref.get(k)!r}" for k in AUDIO_SETTING_KEYS
                if part.settings.get(k) != ref.get(k)]
        if diff:
            raise CacheError(f"cache '{name}' has other spectrogram settings than '{names[0]}': {'; '.join(diff)}")
    classes = sorted({c for part in parts for c in part.classes})
    clips, labels, speakers = [], [], []
    for part, name in zip(parts, names):
        for clip, label, speaker in zip(part.clips, part.labels, part.speakers):
            if clip.has_audio:
                clips.append(clip)
                labels.append(classes.index(part.classes[label]))
                speakers.append(f"{name}:{speaker}" if speaker else None)
    if not clips:
        raise CacheError(f"no clip with audio in {', '.join(names)}")
    return TrainingData(clips=clips, labels=np.array(labels, np.int64), classes=classes, speakers=speakers,
                        split_column=None, settings=dict(ref), n_mels=parts[0].n_mels, video_dim=0)
