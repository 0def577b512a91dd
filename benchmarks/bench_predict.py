"""End-to-end latency of avemo-predict on one short clip, cold process and warm in-process.

    python benchmarks/bench_predict.py --model demo-out/run/best.pt [--clip CLIP] [--repeats 5]

Cold: a fresh ``avemo-predict CLIP --model M --json`` process (interpreter start, imports,
model + detector + encoder loading, one prediction), timed from outside; each stage is
timed inside a second fresh process. Warm: the loaded model in this process predicting
the same clip again (median of --repeats), split by extraction stage. Targets on a
2-core CPU: warm < 1 s, cold < 4 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = ROOT / "examples" / "cremad" / "1001_DFA_HAP_XX.flv"

# Run in a fresh interpreter: the same work as avemo-predict, with a clock around each step.
COLD_STAGES = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from avemo.prediction import load_model
t1 = time.perf_counter()
m = load_model(sys.argv[1], "cpu")
t2 = time.perf_counter()
m.extractor
t3 = time.perf_counter()
p = m.predict(sys.argv[2])
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load model": t2 - t1, "load detector+encoder": t3 - t2,
                  "predict": t4 - t3, "stages": dict(m.extractor.seconds)}))
"""


def cold(model: str, clip: str, device: str) -> tuple[float, dict]:
    exe = Path(sys.executable).with_name("avemo-predict")
    t = time.perf_counter()
    subprocess.run([str(exe), clip, "--model", model, "--json", "--device", device],
                   check=True, capture_output=True)
    total = time.perf_counter() - t
    out = subprocess.run([sys.executable, "-c", COLD_STAGES, model, clip], check=True,
                         capture_output=True, text=True).stdout
    return total, json.loads(out.strip().splitlines()[-1])


def warm(model: str, clip: str, device: str, repeats: int) -> tuple[list[float], dict]:
    from avemo.prediction import load_model
    m = load_model(model, device)
    m.predict(clip)                        # first call pays one-off allocation costs
    m.extractor.seconds.clear()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        m.predict(clip)
        times.append(time.perf_counter() - t)
    stages = {k: v / repeats for k, v in m.extractor.seconds.items()}
    return times, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained checkpoint (e.g. demo-out/run/best.pt)")
    ap.add_argument("--clip", default=str(DEFAULT_CLIP))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    total, cold_stages = cold(args.model, args.clip, args.device)
    times, stages = warm(args.model, args.clip, args.device, args.repeats)
    w = statistics.median(times)
    extraction = sum(stages.values())
    print(f"clip: {args.clip}  device: {args.device}  torch threads: {torch.get_num_threads()}")
    print()
    print("| measure | seconds | target | ratio to target |")
    print("|---|---:|---:|---:|")
    print(f"| cold: fresh `avemo-predict` process, wall | {total:.2f} | 4.0 | {total / 4.0:.2f} |")
    print(f"| warm: in-process predict, median of {args.repeats} | {w:.3f} | 1.0 | {w / 1.0:.2f} |")
    print()
    print("| cold process stage | seconds |")
    print("|---|---:|")
    for k in ("imports", "load model", "load detector+encoder", "predict"):
        print(f"| {k} | {cold_stages[k]:.3f} |")
    print()
    print("| warm stage (per clip) | seconds | share |")
    print("|---|---:|---:|")
    for k, v in stages.items():
        print(f"| {k} | {v:.3f} | {v / w:.0%} |")
    print(f"| model + overhead | {w - extraction:.3f} | {(w - extraction) / w:.0%} |")


if __name__ == "__main__":
    main()
