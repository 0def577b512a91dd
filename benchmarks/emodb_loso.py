"""Speaker-independent EmoDB accuracy: audio only, leave one speaker out over the cache's speakers.

    python benchmarks/emodb_loso.py CACHE_OR_WAV_DIR [--out DIR] [avemo-train options ...]

CACHE_OR_WAV_DIR is an avemo cache (has manifest.csv) or a folder of EmoDB wav files, which
is first extracted with ``avemo-extract --label-from emodb`` into OUT/cache. Every speaker is
the test speaker once; the model trains on all the others for a fixed number of epochs
(``--fold-val none``: with six speakers, holding one more out for early stopping costs a
fifth of the training data and a one-speaker validation set is too noisy to choose epochs by).
Prints UAR and WAR per fold and their mean; resumable (finished folds are kept).
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

# what the README's table was made with; anything after the known flags is passed to avemo-train
DEFAULTS = ["--modalities", "audio", "--fold-val", "none", "--epochs", "40", "--batch-size", "16", "--lr", "5e-3",
            "--balance", "--label-smoothing", "0.1", "--audio-channels", "8,16,32,64",
            "--quiet"]


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
    args, extra = p.parse_known_args()
    cache = ensure_cache(args.data, args.out)
    manifest = pd.read_csv(cache / "manifest.csv", dtype=str, keep_default_na=False)
    n_speakers = manifest.loc[manifest["status"].isin(["ok", "partial"]), "speaker"].nunique()
    t0 = time.perf_counter()
    rc = cli([str(cache), "--out", str(args.out / "run"), "--folds", str(n_speakers), *DEFAULTS, *extra,
              "--resume"])
    if rc:
        raise SystemExit(rc)
    summary = json.loads((args.out / "run" / "folds.json").read_text())
    print(f"\nEmoDB leave-one-speaker-out, audio only ({cache}); train options: {' '.join(DEFAULTS + extra)}")
    print(f"{'fold':<7}{'test speaker':<14}{'clips':>6}{'UAR':>8}{'WAR':>8}{'macro-F1':>10}")
    for f in summary["folds"]:
        print(f"{f['fold']:<7}{','.join(f['speakers']):<14}{f['n']:>6}{f['uar']:>8.3f}{f['accuracy']:>8.3f}"
              f"{f['macro_f1']:>10.3f}")
    print(f"{'mean':<21}{'':>6}{summary['uar_mean']:>8.3f}{summary['accuracy_mean']:>8.3f}{summary['macro_f1_mean']:>10.3f}")
    print(f"{'std':<21}{'':>6}{summary['uar_std']:>8.3f}{summary['accuracy_std']:>8.3f}{summary['macro_f1_std']:>10.3f}")
    reports = [json.loads((args.out / "run" / f["fold"] / "report.json").read_text()) for f in summary["folds"]]
    pooled = sum(np.asarray(r["confusion"]) for r in reports)
    write_confusion(args.out, pooled, reports[0]["classes"],
                    f"EmoDB LOSO, audio only: all {len(reports)} test speakers pooled")
    print(f"pooled confusion matrix: {args.out / 'confusion.png'}")
    print(f"wall time {time.perf_counter() - t0:.0f} s (target: mean UAR >= 0.75)")


if __name__ == "__main__":
    main()
