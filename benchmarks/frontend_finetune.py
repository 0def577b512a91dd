"""Fine-tuning from a pretrained audio front-end on speakers it has never heard: how fast the stream may move.

    python benchmarks/frontend_finetune.py CACHE --frontend FILE --test-speakers 08,12 [--val-speakers 10]
                                           [--seeds 6] [--jobs 2] [--configs scratch,same,tenth,...] [--out DIR]

FILE is a front-end (``avemo-train-audio``'s frontend.pt) or the audio-only checkpoint of its held-out
fit (``RUN/holdout/best.pt`` of ``avemo-train-audio ... --holdout-speakers``), which is exported to a
front-end first: that fit never heard the held-out speakers, so fine-tuning it on CACHE's other speakers
and testing on ``--test-speakers`` mirrors a user's run on a corpus with new speakers. Every config is
avemo-train's defaults (audio only) but for:

- ``scratch``: ``--audio-init none``;
- ``zero-shot``: no training, the front-end itself, its predictions restricted to CACHE's classes;
- ``same``: the stream at the head's peak learning rate (avemo before the tenth);
- ``tenth``: the stream at a tenth of it, ``lr3e-4``-style names set ``--audio-lr`` itself
  (``lr0``: frozen);
- ``default``: avemo-train's own choice (frozen when the front-end's zero-shot UAR on the training
  clips is at least halfway from chance to 1, else a tenth);
- ``lpft12``-style names: frozen for the first 12 epochs, then at a tenth (``--audio-frozen-epochs``).

Prints UAR and WAR per config: the mean and standard deviation over seeds, the UAR of the same models
adapted to each test speaker's clips (``avemo-evaluate --adapt speaker``; "-" where adaptation refuses
the model, as it does a stream kept frozen), and the seconds per run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech_bench import _worker_init, task_fit  # noqa: E402
from avemo.model import load_model  # noqa: E402
from avemo.model.adapt import AdaptError  # noqa: E402
from avemo.model.frontend import export_frontend, load_frontend  # noqa: E402
from train.cli import SplitOptions  # noqa: E402
from train.evaluate import evaluate_cache  # noqa: E402
from train.loop import PRETRAINED_AUDIO_LR_SCALE, TrainConfig  # noqa: E402


def as_frontend(path: Path, out: Path) -> Path:
    """A front-end file, exporting an audio-only training checkpoint to one when need be."""
    try:
        load_frontend(path)
        return path
    except Exception:   # noqa: BLE001 - not a front-end: try it as a training checkpoint below
        pass
    model, ckpt = load_model(path)
    target = out / "frontend.pt"
    export_frontend(target, model, ckpt["classes"], ckpt["extraction_settings"],
                    {"data": [], "command": f"exported from {path} by benchmarks/frontend_finetune.py",
                     "metrics": {}, "licence": "as the data it was trained on (benchmark use)"})
    return target


def config(name: str, frontend: Path) -> dict:
    """TrainConfig fields for a config name (see the module docstring)."""
    if name == "scratch":
        return {"audio_init": "none"}
    fields = {"audio_init": str(frontend)}
    if name == "same":
        fields["audio_lr"] = TrainConfig().lr
    elif name == "tenth":
        fields["audio_lr"] = TrainConfig().lr * PRETRAINED_AUDIO_LR_SCALE
    elif name.startswith("lr"):
        fields["audio_lr"] = float(name[2:])
    elif name.startswith("lpft"):
        fields["audio_frozen_epochs"] = int(name[4:])
    elif name != "default":
        raise SystemExit(f"unknown config '{name}'")
    return fields


def zero_shot(cache: Path, frontend: Path, test: list[str]) -> tuple[dict, dict | None]:
    """The front-end on the test speakers as it is, and adapted to each of them (``--adapt speaker``; None where
    adaptation refuses the front-end, as it does one trained on several corpora)."""
    plain = evaluate_cache(cache, frontend=str(frontend), speakers=test, device="cpu")
    try:
        return plain, evaluate_cache(cache, frontend=str(frontend), speakers=test, device="cpu", adapt_to="speaker")
    except AdaptError:
        return plain, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path)
    p.add_argument("--frontend", type=Path, required=True)
    p.add_argument("--test-speakers", required=True)
    p.add_argument("--val-speakers", help="validation speakers (best.pt is the best epoch on them); default none")
    p.add_argument("--configs", default="zero-shot,scratch,tenth,default")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed..seeds-1 (to add seeds to a run)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-out/frontend-finetune"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    frontend = as_frontend(args.frontend, args.out)
    test = args.test_speakers.split(",")
    names = args.configs.split(",")
    rows: dict[str, list[dict]] = {n: [] for n in names}
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(os.getpid(),)) as pool:
        futures = [(n, pool.submit(task_fit, str(args.cache), str(args.out / f"{n}-s{seed}"), {"modalities": "audio"},
                                   TrainConfig(seed=seed, progress=False, **config(n, frontend)),
                                   SplitOptions(val_speakers=args.val_speakers, test_speakers=args.test_speakers)))
                   for seed in range(args.first_seed, args.seeds) for n in names if n != "zero-shot"]
        if "zero-shot" in names:
            r, a = zero_shot(args.cache, frontend, test)
            rows["zero-shot"].append({"uar": r["uar"], "war": r["accuracy"], "adapted": a and a["uar"], "s": 0.0})
        for n, f in futures:
            r = f.result()
            rows[n].append({"uar": r["report"]["uar"], "war": r["report"]["accuracy"],
                            "adapted": r["adapted"] and r["adapted"]["uar"], "s": r["seconds"]})
            print(json.dumps({"config": n, **rows[n][-1]}), flush=True)
    print(f"\nfine-tuned on {args.cache}'s other speakers, tested on {', '.join(test)}; front-end {args.frontend}")
    print(f"{'config':<16}{'runs':>5}{'UAR':>16}{'WAR':>16}{'adapted UAR':>16}{'s per run':>11}")
    for n, rs in rows.items():
        def ms(key):
            v = [r[key] for r in rs]
            if None in v:           # not adapted: a frozen stream, a front-end of several corpora
                return "-"
            return f"{statistics.mean(v):.3f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"
        print(f"{n:<16}{len(rs):>5}{ms('uar'):>16}{ms('war'):>16}{ms('adapted'):>16}"
              f"{statistics.mean(r['s'] for r in rs):>11.0f}")


if __name__ == "__main__":
    main()
