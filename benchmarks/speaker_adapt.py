"""How many of a new speaker's clips does adaptation need? Prints a table.

    python benchmarks/speaker_adapt.py CACHE RUN [RUN ...] [--clips 3,5,10,20] [--draws 5] [--priors 0,10]
                                       [--relative] [--speakers S,S,...]

Each RUN is a finished avemo-train run (RUN/best.pt, RUN/split.json) whose test speakers are in
CACHE, e.g. the folds of ``benchmarks/speech_bench.py`` (``OUT/emodb-scratch/seed0/fold*``), or a
checkpoint file with ``--speakers`` naming the cache's speakers to score. For each run and each
test speaker, the model is adapted (``train.evaluate.adapted_to``) to k clips of that speaker drawn
at random (``--draws`` times), and scored on all of the speaker's clips: on its own by default (the
speaker's statistics replacing the model's, as ``avemo-predict --adapt`` adapts), or with
``--relative`` relative to the whole cache (every labelled clip), as ``avemo-evaluate --adapt
speaker`` and ``avemo-predict --adapt --corpus`` adapt; "all" adapts to every clip. UAR per speaker, averaged over the draws,
then over speakers and runs; "none" is the model as trained. One row per ``--priors`` value: how many
clips the model's own statistics weigh against the speaker's (``avemo.model.adapt``; 0 is plain AdaBN,
the speaker's statistics alone; the default, PRIOR_CLIPS, is what the commands do).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.model import load_model  # noqa: E402
from train.data import load_training_data  # noqa: E402
from avemo.model.adapt import PRIOR_CLIPS  # noqa: E402
from train.evaluate import adapted_to, cache_population, model_logits, shared_class_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--clips", default="3,5,10,20", help="comma-separated numbers of clips to adapt to")
    p.add_argument("--draws", type=int, default=5, help="random draws of k clips per speaker")
    p.add_argument("--priors", default=f"0,{PRIOR_CLIPS}",
                   help="comma-separated weights of the model's own statistics, in clips (one row each)")
    p.add_argument("--relative", action="store_true", help="adapt relative to the whole cache (any model)")
    p.add_argument("--speakers", help="comma-separated speakers to score (default: each run's test speakers)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.clips.split(",") if k]
    priors = [float(v) for v in args.priors.split(",") if v]
    cols = [*map(str, ks), "all"]
    data = load_training_data(args.cache)
    device = torch.device("cpu")
    rows = []
    for run in args.runs:
        net, ckpt = load_model(run if run.is_file() else run / "best.pt")
        test = (args.speakers.split(",") if args.speakers
                else json.loads((run / "split.json").read_text())["speakers"]["test"])
        population = cache_population(net, data) if args.relative else None
        for spk in test:
            idx = [i for i, s in enumerate(data.speakers) if s == spk]

            def uar(model) -> float:
                return shared_class_metrics(model_logits(model, data, idx, device), ckpt["classes"], data, idx)[0]["uar"]

            rng = np.random.default_rng(0)
            draws = {str(k): [sorted(rng.choice(idx, min(k, len(idx)), replace=False)) for _ in range(args.draws)]
                     for k in ks}
            draws["all"] = [idx]
            row = {"run": str(run), "speaker": spk, "clips": len(idx), "none": uar(net)}
            for prior in priors:
                row[prior] = {c: float(np.mean([uar(adapted_to(net, data, d, prior, population=population))
                                                for d in draws[c]])) for c in cols}
            rows.append(row)
            print(f"{run} {spk} ({len(idx)} clips): none {row['none']:.3f}; " + "; ".join(
                f"prior {prior:g}: " + " ".join(f"{c} {row[prior][c]:.3f}" for c in cols) for prior in priors), flush=True)
    none = float(np.mean([r["none"] for r in rows]))
    print(f"\nUAR on each test speaker's clips, the model adapted to k of them"
          f"{' relative to the cache' if args.relative else ' on their own'} ({args.draws} random draws per k; "
          f"{len(rows)} speakers of {len(args.runs)} runs); the model as trained: {none:.3f}")
    print(f"{'prior (clips)':<14}" + "".join(f"{c:>9}" for c in cols) + "   (change against the model as trained)")
    for prior in priors:
        means = [np.mean([r[prior][c] for r in rows]) for c in cols]
        print(f"{prior:<14g}" + "".join(f"{m:>9.3f}" for m in means) + "   "
              + " ".join(f"{m - none:+.3f}" for m in means))

if __name__ == "__main__":
    main()
