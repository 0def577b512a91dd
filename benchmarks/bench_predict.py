"""End-to-end latency of avemo-predict on one short clip, cold process and warm in-process.

    python benchmarks/bench_predict.py [--model default] [--clip CLIP] [--repeats 5] [--cold-repeats 3]

Cold: a fresh ``avemo-predict CLIP --model M --json`` process (interpreter start, imports,
model + detector + encoder loading, one prediction), timed from outside, best of
--cold-repeats, beside the baseline every Python user pays: a fresh ``python -c "import
torch"`` on the same machine, timed the same way; each stage is timed inside another fresh
process. Warm: the loaded model in this process predicting the same clip again (median of
--repeats), split by extraction stage. Targets (issue 13): cold within 2x of importing
torch, warm <= 0.15 s for a 2 s clip on the CPU.
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


def _best_wall(cmd: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


def cold(model: str, clip: str, device: str, repeats: int) -> tuple[float, float, dict]:
    """(avemo-predict wall, `import torch` wall, stages of a third process)."""
    exe = Path(sys.executable).with_name("avemo-predict")
    total = _best_wall([str(exe), clip, "--model", model, "--json", "--device", device], repeats)
    torch_only = _best_wall([sys.executable, "-c", "import torch"], repeats)
    out = subprocess.run([sys.executable, "-c", COLD_STAGES, model, clip], check=True,
                         capture_output=True, text=True).stdout
    return total, torch_only, json.loads(out.strip().splitlines()[-1])


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
    ap.add_argument("--model", default="default", help="a trained checkpoint or a shipped model's name")
    ap.add_argument("--clip", default=str(DEFAULT_CLIP))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold-repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    total, torch_only, cold_stages = cold(args.model, args.clip, args.device, args.cold_repeats)
    times, stages = warm(args.model, args.clip, args.device, args.repeats)
    w = statistics.median(times)
    extraction = sum(stages.values())
    print(f"clip: {args.clip}  device: {args.device}  torch threads: {torch.get_num_threads()}")
    print()
    print("| measure | seconds | target | ratio to target |")
    print("|---|---:|---:|---:|")
    print(f"| baseline: fresh `python -c \"import torch\"`, wall | {torch_only:.2f} | | |")
    print(f"| cold: fresh `avemo-predict` process, wall (best of {args.cold_repeats}) | {total:.2f} | "
          f"{2 * torch_only:.2f} (2x import torch) | {total / (2 * torch_only):.2f} |")
    print(f"| cold vs import torch | {total / torch_only:.2f}x | 2.00x | |")
    print(f"| warm: in-process predict, median of {args.repeats} | {w:.3f} | 0.15 | {w / 0.15:.2f} |")
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
