"""Face-encoder throughput (faces/s) at batch 1 and 64, on the CPU and on a GPU when there is one.

    python benchmarks/bench_encoder.py [--encoder default] [--threads 1] [--seconds 2]

Rows: the shipped encoder (through ``FaceEncoder.embed`` on 112x112 RGB uint8 crops, i.e.
with the input conversion, as the extraction stage calls it), then the bare networks on
ready input: the shipped configuration, EfficientFace at the paper's widths, and TransFER
with its default small stem, each in the default (contiguous) and channels-last layouts.
The ratio column compares each row with the shipped network in contiguous layout at the
same batch size and device (> 1 is faster). Medians of repeated timed runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avemo.encoders import build_encoder, load_encoder  # noqa: E402


def faces_per_second(fn, batch: int, seconds: float, sync) -> float:
    fn()                                         # warm-up: allocations, kernel selection
    sync()
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t = time.perf_counter()
        fn()
        sync()
        rates.append(batch / (time.perf_counter() - t))
    return statistics.median(rates)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="default", help="encoder name or file (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=2.0, help="timing window per row")
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    enc = load_encoder(args.encoder)
    chans = 1 if enc.grayscale else 3
    networks = {
        f"shipped ({enc.arch}, {enc.feature_dim}-d)": lambda: build_encoder(enc.arch, len(enc.classes), **enc.arch_cfg),
        "efficientface paper widths (1024-d)": lambda: build_encoder("efficientface", 7, in_chans=chans, stem_stride=1),
        "transfer default (128-d)": lambda: build_encoder("transfer", 7, in_chans=chans),
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s)"
          + (f", GPU {torch.cuda.get_device_name(0)}" if "cuda" in devices else ", no GPU"))
    print(f"input: {enc.input_size}x{enc.input_size} {'grey' if enc.grayscale else 'RGB'}; "
          f"FaceEncoder.embed rows take 112x112 RGB uint8 crops\n")
    header = f"{'device':<6} {'batch':>5}  {'what':<50} {'layout':<14} {'faces/s':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for batch in batches:
            crops = rng.integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8)
            x = torch.randn(batch, chans, enc.input_size, enc.input_size, device=device)
            baseline = None
            rows = []
            for name, make in networks.items():
                net = make().to(device).eval()
                for layout in ("contiguous", "channels_last"):
                    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    net = net.to(memory_format=fmt)
                    xi = x.contiguous(memory_format=fmt)
                    with torch.inference_mode():
                        rate = faces_per_second(lambda: net.forward_features(xi), batch, args.seconds, sync)
                    baseline = baseline or rate
                    rows.append((name, layout, rate))
            wrapped = load_encoder(args.encoder, device=device)
            layout = "channels_last" if wrapped.channels_last else "contiguous"
            rate = faces_per_second(lambda: wrapped.embed(crops), batch, args.seconds, sync)
            rows.insert(0, (f"FaceEncoder.embed '{wrapped.name}' (+ preprocessing)", layout, rate))
            for name, layout, rate in rows:
                print(f"{device:<6} {batch:>5}  {name:<50} {layout:<14} {rate:>9.0f} {rate / baseline:>6.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
