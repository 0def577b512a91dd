"""The face encoder inside the fused model, for end-to-end training (FAN trains its frame CNN).

With frozen features the model reads ``video`` [B, T, D], cached by ``avemo-extract``. A model
built with ``ModelConfig.frame_encoder`` instead reads the face pixels of the frames it is to
use and computes their features itself, so the classification loss trains the encoder's
weights too (Meng et al., ICIP 2019: "trained end to end by the classification loss alone").

The batch then carries, beside ``video_mask`` [B, T]:

=====  ==============================  ====================================================
faces  [M, C, S, S] uint8 (or float    the encoder-input pixels (``to_model_pixels``) of the
       0..255 after augmentation)      M frames where ``video_mask`` is True, in the order of
                                       ``video_mask.nonzero()`` (clip by clip, then by time)
=====  ==============================  ====================================================

The encoder's architecture and input contract travel in the model's config as plain values
(``encoder_spec``), its weights in the model's state dict, so a checkpoint rebuilds the
fine-tuned encoder without executing code, as it rebuilds everything else.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from avemo.encoders import ARCHITECTURES, FaceEncoder, build_encoder, normalize, to_model_pixels
from avemo.features import ClipFeatures

EVAL_CHUNK = 256                     # faces encoded at once in evaluation
SPEC_KEYS = ("arch", "arch_cfg", "n_classes", "input_size", "grayscale", "mean", "std", "feature_dim")


def encoder_spec(encoder: FaceEncoder) -> dict[str, Any]:
    """What rebuilds ``encoder``'s network and feeds it (plain values), and which file it started from."""
    return {"arch": encoder.arch, "arch_cfg": dict(encoder.arch_cfg), "n_classes": len(encoder.classes),
            "input_size": encoder.input_size, "grayscale": encoder.grayscale, "mean": list(encoder.mean),
            "std": list(encoder.std), "feature_dim": encoder.feature_dim,
            "started_from": {"name": encoder.name, "sha256": encoder.sha256}}


def check_encoder_spec(spec: Any, video_dim: int) -> None:
    """``ValueError`` saying what is wrong with a spec read back from a file (nothing is built here)."""
    if not isinstance(spec, dict) or any(k not in spec for k in SPEC_KEYS):
        raise ValueError(f"frame_encoder must be a table with {', '.join(SPEC_KEYS)}")
    if spec["arch"] not in ARCHITECTURES or not isinstance(spec["arch_cfg"], dict):
        raise ValueError(f"frame_encoder: unknown architecture {spec['arch']!r} or settings not a table")
    whole = {k: spec[k] for k in ("n_classes", "input_size", "feature_dim")}
    if any(not isinstance(v, int) or isinstance(v, bool) for v in whole.values()) or not (
            2 <= whole["n_classes"] <= 1 << 16 and 8 <= whole["input_size"] <= 1024):
        raise ValueError(f"frame_encoder: class count, input size or feature size out of range: {whole}")
    if whole["feature_dim"] != video_dim:
        raise ValueError(f"frame_encoder makes {whole['feature_dim']}-D features, the video stream reads {video_dim}")
    channels = 1 if spec["grayscale"] else 3
    for key in ("mean", "std"):
        v = spec[key]
        if not (isinstance(v, list) and len(v) == channels and all(isinstance(x, (int, float)) and math.isfinite(x)
                                                                   for x in v)):
            raise ValueError(f"frame_encoder: '{key}' must hold {channels} finite number(s)")
    if min(spec["std"]) <= 0:
        raise ValueError("frame_encoder: 'std' must be above zero")


class FrameEncoder(nn.Module):
    """Face pixels of the used frames -> their features, scattered back to [B, T, D] (zero elsewhere)."""

    def __init__(self, spec: dict[str, Any], cells: int = 0):
        super().__init__()
        self.cells = cells               # cells of the last feature map (stt over cells reads the maps)
        self.net = build_encoder(spec["arch"], spec["n_classes"], **spec["arch_cfg"])
        # the expression classifier is not on the feature path: frozen, so that DDP finds no parameter
        # without a gradient (it is kept, so the checkpoint holds the whole encoder)
        self.net.fc.requires_grad_(False)
        channels = 1 if spec["grayscale"] else 3
        self.register_buffer("pixel_mean", torch.tensor(spec["mean"], dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(spec["std"], dtype=torch.float32).view(1, channels, 1, 1))
        self.input_size, self.feature_dim = spec["input_size"], spec["feature_dim"]

    def encode(self, faces: torch.Tensor, maps: bool = False) -> torch.Tensor:
        """[M, C, S, S] pixels (0..255) -> features [M, D] (``maps``: last feature maps [M, h*w, D]),
        normalised on the faces' device as the encoder was trained."""
        x = normalize(faces, self.pixel_mean, self.pixel_std)
        run = self._maps if maps else self.net.forward_features
        if self.training and len(x) == 1:
            # batch statistics need two samples: a lone frame is encoded beside a copy of itself
            return run(x.expand(2, -1, -1, -1))[:1]
        if not self.training:
            # evaluation encodes every frame of every clip: in chunks, so that the activations of one
            # chunk, not of the whole batch, are what is held (exact: BatchNorm uses its running statistics)
            return torch.cat([run(c) for c in x.split(EVAL_CHUNK)])
        return run(x)

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.net.forward_features_and_maps(x)[1]                            # [M, D, h, w]
        return maps.flatten(2).transpose(1, 2)                                     # [M, h*w, D], cells row by row

    def forward(self, faces: torch.Tensor, mask: torch.Tensor, maps: bool = False) -> torch.Tensor:
        # faces [M, C, S, S] with M = mask.sum(), mask [B, T] -> [B, T, D] (maps: [B, T, N, D])
        m = int(mask.sum())
        if faces.ndim != 4 or len(faces) != m or faces.shape[1:] != (self.pixel_mean.shape[1], self.input_size,
                                                                        self.input_size):
            raise ValueError(f"faces must be [{m}, {self.pixel_mean.shape[1]}, {self.input_size}, {self.input_size}] "
                             f"(one per frame the mask keeps), got {tuple(faces.shape)}")
        if m == 0:
            cells = (self.cells,) if maps else ()
            return torch.zeros(*mask.shape, *cells, self.feature_dim, device=mask.device)
        feats = self.encode(faces, maps)                                           # [M, D] or [M, N, D]
        out = torch.zeros(*mask.shape, *feats.shape[1:], device=mask.device, dtype=feats.dtype)
        return out.index_put((mask,), feats)                                       # [B, T, (N,) D]


def clip_face_pixels(clip: ClipFeatures, input_size: int, grayscale: bool) -> torch.Tensor:
    """The encoder-input pixels of a clip's frames with a face, in time order: uint8 [F, C, S, S].

    The one conversion training (``train.finetune.CropBank``) and prediction share; it is the
    encoder's own ``to_model_pixels``, so the starting encoder sees exactly what extraction fed it.
    """
    mask = np.asarray(clip.arrays.get("face_mask", np.zeros(0, bool)), bool)
    channels = 1 if grayscale else 3
    if "video_features" not in clip.arrays or not mask.any():
        return torch.zeros(0, channels, input_size, input_size, dtype=torch.uint8)
    crops = clip.arrays.get("crops")
    if crops is None or len(crops) != len(mask):
        raise ValueError(f"{clip.clip}: no aligned face crops for its {len(mask)} frames (extracted without "
                         "--keep-crops); a model that fine-tuned its face encoder reads the crops")
    return to_model_pixels(crops[mask], input_size, grayscale)
