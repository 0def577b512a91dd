"""avemo-train-face: train a face-expression encoder on a class-folder dataset, or evaluate one.

    avemo-train-face DATA_DIR --out RUN [--arch efficientface|transfer] [--arch-cfg NAME|JSON] [--epochs N] ...
    avemo-train-face --evaluate DIR --encoder NAME_OR_PATH [--json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from pathlib import Path

import torch

from avemo.checkpoint import CheckpointError
from avemo.cpu import reuse_freed_memory, set_torch_threads
from avemo.encoders import ARCH_PRESETS, ARCHITECTURES, DEFAULT_PRESET, load_encoder
from train.face.data import DataError, read_image_folder
from train.metrics import classification_metrics
from train.face.trainer import TrainConfig, run_training

# CLI option -> TrainConfig field, for options that change the result (None = not given)
_TRAIN_OPTIONS = {
    "arch": "arch", "arch_cfg": "arch_cfg", "input_size": "input_size", "epochs": "epochs",
    "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr", "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs", "label_smoothing": "label_smoothing", "ldg": "ldg", "seed": "seed",
    "time_budget": "time_budget",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avemo-train-face",
        description="Train a face-expression encoder on DATA_DIR/{train,validation,test}/<class>/<image> "
                    "(best on validation, reported on test), or evaluate an encoder with --evaluate.")
    p.add_argument("data_dir", nargs="?", metavar="DATA_DIR", help="dataset root with train/, validation/, test/")
    p.add_argument("--out", metavar="RUN", help="run folder (checkpoints, log, encoder.pt)")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), help="network (default efficientface)")
    p.add_argument("--arch-cfg", metavar="NAME|JSON", type=_arch_cfg,
                   help="a preset by name (efficientface: " + ", ".join(ARCH_PRESETS["efficientface"]) + "; transfer: "
                        + ", ".join(ARCH_PRESETS["transfer"]) + "; default: "
                        + ", ".join(f"{a} {n}" for a, n in DEFAULT_PRESET.items()) + "), or settings as JSON laid over "
                        'the default preset, e.g. \'{"stages_out_channels": [24, 96, 192, 384, 512]}\'')
    p.add_argument("--input-size", type=int, metavar="PX", help="side of the network input (default 48)")
    p.add_argument("--color", action="store_true", help="train on RGB input (default: grey, as FER2013)")
    p.add_argument("--epochs", type=int, help="default 30")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), help="default sgd (Nesterov momentum 0.9)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1; use ~2e-3 with adamw)")
    p.add_argument("--weight-decay", type=float, help="default 5e-4")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up before the cosine decay (default 1)")
    p.add_argument("--label-smoothing", type=float, help="uniform label smoothing (default 0)")
    p.add_argument("--ldg", metavar="NAME_OR_PATH",
                   help="label distribution training: an encoder (e.g. a previous RUN/encoder.pt) whose softmax "
                        "output on each augmented image is the target (EfficientFace's LDG; its loss, as in the "
                        "paper, is the cross-entropy divided by the number of classes)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="stop after this much training time; the cosine schedule then follows the clock so the "
                        "run still ends annealed (--epochs becomes the upper bound)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--evaluate", metavar="DIR", help="classify the class-folder tree DIR/<class>/<image>")
    p.add_argument("--encoder", metavar="NAME_OR_PATH", default="default", help="encoder for --evaluate")
    p.add_argument("--json", action="store_true", help="with --evaluate: print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_torch_threads(requested=args.threads)
    reuse_freed_memory()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.evaluate:
            return evaluate_command(args.evaluate, args.encoder, device, args.json)
        if not args.data_dir or not args.out:
            parser.error("training needs DATA_DIR and --out RUN (or use --evaluate DIR --encoder NAME)")
        explicit = {field: getattr(args, opt) for opt, field in _TRAIN_OPTIONS.items() if getattr(args, opt) is not None}
        if args.color:
            explicit["grayscale"] = False
        explicit["data_dir"] = str(Path(args.data_dir).resolve())
        cfg = TrainConfig(**explicit)
        command = "avemo-train-face " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        run_training(cfg, args.out, resume=args.resume, device=device, explicit=explicit, command=command)
    except (DataError, CheckpointError, ValueError, FileExistsError) as e:
        print(f"avemo-train-face: error: {e}", file=sys.stderr)
        return 2
    return 0


def evaluate(directory: str | Path, encoder_name: str = "default", device: str = "cpu") -> dict:
    """Accuracy, UAR, per-class recall of an encoder on DIR/<class>/<image>.

    DIR may hold a subset of the encoder's classes; predictions range over all of them.
    """
    encoder = load_encoder(encoder_name, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = read_image_folder(directory, encoder.input_size, encoder.grayscale)
    for w in caught:
        print(f"avemo-train-face: warning: {w.message}", file=sys.stderr)
    unknown = [c for c in images.classes if c not in encoder.classes]
    if unknown:
        raise DataError(f"{directory}: class folder(s) {', '.join(unknown)} are not classes of encoder "
                        f"'{encoder.name}' ({', '.join(encoder.classes)})")
    probs = encoder.classify(images.pixels.permute(0, 2, 3, 1))        # [N, S, S, C] already in contract
    report = classification_metrics(images.labels, probs.argmax(-1), images.classes, encoder.classes)
    return {"encoder": encoder.name, "sha256": encoder.sha256, "dir": str(directory),
            "skipped": len(images.skipped), **report}


def evaluate_command(directory: str, encoder_name: str, device: str, as_json: bool) -> int:
    report = evaluate(directory, encoder_name, device)
    if as_json:
        print(json.dumps(report))
        return 0
    print(f"encoder {report['encoder']} on {directory}: {report['n']} images")
    print(f"accuracy {report['accuracy']:.4f}   UAR {report['uar']:.4f}")
    for c, r in report["per_class_recall"].items():
        print(f"  {c:<12s} recall {r:.4f}  ({report['support'][c]} images)")
    return 0


def _arch_cfg(text: str) -> str | dict:
    """A preset name (checked against --arch when the run is set up) or a JSON table."""
    if text.strip().startswith("{"):
        return _json_dict(text)
    if not text.isidentifier():
        raise argparse.ArgumentTypeError("must be a preset name or a JSON object like '{\"key\": value}'")
    return text


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object like '{\"key\": value}'")
    return value


if __name__ == "__main__":
    sys.exit(main())
