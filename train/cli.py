"""``avemo-train CACHE --out RUN``: fit the fused model on a feature cache.

The same command line runs on the CPU, on one GPU, and under ``torchrun`` on several.
``cli`` only parses; ``run_training`` is the function to call from Python.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avemo.checkpoint import CheckpointError
from avemo.cpu import reuse_freed_memory, set_torch_threads
from avemo.io import NoSpaceError, write_json_atomic
from avemo.model import FUSIONS, LOSSES, MODALITIES, STT_TOKENS, VIDEO_STREAMS, ModelConfig
from avemo.model.net import AUDIO_NORMS
from train.augment import AugmentConfig
from train.data import CacheError, TrainingData, load_training_data
from train.loop import KEEPS, SCHEDULES, RunBusy, TrainConfig, TrainError, fit, fit_ensemble, start_runtime
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
    maps = needs_feature_maps(model)
    data = load_training_data(cache, labels, with_maps=maps)
    model.setdefault("modalities", default_modalities(data))
    maps = maps and model["modalities"] != "audio"
    if maps and not data.video_cells:
        raise TrainError(f"--video-stream stt attends over the cells of each frame's feature map, and {cache} holds "
                         "no feature maps: re-extract it with avemo-extract --feature-maps (the same command and "
                         "--out add them to the cache), or train on one pooled vector per frame with "
                         "--stt-tokens frames")
    model.update(n_classes=len(data.classes), n_mels=data.n_mels,
                 video_dim=data.video_dim if model["modalities"] != "audio" else 0,
                 video_cells=data.video_cells if maps else 0)
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


def needs_feature_maps(model: dict[str, Any]) -> bool:
    """The model settings ask for stt over cells, which reads the cache's feature maps."""
    m = {**_defaults(ModelConfig), **model}
    return m["video_stream"] == "stt" and m["stt_tokens"] == "cells" and m.get("modalities") != "audio"


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
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1, got '{text}'")
    return values


def _defaults(cls) -> dict[str, Any]:
    """A settings dataclass's field defaults: the flags show (and use) the very defaults the code has."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# flag -> ModelConfig field; the audio stream's shape flags are set only when given (with --audio-init
# the front-end fixes them)
MODEL_FLAGS = {"audio_channels": "audio_channels", "audio_convs": "audio_convs_per_block",
               "audio_lambda": "audio_lambda", "audio_norm": "audio_norm", "dropout": "dropout",
               "video_stream": "video_stream", "fusion": "fusion", "fbp_k": "fbp_k", "fbp_o": "fbp_o",
               "video_lambda": "video_lambda", "video_hidden": "video_hidden", "stt_layers": "stt_layers",
               "stt_tokens": "stt_tokens",
               "modality_dropout": "modality_dropout", "voice_head": "voice_head", "voice_layers": "voice_layers"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avemo-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("cache", help="feature cache written by avemo-extract (holds manifest.csv)")
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, metrics.csv, report.json, ...")
    p.add_argument("--labels", help="CSV with clip,label[,speaker][,split] overriding the manifest's labels")
    add_model_args(p, video=True)
    add_optimisation_args(p)
    add_augmentation_args(p, video=True)
    add_finetune_args(p)
    g = p.add_argument_group("split (speaker-independent)")
    g.add_argument("--val-speakers", help="comma-separated speakers for validation / early stopping")
    g.add_argument("--test-speakers", help="comma-separated speakers held out for the final report")
    g.add_argument("--folds", type=int, help="K speaker folds; every fold unless --fold, then mean and std")
    g.add_argument("--fold", type=int, help="run only this fold (1..K)")
    g.add_argument("--fold-val", choices=("next", "none"), default="next",
                   help="folds: validate on the next group, or none (fixed epochs)")
    g.add_argument("--no-split", action="store_true", help="train on everything (demos); the report is not held out")
    add_run_args(p)
    return p


def add_model_args(p: argparse.ArgumentParser, video: bool) -> None:
    """Model flags; ``video`` False leaves out everything but the audio stream (avemo-train-audio)."""
    m, t = _defaults(ModelConfig), _defaults(TrainConfig)
    g = p.add_argument_group("model")
    if video:
        g.add_argument("--modalities", choices=MODALITIES, help="default: av when the cache has both, else the one it has")
        g.add_argument("--audio-init", default=t["audio_init"], metavar="default|none|PATH",
                       help="start the audio stream and its mel normalisation from a pretrained front-end (a name "
                            "shipped with avemo, or a file from avemo-train-audio); none: from scratch")
        arch = " (default: the front-end's; with --audio-init none: {})"
    else:
        arch = " (default: {})"
    g.add_argument("--audio-channels", type=_ints, default=argparse.SUPPRESS, help="FCN channels per conv block"
                   + arch.format(",".join(map(str, m["audio_channels"]))))
    g.add_argument("--audio-convs", type=int, default=argparse.SUPPRESS,
                   help="3x3 convolutions per FCN block" + arch.format(m["audio_convs_per_block"]))
    g.add_argument("--audio-lambda", type=float, default=argparse.SUPPRESS,
                   help="attention sharpness (0: mean pooling)" + arch.format(m["audio_lambda"]))
    g.add_argument("--audio-norm", choices=AUDIO_NORMS, default=argparse.SUPPRESS,
                   help="mel centring: training-set mean per bin (global), or global after each clip is "
                        "brought to one loudness (level)"
                   + arch.format(m["audio_norm"]))
    g.add_argument("--dropout", type=float, default=m["dropout"])
    if not video:
        return
    g.add_argument("--voice-head", type=float, default=m["voice_head"],
                   help="audio-only and --fusion product models: weight of a frozen pretrained speaker encoder's "
                        "classifier, fitted on the training clips after the FCN, in the voice's probabilities (0: the "
                        "FCN alone)")
    g.add_argument("--voice-layers", type=_ints, default=m["voice_layers"],
                   help="the speaker encoder's layers (1-3) whose statistics the voice head reads (default: "
                        + ",".join(map(str, m["voice_layers"])) + ")")
    g.add_argument("--video-stream", choices=VIDEO_STREAMS, default=m["video_stream"])
    g.add_argument("--no-relation", action="store_true", help="fan: self-attention only, no relation-attention")
    g.add_argument("--fusion", choices=FUSIONS, default=m["fusion"])
    g.add_argument("--fbp-k", type=int, default=m["fbp_k"], help="factors per fbp output")
    g.add_argument("--fbp-o", type=int, default=m["fbp_o"], help="fbp outputs")
    g.add_argument("--video-lambda", type=float, default=m["video_lambda"])
    g.add_argument("--video-hidden", type=int, default=m["video_hidden"])
    g.add_argument("--stt-layers", type=int, default=m["stt_layers"])
    g.add_argument("--stt-tokens", choices=STT_TOKENS, default=m["stt_tokens"],
                   help="stt: attend over the cells of each frame's feature map (needs a cache extracted with "
                        "--feature-maps), or over one pooled vector per frame")
    g.add_argument("--modality-dropout", type=float, default=0.2, help="training: chance a clip loses one modality")


def add_optimisation_args(p: argparse.ArgumentParser, runs_of_avemo_train: bool = True) -> None:
    """Optimisation flags; without ``runs_of_avemo_train`` (avemo-train-audio: no validation part, one
    model) early stopping and ensembles are left out."""
    t = _defaults(TrainConfig)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=t["epochs"])
    g.add_argument("--batch-size", type=int, default=t["batch_size"])
    g.add_argument("--lr", type=float, default=t["lr"], help="peak learning rate (AdamW)")
    if runs_of_avemo_train:
        g.add_argument("--audio-lr", type=float, default=t["audio_lr"],
                       help="the audio stream's own peak learning rate (0 keeps a pretrained stream frozen); "
                            "default: from a front-end, frozen for an audio-only model when the front-end already "
                            "tells the cache's classes apart (zero-shot), else a tenth of --lr; without one, --lr")
        g.add_argument("--audio-frozen-epochs", type=int, default=t["audio_frozen_epochs"],
                       help="a pretrained audio stream stays frozen for this many epochs, then trains at --audio-lr")
    g.add_argument("--weight-decay", type=float, default=t["weight_decay"])
    g.add_argument("--schedule", choices=SCHEDULES, default=t["schedule"],
                   help="onecycle: warm-up then anneal, per batch; cosine: per epoch from --lr")
    if runs_of_avemo_train:
        g.add_argument("--patience", type=int, default=t["patience"],
                       help="early stop after this many epochs without a better val UAR (0: off)")
        g.add_argument("--keep", choices=KEEPS, default=t["keep"],
                       help="which epoch becomes RUN/best.pt: the one with the best validation UAR, or the "
                            "final one (the one-cycle schedule's annealed end; not with --patience); auto: the "
                            "final one where only a new head trains on a frozen pretrained audio stream, else best")
    g.add_argument("--loss", choices=LOSSES, default=t["loss"])
    g.add_argument("--label-smoothing", type=float, default=t["label_smoothing"])
    g.add_argument("--compact-beta", type=float, default=t["compact_beta"], help="weight of compact softmax's extra term")
    g.add_argument("--balance", action="store_true", help="class-balanced loss weights")
    g.add_argument("--seed", type=int, default=t["seed"])
    if runs_of_avemo_train:
        g.add_argument("--ensemble", type=int, default=t["ensemble"], metavar="N",
                       help="train N models (seeds seed..seed+N-1, in RUN/member1..N) and average their "
                            "probabilities in RUN/best.pt")


def add_augmentation_args(p: argparse.ArgumentParser, video: bool) -> None:
    a = _defaults(AugmentConfig)
    g = p.add_argument_group("augmentation")
    g.add_argument("--freq-mask", type=int, default=a["freq_mask"], help="SpecAugment: widest frequency mask in mel bins (0: off)")
    g.add_argument("--time-mask", type=int, default=a["time_mask"], help="SpecAugment: widest time mask in frames (0: off)")
    g.add_argument("--n-masks", type=int, default=a["n_masks"])
    if video:
        g.add_argument("--frame-dropout", type=float, default=a["frame_dropout"])
    g.add_argument("--tempo", type=float, default=a["tempo"], metavar="R",
                   help="play each training clip faster or slower by a random factor in [1-R, 1+R] (0: off)")
    g.add_argument("--gain", type=float, default=a["gain"], metavar="DB",
                   help="replay each training clip louder or quieter by a random gain in [-DB, +DB] decibels, "
                        "exactly, the spectrogram's silence floor included (0: off)")
    g.add_argument("--noise", type=float, default=a["noise"], metavar="P",
                   help="mix coloured noise or babble (three other clips of the batch) at 5-30 dB SNR into each "
                        "training clip's spectrogram with chance P (0: off)")
    g.add_argument("--voice-noise", type=int, default=a["voice_noise"], metavar="N",
                   help="the voice head's regression also learns from N copies of each training clip with "
                        "coloured noise or babble mixed in at 5-30 dB SNR (0: clean clips only)")
    g.add_argument("--voice-band", type=int, default=a["voice_band"], metavar="N",
                   help="the voice head's regression also learns from N copies of each training clip "
                        "band-limited as a telephone line or 8 kHz audio hears it (from 0 or 200-400 Hz up to "
                        "3-4.2 kHz; 0: none)")
    g.add_argument("--mixup", type=float, default=a["mixup"], help="mixup Beta(a, a) parameter (0: off)")
    g.add_argument("--crop", type=float, default=a["crop"], metavar="S",
                   help="train on a random S-second window of each clip's audio (0: whole clips)")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    t = _defaults(TrainConfig)
    g = p.add_argument_group("end to end (train.finetune)")
    g.add_argument("--finetune-encoder", action="store_true",
                   help="train the face encoder the cache was extracted with together with the video stream, from "
                        "the cache's face crops (needs avemo-extract --keep-crops); the checkpoint carries it")
    g.add_argument("--frames-per-clip", type=int, default=t["frames_per_clip"], metavar="K",
                   help="--finetune-encoder: random face frames of each clip per training step (evaluation: all; "
                        "0: all in training too)")
    g.add_argument("--encoder-lr", type=float, default=t["encoder_lr"],
                   help="--finetune-encoder: the face encoder's peak learning rate")


def add_run_args(p: argparse.ArgumentParser) -> None:
    t = _defaults(TrainConfig)
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    g.add_argument("--features-on-device", choices=("auto", "yes", "no"), default=t["features_on_device"],
                   help="hold the padded cache on the training device (auto: when it fits)")
    g.add_argument("--max-train-seconds", type=float, default=t["max_train_seconds"], metavar="S",
                   help="a clip longer than S seconds trains on a random S-second window of its audio each time "
                        "it is drawn, so one long recording cannot blow up a batch's memory; evaluation and "
                        "prediction see whole clips (0: no bound)")
    g.add_argument("--no-amp", action="store_true", help="float32 throughout (default: bf16 autocast on CUDA and on CPUs with bf16 in hardware)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: the CPUs this process may use, "
                                               "from its affinity and cgroup quota, or OMP_NUM_THREADS)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def options_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], TrainConfig, SplitOptions]:
    """Parsed flags -> (ModelConfig fields, TrainConfig, SplitOptions), as run_training takes them.

    Flags a parser leaves out (avemo-train-audio has no video ones) keep the dataclasses' defaults.
    """
    given = vars(args)
    model = {field: given[flag] for flag, field in MODEL_FLAGS.items() if flag in given}
    if "no_relation" in given:
        model["fan_relation"] = not args.no_relation
    if given.get("modalities"):
        model["modalities"] = args.modalities
    augment = AugmentConfig(**{f: given[f] for f in _defaults(AugmentConfig) if f in given})
    train = {f: given[f] for f in _defaults(TrainConfig) if f in given and f != "augment"}
    cfg = TrainConfig(**train, augment=augment, amp=not args.no_amp, progress=not args.quiet)
    split = SplitOptions(*(given.get(k) for k in ("val_speakers", "test_speakers", "folds", "fold")),
                         given.get("fold_val", "next"), bool(given.get("no_split")))
    return model, cfg, split


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
    # distributed ranks on one machine share its CPUs
    set_torch_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), args.threads)
    reuse_freed_memory()
    _setup_logging(Path(args.out), int(os.environ.get("RANK", "0")) == 0)
    try:
        model, cfg, split = options_from_args(args)
        run_training(args.cache, args.out, model, cfg, split, args.labels, args.resume)
    except (CacheError, SplitError, TrainError, CheckpointError, ValueError) as e:
        log.error("avemo-train: error: %s", e)
        return 2
    except RunBusy as e:
        log.error("avemo-train: error: %s", e)
        return 4
    except NoSpaceError as e:
        log.error("avemo-train: error: %s; the last finished epoch is kept in %s/last.pt: free some space and "
                  "run the same command with --resume", e.strerror, args.out)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(cli())
