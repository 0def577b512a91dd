"""Tiny generated feature caches for the model and training tests (no extraction code involved)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from avemo.features import ClipFeatures, ExtractionSettings, feature_filename

N_MELS, VIDEO_DIM = 16, 8


def make_cache(root: Path, classes=("ang", "hap", "sad"), speakers=("s1", "s2", "s3", "s4"), per_class: int = 4,
               seed: int = 0, audio: bool = True, video: bool = True, settings: ExtractionSettings | None = None,
               with_labels: bool = True, audio_only_every: int = 0, n_mels: int = N_MELS,
               maps: bool = False) -> Path:
    """A cache whose classes are separable in both modalities: class c lights up its own mel band
    and shifts the face features along its own direction; lengths vary so padding is exercised.
    ``maps``: each frame also has a 2 x 2 feature map whose cells average to its feature vector."""
    rng = np.random.default_rng(seed)
    map_rng = np.random.default_rng(seed + 1)       # its own stream: the other arrays stay as they were
    settings = settings or ExtractionSettings(n_mels=n_mels, feature_dim=VIDEO_DIM, feature_maps=maps)
    rows, k = [], 0
    for spk in speakers:
        for ci, label in enumerate(classes):
            for j in range(per_class):
                clip = f"{spk}/{label}_{j}.mp4"
                arrays = {}
                if audio:
                    t_a = int(rng.integers(24, 48))
                    mel = rng.normal(-4.0, 1.0, (settings.n_mels, t_a)).astype(np.float32)
                    band = slice(ci * 4, ci * 4 + 4)
                    mel[band] += 1.5
                    arrays["mel"] = mel
                k += 1
                if video and not (audio_only_every and k % audio_only_every == 0):
                    t_v = int(rng.integers(4, 9))
                    feats = rng.normal(0, 0.5, (t_v, VIDEO_DIM)).astype(np.float32)
                    feats[:, ci] += 2.0
                    mask = np.ones(t_v, bool)
                    mask[int(rng.integers(0, t_v))] = False
                    feats[~mask] = 0.0
                    arrays.update(video_features=feats, face_mask=mask, frame_times=np.arange(t_v) / 4.0)
                    if maps:
                        spread = map_rng.normal(0, 0.25, (t_v, 2, 2, VIDEO_DIM))
                        cells = feats[:, None, None, :] + spread - spread.mean((1, 2), keepdims=True)
                        arrays["feature_maps"] = (cells * mask[:, None, None, None]).astype(np.float16)
                c = ClipFeatures(clip=clip, settings=settings.to_dict(), duration=1.0, label=label if with_labels else None,
                                 speaker=spk, arrays=arrays)
                name = feature_filename(clip)
                c.save(root / name)
                rows.append({"clip": clip, "status": "ok", "reason": "", "label": label if with_labels else "",
                             "speaker": spk, "feature_file": name, "settings_hash": settings.digest()})
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def blind_encoder(path: Path, size: int = 16) -> Path:
    """A tiny random EfficientFace (``size`` px RGB) whose frozen features are one constant vector.

    Its last BatchNorm has scale 0 and shift 0.5, so every face gets the same feature (0.5 in
    every dimension, whatever the pixels): frozen, it sees nothing. The scale is a weight like
    any other; trained end to end it moves off zero and the network's (random) view of the
    pixels reaches the stream. The file records a mild augmentation as its training's own."""
    import torch
    from avemo.encoders import build_encoder, export_encoder
    torch.manual_seed(0)
    arch_cfg = dict(stages_repeats=[1, 1, 1], stages_out_channels=[8, 16, 32, 64, 32], stem_stride=1, stem_pool=False)
    model = build_encoder("efficientface", 2, **arch_cfg)
    with torch.no_grad():
        bn = model.conv5[1]
        bn.weight.zero_()
        bn.bias.fill_(0.5)
    augment = dict(flip=0.5, rotate=5.0, scale=0.05, shift=0.05, brightness=0.1, contrast=0.1, erase=0.0,
                   erase_area=[0.02, 0.2])
    export_encoder(path, model.eval(), "efficientface", arch_cfg, ["a", "b"], input_size=size, grayscale=False,
                   mean=[0.5] * 3, std=[0.25] * 3, training={"config": {"augment": augment}})
    return Path(path)


def pattern_crops(rng: np.random.Generator, cls: int, frames: int, size: int = 16) -> np.ndarray:
    """uint8 [frames, size, size, 3] noisy grey faces with a bright bar in the top (class 0) or bottom
    (class 1) half: a mirror image keeps the class."""
    crops = rng.integers(70, 150, (frames, size, size, 3)).astype(np.uint8)
    top = size // 8 + (size // 2 if cls else 0)
    crops[:, top:top + size // 4, size // 8:-size // 8] = 250
    return crops


def make_crop_cache(root: Path, encoder_path: Path, classes=("bottom", "top"), speakers=("s1", "s2", "s3", "s4"),
                    per_class: int = 8, frames: int = 6, seed: int = 0, keep_crops: bool = True,
                    maps: bool = True) -> Path:
    """A video-only cache written as ``avemo-extract --keep-crops`` writes one, from generated face crops:
    ``video_features`` are the encoder's own (frozen) features of the crops, frames without a face
    have zero features and a zero crop. Classes differ by where the bar is (``pattern_crops``).
    ``maps``: also the encoder's feature maps, as ``--feature-maps`` writes them."""
    from avemo.encoders import file_sha256, load_encoder
    rng = np.random.default_rng(seed)
    enc = load_encoder(encoder_path)
    settings = ExtractionSettings(n_mels=N_MELS, frames=frames, face_size=enc.input_size, keep_crops=keep_crops,
                                  encoder=str(encoder_path), encoder_sha256=file_sha256(encoder_path),
                                  feature_dim=enc.feature_dim, feature_maps=maps)
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    for spk in speakers:
        for ci, label in enumerate(classes):
            for j in range(per_class):
                clip = f"{spk}/{label}_{j}.mp4"
                mask = np.ones(frames, bool)
                mask[rng.integers(0, frames)] = False
                crops = pattern_crops(rng, ci, frames, enc.input_size)
                crops[~mask] = 0
                feats = np.zeros((frames, enc.feature_dim), np.float32)
                pooled, cells = enc.embed_maps(crops[mask])
                feats[mask] = pooled.numpy()
                arrays = dict(video_features=feats, face_mask=mask, frame_times=np.arange(frames) / 4.0)
                if maps:
                    arrays["feature_maps"] = np.zeros((frames, *cells.shape[1:]), np.float16)
                    arrays["feature_maps"][mask] = cells.numpy()
                if keep_crops:
                    arrays["crops"] = crops
                c = ClipFeatures(clip=clip, settings=settings.to_dict(), duration=1.5, label=label, speaker=spk,
                                 arrays=arrays)
                name = feature_filename(clip)
                c.save(root / name)
                rows.append({"clip": clip, "status": "ok", "reason": "", "label": label, "speaker": spk,
                             "feature_file": name, "settings_hash": settings.digest()})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root
