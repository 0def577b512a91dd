"""The feature contract: what one cached clip holds, and the settings that produced it.

Stage one writes ``ClipFeatures`` (one ``.npz`` per clip), stage two reads them, and
prediction builds the same object in memory from a single file with the settings
stored in the checkpoint. Either modality may be absent: that is data, not an error.

Arrays (all optional, absent when the modality is missing):

=================  ===============  ======================================================
key                shape / dtype    meaning
=================  ===============  ======================================================
video_features     [T_v, D] f32     face-encoder feature of each sampled frame (0 if no face)
face_mask          [T_v] bool       True where a face was found in that frame
frame_times        [T_v] f64        presentation time of each sampled frame, seconds
boxes              [T_v, 4] f32     face box x1, y1, x2, y2 in source-frame pixels as shown (NaN: none)
scores             [T_v] f32        detector probability of the kept face (0: none)
landmarks          [T_v, 5, 2] f32  eyes, nose, mouth corners in the same pixels (NaN: none)
crops              [T_v, S, S, 3]   aligned RGB face crops, uint8 (only with keep_crops)
feature_maps       [T_v, h, w, D]   the face encoder's last spatial feature map of each frame, f16
                                    (only with feature_maps; h x w cells, e.g. 3 x 3 for the shipped
                                    encoder at 48 px; 0 if no face): STT's spatial tokens
mel                [n_mels, T_a]    log-mel spectrogram, f32 (natural log of power + 1e-6)
=================  ===============  ======================================================

Loading never unpickles: metadata is JSON stored as a uint8 array.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avemo.io import atomic_path, dataclass_from_dict, first_line

CACHE_FORMAT_VERSION = 1
# arrays that must be finite: NaN or inf here would train to NaN weights (boxes and
# landmarks use NaN on purpose, for "no face")
FINITE_KEYS = ("video_features", "feature_maps", "mel")


class FeatureFileError(ValueError):
    """A feature file that cannot be read (empty, truncated, not an avemo file); the reason in words."""
ARRAY_KEYS = ("video_features", "face_mask", "frame_times", "boxes", "scores", "landmarks", "crops", "feature_maps",
              "mel")
# the settings that shape the log-mel spectrogram: an audio model trained on one cache fits another
# cache's audio only when these agree (the face-side settings may differ)
AUDIO_SETTING_KEYS = ("sample_rate", "n_fft", "hop_length", "n_mels", "f_min", "f_max", "trim_silence", "trim_top_db")
# Stored settings that lack a field were written before it existed: the field takes the value
# that reproduces what that avemo did, not today's default.
LEGACY_SETTINGS = {"track_faces": False, "feature_maps": False, "small_face_side": 0}
# settings that only add arrays to a cache and change none of its numbers: not part of its identity,
# so asking for them later (re-running avemo-extract with the flag) fills them in on the same cache
ADDITIVE_SETTINGS = ("keep_crops", "feature_maps")
# settings whose default a release changed: a cache begun before goes on as it was begun, unless asked
# otherwise (extract.run), so that upgrading avemo never makes a half-finished cache unresumable
UPGRADE_SETTINGS = tuple(k for k in LEGACY_SETTINGS if k not in ADDITIVE_SETTINGS)


def settings_differences(model_settings: dict[str, Any], cache_settings: dict[str, Any],
                         keys: tuple[str, ...] | None = None) -> list[tuple[str, Any, Any]]:
    """(setting, cache's value, model's value) wherever a cache was made otherwise than the one a
    model learned from. ``keys``: the settings the model reads (``AUDIO_SETTING_KEYS`` for a
    voice-only model, whose face-side settings never reach it); None: all but the additive ones."""
    theirs = {**LEGACY_SETTINGS, **model_settings}
    ours = {**LEGACY_SETTINGS, **cache_settings}
    keys = keys or tuple(sorted((set(theirs) | set(ours)) - set(ADDITIVE_SETTINGS)))
    return [(k, ours.get(k), theirs.get(k)) for k in keys if ours.get(k) != theirs.get(k)]


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything that changes the numbers in a cache. Its hash names a cache's identity."""

    # audio: log-mel as in most speech-emotion work: 25 ms windows, 10 ms hop
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 20.0
    f_max: float | None = None
    trim_silence: bool = True
    trim_top_db: float = 40.0
    # video: sample `frames` frames uniformly over the clip, or `fps` frames a second
    frames: int | None = 16
    fps: float | None = None
    max_frames: int = 4096          # hard cap when sampling by fps (an hour at 1 fps fits)
    detect_max_side: int = 640      # frames are shrunk to this before detection (speed, memory)
    min_face_prob: float = 0.90
    min_face_size: int = 20         # in detection-resolution pixels, and at least...
    min_face_frac: float = 0.08     # ...this share of the frame's shorter side: the face that
                                    # carries a clip is rarely tiny, and MTCNN's image pyramid
                                    # (its cost) shrinks with the square of the smallest face
    track_faces: bool = True        # between keyframes, look for faces only where they just were
                                    # (FaceDetector.detect): a fraction of the detection time
    small_face_side: int = 1920     # a video in which no face is found is looked at again with its
                                    # longer side at up to this, for faces down to SMALL_FACE_PX
                                    # (a wide shot in HD; 0: never). Only faceless clips pay for it
    face_size: int = 112            # side of the aligned crop (five-point template scaled)
    keep_crops: bool = False
    feature_maps: bool = False      # also store each frame's last feature map (STT's spatial tokens)
    # face encoder identity: a cache made with another encoder is another cache
    encoder: str = "default"
    encoder_sha256: str = ""
    feature_dim: int = 0

    def __post_init__(self):
        if (self.frames is None) == (self.fps is None):
            raise ValueError("set exactly one of frames (per clip) or fps (frames per second)")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.small_face_side < 0:
            raise ValueError(f"small_face_side must be >= 0 (0: no second look), got {self.small_face_side}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractionSettings":
        """Settings read back from a cache or a checkpoint (see ``LEGACY_SETTINGS``)."""
        return dataclass_from_dict(cls, {**LEGACY_SETTINGS, **d}, "extraction settings")

    def digest(self) -> str:
        """Short stable hash of the settings (``ADDITIVE_SETTINGS`` excluded: they add data, change none).

        A field at its ``LEGACY_SETTINGS`` value is left out, so caches written before the
        field existed keep their identity (their settings hash as they did then).
        """
        d = self.to_dict()
        for k in ADDITIVE_SETTINGS:
            d.pop(k)
        for k, v in LEGACY_SETTINGS.items():
            if k in d and d[k] == v:
                d.pop(k)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class ClipFeatures:
    """One clip's features (see the module docstring for the arrays) plus its metadata."""

    clip: str                                   # id: path relative to the input folder
    settings: dict[str, Any]
    duration: float = 0.0                       # seconds, longest stream
    audio_seconds: float = 0.0                  # after trimming silence
    label: str | None = None
    speaker: str | None = None
    warnings: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def has_video(self) -> bool:
        m = self.arrays.get("face_mask")
        return m is not None and bool(np.any(m))

    @property
    def has_audio(self) -> bool:
        mel = self.arrays.get("mel")
        return mel is not None and mel.shape[-1] > 0

    @property
    def face_coverage(self) -> float:
        m = self.arrays.get("face_mask")
        return float(np.mean(m)) if m is not None and len(m) else 0.0

    @property
    def frames_sampled(self) -> int:
        m = self.arrays.get("face_mask")
        return 0 if m is None else int(len(m))

    def meta(self) -> dict[str, Any]:
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "clip": self.clip, "settings": self.settings, "duration": self.duration,
            "audio_seconds": self.audio_seconds, "label": self.label, "speaker": self.speaker,
            "warnings": list(self.warnings),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to ``path`` (an ``.npz``)."""
        unknown = set(self.arrays) - set(ARRAY_KEYS)
        if unknown:
            raise ValueError(f"unknown feature arrays {sorted(unknown)}")
        meta = np.frombuffer(json.dumps(self.meta()).encode("utf-8"), dtype=np.uint8)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object stops numpy appending ".npz" to the temp name
                np.savez(f, meta=meta, **self.arrays)

    def nonfinite(self) -> list[str]:
        """Names of the arrays that hold NaN or infinite values (see ``FINITE_KEYS``)."""
        return [k for k in FINITE_KEYS if k in self.arrays and not np.isfinite(self.arrays[k]).all()]

    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict[str, Any]:
        """The metadata of a feature file without loading its arrays (cheap); ``FeatureFileError`` if unreadable."""
        with _reading(path) as z:
            return _meta(z, path)

    @classmethod
    def load(cls, path: str | os.PathLike, with_crops: bool = False, with_maps: bool = True) -> "ClipFeatures":
        """Read a feature file; the large optional arrays (crops, feature maps) only when asked."""
        skip = {k for k, want in (("crops", with_crops), ("feature_maps", with_maps)) if not want}
        with _reading(path) as z:
            meta = _meta(z, path)
            arrays = {k: z[k] for k in ARRAY_KEYS if k in z.files and k not in skip}
        return cls(clip=meta["clip"], settings=meta["settings"], duration=meta["duration"],
                   audio_seconds=meta["audio_seconds"], label=meta["label"], speaker=meta["speaker"],
                   warnings=meta.get("warnings", []), arrays=arrays)


@contextlib.contextmanager
def _reading(path):
    """np.load of an .npz, with every way a damaged file fails turned into ``FeatureFileError``."""
    try:
        if os.path.getsize(path) == 0:
            raise FeatureFileError(f"{path}: empty feature file (0 bytes)")
        with np.load(path, allow_pickle=False) as z:
            yield z
    except FeatureFileError:
        raise
    except FileNotFoundError:
        raise FeatureFileError(f"{path}: feature file missing") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zlib.error, UnicodeDecodeError) as e:
        raise FeatureFileError(f"{path}: damaged feature file (truncated or overwritten?): "
                               f"{type(e).__name__}: {first_line(e)}") from None


def _meta(z, path) -> dict[str, Any]:
    if "meta" not in z.files:
        raise FeatureFileError(f"{path}: not an avemo feature file (no metadata)")
    meta = json.loads(bytes(z["meta"]).decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise FeatureFileError(f"{path}: cache format {meta.get('format_version') if isinstance(meta, dict) else '?'} "
                               f"is not {CACHE_FORMAT_VERSION}; re-extract with this avemo version")
    missing = {"clip", "settings", "duration", "audio_seconds", "label", "speaker"} - set(meta)
    if missing:
        raise FeatureFileError(f"{path}: feature metadata lacks {', '.join(sorted(missing))}")
    return meta


def feature_filename(clip: str) -> str:
    """A flat, collision-free file name for a clip id (ids are relative paths, maybe non-ASCII)."""
    stem = Path(clip).name
    safe = "".join(c if (c.isalnum() and c.isascii()) or c in "-_." else "_" for c in stem)[:80]
    # fsencode: a name that is not UTF-8 (kept as surrogates) hashes as its bytes on disk
    return f"{safe}.{hashlib.sha1(os.fsencode(clip)).hexdigest()[:10]}.npz"
