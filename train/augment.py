"""Training-time augmentation of a batch: recording gain, random windows, tempo changes and SpecAugment masks
on the mel, frame dropout on the video, and mixup of whole clips."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio

from avemo.audio import at_gain
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
    def __init__(self, cfg: AugmentConfig, mel_frames_per_second: float = 100.0):
        self.cfg = cfg
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
