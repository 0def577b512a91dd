"""Speaker-independent EmoDB accuracy: audio only, leave one speaker out over the cache's speakers.

    python benchmarks/emodb_loso.py CACHE_OR_WAV_DIR [--out DIR] [--seeds N] [avemo-train options ...]

CACHE_OR_WAV_DIR is an avemo cache (has manifest.csv) or a folder of EmoDB wav files, which
is first extracted with ``avemo-extract --label-from emodb`` into OUT/cache. Every speaker is
the test speaker once; the model trains on all the others for a fixed number of epochs
(``--fold-val none``: with six speakers, holding one more out for early stopping costs a
fifth of the training data and a one-speaker validation set is too noisy to choose epochs by).
Prints UAR and WAR per fold and their mean; resumable (finished folds are kept). Three seeds
by default: one fold's UAR moves by up to 0.3 between seeds, so one seed compares nothing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.cli import cli  # noqa: E402
from train.metrics import write_confusion  # noqa: E402

# what the README's earlier EmoDB table was made with (a small FCN from scratch, the schedule of that
# time); anything after the known flags is passed to avemo-train. benchmarks/speech_bench.py measures
# today's defaults.
DEFAULTS = ["--modalities", "audio", "--fold-val", "none", "--epochs", "40", "--batch-size", "16", "--lr", "5e-3",
            "--balance", "--label-smoothing", "0.1", "--audio-init", "none", "--audio-channels", "8,16,32,64",
            "--audio-convs", "1", "--schedule", "cosine", "--weight-decay", "1e-3", "--quiet"]


def ensure_cache(src: Path, out: Path) -> Path:
    if (src / "manifest.csv").is_file():
        return src
    if not any(src.glob("*.wav")):
        raise SystemExit(f"{src}: neither an avemo cache (manifest.csv) nor a folder of EmoDB .wav files")
    exe = shutil.which("avemo-extract") or str(Path(sys.executable).parent / "avemo-extract")
    cache = out / "cache"
    subprocess.run([exe, str(src), "--out", str(cache), "--label-from", "emodb"], check=True)
    return cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="avemo cache, or a folder of EmoDB wav files")
    p.add_argument("--out", type=Path, default=Path("bench-out/emodb-loso"))
    p.add_argument("--seeds", type=int, default=3,
                   help="repeat the whole LOSO with seeds 0..N-1 and average (a 6-speaker LOSO moves by "
                        "several points of UAR from one seed to the next)")
    args, extra = p.parse_known_args()
    if args.seeds > 1 and "--seed" in extra:
        raise SystemExit("--seeds N runs seeds 0..N-1; do not pass --seed as well")
    cache = ensure_cache(args.data, args.out)
    manifest = pd.read_csv(cache / "manifest.csv", dtype=str, keep_default_na=False)
    n_speakers = manifest.loc[manifest["status"].isin(["ok", "partial"]), "speaker"].nunique()
    t0 = time.perf_counter()
    runs = [args.out / "run"] if args.seeds == 1 else [args.out / f"run-seed{s}" for s in range(args.seeds)]
    for seed, run in enumerate(runs):
        seed_flag = ["--seed", str(seed)] if args.seeds > 1 else []
        rc = cli([str(cache), "--out", str(run), "--folds", str(n_speakers), *DEFAULTS, *extra, *seed_flag,
                  "--resume"])
        if rc:
            raise SystemExit(rc)
    summaries = [json.loads((run / "folds.json").read_text()) for run in runs]
    print(f"\nEmoDB leave-one-speaker-out, audio only ({cache}); train options: {' '.join(DEFAULTS + extra)}")
    seeds = "".join(f"{f'UAR s{s}':>9}" for s in range(len(runs))) if len(runs) > 1 else ""
    print(f"{'fold':<7}{'test speaker':<14}{'clips':>6}{seeds}{'UAR':>8}{'WAR':>8}{'macro-F1':>10}")
    per_fold = []
    for i, f in enumerate(summaries[0]["folds"]):
        rows = [s["folds"][i] for s in summaries]
        uar, war, f1 = (float(np.mean([r[k] for r in rows])) for k in ("uar", "accuracy", "macro_f1"))
        per_fold.append((uar, war, f1))
        cols = "".join(f"{r['uar']:>9.3f}" for r in rows) if len(runs) > 1 else ""
        print(f"{f['fold']:<7}{','.join(f['speakers']):<14}{f['n']:>6}{cols}{uar:>8.3f}{war:>8.3f}{f1:>10.3f}")
    table = np.array(per_fold)
    means = "".join(f"{s['uar_mean']:>9.3f}" for s in summaries) if len(runs) > 1 else ""
    print(f"{'mean':<21}{'':>6}{means}{table[:, 0].mean():>8.3f}{table[:, 1].mean():>8.3f}{table[:, 2].mean():>10.3f}")
    pad = " " * (9 * len(runs)) if len(runs) > 1 else ""
    print(f"{'std over folds':<21}{'':>6}{pad}{table[:, 0].std():>8.3f}{table[:, 1].std():>8.3f}{table[:, 2].std():>10.3f}")
    if len(runs) > 1:
        seed_means = np.array([s["uar_mean"] for s in summaries])
        print(f"mean UAR over seeds {seed_means.mean():.3f} +- {seed_means.std():.3f} (std of the {len(runs)} seeds' means)")
    reports = [json.loads((run / f["fold"] / "report.json").read_text()) for run in runs for f in summaries[0]["folds"]]
    pooled = sum(np.asarray(r["confusion"]) for r in reports)
    write_confusion(args.out, pooled, reports[0]["classes"],
                    f"EmoDB LOSO, audio only: all {len(summaries[0]['folds'])} test speakers pooled"
                    + (f", {len(runs)} seeds" if len(runs) > 1 else ""))
    print(f"pooled confusion matrix: {args.out / 'confusion.png'}")
    print(f"wall time {time.perf_counter() - t0:.0f} s (target: mean UAR >= 0.75)")


if __name__ == "__main__":
    main()
