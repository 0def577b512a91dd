"""``avemo-train-audio CACHE [CACHE ...] --out RUN``: pretrain the FCN audio front-end on many speakers.

The audio-only model is trained on every clip of one or more avemo caches (say RAVDESS,
EmoDB and CREMA-D extracted with ``--label-from``, which maps them to one vocabulary) and
exported as ``RUN/frontend.pt``: a self-describing file that ``avemo-train --audio-init
PATH`` starts from (copy it to ``avemo/model/weights/audio_NAME.pt`` to use it by name).
With ``--holdout-speakers`` the same recipe is first trained without those speakers and
measured on them, so that the file carries a held-out figure; the exported model is then
trained on everything.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

import avemo
from avemo.checkpoint import CheckpointError
from avemo.cpu import reuse_freed_memory, set_torch_threads
from avemo.features import ExtractionSettings
from avemo.io import NoSpaceError
from avemo.model import load_model
from avemo.model.frontend import export_frontend
from avemo.workers import die_with_parent
from train.cli import (_setup_logging, add_augmentation_args, add_model_args, add_optimisation_args, add_run_args,
                       options_from_args)
from train.data import CacheError, TrainingData, load_training_data, merge_training_data
from train.loop import FeatureStore, RunBusy, TrainConfig, TrainError, fit, predict_store, start_runtime
from train.metrics import classification_metrics
from train.splits import SplitError, explicit_split, no_split

log = logging.getLogger("avemo.train")
DEFAULT_LICENCE = ("research use; the weights inherit the licence conditions of the data they were trained on "
                   "(list them here with --licence)")


def load_corpora(caches: list[str | Path], names: list[str] | None = None) -> tuple[TrainingData, list[dict]]:
    """The caches merged into one training set, and a description of each (what a front-end records)."""
    names = names or [Path(c).resolve().name for c in caches]
    if len(names) != len(caches):
        raise CacheError(f"{len(caches)} caches but {len(names)} names")
    parts = [load_training_data(c) for c in caches]
    data = merge_training_data(parts, names)
    described = []
    for name, cache, part in zip(names, caches, parts):
        counts = np.bincount(part.labels, minlength=len(part.classes))
        described.append({"name": name, "cache": str(Path(cache).resolve()), "clips": int(part.has_audio.sum()),
                          "speakers": len({s for s in part.speakers if s}),
                          "speaker_ids": sorted({s for s in part.speakers if s}),
                          "classes": {c: int(n) for c, n in zip(part.classes, counts)},
                          "settings_digest": ExtractionSettings.from_dict(part.settings).digest()})
    return data, described


def _per_corpus(data: TrainingData, indices: list[int], pred: np.ndarray) -> dict[str, Any]:
    out = {}
    corpora = np.array([(data.speakers[i] or "?:").split(":", 1)[0] for i in indices])
    truth = data.labels[indices]
    for name in sorted(set(corpora)):
        keep = corpora == name
        m = classification_metrics(truth[keep], pred[keep], data.classes)
        out[name] = {k: m[k] for k in ("n", "uar", "accuracy", "macro_f1", "per_class_recall")}
    return out


def train_frontend(caches: list[str | Path], out: str | Path, names: list[str] | None = None,
                   model: dict[str, Any] | None = None, cfg: TrainConfig | None = None,
                   holdout: str | None = None, licence: str = DEFAULT_LICENCE, command: str = "",
                   resume: bool = False) -> dict[str, Any]:
    """Train (and, with ``holdout``, first measure) the audio-only model; export ``out``/frontend.pt.

    Returns the metadata written into the file (data, metrics, command, licence, training).
    """
    out = Path(out)
    rt = start_runtime()
    cfg = dataclasses.replace(cfg or TrainConfig(), audio_init="none")   # pretraining starts from scratch
    model = {**(model or {}), "modalities": "audio", "voice_head": 0.0}    # a front-end is the FCN alone
    data, described = load_corpora(caches, names)
    model.update(n_classes=len(data.classes), n_mels=data.n_mels, video_dim=0)
    log.info("front-end data: %d clips, %d speakers, classes %s", len(data), len(set(data.speakers)),
             ", ".join(f"{c} {n}" for c, n in zip(data.classes, np.bincount(data.labels))))
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {}
    held_future, pool = None, None
    if holdout:
        split = explicit_split(data.speakers, None, holdout)
        if rt.device.type == "cuda" and rt.world == 1:
            # the two fits are independent and one small FCN leaves most of a GPU idle: run them side by side
            pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=die_with_parent,
                                       initargs=(os.getpid(),))
            held_future = pool.submit(fit, data, split, model, cfg, out / "holdout", resume)
        else:
            held_report = fit(data, split, model, cfg, out / "holdout", resume=resume, rt=rt)
    report = fit(data, no_split(len(data)), model, cfg, out / "all", resume=resume, rt=rt)
    if holdout:
        if held_future is not None:
            held_report = held_future.result()
            pool.shutdown()
        held, _ = load_model(out / "holdout" / "best.pt", map_location=rt.device)
        store = FeatureStore(data, split.test, 0, rt.device, on_device=False)
        pred = predict_store(held, store, cfg.batch_size * 2, cfg.amp)
        metrics["heldout"] = {"speakers": split.speakers["test"], "n": held_report["n"], "uar": held_report["uar"],
                              "accuracy": held_report["accuracy"], "macro_f1": held_report["macro_f1"],
                              "per_class_recall": held_report["per_class_recall"],
                              "per_corpus": _per_corpus(data, split.test, pred)}
    metrics["training_set"] = {"note": "figures on the clips it was trained on, not an accuracy estimate",
                               **{k: report[k] for k in ("n", "uar", "accuracy")}}
    final, ckpt = load_model(out / "all" / "best.pt")
    info = {
        "data": described,
        "command": command,
        "metrics": metrics,
        "licence": licence,
        "training": {"train_config": cfg.to_dict(), "epochs_run": report["epochs_run"],
                     "wall_seconds": round(time.perf_counter() - t0, 1), "device": _hardware(rt.device),
                     "torch": str(torch.__version__), "avemo": avemo.__version__,
                     "parameters": int(sum(p.numel() for p in final.audio.parameters()))},
    }
    export_frontend(out / "frontend.pt", final, data.classes, data.settings, info)
    log.info("wrote %s (%s)", out / "frontend.pt", "held-out UAR %.3f on %s" % (
        metrics["heldout"]["uar"], ",".join(metrics["heldout"]["speakers"])) if holdout else "no held-out figure")
    return info


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avemo-train-audio", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("caches", nargs="+", metavar="CACHE", help="avemo caches with labels (avemo-extract --label-from ...)")
    p.add_argument("--out", required=True, help="run folder: holdout/, all/, frontend.pt")
    p.add_argument("--names", help="comma-separated corpus names, one per cache (default: the folder names); "
                                   "speakers become NAME:speaker")
    p.add_argument("--holdout-speakers", metavar="NAME:SPK,...",
                   help="first train without these speakers and record the UAR on them in the file")
    p.add_argument("--licence", default=DEFAULT_LICENCE, help="the licence condition the weights carry")
    add_model_args(p, video=False)
    add_optimisation_args(p, runs_of_avemo_train=False)
    add_augmentation_args(p, video=False)
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_torch_threads(requested=args.threads)
    reuse_freed_memory()
    _setup_logging(Path(args.out), True)
    command = "avemo-train-audio " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        model, cfg, _ = options_from_args(args)
        train_frontend(args.caches, args.out, args.names.split(",") if args.names else None, model, cfg,
                       args.holdout_speakers, args.licence, command, args.resume)
    except (CacheError, SplitError, TrainError, CheckpointError, ValueError) as e:
        log.error("avemo-train-audio: error: %s", e)
        return 2
    except RunBusy as e:
        log.error("avemo-train-audio: error: %s", e)
        return 4
    except NoSpaceError as e:
        log.error("avemo-train-audio: error: %s; finished epochs are kept in %s: free some space and run the "
                  "same command with --resume", e.strerror, args.out)
        return 3
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
