"""Training throughput (clips/s) of avemo-train: what the CPU runtime settings buy, and the cache
held on the device vs collated per batch; with ``--streams``, each video stream frozen vs end
to end (``--finetune-encoder``).

    python benchmarks/bench_train.py [--clips 256] [--epochs 3] [--threads N]
    python benchmarks/bench_train.py --streams [--clips 64] [--epochs 3] [--threads N]

Builds a random cache of realistic shape (64-bin log-mel of 3 s clips at a 10 ms hop,
16 face frames of 512-D features, lengths varying by +-30 %) in a temporary folder and runs
the real training loop (``train.loop.fit``) on it; clips/s is the mean over the epochs after
the first. Each row is its own process (its own allocator settings and peak resident memory,
from the kernel via ``wait4``). CPU rows, each against the first: glibc's default allocator
with float32 (avemo before it set its allocator), then what avemo-train does (heap-served
large blocks, ``avemo.cpu.reuse_freed_memory``), the cache held in memory, and bf16 autocast
where the CPU computes bf16 in hardware. On CUDA: float32 and bf16, collated vs held on the GPU.

``--streams``: the same kind of cache with aligned face crops (112 px RGB, random pixels) and
the shipped ``default`` face encoder's identity; each of ``attention``, ``fan``, ``stt`` is
trained on the video alone, once on the cached features (frozen) and once with the encoder
trained end to end (3 random frames per clip a step). Each run is its own process, so its
peak resident memory (from the kernel, ``wait4``; torch's own ~0.3 GB included) and, on CUDA,
its peak allocated GPU memory belong to it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.features import ClipFeatures, ExtractionSettings, feature_filename  # noqa: E402
from avemo.cpu import cpu_computes_bf16, reuse_freed_memory  # noqa: E402
from train.augment import AugmentConfig  # noqa: E402
from train.data import load_training_data  # noqa: E402
from train.loop import Runtime, TrainConfig, fit  # noqa: E402
from train.splits import no_split  # noqa: E402


def random_cache(root: Path, n: int, seconds: float, frames: int, dim: int, seed: int = 0,
                 encoder=None) -> Path:
    """``encoder`` (a loaded FaceEncoder): the cache also holds 112 px crops and feature maps of that
    encoder's grid (for stt over cells), and names that encoder."""
    rng = np.random.default_rng(seed)
    settings = ExtractionSettings(feature_dim=dim, frames=frames)
    if encoder is not None:
        settings = ExtractionSettings(feature_dim=encoder.feature_dim, frames=frames, keep_crops=True,
                                      feature_maps=True, encoder=encoder.name, encoder_sha256=encoder.sha256)
    rows = []
    for i in range(n):
        t_a = int(seconds * 100 * rng.uniform(0.7, 1.3))
        arrays = {"mel": rng.normal(-5, 2, (settings.n_mels, t_a)).astype(np.float32),
                  "video_features": rng.normal(0, 1, (frames, settings.feature_dim)).astype(np.float32),
                  "face_mask": rng.random(frames) > 0.1, "frame_times": np.linspace(0, seconds, frames)}
        if encoder is not None:
            arrays["crops"] = rng.integers(0, 256, (frames, settings.face_size, settings.face_size, 3), np.uint8)
            grid = (frames, *encoder.map_grid, settings.feature_dim)
            arrays["feature_maps"] = rng.normal(0, 1, grid).astype(np.float16)
        clip = f"c{i:05d}.mp4"
        ClipFeatures(clip=clip, settings=settings.to_dict(), arrays=arrays).save(root / feature_filename(clip))
        rows.append({"clip": clip, "status": "ok", "reason": "", "label": f"e{i % 6}", "speaker": f"s{i % 8}",
                     "feature_file": feature_filename(clip)})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def clips_per_second(data, device: torch.device, on_device: str, amp: bool, epochs: int, batch: int,
                     model: dict, out: Path, finetune: bool = False) -> float:
    cfg = TrainConfig(epochs=epochs, batch_size=batch, patience=0, progress=False, features_on_device=on_device,
                      audio_init="none", finetune_encoder=finetune,
                      amp=amp, augment=AugmentConfig())
    full = dict(model, n_classes=len(data.classes), n_mels=data.n_mels, video_dim=data.video_dim,
                video_cells=data.video_cells)
    fit(data, no_split(len(data)), full, cfg, out, rt=Runtime(device))
    hist = pd.read_csv(out / "metrics.csv")
    return float(hist["clips_per_s"].iloc[1:].mean())


def one_stream_run(args) -> None:
    """Child process of ``--streams``: one training run; prints its figures as JSON."""
    device = torch.device(args.device)
    stream, mode = args.one.split(":")
    reuse_freed_memory()                      # as avemo-train does
    data = load_training_data(args.cache, with_maps=stream == "stt")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cps = clips_per_second(data, device, "auto", True, args.epochs, args.batch_size,
                           dict(modalities="video", video_stream=stream), Path(args.out), finetune=mode == "e2e")
    gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    print(json.dumps({"clips_per_s": cps, "gpu_mb": gpu}))


def stream_rows(args) -> None:
    """Each video stream, frozen vs end to end, each run in its own process (its own peak memory)."""
    from avemo.encoders import load_encoder
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = random_cache(tmp / "cache", args.clips, args.seconds, 16, 0, encoder=load_encoder("default"))
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for dev in devices:
            for stream in ("attention", "fan", "stt"):
                for mode in ("frozen", "e2e"):
                    fig, rss = _child(args, ["--one", f"{stream}:{mode}", "--cache", str(cache), "--device", dev],
                                      tmp / f"{dev}-{stream}-{mode}")
                    rows.append((dev, stream, mode, fig["clips_per_s"], rss, fig["gpu_mb"]))
    threads = args.threads or torch.get_num_threads()
    print(f"avemo-train, video only: {args.clips} clips x 16 frames (112 px crops; shipped 'default' encoder, 48 px "
          f"grey, 512-D), batch {args.batch_size}, mean of epochs 2..{args.epochs}; e2e = --finetune-encoder, "
          f"3 frames per clip a step; cpu rows: {threads} thread(s), "
          f"{'bf16 autocast frozen, float32 end to end' if cpu_computes_bf16() else 'float32'} (avemo-train's defaults)")
    print(f"{'device':<8}{'stream':<11}{'encoder':<10}{'clips/s':>9}{'vs frozen':>11}{'peak RSS MB':>13}{'peak GPU MB':>13}")
    frozen = {}
    for dev, stream, mode, cps, rss, gpu in rows:
        frozen.setdefault((dev, stream), cps)
        gpu_text = f"{gpu:.0f}" if gpu is not None else "-"
        print(f"{dev:<8}{stream:<11}{mode:<10}{cps:>9.1f}{cps / frozen[(dev, stream)]:>10.2f}x{rss:>13.0f}{gpu_text:>13}")


def one_row_run(args) -> None:
    """Child process of the main table: one configuration ``DEVICE:bf16|fp32:yes|no:reuse|glibc``."""
    dev, precision, on_device, alloc = args.row.split(":")
    if alloc == "reuse":
        reuse_freed_memory()
    data = load_training_data(args.cache)
    cps = clips_per_second(data, torch.device(dev), on_device, precision == "bf16", args.epochs, args.batch_size,
                           dict(modalities="av", video_stream="attention", fusion="fbp"), Path(args.out))
    print(json.dumps({"clips_per_s": cps}))


def _child(args, extra: list[str], out: Path) -> tuple[dict, float]:
    """Runs this script with ``extra`` in its own process; its printed figures and peak RSS (MB)."""
    cmd = [sys.executable, __file__, *extra, "--out", str(out), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed (status {status})")
    return json.loads(text.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int)
    p.add_argument("--streams", action="store_true", help="each video stream, frozen vs end to end (--finetune-encoder)")
    p.add_argument("--one", help=argparse.SUPPRESS)       # child of --streams: STREAM:frozen|e2e
    p.add_argument("--row", help=argparse.SUPPRESS)       # child of the main table
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        return one_stream_run(args)
    if args.row:
        return one_row_run(args)
    if args.streams:
        return stream_rows(args)
    configs = [("cpu", "fp32", "no", "glibc"), ("cpu", "fp32", "no", "reuse"), ("cpu", "fp32", "yes", "reuse")]
    if cpu_computes_bf16():
        configs.append(("cpu", "bf16", "yes", "reuse"))
    if torch.cuda.is_available():
        configs += [("cuda", prec, mode, "reuse") for prec in ("fp32", "bf16") for mode in ("no", "yes")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = random_cache(tmp / "cache", args.clips, args.seconds, 16, 512)
        for i, cfg in enumerate(configs):
            fig, rss = _child(args, ["--row", ":".join(cfg), "--cache", str(cache)], tmp / f"run{i}")
            rows.append((*cfg, fig["clips_per_s"], rss))
    threads = args.threads or torch.get_num_threads()
    print(f"avemo-train throughput: {args.clips} clips of ~{args.seconds:g} s (64 mels) + 16 frames x 512-D, "
          f"av / attention / fbp, batch {args.batch_size}, mean of epochs 2..{args.epochs}; cpu rows: {threads} thread(s)")
    print(f"{'device':<8}{'precision':<11}{'allocator':<18}{'features':<22}{'clips/s':>9}{'vs first':>10}{'peak RSS MB':>13}")
    first = {}
    for dev, prec, mode, alloc, cps, rss in rows:
        base = first.setdefault(dev, cps)
        name = torch.cuda.get_device_name() if dev == "cuda" else dev
        alloc_text = "glibc default" if alloc == "glibc" else "heap reuse"
        feats = "held on the device" if mode == "yes" else "collated per batch"
        print(f"{name:<8}{prec:<11}{alloc_text:<18}{feats:<22}{cps:>9.1f}{cps / base:>9.2f}x{rss:>13.0f}")


if __name__ == "__main__":
    main()
