"""Training-time augmentation of a batch: SpecAugment masks on the mel, frame dropout on the video."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio


@dataclass(frozen=True)
class AugmentConfig:
    freq_mask: int = 8          # widest frequency mask (mel bins); 0 disables
    time_mask: int = 20         # widest time mask (frames); 0 disables
    n_masks: int = 2            # masks of each kind per clip
    frame_dropout: float = 0.1  # chance that each face frame is hidden (one always survives)


class BatchAugment:
    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        # iid_masks: every clip in the batch gets its own masks (needs a [B, C, F, T] input)
        self.freq = torchaudio.transforms.FrequencyMasking(cfg.freq_mask, iid_masks=True) if cfg.freq_mask else None
        self.time = torchaudio.transforms.TimeMasking(cfg.time_mask, iid_masks=True) if cfg.time_mask else None

    def __call__(self, batch: dict[str, torch.Tensor], mel_mean: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = dict(batch)
        if "mel" in batch and (self.freq or self.time):
            # mask to the per-bin training mean, which the model's normalisation maps to zero
            centre = mel_mean[None, :, None] if mel_mean is not None else 0.0
            x = (batch["mel"] - centre).unsqueeze(1)               # [B, 1, n_mels, T]
            for _ in range(self.cfg.n_masks):
                if self.freq is not None:
                    x = self.freq(x)
                if self.time is not None:
                    x = self.time(x)
            out["mel"] = x.squeeze(1) + centre
        if "video_mask" in batch and self.cfg.frame_dropout > 0:
            mask = batch["video_mask"]
            keep = torch.rand(mask.shape, device=mask.device) >= self.cfg.frame_dropout
            dropped = mask & keep
            # a clip that lost every face keeps its original mask (one modality must not vanish)
            out["video_mask"] = torch.where(dropped.any(1, keepdim=True), dropped, mask)
        return out
