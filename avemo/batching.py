"""Cached clips -> padded tensors and masks, the model's input (training and prediction alike).

A batch is a dict:

==========  =====================  ==================================================
mel         [B, n_mels, T_a] f32   raw log-mel (zero where padded)
mel_mask    [B, T_a] bool          True on real audio frames; all False: no audio
video       [B, T_v, D] f32        face features (zero where padded)
video_mask  [B, T_v] bool          True where a face was found in a real frame
video_maps  [B, T_v, N, D] f32     each frame's feature map, N = h*w cells in row-major
                                   order (only when asked for: stt over cells)
==========  =====================  ==================================================

Time axes are padded to the longest clip (at least 1, so that shapes are never empty).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from avemo.features import ClipFeatures


def _clip_arrays(clip: ClipFeatures, n_mels: int, video_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mel = clip.arrays.get("mel")
    if mel is None or mel.size == 0:
        mel = np.zeros((n_mels, 0), np.float32)
    elif mel.ndim != 2 or mel.shape[0] != n_mels:
        raise ValueError(f"{clip.clip}: mel has shape {mel.shape}, expected [{n_mels}, T] "
                         "(was it extracted with other settings?)")
    feats = clip.arrays.get("video_features")
    if feats is None or feats.size == 0 or video_dim == 0:
        feats, fmask = np.zeros((0, max(video_dim, 0)), np.float32), np.zeros(0, bool)
    else:
        if feats.ndim != 2 or feats.shape[1] != video_dim:
            raise ValueError(f"{clip.clip}: video_features has shape {feats.shape}, expected [T, {video_dim}]")
        fmask = clip.arrays.get("face_mask")
        fmask = np.ones(len(feats), bool) if fmask is None else np.asarray(fmask, bool)
        if len(fmask) != len(feats):
            raise ValueError(f"{clip.clip}: face_mask has {len(fmask)} entries for {len(feats)} frames")
    return mel, feats, fmask


def _clip_maps(clip: ClipFeatures, frames: int, cells: int, video_dim: int) -> np.ndarray:
    """The clip's feature maps as [T_v, cells, D] (zeros for a clip without video)."""
    maps = clip.arrays.get("feature_maps")
    if maps is None:
        if frames and clip.has_video:
            raise ValueError(f"{clip.clip}: no feature maps in this clip's features; re-extract with "
                             "avemo-extract --feature-maps")
        return np.zeros((frames, cells, video_dim), np.float32)
    if maps.ndim != 4 or maps.shape[0] != frames or maps.shape[1] * maps.shape[2] != cells \
            or maps.shape[3] != video_dim:
        raise ValueError(f"{clip.clip}: feature_maps has shape {maps.shape}, expected [{frames}, h, w, {video_dim}] "
                         f"with h*w = {cells}")
    return maps.reshape(frames, cells, video_dim)


def collate(clips: Sequence[ClipFeatures], n_mels: int, video_dim: int = 0,
            video_cells: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of clips into one batch (see the module docstring); video_dim 0 leaves video out,
    video_cells > 0 adds the feature maps."""
    if not clips:
        raise ValueError("cannot make a batch from zero clips")
    rows = [_clip_arrays(c, n_mels, video_dim) for c in clips]
    b = len(rows)
    t_a = max(1, max(m.shape[1] for m, _, _ in rows))
    mel = np.zeros((b, n_mels, t_a), np.float32)
    mel_mask = np.zeros((b, t_a), bool)
    for i, (m, _, _) in enumerate(rows):
        mel[i, :, : m.shape[1]] = m
        mel_mask[i, : m.shape[1]] = True
    batch = {"mel": torch.from_numpy(mel), "mel_mask": torch.from_numpy(mel_mask)}
    if video_dim > 0:
        t_v = max(1, max(len(f) for _, f, _ in rows))
        video = np.zeros((b, t_v, video_dim), np.float32)
        video_mask = np.zeros((b, t_v), bool)
        for i, (_, f, fm) in enumerate(rows):
            video[i, : len(f)] = f
            video_mask[i, : len(f)] = fm
        batch["video"] = torch.from_numpy(video)
        batch["video_mask"] = torch.from_numpy(video_mask)
        if video_cells > 0:
            maps = np.zeros((b, t_v, video_cells, video_dim), np.float32)
            for i, (clip, (_, f, _)) in enumerate(zip(clips, rows)):
                maps[i, : len(f)] = _clip_maps(clip, len(f), video_cells, video_dim)
            batch["video_maps"] = torch.from_numpy(maps)
    return batch


def trim_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut trailing time steps that are padding in every clip of the batch (keeps at least 1)."""
    out = dict(batch)
    for key, mask_key, axis in (("mel", "mel_mask", 2), ("video", "video_mask", 1), ("video_maps", "video_mask", 1)):
        if key not in batch:
            continue
        mask = batch[mask_key]
        valid = mask.any(0).nonzero()
        t = int(valid.max()) + 1 if len(valid) else 1
        out[mask_key] = mask[:, :t]
        out[key] = batch[key].narrow(axis, 0, t)
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str, non_blocking: bool = False):
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def length_batches(lengths: np.ndarray, batch_size: int, budget: int) -> list[torch.Tensor]:
    """Indices into ``lengths`` in batches of clips of like length, each of at most ``batch_size`` clips and
    ``budget`` clip-frames (one clip alone may exceed it): a long recording then pads no short clip to its
    length (a clip's outputs do not depend on its batch)."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < batch_size and \
                (end + 1 - start) * max(int(lengths[order[end]]), 1) <= budget:
            end += 1
        batches.append(torch.as_tensor(order[start:end]))
        start = end
    return batches
