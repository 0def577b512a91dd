"""One media file -> ``ClipFeatures``: the single extraction code path (folder runs and prediction).

``ClipExtractor`` loads the face detector and encoder once, then turns files (or time
windows of a long file) into face-feature sequences and a log-mel spectrogram. Faces are
detected, aligned and embedded batch by batch while frames stream past, so memory stays
bounded however long the input is; the primary face is chosen after the last frame,
from every face seen.

A missing modality is data: its reason goes into ``ClipFeatures.warnings`` as
``"video: ..."`` or ``"audio: ..."``. Only a file with nothing usable raises ``ClipError``.
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from avemo.audio import audio_stream, is_silent, load_audio, log_mel, trim_silence
from avemo.encoders import FaceEncoder, load_named_encoder
from avemo.faces import SMALL_FACE_KEEP, Detections, FaceDetector, FaceTrack, align_face, track_primary_face
from avemo.features import ClipFeatures, ExtractionSettings
from avemo.media import ClipError, expects_video, unreadable_reason
from avemo.video import (MediaError, VideoFrames, iter_frames_at, media_duration, open_media,
                         sample_times, scan_ends, video_span, video_stream)

STAGES = ("decode", "detect", "align", "embed", "audio")
# a second look for small faces (ClipExtractor._second_look) over many sampled frames first tries this many
SECOND_LOOK_PROBE = 16
# Windows of one file (avemo-predict --window) get a second look at most once in this many seconds of it
# while those looks find no face: a faceless hour of HD video in 2 s windows would otherwise take some
# six times as long, for a face that none of the looks so far has seen.
SECOND_LOOK_EVERY_S = 30.0


@dataclasses.dataclass
class _Look:
    """One pass over a video's sampled frames: per frame shown, its time, the faces found (best
    first), their embeddings (and crops, feature maps); ``info``: what decoding saw."""

    info: VideoFrames
    frame_times: list[float] = dataclasses.field(default_factory=list)
    dets: list[Detections] = dataclasses.field(default_factory=list)
    feats: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    crops: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    maps: list[np.ndarray | None] = dataclasses.field(default_factory=list)

    def any_face(self) -> bool:
        return any(len(d.probs) for d in self.dets)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def with_encoder_identity(settings: ExtractionSettings, encoder) -> ExtractionSettings:
    """``settings`` with the loaded encoder's hash and feature size filled in; if ``settings``
    already carry a hash (read back from a cache or a checkpoint) the encoder must match it."""
    if settings.encoder_sha256 and settings.encoder_sha256 != encoder.sha256:
        raise ValueError(
            f"face encoder '{settings.encoder}' is not the one these settings were made with "
            f"(sha256 {encoder.sha256[:12]}... vs {settings.encoder_sha256[:12]}...)")
    return dataclasses.replace(settings, encoder_sha256=encoder.sha256, feature_dim=encoder.feature_dim)


class ClipExtractor:
    """Loads MTCNN and the face encoder once; ``extract()`` turns one file into ``ClipFeatures``.

    ``settings.encoder`` names the encoder (shipped name or file path); the loaded file's
    hash and feature size are filled into ``self.settings``. If ``settings`` already
    carries a hash (read back from a cache or a model checkpoint) the encoder must match it.
    ``encoder``: a loaded encoder to embed with instead (a model's fine-tuned one).
    """

    def __init__(self, settings: ExtractionSettings | None = None, device: str | None = None,
                 batch_frames: int = 16, with_video: bool = True, encoder: FaceEncoder | None = None):
        settings = settings or ExtractionSettings()
        self.device = device or default_device()
        # an audio-only consumer (an audio model at prediction time) never pays for faces
        self.with_video = with_video
        self.encoder = self.detector = None
        if with_video:
            if encoder is None:
                self.encoder = load_named_encoder(settings.encoder, settings.encoder_sha256, self.device)
                settings = with_encoder_identity(settings, self.encoder)
            else:
                # a model's own encoder (fine-tuned end to end from the one ``settings`` name): no
                # file is opened, and the settings keep the identity of the encoder it started from
                self.encoder = encoder
            self.detector = FaceDetector(self.device, settings.min_face_size, settings.min_face_prob,
                                         settings.min_face_frac)
        self.settings = settings
        self.batch_frames = batch_frames
        self.seconds: dict[str, float] = defaultdict(float)   # time spent per stage, all clips
        # (file, size, modification time) -> start of the last window whose second look found no face
        self._fruitless: dict[tuple[str, int, int], float] = {}

    @contextmanager
    def _timed(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t

    def extract(self, path, clip_id: str | None = None, start: float | None = None,
                end: float | None = None, label: str | None = None,
                speaker: str | None = None) -> ClipFeatures:
        """Features of ``path`` (or of its [start, end) seconds). Raises ``ClipError``."""
        path = Path(path)
        if start is not None and end is not None and not end > start:
            raise ValueError(f"empty time window: start {start} >= end {end}")
        reason = unreadable_reason(path)
        if reason:
            raise ClipError(reason)
        if path.stat().st_size == 0:
            raise ClipError("empty file (0 bytes)")
        try:
            with open_media(path) as c:
                vs, aus = video_stream(c), audio_stream(c)
                duration = media_duration(c)
        except MediaError as e:
            raise ClipError(str(e)) from None
        if vs is None and aus is None:
            raise ClipError("no audio or video stream in the file")
        if duration is None:
            duration = max(scan_ends(path).values(), default=0.0)

        warnings: list[str] = []
        arrays: dict[str, np.ndarray] = {}
        if vs is not None and self.with_video:
            arrays.update(self._video_arrays(path, start, end, warnings))
        elif vs is None and expects_video(path):
            warnings.append("video: no video stream (audio-only file)")
        audio_seconds = 0.0
        if aus is not None:
            mel, audio_seconds = self._audio_mel(path, start, end, warnings)
            if mel is not None:
                arrays["mel"] = mel
        else:
            warnings.append("audio: no audio stream")

        feats = ClipFeatures(clip=clip_id or path.name, settings=self.settings.to_dict(),
                             duration=float(duration or 0.0), audio_seconds=audio_seconds,
                             label=label, speaker=speaker, warnings=warnings, arrays=arrays)
        if not feats.has_video and not feats.has_audio:
            raise ClipError("; ".join(warnings) or "nothing could be extracted")
        return feats

    # ---- video ----

    def _video_arrays(self, path: Path, start, end, warnings: list[str]) -> dict[str, np.ndarray]:
        s = self.settings
        with open_media(path) as c:
            stream = video_stream(c)
            v_dur = video_span(path, c, stream, warnings)
            if v_dur is None and end is None:
                warnings.append("video: the file gives no duration and has no timestamps")
                return {}
            t0, t1 = start or 0.0, end if end is not None else v_dur
            times = sample_times(t0, t1, s.frames, s.fps, s.max_frames)
            if s.fps is not None and len(times) == s.max_frames and (t1 - t0) * s.fps > s.max_frames:
                warnings.append(f"video: {s.fps} fps over {t1 - t0:.0f} s exceeds max_frames; "
                                f"sampled {s.max_frames} frames evenly instead")
            seen = self._faces_at(c, stream, times, s.detect_max_side, self.detector)
        info = seen.info
        if info.bad_packets:
            warnings.append(f"video: {info.bad_packets} undecodable packet(s) skipped")
        if info.corrupt_frames:
            warnings.append(f"video: {info.corrupt_frames} damaged frame(s) decoded")
        if info.gaps:
            at, length = max(info.gaps, key=lambda g: g[1])
            warnings.append(f"video: {len(info.gaps)} gap(s) with no frames, longest {length:.2f} s "
                            f"after {at:.2f} s (damaged file?)")
        warnings.extend(f"video: {w}" for w in info.warnings)
        if not seen.frame_times:
            warnings.append("video: no frame could be decoded")
            return {}
        if info.end_time is not None and times[-1] > info.end_time + 0.5 and len(seen.frame_times) < len(times):
            warnings.append(f"video: frames end at {info.end_time:.2f} s of {t1:.2f} s (truncated file?)")
        elif s.frames is not None and len(seen.frame_times) < len(times):
            warnings.append(f"video: only {len(seen.frame_times)} distinct frame(s) in the clip ({len(times)} asked)")
        if not seen.any_face():
            seen = self._second_look(path, times, seen, warnings, start)
        return self._primary_face_arrays(seen, warnings)

    def _faces_at(self, container, stream, times: np.ndarray, max_side: int, detector: FaceDetector) -> "_Look":
        """Every face ``detector`` finds in the frames on screen at ``times``, with frames shrunk to
        ``max_side``: decoded, detected, aligned and embedded batch by batch as they stream past."""
        look = _Look(VideoFrames())
        track = FaceTrack() if self.settings.track_faces else None
        batch: list[tuple[float, np.ndarray]] = []
        frames_iter = iter_frames_at(container, stream, times, max_side, look.info)
        while True:
            with self._timed("decode"):
                item = next(frames_iter, None)
            if item is not None:
                batch.append(item)
            if batch and (item is None or len(batch) == self.batch_frames
                          or batch[-1][1].shape != batch[0][1].shape):
                tail = [batch.pop()] if batch[-1][1].shape != batch[0][1].shape else []
                self._faces_of_batch(batch, track, detector, look)
                batch = tail
            if item is None:
                break
        return look

    def _second_look(self, path: Path, times: np.ndarray, first: "_Look", warnings: list[str],
                     window: float | None = None) -> "_Look":
        """``first`` (no face in any frame), or what a look at up to ``small_face_side`` pixels for faces
        down to ``SMALL_FACE_PX`` finds in the same frames: a wide shot in HD, where the face that
        carries the clip is smaller than the usual search (``min_face_frac`` of a 640 px frame) sees.

        Only where that look can see faces the first could not (a source larger than the first look's
        frames, or a first look that skipped small faces). On many frames it first tries
        ``SECOND_LOOK_PROBE`` of them, spread evenly, and looks at all only if those hold a face. In
        windows of a file (``window``: the start of this one) it looks at most once in
        ``SECOND_LOOK_EVERY_S`` while it finds nothing."""
        s, info = self.settings, first.info
        n = len(times)
        note = f"video: no face found in any of {len(first.frame_times)} sampled frame(s)"
        side = max(info.width, info.height)
        if not s.small_face_side or not side:
            warnings.append(note)
            return first
        small = self.detector.for_small_faces()
        scale = min(1.0, s.small_face_side / side)
        shape = (round(info.height * info.scale), round(info.width * info.scale))
        # MTCNN boxes faces down to about 0.6 of its smallest window: what the first look could find
        first_box = 0.6 * self.detector.smallest_face(shape) / info.scale      # in source pixels
        floor = SMALL_FACE_KEEP / scale
        if floor >= first_box:
            warnings.append(note)
            return first
        key = None
        if window is not None:
            st = path.stat()
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
            last = self._fruitless.get(key)
            if last is not None and 0 <= window - last < SECOND_LOOK_EVERY_S:
                warnings.append(f"{note} (not looked at again for small faces: that look found none at {last:.1f} s "
                                f"of this file; the next is {SECOND_LOOK_EVERY_S:.0f} s after that)")
                return first
        probe = times if n <= SECOND_LOOK_PROBE else times[np.linspace(0, n - 1, SECOND_LOOK_PROBE).round().astype(int)]
        for targets in (probe, times):
            with open_media(path) as c:     # afresh: decoding only ever seeks forwards
                look = self._faces_at(c, video_stream(c), targets, s.small_face_side, small)
            if not look.any_face() or len(targets) == n:
                break
        if key is not None:
            if len(self._fruitless) > 1024:     # a long-lived extractor over many files
                self._fruitless.clear()
            if look.any_face():
                self._fruitless.pop(key, None)
            else:
                self._fruitless[key] = window
        if not look.any_face():
            warnings.append(f"{note}, nor in {len(probe)} of them looked at again at "
                            f"{round(info.width * scale)}x{round(info.height * scale)} for faces down to {floor:.0f} px")
            return first
        warnings.append(f"video: no face of the size looked for first (about {first_box:.0f} px and up); small faces "
                        f"found on a second look at {round(info.width * scale)}x{round(info.height * scale)} "
                        f"(down to {floor:.0f} px)")
        return look

    def _faces_of_batch(self, batch, track: FaceTrack | None, detector: FaceDetector, look: "_Look") -> None:
        """Detect, align and embed every face in a batch of frames (the primary is chosen later)."""
        s = self.settings
        frames = np.stack([f for _, f in batch])                       # [B, H, W, 3]
        with self._timed("detect"):
            found = detector.detect(frames, track)
        with self._timed("align"):
            aligned = [np.stack([align_face(frames[i], lm, s.face_size) for lm in d.landmarks])
                       if len(d.probs) else None for i, d in enumerate(found)]
        with self._timed("embed"):
            flat = [a for a in aligned if a is not None]
            emb = fmap = None
            if flat and s.feature_maps:
                # one pass gives both: the pooled feature is computed from this very map
                emb, fmap = (t.numpy() for t in self.encoder.embed_maps(np.concatenate(flat)))
                # emb [faces, D], fmap [faces, h, w, D]
            elif flat:
                emb = self.encoder.embed(np.concatenate(flat)).numpy()                # [faces, D]
        k = 0
        for (t, _), d, a in zip(batch, found, aligned):
            look.frame_times.append(t)
            look.dets.append(d)
            n = 0 if a is None else len(a)
            look.feats.append(emb[k:k + n] if n else None)
            look.crops.append(a if s.keep_crops else None)
            look.maps.append(fmap[k:k + n] if n and fmap is not None else None)
            k += n

    def _primary_face_arrays(self, look: "_Look", warnings: list[str]) -> dict[str, np.ndarray]:
        s, dets, scale = self.settings, look.dets, look.info.scale
        t = len(look.frame_times)
        chosen = track_primary_face(dets)
        out = {
            "video_features": np.zeros((t, s.feature_dim), np.float32),
            "face_mask": chosen >= 0,
            "frame_times": np.asarray(look.frame_times, np.float64),
            "boxes": np.full((t, 4), np.nan, np.float32),
            "scores": np.zeros(t, np.float32),
            "landmarks": np.full((t, 5, 2), np.nan, np.float32),
        }
        if s.keep_crops:
            out["crops"] = np.zeros((t, s.face_size, s.face_size, 3), np.uint8)
        if s.feature_maps:
            # float16 halves the cache; a value beyond its range becomes inf and is refused below
            out["feature_maps"] = np.zeros((t, *self.encoder.map_grid, s.feature_dim), np.float16)
        for i, j in enumerate(chosen):
            if j < 0:
                continue
            out["video_features"][i] = look.feats[i][j]
            out["boxes"][i] = dets[i].boxes[j] / scale      # detection pixels -> source pixels as shown (rotated, square)
            out["scores"][i] = dets[i].probs[j]
            out["landmarks"][i] = dets[i].landmarks[j] / scale
            if s.keep_crops:
                out["crops"][i] = look.crops[i][j]
            if s.feature_maps:
                out["feature_maps"][i] = look.maps[i][j]
        if not all(np.isfinite(out[k]).all() for k in ("video_features", "feature_maps") if k in out):
            # refused here, where it arises: stored, it would train to NaN weights
            warnings.append("video: the face encoder gave NaN or infinite features (a broken encoder file?)")
            return {}
        if out["face_mask"].any() and max(len(d.probs) for d in dets) > 1:
            warnings.append("video: several faces seen; kept the one tracked through the most frames")
        return out

    # ---- audio ----

    def _audio_mel(self, path: Path, start, end, warnings: list[str]) -> tuple[np.ndarray | None, float]:
        s = self.settings
        with self._timed("audio"):
            notes: list[str] = []
            wav = load_audio(path, s.sample_rate, start, end, notes)
            warnings.extend(f"audio: {n}" for n in notes)
            if len(wav) == 0:
                warnings.append("audio: no audio could be decoded")
                return None, 0.0
            if not np.isfinite(wav).all():
                # float formats can carry them; stored, they would train to NaN weights
                warnings.append("audio: the decoded samples hold NaN or infinite values")
                return None, 0.0
            if is_silent(wav):
                warnings.append("audio: the audio track is silent")
                return None, 0.0
            if s.trim_silence:
                trimmed = trim_silence(wav, s.trim_top_db)
                # a clip that is all one short sound keeps its untrimmed audio rather than none
                if len(trimmed) >= s.n_fft:
                    wav = trimmed
            if len(wav) < s.n_fft:
                warnings.append(f"audio: shorter than one spectrogram window "
                                f"({1000 * len(wav) / s.sample_rate:.1f} ms < {1000 * s.n_fft / s.sample_rate:.0f} ms)")
                return None, 0.0
            mel = log_mel(wav, s.sample_rate, s.n_fft, s.hop_length, s.n_mels, s.f_min, s.f_max)
            return mel, len(wav) / s.sample_rate
