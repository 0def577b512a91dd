"""Streaming video decode with PyAV: frames sampled uniformly in time, upright, bounded in size.

Only the sampled frames are ever converted to pixels, one at a time, so memory does not
grow with the length of the file. Streams are chosen by type (some containers carry data
streams with no codec before the video), and rotation metadata is applied so frames come
out the way a player shows them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import av
import numpy as np

# A gap between sampled frames longer than this is crossed by seeking instead of decoding.
SEEK_GAP_S = 10.0


class MediaError(Exception):
    """A file that cannot be read as media; the message is the reason, in words."""


@dataclass
class VideoFrames:
    """What a decode pass found besides the frames themselves (filled while iterating)."""

    width: int = 0                  # displayed source size (square pixels, rotated), pixels
    height: int = 0
    pixel_aspect: float = 1.0       # a stored pixel's width over its height as shown (``pixel_aspect``)
    rotation: int = 0               # degrees counter-clockwise applied to display
    scale: float = 1.0              # returned frame size / source size
    bad_packets: int = 0
    corrupt_frames: int = 0         # decoded, but flagged by the decoder as damaged
    gaps: list[tuple[float, float]] = field(default_factory=list)   # (start, length) with no frames
    end_time: float | None = None   # when the last decoded frame leaves the screen, seconds
    warnings: list[str] = field(default_factory=list)


def open_media(path) -> av.container.InputContainer:
    """Open ``path`` with PyAV or raise ``MediaError`` saying why it is not media."""
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.FileNotFoundError:
        raise MediaError("file not found") from None
    except av.error.InvalidDataError:
        raise MediaError("not a readable media file (unknown format, or the header is corrupt)") from None
    except (av.error.FFmpegError, UnicodeDecodeError, OSError) as e:
        raise MediaError(f"cannot open as media: {e}") from None


def video_stream(container) -> av.video.stream.VideoStream | None:
    """The first real video stream (cover art in audio files is not video), or None."""
    for s in container.streams.video:
        if s.disposition & av.stream.Disposition.attached_pic:
            continue
        if s.codec_context is None or s.codec_context.name is None:
            continue
        return s
    return None


def stream_start(stream) -> float:
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def media_duration(container, stream=None) -> float | None:
    """Seconds from headers: of ``stream`` if given, else of the container; None if unknown."""
    if stream is not None:
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            return float(stream.duration * stream.time_base)
        return None
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def scan_ends(path) -> dict[str, float]:
    """Where the video and audio packets end, in seconds from each stream's start, read from
    timestamps (demux only, no decoding). Headers can be wrong (MPEG program streams
    estimate durations from the bit rate; a truncated file keeps its old header)."""
    ends: dict[str, float] = {}
    with open_media(path) as c:
        v = video_stream(c)
        streams = ([v] if v is not None else []) + list(c.streams.audio[:1])
        if not streams:
            return ends
        t0 = {s.type: stream_start(s) for s in streams}
        try:
            for p in c.demux(*streams):
                if p.pts is not None and p.time_base is not None:
                    kind = p.stream.type
                    end = float((p.pts + (p.duration or 0)) * p.time_base) - t0[kind]
                    ends[kind] = max(ends.get(kind, end), end)
        except av.error.FFmpegError:
            pass
    return ends


def scan_duration(path, kind: str) -> float | None:
    """End of the ``kind`` ("video" or "audio") packets in seconds, from their timestamps."""
    return scan_ends(path).get(kind)


def video_span(path, container, stream, warnings: list[str]) -> float | None:
    """How long the video stream runs, in seconds: from its packets' timestamps, else headers.

    The container's duration covers the longest stream (often the audio), so it is the last
    resort. A file whose packets stop well before its header's end is reported as truncated.
    """
    ends = scan_ends(path)
    header = media_duration(container)
    found = max(ends.values(), default=None)
    if header is not None and found is not None and found < header - 0.5:
        warnings.append(f"video: the file ends at {found:.2f} s but its header says {header:.2f} s (truncated file?)")
    return ends.get("video") or media_duration(container, stream) or header


def sample_times(start: float, end: float, frames: int | None = None, fps: float | None = None,
                 max_frames: int = 4096) -> np.ndarray:
    """Target times in [start, end): ``frames`` evenly spaced, or ``fps`` a second (capped).

    Each target is the middle of its slot, so a clip cut into N slots is sampled once per
    slot and never at the very first or last instant (often black or a fade).
    """
    span = max(end - start, 0.0)
    if frames is None:
        frames = max(1, int(math.floor(span * fps)))
        frames = min(frames, max_frames)
    return start + (np.arange(frames) + 0.5) * (span / frames)


def iter_frames_at(container, stream, times: np.ndarray, max_side: int,
                   info: VideoFrames) -> Iterator[tuple[float, np.ndarray]]:
    """Yield ``(time, rgb uint8 [H, W, 3])`` for the frame on screen at each target time.

    Frames are given square pixels (anamorphic video, ``pixel_aspect``), shrunk (never enlarged)
    so the longer side is at most ``max_side``, then rotated upright. A frame on screen at several target times is yielded once: a video
    with fewer frames than targets gives fewer frames, never duplicates. ``info`` is
    filled in as decoding goes (bad packets are counted and skipped, not fatal).
    """
    times = np.asarray(times, dtype=np.float64)
    if len(times) == 0:
        return
    stream.thread_type = "AUTO"
    info.pixel_aspect = pixel_aspect(stream)
    t0 = stream_start(stream)
    k, prev = 0, None               # next target; last decoded frame
    shown_t = -math.inf             # time of the last yielded frame
    rate = stream.average_rate or stream.guessed_rate
    max_gap = max(0.5, 5.0 / float(rate)) if rate else 0.5   # missing frames, not a slow frame rate
    # A seek lands on the keyframe at or before its target, which with long GOPs (or a
    # damaged index) can be far behind it: seeking again would land in the same place for
    # ever. So a seek only ever goes to a later target than the last one, and only from
    # behind it; once a seek has landed behind where decoding already was, the rest of
    # the stream is decoded straight through.
    seek = _Seeker(container, stream, t0)
    if times[0] > SEEK_GAP_S:
        seek.to(times[0], from_t=-math.inf)
    for frame in _decode(container, stream, info):
        t = _frame_time(frame, t0)
        seek.landed(t)
        info.corrupt_frames += bool(frame.is_corrupt)
        if prev is not None and t - _frame_time(prev, t0) > max_gap:
            info.gaps.append((_frame_time(prev, t0), t - _frame_time(prev, t0)))
        # a frame is on screen until the next one: at 1 fps the last of 3 s of video starts at 2 s
        shown_for = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else (
            1.0 / float(rate) if rate else 0.0)
        info.end_time = t + shown_for if info.end_time is None else max(info.end_time, t + shown_for)
        while k < len(times) and t > times[k]:
            # on screen at times[k]: the previous frame (or this one, if none came before)
            shown = prev if prev is not None else frame
            st = _frame_time(shown, t0)
            if st > shown_t:
                shown_t = st
                yield st, _to_rgb(shown, max_side, info)
            k += 1
        if k >= len(times):
            return
        prev = frame
        if times[k] - t > SEEK_GAP_S and seek.to(times[k], from_t=t):
            prev = None
    if prev is not None and k < len(times) and _frame_time(prev, t0) > shown_t:
        # the last frame stays on screen to the end of the clip
        yield _frame_time(prev, t0), _to_rgb(prev, max_side, info)


class _Seeker:
    """Seeks that can only move forward: each to a later target than the last, none after one went backwards."""

    def __init__(self, container, stream, t0: float):
        self.container, self.stream, self.t0 = container, stream, t0
        self.last_target = -math.inf
        self.from_t: float | None = None     # where decoding was when the pending seek was made
        self.enabled = True

    def to(self, target: float, from_t: float) -> bool:
        """Seek to ``target`` (seconds from the stream start) if allowed; True if it was done."""
        if not self.enabled or target <= self.last_target:
            return False
        self.last_target, self.from_t = target, from_t
        _seek(self.container, self.stream, self.t0 + target)
        return True

    def landed(self, t: float) -> None:
        """Called with each decoded frame's time: a seek that landed behind its start disables seeking."""
        if self.from_t is not None:
            if t <= self.from_t:
                self.enabled = False
            self.from_t = None


def _decode(container, stream, info: VideoFrames):
    try:
        packets = container.demux(stream)
        for packet in packets:
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                info.bad_packets += 1
                continue
            yield from frames
    except av.error.FFmpegError as e:
        info.warnings.append(f"video stopped early: {_short(e)}")


def _seek(container, stream, t: float) -> None:
    try:
        container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
    except av.error.FFmpegError:
        pass  # unseekable input: keep decoding forward


def _frame_time(frame, t0: float) -> float:
    return (float(frame.time) if frame.time is not None else 0.0) - t0


def pixel_aspect(stream) -> float:
    """How much wider a stored pixel is shown than tall: 1 for square pixels, or when unknown or absurd.

    Camcorders and discs store anamorphic frames (HDV and AVCHD 1440x1080 shown as 1920x1080, DV and
    DVD 720x480 shown as 4:3 or 16:9); decoded as stored, every face in them is squeezed or stretched.
    """
    for ratio in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        try:
            value = float(ratio) if ratio else 0.0
        except (TypeError, ValueError, ZeroDivisionError):
            value = 0.0
        if 0.2 < value < 5.0:
            return value
    return 1.0


def _to_rgb(frame, max_side: int, info: VideoFrames) -> np.ndarray:
    rot = int(round((frame.rotation or 0) / 90.0)) % 4
    # the frame as shown: its pixels made square (anamorphic video), then rotated
    w, h = max(1, round(frame.width * info.pixel_aspect)), frame.height
    disp_w, disp_h = (h, w) if rot % 2 else (w, h)
    scale = min(1.0, max_side / max(w, h))
    info.width, info.height, info.rotation, info.scale = disp_w, disp_h, rot * 90, scale
    # swscale resizes while converting; making a huge frame full-size RGB first would not fit.
    out_w, out_h = max(2, round(w * scale)), max(2, round(h * scale))
    rgb = frame.reformat(width=out_w, height=out_h, format="rgb24").to_ndarray()
    if rot:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rot))
    return rgb


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
