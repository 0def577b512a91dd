"""``avemo-train CACHE --out RUN``: fit the fused model on a feature cache.

The same command line runs on the CPU, on one GPU, and under ``torchrun`` on several.
``cli`` only parses; ``run_training`` is the function to call from Python.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avemo.checkpoint import CheckpointError
from avemo.io import NoSpaceError, write_json_atomic
from avemo.model import FUSIONS, LOSSES, MODALITIES, VIDEO_STREAMS
from train.augment import AugmentConfig
from train.data import CacheError, TrainingData, load_training_data
from train.loop import TrainConfig, TrainError, fit, fit_ensemble, start_runtime
from train.splits import Split, SplitError, auto_split, column_split, explicit_split, kfold_splits, no_split

log = logging.getLogger("avemo.train")


@dataclass
class SplitOptions:
    val_speakers: str | None = None
    test_speakers: str | None = None
    folds: int | None = None
    fold: int | None = None            # 1-based; None: every fold
    fold_val: str = "next"             # next | none
    no_split: bool = False


def choose_splits(data: TrainingData, opts: SplitOptions, seed: int) -> list[tuple[str | None, Split]]:
    """[(subfolder or None, split)]: one split, or one per fold."""
    named = opts.val_speakers is not None or opts.test_speakers is not None
    if opts.no_split and (named or opts.folds):
        raise SplitError("--no-split cannot be combined with --folds or --val/--test-speakers")
    if opts.folds and named:
        raise SplitError("choose either --folds or --val/--test-speakers, not both")
    if opts.fold is not None and not opts.folds:
        raise SplitError("--fold needs --folds K")
    if opts.no_split:
        return [(None, no_split(len(data)))]
    if opts.folds:
        folds = kfold_splits(data.speakers, opts.folds, opts.fold_val)
        if opts.fold is not None:
            if not 1 <= opts.fold <= opts.folds:
                raise SplitError(f"--fold must be in 1..{opts.folds}, got {opts.fold}")
            return [(f"fold{opts.fold}", folds[opts.fold - 1])]
        return [(f"fold{i + 1}", s) for i, s in enumerate(folds)]
    if named:
        return [(None, explicit_split(data.speakers, opts.val_speakers, opts.test_speakers))]
    if data.split_column is not None:
        return [(None, column_split(data.speakers, data.split_column))]
    return [(None, auto_split(data.speakers, seed))]


def default_modalities(data: TrainingData) -> str:
    audio, video = data.has_audio.any(), data.has_video.any() and data.video_dim > 0
    return "av" if audio and video else "audio" if audio else "video"


def run_training(cache: str | Path, out: str | Path, model: dict[str, Any] | None = None,
                 cfg: TrainConfig | None = None, split: SplitOptions | None = None,
                 labels: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train on ``cache`` into ``out``; returns the report (or, for all folds, the fold summary).

    ``model`` holds ``ModelConfig`` fields; n_classes, n_mels and video_dim come from the cache.
    """
    cfg, split, model = cfg or TrainConfig(), split or SplitOptions(), dict(model or {})
    if cfg.ensemble < 1:
        raise ValueError(f"--ensemble must be at least 1, got {cfg.ensemble}")
    rt = start_runtime()
    data = load_training_data(cache, labels)
    model.setdefault("modalities", default_modalities(data))
    model.update(n_classes=len(data.classes), n_mels=data.n_mels,
                 video_dim=data.video_dim if model["modalities"] != "audio" else 0)
    if rt.main:
        counts = np.bincount(data.labels, minlength=len(data.classes))
        log.info("cache %s: %d clips, classes %s, %d speakers", cache, len(data),
                 ", ".join(f"{c} {n}" for c, n in zip(data.classes, counts)),
                 len({s for s in data.speakers if s}))
    runs = choose_splits(data, split, cfg.seed)
    out = Path(out)
    reports = []
    fit_split = fit_ensemble if cfg.ensemble > 1 else fit
    for sub, s in runs:
        reports.append(fit_split(data, s, model, cfg, out / sub if sub else out, resume=resume, rt=rt))
    if len(runs) == 1:
        return reports[0]
    summary = summarise_folds(reports, [sub for sub, _ in runs])
    if rt.main:
        write_json_atomic(out / "folds.json", summary)
        log.info("%d folds: UAR %.3f +- %.3f, WAR %.3f +- %.3f", len(runs), summary["uar_mean"], summary["uar_std"],
                 summary["accuracy_mean"], summary["accuracy_std"])
    return summary


def summarise_folds(reports: list[dict], names: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"folds": []}
    for name, r in zip(names, reports):
        summary["folds"].append({"fold": name, "speakers": r["speakers"], "n": r["n"], "uar": r["uar"],
                                 "accuracy": r["accuracy"], "macro_f1": r["macro_f1"]})
    for key in ("uar", "accuracy", "macro_f1"):
        values = np.array([r[key] for r in reports])
        summary[f"{key}_mean"], summary[f"{key}_std"] = float(values.mean()), float(values.std())
    return summary


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"channel counts must be >= 1, got '{text}'")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avemo-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("cache", help="feature cache written by avemo-extract (holds manifest.csv)")
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, metrics.csv, report.json, ...")
    p.add_argument("--labels", help="CSV with clip,label[,speaker][,split] overriding the manifest's labels")
    g = p.add_argument_group("model")
    g.add_argument("--modalities", choices=MODALITIES, help="default: av when the cache has both, else the one it has")
    g.add_argument("--video-stream", choices=VIDEO_STREAMS, default="attention")
    g.add_argument("--no-relation", action="store_true", help="fan: self-attention only, no relation-attention")
    g.add_argument("--fusion", choices=FUSIONS, default="fbp")
    g.add_argument("--fbp-k", type=int, default=4, help="factors per fbp output")
    g.add_argument("--fbp-o", type=int, default=256, help="fbp outputs")
    g.add_argument("--audio-channels", type=_ints, default=(16, 32, 64, 64), help="FCN channels per conv block")
    g.add_argument("--audio-lambda", type=float, default=1.0, help="attention sharpness (0: mean pooling)")
    g.add_argument("--audio-norm", choices=("global", "utterance"), default="global",
                   help="mel centring: training-set mean per bin, or each clip's own mean")
    g.add_argument("--video-lambda", type=float, default=1.0)
    g.add_argument("--video-hidden", type=int, default=128)
    g.add_argument("--stt-layers", type=int, default=2)
    g.add_argument("--dropout", type=float, default=0.3)
    g.add_argument("--modality-dropout", type=float, default=0.2, help="training: chance a clip loses one modality")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=60)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--weight-decay", type=float, default=1e-3)
    g.add_argument("--patience", type=int, default=15, help="early stop after this many epochs without a better val UAR (0: off)")
    g.add_argument("--loss", choices=LOSSES, default="ce")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--compact-beta", type=float, default=0.5, help="weight of compact softmax's extra term")
    g.add_argument("--balance", action="store_true", help="class-balanced loss weights")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ensemble", type=int, default=1, metavar="N",
                   help="train N models (seeds seed..seed+N-1, in RUN/member1..N) and average their "
                        "probabilities in RUN/best.pt")
    g = p.add_argument_group("augmentation")
    g.add_argument("--freq-mask", type=int, default=8, help="SpecAugment: widest frequency mask in mel bins (0: off)")
    g.add_argument("--time-mask", type=int, default=20, help="SpecAugment: widest time mask in frames (0: off)")
    g.add_argument("--n-masks", type=int, default=2)
    g.add_argument("--frame-dropout", type=float, default=0.1)
    g.add_argument("--mixup", type=float, default=0.0, help="mixup Beta(a, a) parameter (0: off)")
    g.add_argument("--crop", type=float, default=0.0, metavar="S",
                   help="train on a random S-second window of each clip's audio (0: whole clips)")
    g = p.add_argument_group("split (speaker-independent)")
    g.add_argument("--val-speakers", help="comma-separated speakers for validation / early stopping")
    g.add_argument("--test-speakers", help="comma-separated speakers held out for the final report")
    g.add_argument("--folds", type=int, help="K speaker folds; every fold unless --fold, then mean and std")
    g.add_argument("--fold", type=int, help="run only this fold (1..K)")
    g.add_argument("--fold-val", choices=("next", "none"), default="next",
                   help="folds: validate on the next group, or none (fixed epochs)")
    g.add_argument("--no-split", action="store_true", help="train on everything (demos); the report is not held out")
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    g.add_argument("--features-on-device", choices=("auto", "yes", "no"), default="auto",
                   help="hold the padded cache on the training device (auto: when it fits)")
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _setup_logging(out: Path, main: bool) -> None:
    """Readable lines on stderr and, on the main process, in RUN/train.log (appended across resumes)."""
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out / "train.log", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _setup_logging(Path(args.out), int(os.environ.get("RANK", "0")) == 0)
    model = dict(video_stream=args.video_stream, fan_relation=not args.no_relation, fusion=args.fusion,
                 fbp_k=args.fbp_k, fbp_o=args.fbp_o, audio_channels=args.audio_channels,
                 audio_lambda=args.audio_lambda, audio_norm=args.audio_norm, video_lambda=args.video_lambda, video_hidden=args.video_hidden,
                 stt_layers=args.stt_layers, dropout=args.dropout, modality_dropout=args.modality_dropout)
    if args.modalities:
        model["modalities"] = args.modalities
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      patience=args.patience, seed=args.seed, loss=args.loss, label_smoothing=args.label_smoothing,
                      compact_beta=args.compact_beta, balance=args.balance, ensemble=args.ensemble,
                      augment=AugmentConfig(args.freq_mask, args.time_mask, args.n_masks, args.frame_dropout,
                                            args.mixup, args.crop),
                      features_on_device=args.features_on_device, amp=not args.no_amp, progress=not args.quiet)
    split = SplitOptions(args.val_speakers, args.test_speakers, args.folds, args.fold, args.fold_val, args.no_split)
    try:
        run_training(args.cache, args.out, model, cfg, split, args.labels, args.resume)
    except (CacheError, SplitError, TrainError, CheckpointError, ValueError) as e:
        log.error("avemo-train: error: %s", e)
        return 2
    except NoSpaceError as e:
        log.error("avemo-train: error: %s; the last finished epoch is kept in %s/last.pt: free some space and "
                  "run the same command with --resume", e.strerror, args.out)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(cli())
