"""Audio: demux from any container, mono, resample, trim silence, log-mel. Plain functions."""
from __future__ import annotations

import os
from functools import lru_cache

import av
import numpy as np
import torch
import torchaudio

from avemo.video import MediaError, media_duration, open_media, stream_start

# Peak amplitude below which a track counts as silent (-80 dBFS: dither, not speech).
SILENCE_PEAK = 1e-4
# A DC offset above this fraction of the signal's standard deviation is taken out. Larger ones shift the
# loudness and stop silence trimming (the offset alone is louder than -40 dB under the loudest frame); smaller
# ones only touch the lowest mel band, where the corpora the shipped models learnt from carry up to 0.037 of
# it (EmoDB, RAVDESS): left in, their spectrograms stay the ones the models and the README's figures had.
DC_OFFSET = 0.05
LOG_EPS = 1e-6


def audio_streams(container) -> list:
    """The audio streams that have a decoder, in the container's order."""
    return [s for s in container.streams.audio if s.codec_context is not None and s.codec_context.name is not None]


def audio_stream(container):
    """The first audio stream with a decoder, or None."""
    streams = audio_streams(container)
    return streams[0] if streams else None


def decode_audio(container, stream, sample_rate: int, start: float | None = None,
                 end: float | None = None, warnings: list[str] | None = None) -> np.ndarray:
    """Decode ``stream`` to mono float32 at ``sample_rate``, optionally only [start, end) seconds.

    Channels are averaged (not summed): a stereo file and its mono mixdown give the same
    loudness; a stereo pair that cancels when averaged is mixed as its difference instead
    (``_Mixdown``). A DC offset (cheap converters add one) larger than ``DC_OFFSET`` of the
    signal's standard deviation is taken out. Undecodable packets are skipped, and both are said
    in ``warnings``.
    """
    # Keep the source layout and average the channels ourselves, so the mixdown is a plain mean.
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)
    t0 = stream_start(stream)
    if start:
        try:
            container.seek(int((t0 + start) / stream.time_base), stream=stream, backward=True)
        except av.error.FFmpegError:
            pass
    span = (end if end is not None else (media_duration(container, stream) or media_duration(container) or 0.0))
    samples = _Mixdown(int((span - (start or 0.0)) * sample_rate * 1.01) + sample_rate, sample_rate)
    first_time, bad = None, 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                bad += 1
                continue
            for frame in frames:
                if first_time is None and frame.time is not None:
                    first_time = float(frame.time) - t0
                for out in resampler.resample(frame):
                    samples.add(out.to_ndarray())
            if end is not None and first_time is not None and samples.n >= (end - first_time) * sample_rate:
                break
        else:
            for out in resampler.resample(None):
                samples.add(out.to_ndarray())
    except av.error.FFmpegError as e:
        if warnings is not None:
            warnings.append(f"audio stopped early: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if bad and warnings is not None:
        warnings.append(f"{bad} undecodable audio packet(s) skipped")
    wav = samples.array()
    if samples.inverted and warnings is not None:
        warnings.append("the two channels cancel out when averaged (one is phase-inverted): "
                        "mixed as their difference")
    first_time = first_time or 0.0
    lo = int(round(((start or 0.0) - first_time) * sample_rate)) if start else 0
    hi = int(round((end - first_time) * sample_rate)) if end is not None else len(wav)
    wav = wav[max(lo, 0):max(hi, 0)]
    mean, std = _mean_std(wav)
    if abs(mean) > DC_OFFSET * std:
        wav -= np.float32(mean)
    return wav


def _mean_std(wav: np.ndarray, chunk: int = 1 << 20) -> tuple[float, float]:
    """Mean and standard deviation in float64, a chunk at a time (a float64 copy of an hour is 460 MB)."""
    if len(wav) == 0:
        return 0.0, 0.0
    total = sum(float(wav[i:i + chunk].sum(dtype=np.float64)) for i in range(0, len(wav), chunk))
    mean = total / len(wav)
    squares = sum(float(np.square(wav[i:i + chunk] - mean, dtype=np.float64).sum()) for i in range(0, len(wav), chunk))
    return mean, (squares / len(wav)) ** 0.5


class _Mixdown:
    """Decoded chunks ([C, n] float) mixed to one channel: the mean of the channels.

    A stereo pair with one channel phase-inverted (a miswired balanced cable, a mid/side
    recorder) cancels in the mean: the speech is gone and the track reads as silent. So for
    stereo the difference (L - R) / 2 is kept beside the mean until ``DECIDE_S`` seconds are
    in (or the track ends), and the difference replaces the mean if its variance is more than
    ``RATIO`` times the mean's. Ordinary stereo never comes near: correlated channels put
    their energy in the mean, unrelated ones split it evenly. Wiring does not change within a
    recording, so the first half-minute decides, and the spare copy costs no more than that.
    Other layouts are averaged as they are.
    """

    DECIDE_S = 30.0
    RATIO = 4.0

    def __init__(self, expected: int, sample_rate: int):
        self.out = _SampleBuffer(expected)
        self.diff: _SampleBuffer | None = _SampleBuffer(min(expected, int(self.DECIDE_S * sample_rate) + 8192))
        self.decide_at = int(self.DECIDE_S * sample_rate)
        self.moments = np.zeros((2, 2))          # [mean, difference] x [sum, sum of squares], float64
        self.inverted = False

    @property
    def n(self) -> int:
        return self.out.n

    def add(self, chunk: np.ndarray) -> None:
        stereo = chunk.shape[0] == 2
        if self.diff is not None and not stereo:
            self._decide()
        if self.diff is None:
            self.out.add(0.5 * (chunk[0] - chunk[1]) if self.inverted and stereo else chunk.mean(axis=0))
            return
        mean, diff = chunk.mean(axis=0), 0.5 * (chunk[0] - chunk[1])
        for row, x in zip(self.moments, (mean, diff)):
            x64 = x.astype(np.float64)
            row += (x64.sum(), float(x64 @ x64))
        self.out.add(mean)
        self.diff.add(diff)
        if self.out.n >= self.decide_at:
            self._decide()

    def _decide(self) -> None:
        n = max(self.out.n, 1)
        var_mean, var_diff = self.moments[:, 1] / n - (self.moments[:, 0] / n) ** 2
        if var_diff > self.RATIO * var_mean:
            self.out, self.inverted = self.diff, True
        self.diff = None

    def array(self) -> np.ndarray:
        if self.diff is not None:
            self._decide()
        return self.out.array()


class _SampleBuffer:
    """Decoded samples written into one array sized from the header's duration.

    Collecting chunks and concatenating them needs twice the track in memory at the end
    (about 460 MB for an hour at 16 kHz); with a good size estimate this needs it once.
    Headers can be wrong or missing, so the array still grows (by half) when it must; pages
    of a too-large estimate that are never written are never touched, so they cost no memory.
    """

    MAX_INITIAL = 1 << 28                # 1 GiB of float32 (4.7 h at 16 kHz): the most a header may reserve

    def __init__(self, expected: int):
        self.buf = np.empty(min(max(expected, 1 << 16), self.MAX_INITIAL), np.float32)
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        if self.n + len(x) > len(self.buf):
            grown = np.empty(max(self.n + len(x), len(self.buf) + len(self.buf) // 2), np.float32)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:self.n + len(x)] = x
        self.n += len(x)

    def array(self) -> np.ndarray:
        return self.buf[:self.n]


def load_audio(path, sample_rate: int = 16000, start: float | None = None,
               end: float | None = None, warnings: list[str] | None = None) -> np.ndarray:
    """Mono float32 samples (as ``decode_audio`` gives them) of the first audio track of any
    media file that has sound; the first track's if none has.

    Cameras and screen recorders write several tracks, some of them empty (an unplugged second
    microphone, a muted desktop track), and the silent one is often first. The other tracks are
    read only when the first is silent; ``warnings`` says which track was used. The track is the
    whole file's choice, also for a part of it (``start``, ``end``: avemo-predict's windows of a
    long recording): a first track silent in one window only (a noise gate in a pause) is kept
    there, so every window of a file hears the same microphone.
    """
    notes: list[str] = []
    with open_media(path) as c:
        streams = audio_streams(c)
        if not streams:
            raise MediaError("no audio stream")
        wav = decode_audio(c, streams[0], sample_rate, start, end, notes)
    if len(streams) > 1 and (is_silent(wav) or not np.isfinite(wav).all()):
        whole = start is None and end is None
        st = os.stat(path)
        # a whole first track is already known to be silent; a part of it says nothing of the rest
        k = _sounding_track(os.path.realpath(path), (st.st_size, st.st_mtime_ns), 1 if whole else 0)
        if k:
            notes = []
            with open_media(path) as c:
                wav = decode_audio(c, audio_streams(c)[k], sample_rate, start, end, notes)
            silent = "track 1 is" if k == 1 else f"tracks 1-{k} are"
            notes.append(f"{silent} silent: used track {k + 1} of {len(streams)}")
    if warnings is not None:
        warnings.extend(notes)
    return wav


@lru_cache(maxsize=64)
def _sounding_track(path: str, stamp: tuple[int, int], first: int) -> int:
    """The index of the first audio track from ``first`` on with any sound in the whole file (0 if none).
    Each track is read only until its first sound; ``stamp`` (size, modification time) makes a changed file
    a new question, and windows of one file ask it once."""
    with open_media(path) as c:
        n = len(audio_streams(c))
    for k in range(first, n):
        with open_media(path) as c:
            stream = audio_streams(c)[k]
            resampler = av.AudioResampler(format="flt", rate=stream.codec_context.sample_rate or 16000)
            try:
                for packet in c.demux(stream):
                    for frame in packet.decode():
                        for out in resampler.resample(frame):
                            x = out.to_ndarray()
                            if x.size and float(np.abs(x - x.mean()).max()) >= SILENCE_PEAK:
                                return k
            except av.error.FFmpegError:
                continue
    return 0


def is_silent(wav: np.ndarray) -> bool:
    return len(wav) == 0 or float(np.max(np.abs(wav))) < SILENCE_PEAK


def trim_silence(wav: np.ndarray, top_db: float, frame_length: int = 2048, hop_length: int = 512) -> np.ndarray:
    """Drop leading and trailing audio quieter than ``top_db`` below the loudest frame.

    The rule of ``librosa.effects.trim`` (centred frames, zero padding, frame power in dB
    relative to the loudest frame), in numpy: librosa's first call costs about 2 s of lazy
    imports, half of a cold prediction's budget. A test checks both agree.
    """
    if len(wav) == 0:
        return wav
    power = _frame_power(wav, frame_length, hop_length)
    db = 10 * np.log10(np.maximum(power, 1e-10)) - 10 * np.log10(max(float(power.max()), 1e-10))
    loud = np.flatnonzero(db > -top_db)
    if len(loud) == 0:
        return wav[:0]
    return wav[loud[0] * hop_length: min(len(wav), (loud[-1] + 1) * hop_length)]


def _frame_power(wav: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """Mean power of each centred, zero-padded frame, in float64.

    Sums of squares are taken per hop-sized block, a chunk of the signal at a time, and a
    frame is a run of blocks: memory stays a few MB however long the recording (a float64
    copy of an hour at 16 kHz would be 460 MB). Frames that are not a whole number of hops
    long fall back to one running sum over the whole signal.
    """
    pad = frame_length // 2
    n_frames = 1 + (len(wav) + 2 * pad - frame_length) // hop_length
    starts = np.arange(n_frames) * hop_length
    if frame_length % hop_length:
        x = np.pad(np.asarray(wav, dtype=np.float64), pad)
        cs = np.concatenate([[0.0], np.cumsum(x * x)])
        return (cs[starts + frame_length] - cs[starts]) / frame_length
    per_frame = frame_length // hop_length
    n_blocks = n_frames + per_frame - 1
    blocks = np.zeros(n_blocks)
    step = hop_length * 8192                                # samples of the padded signal per chunk
    for lo in range(0, n_blocks * hop_length, step):
        hi = min(lo + step, n_blocks * hop_length)
        buf = np.zeros(hi - lo)
        a, b = max(lo - pad, 0), min(hi - pad, len(wav))   # the real samples inside [lo, hi)
        if b > a:
            buf[a + pad - lo: b + pad - lo] = wav[a:b]
        blocks[lo // hop_length: hi // hop_length] = (buf * buf).reshape(-1, hop_length).sum(1)
    cs = np.concatenate([[0.0], np.cumsum(blocks)])
    return (cs[per_frame:] - cs[:-per_frame]) / frame_length


@lru_cache(maxsize=8)
def _mel_transform(sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
                   f_min: float, f_max: float | None) -> torchaudio.transforms.MelSpectrogram:
    # frames are cut by log_mel (centred, reflect-padded at the ends), so no centring here
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
        f_min=f_min, f_max=f_max, power=2.0, center=False)


def at_gain(mel: torch.Tensor, db: float | torch.Tensor) -> torch.Tensor:
    """``mel`` (as ``log_mel`` writes it: natural-log mel power plus ``LOG_EPS``, [..., n_mels, T]) as if the
    recording had been ``db`` decibels louder: one gain, or one per clip ([B] for a [B, n_mels, T] batch).

    A gain g multiplies every power by g^2, so the cells well above the floor shift by 2 ln g and those near
    it do not: ``log(g^2 (exp(x) - LOG_EPS) + LOG_EPS)`` is exact, the floor included.
    """
    db = torch.as_tensor(db, dtype=torch.float32, device=mel.device)
    if db.ndim:
        db = db.view(-1, *([1] * (mel.ndim - 1)))
    power = (mel.float().exp() - LOG_EPS).clamp_min(0.0)
    return torch.log(10 ** (db / 10) * power + LOG_EPS).to(mel.dtype)


def log_mel(wav: np.ndarray, sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
            f_min: float = 0.0, f_max: float | None = None, chunk_frames: int = 6000) -> np.ndarray:
    """Natural-log mel power spectrogram, float32 [n_mels, T_a] with T_a = 1 + len // hop.

    Frames are centred on every ``hop_length``-th sample, the signal reflected at both ends
    (``torch.stft(center=True)``'s framing), and computed ``chunk_frames`` at a time, so an
    hour of audio never holds its whole complex STFT (about 600 MB at 16 kHz) at once.
    Input shorter than one window (``n_fft`` samples) raises ``ValueError``.
    """
    n = len(wav)
    if n < n_fft:
        raise ValueError(f"{n} samples is shorter than one spectrogram window ({n_fft} samples)")
    mel = _mel_transform(sample_rate, n_fft, hop_length, n_mels, f_min, f_max)
    pad, total = n_fft // 2, 1 + n // hop_length
    # a last chunk of a few frames would be shorter than the reflection it needs: fold it in
    chunk_frames = max(chunk_frames, 4 * (n_fft // hop_length + 1))
    out = np.empty((n_mels, total), np.float32)
    f0 = 0
    while f0 < total:
        f1 = total if total - f0 < 2 * chunk_frames else f0 + chunk_frames
        lo, hi = f0 * hop_length - pad, (f1 - 1) * hop_length - pad + n_fft       # samples this chunk's frames see
        seg = np.ascontiguousarray(wav[max(lo, 0):min(hi, n)], dtype=np.float32)
        if lo < 0 or hi > n:
            seg = np.pad(seg, (max(-lo, 0), max(hi - n, 0)), mode="reflect")
        with torch.no_grad():
            power = mel(torch.from_numpy(seg))                                         # [n_mels, f1 - f0]
        out[:, f0:f1] = torch.log(power + LOG_EPS).numpy()
        f0 = f1
    return out
