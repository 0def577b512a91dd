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
