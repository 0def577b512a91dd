"""Speed of the voice head's encoder statistics (avemo.model.voice): clip by clip against batched.

    python benchmarks/bench_voice.py [CACHE] [--clips 300] [--threads 1,2] [--busy 0] [--repeats 3]

Every clip's statistics run the frozen 3-layer LSTM over all its frames, when avemo-train fits a
head, when avemo-evaluate scores a cache and when a model adapts to a group. ``per clip`` is one
clip at a time (``voice_stats`` in a loop, how the head ran before 2026-11-26 and how avemo-predict
still runs its one clip); ``batched`` is ``voice_stats_batch``, clips of similar length packed into
one LSTM batch. Clips come from CACHE (an avemo-extract cache: its first --clips clips with audio)
or, without one, are random log-mels of 1-6 s (the LSTM's cost does not depend on what it hears).
``--busy N`` starts N other processes, each a one-thread matrix-product loop, for the time of the
measurement: a shared machine, where a job's threads wait on cores that others hold. Prints the
median of --repeats, seconds and clips per second, and the batched path's speed-up.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.features import ExtractionSettings  # noqa: E402
from avemo.model.voice import DEFAULT_LAYERS, band_map, voice_stats, voice_stats_batch  # noqa: E402

BUSY_LOOP = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a = torch.tanh(a @ a * 0.01)\n"


def clips_of(cache: Path | None, n: int) -> tuple[list[torch.Tensor], dict]:
    if cache is None:
        settings = ExtractionSettings().to_dict()
        rng = np.random.default_rng(0)
        frames = rng.integers(100, 600, n)               # 1-6 s at the default 10 ms hop
        return [torch.from_numpy(rng.normal(-6, 2, (settings["n_mels"], t)).astype(np.float32)) for t in frames], \
            settings
    from train.data import load_training_data
    data = load_training_data(cache)
    mels = [torch.from_numpy(c.arrays["mel"]) for c in data.clips if c.has_audio][:n]
    return mels, data.settings


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path, nargs="?")
    p.add_argument("--clips", type=int, default=300)
    p.add_argument("--threads", default="1,2", help="torch intra-op threads to measure, comma-separated")
    p.add_argument("--busy", type=int, default=0, help="other one-thread processes running meanwhile")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    mels, settings = clips_of(args.cache, args.clips)
    bands = band_map(settings)
    seconds = sum(m.shape[1] for m in mels) * settings["hop_length"] / settings["sample_rate"]
    voice_stats(mels[0], bands)                               # load the encoder outside the clock
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
    try:
        time.sleep(1.0 if busy else 0.0)
        rows = []
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            one = timed(lambda: [voice_stats(m, bands, DEFAULT_LAYERS) for m in mels], args.repeats)
            many = timed(lambda: voice_stats_batch(mels, bands, DEFAULT_LAYERS), args.repeats)
            rows.append((threads, one, many))
    finally:
        for proc in busy:
            proc.kill()
    print(f"{len(mels)} clips, {seconds / 60:.1f} min of audio ({'cache ' + str(args.cache) if args.cache else 'random'}), "
          f"layers {DEFAULT_LAYERS}, {args.busy} busy process(es) beside, median of {args.repeats}")
    print(f"{'threads':>7} {'per clip s':>11} {'clips/s':>8} {'batched s':>10} {'clips/s':>8} {'speed-up':>9}")
    for threads, one, many in rows:
        print(f"{threads:>7} {one:>11.2f} {len(mels) / one:>8.0f} {many:>10.2f} {len(mels) / many:>8.0f} "
              f"{one / many:>8.2f}x")


if __name__ == "__main__":
    main()
