"""Training-time augmentation of a batch: recording gain, random windows, tempo changes and SpecAugment masks
on the mel, frame dropout on the video, and mixup of whole clips; and the noisy copies of training clips
the voice head's regression also learns from (``noisy_copies``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

from avemo.audio import LOG_EPS, at_gain
from avemo.model.audio import clip_level


@dataclass(frozen=True)
class AugmentConfig:
    freq_mask: int = 8          # widest frequency mask (mel bins); 0 disables
    time_mask: int = 20         # widest time mask (frames); 0 disables
    n_masks: int = 2            # masks of each kind per clip
    frame_dropout: float = 0.1  # chance that each face frame is hidden (one always survives)
    mixup: float = 0.0          # mixup's Beta(a, a) parameter; 0 disables
    crop: float = 0.0           # train on a random window of this many seconds of each clip's audio; 0: whole clips
    tempo: float = 0.0          # each clip played faster or slower by a factor in [1 - tempo, 1 + tempo]; 0 disables
    gain: float = 20.0          # each clip replayed louder or quieter by up to this many dB; 0 disables
    voice_noise: int = 2        # noisy copies of each training clip for the voice head's regression; 0 disables
    voice_band: int = 2         # copies of each training clip band-limited as a telephone or 8 kHz audio, for the same; 0 disables
    noise: float = 0.0          # chance that a training clip gets coloured noise or babble at 5-30 dB SNR; 0 disables


def mix_clips(batch: dict[str, torch.Tensor], perm: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    """Mixup (Zhang et al. 2018) of each clip with clip ``perm[i]``: lam * own + (1 - lam) * other.

    Where only one of the two has a real step (different lengths, a missing modality) that
    step is taken as it is: padding is not a value to mix with. Masks become the union.
    """
    out = dict(batch)
    for key, mkey, step_dim in (("mel", "mel_mask", 2), ("video", "video_mask", 1), ("video_maps", "video_mask", 1)):
        if key not in batch:
            continue
        x, m = batch[key], batch[mkey]
        y, my = x[perm], m[perm]
        shape = [m.shape[0]] + [1] * (x.ndim - 1)
        shape[step_dim] = m.shape[1]
        a, b = m.view(shape), my.view(shape)                      # masks broadcast over the feature (and cell) axes
        mixed = lam * x + (1 - lam) * y
        out[key] = torch.where(a & b, mixed, torch.where(a, x, y))
        out[mkey] = m | my
    return out


def random_crop(mel: torch.Tensor, mask: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip's own random window of ``frames`` valid steps (or all of a shorter clip)."""
    # mel [B, F, T], mask [B, T] with the valid steps first (padding is at the end)
    lengths = mask.sum(1)                                                      # [B]
    keep = lengths.clamp(max=frames)
    start = (torch.rand(lengths.shape, device=mel.device) * (lengths - keep + 1)).long()
    t = max(1, int(keep.max()))
    steps = torch.arange(t, device=mel.device)
    src = (start[:, None] + steps[None, :]).clamp(max=mel.shape[2] - 1)        # [B, t]
    new_mask = steps[None, :] < keep[:, None]
    out = mel.gather(2, src[:, None, :].expand(-1, mel.shape[1], -1)) * new_mask[:, None, :].to(mel.dtype)
    return out, new_mask


def tempo_stretch(mel: torch.Tensor, mask: torch.Tensor, rate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip's time axis resampled by its own ``rate`` (> 1: faster, shorter), by linear interpolation.

    A tempo change in the log-mel domain: speaking rate changes, pitch and formants do not
    (speed perturbation, Ko et al. 2015, without its pitch shift).
    """
    # mel [B, F, T], mask [B, T] with the valid steps first, rate [B]
    lengths = mask.sum(1)                                                      # [B]
    new_len = torch.where(lengths > 0, (lengths / rate).floor().clamp_min(1), 0).long()
    t = max(1, int(new_len.max()))
    steps = torch.arange(t, device=mel.device)
    last = (lengths - 1).clamp_min(0)[:, None]                                 # [B, 1]
    pos = (steps[None, :] * rate[:, None]).minimum(last.to(rate.dtype))        # source position [B, t]
    lo = pos.floor().long()
    hi = (lo + 1).minimum(last)
    w = (pos - lo).to(mel.dtype)[:, None, :]
    take = lambda idx: mel.gather(2, idx[:, None, :].expand(-1, mel.shape[1], -1))  # noqa: E731
    new_mask = steps[None, :] < new_len[:, None]
    out = (take(lo) * (1 - w) + take(hi) * w) * new_mask[:, None, :].to(mel.dtype)
    return out, new_mask


class BatchAugment:
    def __init__(self, cfg: AugmentConfig, mel_frames_per_second: float = 100.0, settings: dict | None = None):
        self.cfg = cfg
        self.fb = _filterbank(settings) if cfg.noise > 0 and settings else None
        self.crop_frames = max(1, round(cfg.crop * mel_frames_per_second)) if cfg.crop > 0 else 0
        # iid_masks: every clip in the batch gets its own masks (needs a [B, C, F, T] input)
        self.freq = torchaudio.transforms.FrequencyMasking(cfg.freq_mask, iid_masks=True) if cfg.freq_mask else None
        self.time = torchaudio.transforms.TimeMasking(cfg.time_mask, iid_masks=True) if cfg.time_mask else None

    def __call__(self, batch: dict[str, torch.Tensor], mel_mean: torch.Tensor | None,
                 audio_norm: str = "global") -> dict[str, torch.Tensor]:
        out = dict(batch)
        if "mel" in batch and self.cfg.gain > 0:
            db = (torch.rand(batch["mel"].shape[0], device=batch["mel"].device) * 2 - 1) * self.cfg.gain
            out["mel"] = at_gain(batch["mel"], db) * batch["mel_mask"][:, None, :].to(batch["mel"].dtype)
        if "mel" in batch and self.fb is not None:
            out["mel"] = add_noise(out["mel"], batch["mel_mask"], *self.fb, self.cfg.noise)
        if "mel" in batch and self.crop_frames:
            out["mel"], out["mel_mask"] = random_crop(batch["mel"], batch["mel_mask"], self.crop_frames)
        if "mel" in batch and self.cfg.tempo > 0:
            rate = 1 + (torch.rand(out["mel"].shape[0], device=out["mel"].device) * 2 - 1) * self.cfg.tempo
            out["mel"], out["mel_mask"] = tempo_stretch(out["mel"], out["mel_mask"], rate)
        if "mel" in batch and (self.freq or self.time):
            # mask to what the model's normalisation (audio_norm) maps to zero: the per-bin training mean, for
            # "level" at the clip's own loudness
            centre = mel_mean[None, :, None] if mel_mean is not None else 0.0
            if audio_norm == "level":
                centre = centre + clip_level(out["mel"], out["mel_mask"])[:, None, None].to(out["mel"].dtype)
            x = (out["mel"] - centre).unsqueeze(1)                 # [B, 1, n_mels, T]
            for _ in range(self.cfg.n_masks):
                if self.freq is not None:
                    x = self.freq(x)
                if self.time is not None:
                    x = self.time(x)
            out["mel"] = (x.squeeze(1) + centre) * out["mel_mask"][:, None, :].to(x.dtype)
        if "video_mask" in batch and self.cfg.frame_dropout > 0:
            mask = batch["video_mask"]
            keep = torch.rand(mask.shape, device=mask.device) >= self.cfg.frame_dropout
            dropped = mask & keep
            # a clip that lost every face keeps its original mask (one modality must not vanish)
            out["video_mask"] = torch.where(dropped.any(1, keepdim=True), dropped, mask)
        return out

    def mixup(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, float]:
        """(mixed batch, partner index of each clip, own weight); (batch, None, 1.0) when off."""
        if self.cfg.mixup <= 0:
            return batch, None, 1.0
        lam = float(torch.distributions.Beta(self.cfg.mixup, self.cfg.mixup).sample())
        lam = max(lam, 1 - lam)  # the clip's own label stays the larger share
        n = next(iter(batch.values())).shape[0]
        perm = torch.randperm(n, device=next(iter(batch.values())).device)
        return mix_clips(batch, perm, lam), perm, lam


NOISE_SNR_DB = (5.0, 30.0)      # a noisy copy's signal-to-noise ratio, uniform in this range
BABBLE_TALKERS = (3, 6)         # other speakers summed into a babble noise
NOISE_CHUNK = 6000              # frames of noise made at a time: an hour-long clip's stays a few MB


def _filterbank(settings: dict) -> tuple[np.ndarray, np.ndarray]:
    """The cache's mel filterbank [n_freqs, n_mels] (torchaudio's, as avemo.audio.log_mel uses) and its bins' Hz."""
    sr, n_fft = int(settings["sample_rate"]), int(settings["n_fft"])
    fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, float(settings.get("f_min") or 0.0),
                                               float(settings.get("f_max") or sr / 2), int(settings["n_mels"]),
                                               sr).numpy()
    return fb, np.linspace(0.0, sr / 2, fb.shape[0])


def add_noise(mel: torch.Tensor, mask: torch.Tensor, fb: np.ndarray, freqs: np.ndarray, chance: float) -> torch.Tensor:
    """A [B, n_mels, T] log-mel batch with noise mixed into a random ``chance`` of its clips, as ``noisy_copies``
    mixes it (coloured noise, or babble: here three other clips of the batch), at 5-30 dB SNR."""
    dev, (b, _, t) = mel.device, mel.shape
    m = mask[:, None, :].float()
    power = (mel.float().exp() - LOG_EPS).clamp_min(0.0) * m
    frame_power = power.sum(1).sum(1) / mask.sum(1).clamp_min(1)                     # [B]
    fbt, f = torch.from_numpy(fb).to(dev), torch.from_numpy(freqs).float().to(dev)
    shape = f.clamp_min(50.0)[None] ** -(torch.rand(b, 1, device=dev) * 2)         # [B, n_freqs]
    colour = (torch.empty(b, t, len(freqs), device=dev).exponential_() * shape[:, None]) @ fbt   # [B, T, n_mels]
    colour = colour.transpose(1, 2) / (shape @ fbt).sum(1)[:, None, None]          # mean frame power 1
    unit = power / frame_power.clamp_min(1e-12)[:, None, None]
    babble = sum(unit.roll(k, 0) for k in (1, 2, 3)) / 3
    noise = torch.where((torch.rand(b, device=dev) < 0.5)[:, None, None], colour, babble)
    snr = NOISE_SNR_DB[0] + torch.rand(b, device=dev) * (NOISE_SNR_DB[1] - NOISE_SNR_DB[0])
    level = frame_power / 10 ** (snr / 10) * (torch.rand(b, device=dev) < chance)
    return (torch.log(power + level[:, None, None] * noise + LOG_EPS) * m).to(mel.dtype)


def noisy_copies(mels: list[np.ndarray], speakers: list, settings: dict, copies: int,
                 seed: int = 0) -> list[list[np.ndarray]]:
    """``copies`` lists of the clips' log-mels (as cached) with noise mixed in: [copy][clip].

    A copy's noise is, at random, coloured noise (a power spectrum falling as f^-a, a uniform in
    [0, 2]: white to brown, each FFT bin's power drawn per frame as Gaussian noise's is) or babble
    (three to six clips of other speakers, each at one level, looped and shifted in time), at a
    signal-to-noise ratio uniform in ``NOISE_SNR_DB`` (mean power of the clip over the noise's).
    Powers add in the mel domain (the speech-noise cross term averages out), so no cache needs its
    audio again. Deterministic for a ``seed``. Studio corpora hold no noise: without these copies the
    voice head's regression lost a third of its UAR at 10 dB (README, speech benchmark).
    """
    if copies <= 0 or not mels:
        return []
    rng = np.random.default_rng(seed)
    fb, freqs = _filterbank(settings)                                                # [n_freqs, n_mels], [n_freqs]
    keys = np.array([str(s) if s not in (None, "") else f"#{i}" for i, s in enumerate(speakers)])
    return [[_noisy(mels, i, keys, fb, freqs, rng) for i in range(len(mels))] for _ in range(copies)]


BAND_LOW_HZ = (200.0, 400.0)       # a band copy's lower edge (half of them keep the lows, as 8 kHz audio does)
BAND_HIGH_HZ = (3000.0, 4200.0)    # its upper edge: from a telephone line's 3.4 kHz to past 8 kHz audio's 4 kHz


def band_copies(mels: list[np.ndarray], settings: dict, copies: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``copies`` lists of the clips' log-mels (as cached) heard through a narrower channel: [copy][clip].

    Each clip of a copy is band-limited to its own pass band: the upper edge uniform in ``BAND_HIGH_HZ``, the
    lower edge 0 or (half the time) uniform in ``BAND_LOW_HZ``, so the copies span a telephone line (300-3400 Hz)
    and audio recorded at 8 kHz (0-4000 Hz), the narrow recordings a call centre or a phone's voice recorder
    gives. A band keeps the share of its mel filter's weight that lies inside the pass band (its power taken as
    flat across the filter). The corpora are wide-band studio speech: the voice head's regression lost nearly
    half its UAR on telephone speech without these copies (README, noise). Deterministic for a ``seed``.
    """
    if copies <= 0 or not mels:
        return []
    rng = np.random.default_rng([seed, 1])             # not the noisy copies' stream: either can change alone
    fb, freqs = _filterbank(settings)                                                # [n_freqs, n_mels]
    weight = np.maximum(fb.sum(0), 1e-12)
    out = []
    for _ in range(copies):
        copy = []
        for mel in mels:
            lo = 0.0 if rng.random() < 0.5 else rng.uniform(*BAND_LOW_HZ)
            inside = (freqs >= lo) & (freqs <= rng.uniform(*BAND_HIGH_HZ))
            gain = (fb * inside[:, None]).sum(0) / weight                            # [n_mels], in [0, 1]
            copy.append(np.log(_power(mel) * gain[:, None].astype(np.float32) + LOG_EPS).astype(np.float32))
        out.append(copy)
    return out


def voice_copies(mels: list[np.ndarray], speakers: list, settings: dict, noise: int = AugmentConfig.voice_noise,
                 band: int = AugmentConfig.voice_band, seed: int = 0) -> list[list[np.ndarray]]:
    """What the voice head's regression learns from besides the clips: ``noisy_copies`` then ``band_copies``."""
    return noisy_copies(mels, speakers, settings, noise, seed) + band_copies(mels, settings, band, seed)


def _power(mel: np.ndarray) -> np.ndarray:
    return np.maximum(np.exp(mel.astype(np.float32)) - LOG_EPS, 0.0)


def _noisy(mels: list[np.ndarray], i: int, keys: np.ndarray, fb: np.ndarray, freqs: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    power = _power(mels[i])                                                          # [n_mels, T]
    n_frames = power.shape[1]
    others = np.flatnonzero(keys != keys[i])
    snr = rng.uniform(*NOISE_SNR_DB)
    level = float(power.sum(0).mean()) / 10 ** (snr / 10)                           # the noise's mean frame power
    out = np.empty_like(power)
    if len(others) == 0 or rng.random() < 0.5:
        shape = np.maximum(freqs, 50.0) ** -rng.uniform(0.0, 2.0)                  # [n_freqs]
        scale = level / float((shape @ fb).sum())
        for t0 in range(0, n_frames, NOISE_CHUNK):
            t1 = min(t0 + NOISE_CHUNK, n_frames)
            noise = (rng.exponential(size=(t1 - t0, len(freqs))) * shape) @ fb       # [t, n_mels]
            out[:, t0:t1] = power[:, t0:t1] + scale * noise.T
    else:
        talkers = [_power(mels[j]) for j in rng.choice(others, min(len(others), rng.integers(*BABBLE_TALKERS,
                                                                                         endpoint=True)), replace=False)]
        talkers = [q / max(float(q.sum(0).mean()), 1e-12) for q in talkers]        # each at one level
        shifts = rng.integers(0, [q.shape[1] for q in talkers])
        for t0 in range(0, n_frames, NOISE_CHUNK):
            t1 = min(t0 + NOISE_CHUNK, n_frames)
            noise = sum(q[:, (np.arange(t0, t1) + k) % q.shape[1]] for q, k in zip(talkers, shifts))
            out[:, t0:t1] = power[:, t0:t1] + level / len(talkers) * noise
    return np.log(out + LOG_EPS).astype(np.float32)
