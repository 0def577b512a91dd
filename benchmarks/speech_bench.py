"""Speech emotion on unseen speakers: RAVDESS folds, EmoDB leave-one-speaker-out with and without a
pretrained front-end, cross-corpus, and a classic reference on the same folds. Prints tables.

    python benchmarks/speech_bench.py --ravdess DIR --emodb DIR [--out DIR] [--seeds 3] [--jobs N]
                                      [--parts ravdess,emodb,pretrained,cross,reference] [-- avemo-train flags]

DIR is an avemo cache (has manifest.csv) or a folder of the corpus's audio files, which is
first extracted with ``avemo-extract --label-from ravdess|emodb`` into OUT/caches. Never is one
speaker in both training and test:

- ``ravdess``: 4 folds of 4 consecutive actors (01-04, 05-08, ...; two women and two men each),
  train on the other 12, 8 classes, front-end from scratch (``--audio-init none``: the shipped
  front-end has heard these actors).
- ``emodb``: leave one speaker out over the cache's speakers, the FCN from scratch (trained on
  all the others, or with ``--fold-val next`` on all but the next one, its validation speaker);
  ``pretrained``: the same folds, the FCN initialised from a front-end that
  ``avemo-train-audio``'s code pretrains on all of RAVDESS (one per seed), so that no EmoDB
  speaker leaks in.
- ``cross``: that RAVDESS-trained model on EmoDB, and a model trained on all of EmoDB on
  RAVDESS, each scored on the classes the two corpora share (predictions restricted to them).
- ``reference``: log-mel statistics + class-balanced logistic regression
  (``benchmarks/emodb_reference.py``) on the same folds; deterministic, one run.

Everything after ``--`` goes to avemo-train's option parser (the same recipe for every part,
the pretraining included): with none, the figures are avemo-train's defaults, the voice head
of its audio-only models included (``-- --voice-head 0``: the FCN alone; the pretraining's
front-ends never have one). Runs go to
``--jobs`` worker processes (on one GPU when there is one); finished runs are kept, so the
same command resumes. UAR and WAR per part: the mean over folds for each seed, then the mean
and standard deviation of those over seeds; seconds per training run (its epochs, from metrics.csv). "adapted": the same
models scored with ``avemo-evaluate --adapt speaker`` (each adapted to its test speakers' clips,
one speaker at a time; ``avemo.model.adapt``). With two seeds or more, each part also gets a row for each fold's models
of all the seeds as one ensemble (probabilities averaged, as ``avemo-train --ensemble N``), as
trained and adapted.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.cpu import reuse_freed_memory  # noqa: E402
from avemo.workers import die_with_parent  # noqa: E402
from avemo.model import Ensemble, load_model  # noqa: E402
from avemo.model.adapt import AdaptError  # noqa: E402
from avemo.model.frontend import load_frontend  # noqa: E402
from emodb_reference import log_mel_stats, logistic_regression  # noqa: E402
from train.cli import SplitOptions, build_parser, options_from_args, run_training  # noqa: E402
from train.data import TrainingData, load_training_data  # noqa: E402
from train.evaluate import cache_population, evaluate_cache, model_logits, shared_class_metrics  # noqa: E402
from train.metrics import classification_metrics  # noqa: E402

PARTS = ("ravdess", "emodb", "pretrained", "cross", "reference")


def ensure_cache(src: Path, scheme: str, out: Path) -> Path:
    if (src / "manifest.csv").is_file():
        return src
    exe = shutil.which("avemo-extract") or str(Path(sys.executable).parent / "avemo-extract")
    cache = out / "caches" / scheme
    subprocess.run([exe, str(src), "--out", str(cache), "--label-from", scheme, "--quiet"], check=True)
    return cache


def ravdess_folds(speakers: list[str | None], k: int = 4) -> list[list[str]]:
    """k groups of consecutive actors (RAVDESS alternates men and women, so each group has both)."""
    unique = sorted({s for s in speakers if s})
    size = len(unique) // k
    return [unique[i * size:(i + 1) * size] if i < k - 1 else unique[i * size:] for i in range(k)]


# ----------------------------------------------------------------------------- worker tasks

def _worker_init(parent_pid: int) -> None:
    die_with_parent(parent_pid)   # a killed benchmark takes its fits with it
    torch.set_num_threads(1)
    reuse_freed_memory()          # as the training commands do


def training_seconds(run: Path, fallback: float) -> float:
    """The run's training time: the sum of its epochs' seconds in metrics.csv, so that a finished run that a
    later command only resumes (or one resumed after an interruption) reports what its training took, not the
    few seconds of finding it done. ``fallback`` (this call's wall time) where the run wrote no history."""
    try:
        with open(run / "metrics.csv", newline="") as f:
            return float(sum(float(row["seconds"]) for row in csv.DictReader(f)))
    except (OSError, KeyError, ValueError):
        return fallback


def task_fit(cache: str, out: str, model: dict, cfg, split: SplitOptions) -> dict:
    t0 = time.perf_counter()
    report = run_training(cache, out, model, cfg, split, resume=True)
    run = Path(out) / f"fold{split.fold}" if split.fold else Path(out)
    seconds = training_seconds(run, time.perf_counter() - t0)
    test = json.loads((run / "split.json").read_text())["speakers"].get("test")
    # the same model adapted to each test speaker's clips (avemo-evaluate --adapt speaker)
    try:
        adapted = evaluate_cache(cache, str(run / "best.pt"), speakers=test, adapt_to="speaker") if test else None
    except AdaptError:      # a stream kept frozen from its front-end is not adapted (adaptation_scope)
        adapted = None
    return {"report": report, "adapted": adapted, "seconds": seconds, "out": out, "run": str(run)}


def task_pretrain(cache: str, out: str, model: dict, cfg) -> dict:
    from train.audio.cli import train_frontend
    t0 = time.perf_counter()
    if not (Path(out) / "frontend.pt").is_file():
        train_frontend([cache], out, ["ravdess"], model, cfg, command="benchmarks/speech_bench.py", resume=True)
    return {"frontend": str(Path(out) / "frontend.pt"), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- scoring

def fold_mean(reports: list[dict]) -> tuple[float, float]:
    return float(np.mean([r["uar"] for r in reports])), float(np.mean([r["accuracy"] for r in reports]))


def summarise(per_seed: list[tuple[float, float]], seconds: list[float]) -> dict:
    u, w = np.array([p[0] for p in per_seed]), np.array([p[1] for p in per_seed])
    return {"uar_mean": float(u.mean()), "uar_std": float(u.std()), "war_mean": float(w.mean()),
            "war_std": float(w.std()), "seeds": len(per_seed), "uar_per_seed": u.round(4).tolist(),
            "seconds_per_run": float(np.mean(seconds)) if seconds else 0.0}


def seed_ensemble(data: TrainingData, runs: list, device: torch.device) -> dict | None:
    """Each fold's models of every seed as one ensemble (class probabilities averaged, ``avemo.model.Ensemble``,
    what ``avemo-train --ensemble N`` makes), scored on the fold's test speakers as trained and adapted to each of
    them relative to the cache (``avemo-evaluate --adapt speaker``); the mean over folds. None with one seed or
    when the runs are ensembles already."""
    folds: dict = {}
    for _, k, res in runs:
        folds.setdefault(k, []).append(Path(res["run"]))
    if min(len(dirs) for dirs in folds.values()) < 2:
        return None
    plain, adapted = [], []
    for dirs in folds.values():
        loaded = [load_model(d / "best.pt") for d in dirs]
        if any(isinstance(net, Ensemble) for net, _ in loaded):
            return None
        net, classes = Ensemble([net for net, _ in loaded]).eval(), loaded[0][1]["classes"]
        test = set(json.loads((dirs[0] / "split.json").read_text())["speakers"]["test"])
        idx = [i for i, s in enumerate(data.speakers) if s in test]
        plain.append(shared_class_metrics(model_logits(net, data, idx, device), classes, data, idx)[0])
        logits = model_logits(net, data, idx, device, groups=[data.speakers[i] for i in idx],
                              population=cache_population(net.to(device), data))
        adapted.append(shared_class_metrics(logits, classes, data, idx)[0])
    return {"members": min(len(dirs) for dirs in folds.values()), "uar": fold_mean(plain)[0],
            "war": fold_mean(plain)[1], "adapted_uar": fold_mean(adapted)[0], "adapted_war": fold_mean(adapted)[1]}


# ----------------------------------------------------------------------------- reference

def reference_rows(rav: TrainingData | None, emo: TrainingData | None) -> dict:
    def feats(d):
        return np.stack([log_mel_stats(c.arrays["mel"]) for c in d.clips])

    rows, l2 = {}, 1e-2
    t0 = time.perf_counter()
    if rav is not None:
        x, spk = feats(rav), np.array(rav.speakers)
        reps = []
        for group in ravdess_folds(rav.speakers):
            test = np.isin(spk, group)
            pred = logistic_regression(x[~test], rav.labels[~test], x[test], len(rav.classes), l2)
            reps.append(classification_metrics(rav.labels[test], pred, rav.classes))
        rows["ravdess"] = summarise([fold_mean(reps)], [])
    if emo is not None:
        x, spk = feats(emo), np.array(emo.speakers)
        reps = []
        for s in sorted(set(emo.speakers)):
            test = spk == s
            pred = logistic_regression(x[~test], emo.labels[~test], x[test], len(emo.classes), l2)
            reps.append(classification_metrics(emo.labels[test], pred, emo.classes))
        rows["emodb"] = summarise([fold_mean(reps)], [])
    if rav is not None and emo is not None:
        for name, src, dst in (("ravdess->emodb", rav, emo), ("emodb->ravdess", emo, rav)):
            xs, xd = feats(src), feats(dst)
            # decision scores per class: a one-hot of each prediction is enough to restrict to shared classes
            pred = logistic_regression(xs, src.labels, xd, len(src.classes), l2)
            scores = np.eye(len(src.classes))[pred]
            m = shared_class_metrics(scores, src.classes, dst)[0]
            rows[name] = summarise([(m["uar"], m["accuracy"])], [])
    rows["seconds"] = time.perf_counter() - t0
    return rows


# ----------------------------------------------------------------------------- the run

def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ravdess", type=Path, help="RAVDESS speech: avemo cache or folder of Actor_*/ files")
    p.add_argument("--emodb", type=Path, help="EmoDB: avemo cache or folder of wav files")
    p.add_argument("--out", type=Path, default=Path("bench-out/speech"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds FIRST..FIRST+SEEDS-1 (to add seeds to an earlier run's, e.g. taken elsewhere)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (worker processes, 1 torch thread each)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--fold-val", choices=("none", "next"), default="none",
                   help="EmoDB folds: train on all other speakers for the set epochs (none), or validate on the "
                        "next speaker (avemo-train --fold-val next: best.pt is the best epoch on it)")
    args = p.parse_args(argv)
    parts = [s for s in args.parts.split(",") if s]
    if set(parts) - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    if {"ravdess", "pretrained", "cross"} & set(parts) and args.ravdess is None:
        raise SystemExit("--ravdess is needed for the parts ravdess, pretrained and cross")
    if {"emodb", "pretrained", "cross"} & set(parts) and args.emodb is None:
        raise SystemExit("--emodb is needed for the parts emodb, pretrained and cross")
    torch.set_num_threads(1)
    rav_cache = ensure_cache(args.ravdess, "ravdess", args.out) if args.ravdess else None
    emo_cache = ensure_cache(args.emodb, "emodb", args.out) if args.emodb else None
    base = build_parser().parse_args(["CACHE", "--out", "OUT", "--modalities", "audio", "--quiet", *extra])
    model, cfg, _ = options_from_args(base)
    cfg_scratch = _replace(cfg, audio_init="none")
    rav = load_training_data(rav_cache) if rav_cache else None
    emo = load_training_data(emo_cache) if emo_cache else None
    out = args.out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"avemo-train options: {' '.join(extra) or '(defaults)'}; device {device}; seeds {args.first_seed}..{args.first_seed + args.seeds - 1}; "
          f"{args.jobs} jobs", flush=True)

    results: dict = {"options": extra, "device": str(device), "seeds": args.seeds, "parts": {}}
    t_start = time.perf_counter()
    runs: dict[str, list] = {}           # part -> [(seed, report(s), seconds)]
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(os.getpid(),)) as pool:
        pending = {}

        def submit(key, fn, *a):
            pending[pool.submit(fn, *a)] = key

        n_emo = len({s for s in emo.speakers if s}) if emo is not None else 0

        def emodb_folds(part, seed, c):
            # one task per fold, so that folds run side by side
            for k in range(n_emo):
                submit((part, seed, k), task_fit, str(emo_cache), str(out / f"{part}/seed{seed}"), model, c,
                       SplitOptions(folds=n_emo, fold=k + 1, fold_val=args.fold_val))

        # the pretraining first: the pretrained EmoDB folds wait for it
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        for seed in seeds:
            if {"pretrained", "cross"} & set(parts):
                submit(("pretrain", seed, None), task_pretrain, str(rav_cache),
                       str(out / f"frontend-ravdess/seed{seed}"), model, _replace(cfg_scratch, seed=seed))
        for seed in seeds:
            c = _replace(cfg_scratch, seed=seed)
            if "ravdess" in parts:
                for k, group in enumerate(ravdess_folds(rav.speakers)):
                    submit(("ravdess", seed, k), task_fit, str(rav_cache), str(out / f"ravdess/seed{seed}/fold{k + 1}"),
                           model, c, SplitOptions(test_speakers=",".join(group)))
            if "emodb" in parts:
                emodb_folds("emodb-scratch", seed, c)
            if "cross" in parts:
                submit(("emodb-all", seed, None), task_fit, str(emo_cache), str(out / f"emodb-all/seed{seed}"),
                       model, c, SplitOptions(no_split=True))
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                part, seed, k = pending.pop(fut)
                res = fut.result()
                runs.setdefault(part, []).append((seed, k, res))
                print(f"  {time.perf_counter() - t_start:7.0f}s  {part} seed {seed}"
                      + (f" fold {k + 1}" if k is not None else "") + f": {res['seconds']:.0f}s"
                      + (f", UAR {res['report']['uar']:.3f} WAR {res['report']['accuracy']:.3f}"
                         if "report" in res else ""), flush=True)
                if part == "pretrain" and "pretrained" in parts:
                    emodb_folds("emodb-pretrained", seed, _replace(cfg, seed=seed, audio_init=res["frontend"]))

    table = {}
    for part, label in (("ravdess", "RAVDESS 4 folds x 4 actors, 8 classes (from scratch)"),
                        ("emodb-scratch", "EmoDB leave-one-speaker-out, 7 classes (from scratch)"),
                        ("emodb-pretrained", "EmoDB leave-one-speaker-out, 7 classes (front-end pretrained on RAVDESS)")):
        if part in runs:
            by_seed: dict[int, list] = {}
            for seed, _, res in runs[part]:
                by_seed.setdefault(seed, []).append(res)
            table[label] = summarise([fold_mean([r["report"] for r in rs]) for rs in by_seed.values()],
                                     [r["seconds"] for rs in by_seed.values() for r in rs])
            table[label]["folds_per_seed"] = [len(rs) for rs in by_seed.values()]
            ens = seed_ensemble(rav if part == "ravdess" else emo, runs[part], device)
            if ens is not None:
                table[label]["seed_ensemble"] = ens
            if all(r["adapted"] for rs in by_seed.values() for r in rs):
                adapted = summarise([fold_mean([r["adapted"] for r in rs]) for rs in by_seed.values()], [])
                table[label]["adapted"] = {k: adapted[k] for k in ("uar_mean", "uar_std", "war_mean", "war_std",
                                                                   "uar_per_seed")}
    if "cross" in parts:
        fwd, back = [], []
        for _, _, res in runs.get("pretrain", []):
            front = load_frontend(res["frontend"])
            m = shared_class_metrics(model_logits(front.model(), emo, None, device), front.classes, emo)[0]
            fwd.append((m["uar"], m["accuracy"]))
        for _, _, res in runs.get("emodb-all", []):
            net, ckpt = load_model(Path(res["out"]) / "best.pt")
            m = shared_class_metrics(model_logits(net, rav, None, device), ckpt["classes"], rav)[0]
            back.append((m["uar"], m["accuracy"]))
        shared = [c for c in emo.classes if c in rav.classes]
        table[f"cross-corpus RAVDESS -> EmoDB ({len(shared)} shared classes)"] = summarise(
            fwd, [r["seconds"] for _, _, r in runs.get("pretrain", [])])
        table[f"cross-corpus EmoDB -> RAVDESS ({len(shared)} shared classes)"] = summarise(
            back, [r["seconds"] for _, _, r in runs.get("emodb-all", [])])
    reference = reference_rows(rav, emo) if "reference" in parts else {}
    results["table"], results["reference"] = table, reference
    # every training run's own figures, so that a fold or a seed can be looked at without re-scoring
    results["runs"] = [{"part": part, "seed": seed, "fold": None if k is None else k + 1, "run": res.get("run"),
                        "uar": res["report"]["uar"], "war": res["report"]["accuracy"],
                        "adapted_uar": res["adapted"]["uar"] if res.get("adapted") else None,
                        "adapted_war": res["adapted"]["accuracy"] if res.get("adapted") else None,
                        "seconds": res["seconds"]}
                       for part, rs in runs.items() for seed, k, res in rs if "report" in res]
    results["wall_seconds"] = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(table, reference, results["wall_seconds"])


def _replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def print_table(table: dict, reference: dict, wall: float) -> None:
    ref_key = {"RAVDESS": "ravdess", "EmoDB leave": "emodb", "cross-corpus RAVDESS": "ravdess->emodb",
               "cross-corpus EmoDB": "emodb->ravdess"}
    print(f"\n{'':<78}{'UAR':>14}{'WAR':>14}{'s/run':>7}{'reference UAR':>15}{'adapted UAR':>16}{'WAR':>14}")
    for name, row in table.items():
        ref = next((reference.get(v) for k, v in ref_key.items() if name.startswith(k)), None)
        ref_text = f"{ref['uar_mean']:.3f}" if ref else ""
        a = row.get("adapted")
        adapted = f"{a['uar_mean']:>10.3f} +-{a['uar_std']:.3f}{a['war_mean']:>8.3f} +-{a['war_std']:.3f}" if a else ""
        print(f"{name:<78}{row['uar_mean']:>8.3f} +-{row['uar_std']:.3f}{row['war_mean']:>8.3f} +-{row['war_std']:.3f}"
              f"{row['seconds_per_run']:>7.0f}{ref_text:>15}{adapted}")
        if "seed_ensemble" in row:
            e = row["seed_ensemble"]
            print(f"{'  the same, each fold as an ensemble of its ' + str(e['members']) + ' seeds':<78}{e['uar']:>8.3f}"
                  f"{'':>7}{e['war']:>8.3f}{'':>7}{'':>7}{'':>15}{e['adapted_uar']:>10.3f}{'':>7}{e['adapted_war']:>8.3f}")
    print(f"(mean over folds per seed, then mean +- std over {next(iter(table.values()))['seeds'] if table else 0} "
          f"seeds; reference: log-mel statistics + logistic regression, same folds; adapted: the same models adapted "
          f"to each test speaker's clips, avemo-evaluate --adapt speaker; an ensemble averages the class probabilities "
          f"of a fold's models, as avemo-train --ensemble N; wall {wall:.0f} s)")


if __name__ == "__main__":
    main()
