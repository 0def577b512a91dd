"""Audio: demux from any container, mono, resample, trim silence, log-mel. Plain functions."""
from __future__ import annotations

from functools import lru_cache

import av
import numpy as np
import torch
import torchaudio

from avemo.video import MediaError, open_media, stream_start

# Peak amplitude below which a track counts as silent (-80 dBFS: dither, not speech).
SILENCE_PEAK = 1e-4
LOG_EPS = 1e-6


def audio_stream(container):
    """The first audio stream with a decoder, or None."""
    for s in container.streams.audio:
        if s.codec_context is not None and s.codec_context.name is not None:
            return s
    return None


def decode_audio(container, stream, sample_rate: int, start: float | None = None,
                 end: float | None = None, warnings: list[str] | None = None) -> np.ndarray:
    """Decode ``stream`` to mono float32 at ``sample_rate``, optionally only [start, end) seconds.

    Channels are averaged (not summed): a stereo file and its mono mixdown give the same
    loudness. Undecodable packets are skipped and counted in ``warnings``.
    """
    # Keep the source layout and average the channels ourselves, so the mixdown is a plain mean.
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)
    t0 = stream_start(stream)
    if start:
        try:
            container.seek(int((t0 + start) / stream.time_base), stream=stream, backward=True)
        except av.error.FFmpegError:
            pass
    chunks, first_time, bad, n = [], None, 0, 0
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
                    chunks.append(out.to_ndarray().mean(axis=0))  # [C, n] -> [n]
                    n += len(chunks[-1])
            if end is not None and first_time is not None and n >= (end - first_time) * sample_rate:
                break
        else:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0))
    except av.error.FFmpegError as e:
        if warnings is not None:
            warnings.append(f"audio stopped early: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if bad and warnings is not None:
        warnings.append(f"{bad} undecodable audio packet(s) skipped")
    wav = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    first_time = first_time or 0.0
    lo = int(round(((start or 0.0) - first_time) * sample_rate)) if start else 0
    hi = int(round((end - first_time) * sample_rate)) if end is not None else len(wav)
    return wav[max(lo, 0):max(hi, 0)]


def load_audio(path, sample_rate: int = 16000, start: float | None = None,
               end: float | None = None) -> np.ndarray:
    """Mono float32 samples of the first audio stream of any media file."""
    with open_media(path) as c:
        s = audio_stream(c)
        if s is None:
            raise MediaError("no audio stream")
        return decode_audio(c, s, sample_rate, start, end)


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
    pad = frame_length // 2
    x = np.pad(np.asarray(wav, dtype=np.float64), pad)
    n_frames = 1 + (len(x) - frame_length) // hop_length
    # mean power of each frame from a running sum of squares: O(n) whatever the frame length
    cs = np.concatenate([[0.0], np.cumsum(x * x)])
    starts = np.arange(n_frames) * hop_length
    power = (cs[starts + frame_length] - cs[starts]) / frame_length
    db = 10 * np.log10(np.maximum(power, 1e-10)) - 10 * np.log10(max(float(power.max()), 1e-10))
    loud = np.flatnonzero(db > -top_db)
    if len(loud) == 0:
        return wav[:0]
    return wav[loud[0] * hop_length: min(len(wav), (loud[-1] + 1) * hop_length)]


@lru_cache(maxsize=8)
def _mel_transform(sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
                   f_min: float, f_max: float | None) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
        f_min=f_min, f_max=f_max, power=2.0, center=True, pad_mode="reflect")


def log_mel(wav: np.ndarray, sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
            f_min: float = 0.0, f_max: float | None = None) -> np.ndarray:
    """Natural-log mel power spectrogram, float32 [n_mels, T_a] with T_a = 1 + len // hop.

    Input shorter than one window (``n_fft`` samples) raises ``ValueError``.
    """
    if len(wav) < n_fft:
        raise ValueError(f"{len(wav)} samples is shorter than one spectrogram window ({n_fft} samples)")
    mel = _mel_transform(sample_rate, n_fft, hop_length, n_mels, f_min, f_max)
    with torch.no_grad():
        power = mel(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)))  # [n_mels, T_a]
    return torch.log(power + LOG_EPS).numpy().astype(np.float32)
