"""How much does a model lose when the same speech is recorded louder or quieter? Prints a table.

    python benchmarks/gain_robustness.py CACHE [NAME=]RUN[,RUN...] [[NAME=]RUN...] [--db -20,-10,-6,0,6,10]
    python benchmarks/gain_robustness.py CACHE default --frontend --speakers 08,12

Each argument after CACHE is one row: finished avemo-train runs (a directory with best.pt and
split.json, scored on its test speakers; a directory holding such runs, e.g. a
``benchmarks/speech_bench.py`` output, stands for all of them) or model files, comma-separated,
optionally named ``NAME=``. With ``--frontend`` the files are audio front-ends
(``avemo-train-audio``'s, or ``default``). ``--speakers`` scores those speakers instead of each
run's test speakers (needed for files).

A recording gain g multiplies every mel power by g^2. The cache's spectrograms are
``log(power + 1e-6)`` (``avemo.audio.log_mel``), so each test clip is replayed at every gain
exactly, the silence floor included (``avemo.audio.at_gain``). UAR per run on the
classes it shares with the cache, then the mean over the row's runs; "worst" is the lowest UAR
over the gains and the drop is from 0 dB.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.audio import at_gain  # noqa: E402
from train.data import load_training_data  # noqa: E402
from train.evaluate import load_scorer, model_logits, shared_class_metrics  # noqa: E402


def expand(spec: str) -> tuple[str, list[Path]]:
    """``[NAME=]PATH[,PATH...]`` -> (name, runs or files); a directory of runs stands for every run in it."""
    name, _, paths = spec.rpartition("=")
    out = []
    for p in map(Path, paths.split(",")):
        if p.is_dir() and not (p / "best.pt").is_file():
            out += sorted(d.parent for d in p.rglob("best.pt") if (d.parent / "split.json").is_file())
        else:
            out.append(p)
    return name or paths, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path)
    p.add_argument("rows", nargs="+", help="[NAME=]RUN[,RUN...]: one row each")
    p.add_argument("--db", default="-20,-10,-6,0,6,10", help="comma-separated gains in decibels")
    p.add_argument("--frontend", action="store_true", help="the files are audio front-ends")
    p.add_argument("--speakers", help="comma-separated speakers to score (default: each run's test speakers)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dbs = [float(d) for d in args.db.split(",") if d]
    if 0.0 not in dbs:
        dbs.insert(0, 0.0)
    data = load_training_data(args.cache)
    original = {i: c.arrays["mel"] for i, c in enumerate(data.clips) if c.has_audio}
    speakers = args.speakers.split(",") if args.speakers else None
    table = []
    for spec in args.rows:
        name, runs = expand(spec)
        if not runs:
            sys.exit(f"{spec}: no finished run (best.pt with split.json) found")
        uar = {d: [] for d in dbs}
        for run in runs:
            if run.is_dir():
                scorer = load_scorer(str(run / "best.pt"))
                test = speakers or json.loads((run / "split.json").read_text())["speakers"]["test"]
            else:
                if speakers is None:
                    sys.exit(f"{run} is a file: name the speakers to score with --speakers")
                scorer = load_scorer(None, str(run)) if args.frontend else load_scorer(str(run))
                test = speakers
            test = {str(s) for s in test}
            idx = [i for i in original if str(data.speakers[i]) in test]
            if not idx:
                sys.exit(f"{run}: none of the speakers {sorted(test)} has a clip with audio in {args.cache}")
            for d in dbs:
                for i in idx:
                    data.clips[i].arrays["mel"] = at_gain(torch.from_numpy(original[i]), d).numpy() if d else original[i]
                logits = model_logits(scorer.network, data, idx, torch.device("cpu"))
                uar[d].append(shared_class_metrics(logits, scorer.classes, data, idx)[0]["uar"])
            for i in idx:
                data.clips[i].arrays["mel"] = original[i]
            print(f"{name}: {run}: " + " ".join(f"{d:+g} dB {uar[d][-1]:.3f}" for d in dbs), flush=True)
        means = {d: float(np.mean(v)) for d, v in uar.items()}
        table.append((name, len(runs), means))
    width = max(len(r[0]) for r in table) + 2
    print(f"\n{'':<{width}}{'runs':>5}" + "".join(f"{f'{d:+g} dB':>9}" for d in dbs) + f"{'worst (drop)':>18}")
    for name, n, means in table:
        worst = min(means.values())
        print(f"{name:<{width}}{n:>5}" + "".join(f"{means[d]:>9.3f}" for d in dbs)
              + f"{worst:>9.3f} ({worst - means[0.0]:+.3f})")
    print("(UAR on each run's test speakers, the same clips replayed louder or quieter; mean over the row's runs)")


if __name__ == "__main__":
    main()
