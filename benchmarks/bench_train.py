"""Training throughput (clips/s) of avemo-train: cache held on the device vs collated per batch.

    python benchmarks/bench_train.py [--clips 256] [--epochs 3] [--threads N]

Builds a random cache of realistic shape (64-bin log-mel of 3 s clips at a 10 ms hop,
16 face frames of 512-D features, lengths varying by +-30 %) in a temporary folder and runs
the real training loop (``train.loop.fit``) on it; clips/s is the mean over the epochs after
the first. Runs on the CPU, and on CUDA too when there is a GPU. The baseline of each
device is "collated per batch" (what a data loader does); the ratio column is against it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.features import ClipFeatures, ExtractionSettings, feature_filename  # noqa: E402
from train.augment import AugmentConfig  # noqa: E402
from train.data import load_training_data  # noqa: E402
from train.loop import Runtime, TrainConfig, fit  # noqa: E402
from train.splits import no_split  # noqa: E402


def random_cache(root: Path, n: int, seconds: float, frames: int, dim: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    settings = ExtractionSettings(feature_dim=dim, frames=frames)
    rows = []
    for i in range(n):
        t_a = int(seconds * 100 * rng.uniform(0.7, 1.3))
        arrays = {"mel": rng.normal(-5, 2, (settings.n_mels, t_a)).astype(np.float32),
                  "video_features": rng.normal(0, 1, (frames, dim)).astype(np.float32),
                  "face_mask": rng.random(frames) > 0.1, "frame_times": np.linspace(0, seconds, frames)}
        clip = f"c{i:05d}.mp4"
        ClipFeatures(clip=clip, settings=settings.to_dict(), arrays=arrays).save(root / feature_filename(clip))
        rows.append({"clip": clip, "status": "ok", "reason": "", "label": f"e{i % 6}", "speaker": f"s{i % 8}",
                     "feature_file": feature_filename(clip)})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def clips_per_second(data, device: torch.device, on_device: str, amp: bool, epochs: int, batch: int,
                     model: dict, out: Path) -> float:
    cfg = TrainConfig(epochs=epochs, batch_size=batch, patience=0, progress=False, features_on_device=on_device,
                      audio_init="none",
                      amp=amp, augment=AugmentConfig())
    full = dict(model, n_classes=len(data.classes), n_mels=data.n_mels, video_dim=data.video_dim)
    fit(data, no_split(len(data)), full, cfg, out, rt=Runtime(device))
    hist = pd.read_csv(out / "metrics.csv")
    return float(hist["clips_per_s"].iloc[1:].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = dict(modalities="av", video_stream="attention", fusion="fbp")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = load_training_data(random_cache(tmp / "cache", args.clips, args.seconds, 16, 512))
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        for dev in devices:
            amps = [False, True] if dev.type == "cuda" else [False]
            for amp in amps:
                base = None
                for mode, label in (("no", "collated per batch"), ("yes", "held on the device")):
                    run = tmp / f"{dev.type}-{amp}-{mode}"
                    cps = clips_per_second(data, dev, mode, amp, args.epochs, args.batch_size, model, run)
                    base = base or cps
                    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
                    rows.append((name, "bf16" if amp else "fp32", label, cps, cps / base))
    print(f"avemo-train throughput: {args.clips} clips of ~{args.seconds:g} s (64 mels) + 16 frames x 512-D, "
          f"av / attention / fbp, batch {args.batch_size}, mean of epochs 2..{args.epochs}")
    print(f"{'device':<28}{'precision':<11}{'features':<22}{'clips/s':>9}{'vs collated':>13}")
    for name, prec, label, cps, ratio in rows:
        print(f"{name:<28}{prec:<11}{label:<22}{cps:>9.1f}{ratio:>12.2f}x")


if __name__ == "__main__":
    main()
