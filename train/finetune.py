"""End-to-end video training (``avemo-train --finetune-encoder``): the face encoder learns with the streams.

Frame Attention Networks (Meng et al., ICIP 2019) train the frame CNN together with the
attention: in the official code (Open-Debin/Emotion-FAN, ``fan_afew_traintest.py``) each
training step sees 3 random frames of every clip, evaluation sees all of them, and the
only crop augmentation is a horizontal flip. Here:

- the cache's aligned face crops (``avemo-extract --keep-crops``) are converted once, by the
  encoder's own ``to_model_pixels``, into one uint8 tensor of encoder-input pixels
  (``CropBank``), held on the training device when it fits;
- each step keeps ``frames_per_clip`` random face frames of each clip (``sample_frames``) by
  narrowing the frame mask, so frames keep their place in time (STT's position embeddings);
  only those frames are encoded;
- those frames get the augmentation the encoder itself was trained with (its file records
  it; ``train.face.augment``), on the device, then the encoder's normalisation;
- the encoder has its own, lower learning rate (its own AdamW parameter group).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avemo.checkpoint import CheckpointError
from avemo.encoders import FaceEncoder, load_named_encoder
from avemo.features import ClipFeatures, ExtractionSettings, FeatureFileError
from avemo.model.frames import clip_face_pixels, encoder_spec
from train.data import TrainingData
from train.face.augment import AugmentConfig, augment

log = logging.getLogger("avemo.train")
ENCODER_PREFIX = "frame_encoder."


class FinetuneError(ValueError):
    """A cache or setting that end-to-end training cannot use, with the reason and the fix in words."""


def require_crops(data: TrainingData, indices: list[int], cache_hint: str = "CACHE") -> None:
    """Every clip with a face must hold its aligned crops; say how to re-extract when some do not.

    Reads only the files' zip directories, so it is quick and comes before anything is built."""
    if len(data.files) != len(data.clips):
        raise FinetuneError("--finetune-encoder needs a cache on disk (its clips' feature files hold the crops)")
    missing = [data.clips[i].clip for i in indices if data.clips[i].has_video and not _has_crops(data.files[i])]
    if missing:
        raise FinetuneError(
            f"--finetune-encoder trains the face encoder on the cache's aligned face crops, and {len(missing)} of "
            f"the clips with a face have none (e.g. '{missing[0]}'): the cache was extracted without --keep-crops. "
            f"Re-extract with `avemo-extract VIDEO_DIR --out {cache_hint} --keep-crops` (the same settings: clips "
            "already done only get their crops added)")


def _has_crops(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return "crops" in z.files
    except (OSError, ValueError):
        return False


def starting_encoder(settings: dict[str, Any]) -> FaceEncoder:
    """The face encoder the cache was extracted with (its name or path and sha256 are in the settings)."""
    from avemo.extraction import with_encoder_identity    # the one check that an encoder is the cache's
    s = ExtractionSettings.from_dict(settings)
    try:
        encoder = load_named_encoder(s.encoder, s.encoder_sha256)
        with_encoder_identity(s, encoder)
    except (CheckpointError, ValueError) as e:
        raise FinetuneError(f"--finetune-encoder starts from the face encoder the cache was extracted with "
                            f"('{s.encoder}'), and it cannot be used: {e}") from None
    return encoder


def finetune_spec(encoder: FaceEncoder) -> dict[str, Any]:
    """``ModelConfig.frame_encoder`` for ``encoder``, with the augmentation it was trained with (if it says)."""
    recorded = (encoder.training.get("config") or {}).get("augment")
    aug = recorded if isinstance(recorded, dict) else dataclasses.asdict(AugmentConfig())
    return {**encoder_spec(encoder), "augment": {k: list(v) if isinstance(v, tuple) else v for k, v in aug.items()}}


def crop_augment_config(spec: dict[str, Any]) -> AugmentConfig:
    try:
        return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("augment", {}).items()})
    except TypeError as e:
        raise FinetuneError(f"the frame encoder's recorded augmentation is not usable: {e}") from None


def sample_frames(mask: torch.Tensor, k: int) -> torch.Tensor:
    """``mask`` [B, T] narrowed to k random True frames per row (a row with k or fewer keeps all)."""
    if k <= 0 or k >= mask.shape[1]:
        return mask
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, 2.0)   # frames without a face last
    kth = scores.topk(k, dim=1, largest=False).values[:, -1:]                      # each row's k-th smallest
    return mask & (scores <= kth)


class CropBank:
    """Every face frame of a set of clips as encoder-input pixels, in one uint8 tensor.

    ``pixels`` [F, C, S, S]: uint8 is a quarter of float32, and the encoder's input (48 px grey
    for the shipped one) is 16x smaller than a 112 px RGB crop, so a cache's faces usually fit
    on the device; float copies are made only of a batch's frames. ``rows`` [N, T] (on the
    training device) is the row of clip n's frame t in ``pixels``, -1 where it has no face.
    """

    def __init__(self, data: TrainingData, indices: list[int], spec: dict[str, Any]):
        size, grey = spec["input_size"], bool(spec["grayscale"])
        t_max = max([len(data.clips[i].arrays.get("face_mask", ())) for i in indices] + [1])
        rows = torch.full((len(indices), t_max), -1, dtype=torch.long)
        parts, total = [], 0
        for n, i in enumerate(indices):
            if not data.clips[i].has_video:
                continue
            try:
                clip = ClipFeatures.load(data.files[i], with_crops=True)
                pixels = clip_face_pixels(clip, size, grey)                      # [F_i, C, S, S] uint8
            except (FeatureFileError, ValueError) as e:
                raise FinetuneError(f"{data.files[i]}: {e}") from None
            mask = torch.from_numpy(np.asarray(clip.arrays["face_mask"], bool))
            rows[n, : len(mask)][mask] = torch.arange(total, total + len(pixels))
            parts.append(pixels)
            total += len(pixels)
        self.pixels = torch.cat(parts) if parts else torch.zeros(0, 1 if grey else 3, size, size, dtype=torch.uint8)
        self.rows = rows
        self.on_device = False

    def place(self, device: torch.device, on_device: bool) -> "CropBank":
        """Pixels onto ``device`` when ``on_device`` (else kept on the host, a batch's copied over); rows always."""
        self.pixels = self.pixels.to(device) if on_device else self.pixels
        self.rows, self.on_device = self.rows.to(device), on_device
        return self

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()

    def rows_of(self, idx: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, frames] rows of the clips ``idx`` (store positions)."""
        return self.rows[idx.to(self.rows.device), :frames]

    def attach(self, batch: dict[str, torch.Tensor], frames_per_clip: int = 0,
               aug: AugmentConfig | None = None) -> dict[str, torch.Tensor]:
        """``batch`` (with ``frame_rows``) -> the model's end-to-end input: ``faces`` of the frames its mask keeps.

        Training passes ``frames_per_clip`` (the mask is narrowed first, so only those frames are
        gathered and encoded) and ``aug``; evaluation passes neither: every face frame, as it is."""
        out = dict(batch)
        rows = out.pop("frame_rows")
        out.pop("video", None)                     # the cached frozen features (and maps): the model computes its own
        out.pop("video_maps", None)
        mask = sample_frames(out["video_mask"], frames_per_clip)
        out["video_mask"] = mask
        faces = self.pixels[rows[mask].to(self.pixels.device)].to(mask.device, non_blocking=True)
        out["faces"] = augment(faces, aug) if aug is not None and len(faces) else faces
        return out
