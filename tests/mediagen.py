"""Real media files made on the fly with PyAV, for extraction tests (good and deliberately bad)."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import skimage.data


def astronaut(size: int = 256) -> np.ndarray:
    """A real photograph with one frontal face (uint8 RGB [size, size, 3])."""
    return cv2.resize(skimage.data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 220.0, amp: float = 0.3) -> np.ndarray:
    """A sine, float32 [channels, n]; channel c has amplitude amp / (c + 1) (never cancels out)."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([(amp / (c + 1)) * np.sin(2 * np.pi * freq * t) for c in range(channels)]).astype(np.float32)


def write_video(path, frames: list[np.ndarray], fps: int = 10, codec: str = "mpeg4",
                audio: np.ndarray | None = None, audio_rate: int = 16000, rotation: int | None = None,
                audio_codec: str = "aac", gop: int | None = None, pixel_aspect: Fraction | None = None) -> Path:
    """Encode RGB ``frames`` (and ``audio`` [C, n] float) into ``path``; container from the suffix.

    AAC pads a few ms of priming; use ``audio_codec="pcm_s16le"`` (mkv) for exact lengths.
    ``rotation``: display rotation (degrees counter-clockwise) written as container metadata.
    ``gop``: frames between keyframes (x264's default is 250: ten seconds and more at low rates).
    ``pixel_aspect``: the stored pixels' width over height as shown (anamorphic video), in the stream.
    """
    path = Path(path)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        vs = c.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if gop:
            vs.codec_context.gop_size = gop
            if codec == "libx264":      # no extra keyframes at scene changes: exactly one per gop
                vs.codec_context.options = {"sc_threshold": "0"}
        if rotation:
            vs.set_display_rotation(rotation)
        if pixel_aspect:
            vs.codec_context.sample_aspect_ratio = pixel_aspect
        aus = None
        if audio is not None:
            aus = c.add_stream(audio_codec, rate=audio_rate, layout="stereo" if audio.shape[0] == 2 else "mono")
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if aus is not None:
            _encode_audio(c, aus, audio, audio_rate)
    return path


def write_audio(path, audio: np.ndarray, rate: int) -> Path:
    """``audio`` [C, n] float in [-1, 1] -> wav / flac / mp3 / m4a / mp4 / ogg / opus / aiff by suffix."""
    path = Path(path)
    codec = {".wav": "pcm_s16le", ".flac": "flac", ".mp3": "libmp3lame", ".m4a": "aac",
             ".mp4": "aac", ".ogg": "libopus", ".opus": "libopus", ".aiff": "pcm_s16be"}[path.suffix.lower()]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate if codec != "libopus" else 48000,
                         layout="stereo" if audio.shape[0] == 2 else "mono")
        _encode_audio(c, s, audio, rate)
    return path


def write_tracks(path, tracks: list[np.ndarray], rate: int) -> Path:
    """Several audio tracks (each [C, n] float) in one file, FLAC in Matroska, in this order."""
    path = Path(path)
    with av.open(str(path), "w") as c:
        streams = [c.add_stream("flac", rate=rate, layout="stereo" if t.shape[0] == 2 else "mono") for t in tracks]
        for s, t in zip(streams, tracks):
            _encode_audio(c, s, t, rate)
    return path


def _encode_audio(container, stream, audio: np.ndarray, rate: int) -> None:
    fmt = stream.codec_context.format.name
    layout = "stereo" if audio.shape[0] == 2 else "mono"
    target = av.AudioResampler(format=fmt, layout=layout, rate=stream.codec_context.sample_rate)
    step = 1024
    pts = 0
    for i in range(0, audio.shape[1], step):
        chunk = np.ascontiguousarray(audio[:, i:i + step], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
        pts += chunk.shape[1]
        for f in target.resample(frame):
            for p in stream.encode(f):
                container.mux(p)
    for f in target.resample(None):
        for p in stream.encode(f):
            container.mux(p)
    for p in stream.encode():
        container.mux(p)


def two_faces(n: int, size: int = 320) -> list[np.ndarray]:
    """n frames, 2*size wide: person A (left) in every frame; person B (right, mirrored)
    only in the last half, and there larger than A (so the largest face changes person)."""
    a = astronaut(size // 2)
    b = np.ascontiguousarray(astronaut(3 * size // 4)[:, ::-1])
    out = []
    for i in range(n):
        f = np.full((size, 2 * size, 3), 90, np.uint8)
        f[size // 4: size // 4 + size // 2, 20: 20 + size // 2] = a
        if i >= n // 2:
            f[: 3 * size // 4, size: size + 3 * size // 4] = b
        out.append(f)
    return out


def random_encoder(path) -> Path:
    """A random-init EfficientFace encoder file: same shapes and cost as a trained one."""
    import torch
    from avemo.encoders import build_encoder, export_encoder
    torch.manual_seed(0)
    model = build_encoder("efficientface", 7)
    export_encoder(path, model, "efficientface", {}, ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"],
                   input_size=112, grayscale=False, mean=[0.5] * 3, std=[0.5] * 3)
    return Path(path)


def moving_face(n: int, start: tuple[float, float, float], end: tuple[float, float, float],
                height: int = 240, width: int = 320, shown: range | None = None) -> list[np.ndarray]:
    """n frames of a grey ``height`` x ``width`` scene with the astronaut photo in it, its top
    left corner and side going linearly from ``start`` to ``end`` (x, y, side in pixels; it
    may leave the frame); ``shown``: the frames it is in (default: all)."""
    out = []
    for i in range(n):
        f = np.full((height, width, 3), 90, np.uint8)
        if shown is None or i in shown:
            a = i / max(n - 1, 1)
            x, y, side = (round(s + a * (e - s)) for s, e in zip(start, end))
            photo = astronaut(side)
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, width), min(y + side, height)
            if x1 > x0 and y1 > y0:
                f[y0:y1, x0:x1] = photo[y0 - y:y1 - y, x0 - x:x1 - x]
        out.append(f)
    return out


def sampled_frames(path, n: int, max_side: int = 640) -> np.ndarray:
    """``n`` frames sampled evenly over a video file, shrunk as extraction shrinks them for
    face detection: uint8 RGB [n, H, W, 3]."""
    from avemo.video import VideoFrames, iter_frames_at, open_media, sample_times, video_span, video_stream
    with open_media(path) as c:
        s = video_stream(c)
        times = sample_times(0.0, video_span(path, c, s, []), n, None, 4096)
        return np.stack([f for _, f in iter_frames_at(c, s, times, max_side, VideoFrames())])


def unlistable(monkeypatch, folder: Path) -> None:
    """``folder`` cannot be listed, as another user's on a shared disk (chmod would not do: a
    test run as root reads it anyway)."""
    scandir = os.scandir

    def refusing(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refusing)
