"""``avemo-predict``: a thin command line over ``avemo.predict`` (like whisper's ``cli()``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avemo.checkpoint import CheckpointError
from avemo.extraction import ClipError
from avemo.prediction import Prediction, load_model, media_files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avemo-predict",
        description="Say which emotion a clip shows, with every class probability and, on request, "
                    "a picture of the frames and sounds that drove the decision.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="clips (video or audio files) or folders of them")
    p.add_argument("--model", required=True, metavar="CKPT", help="a trained checkpoint (RUN/best.pt)")
    p.add_argument("--json", action="store_true", help="one JSON object per line per clip (per window with --window)")
    p.add_argument("--explain", metavar="OUT.png",
                   help="write a PNG of the attention over face crops and spectrogram (a timeline with "
                        "--window); with several clips, the clip name is added to OUT")
    p.add_argument("--window", type=float, metavar="S", help="slide a window of S seconds over each file")
    p.add_argument("--hop", type=float, metavar="S", help="seconds between window starts (default: --window)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--face-encoder", metavar="PATH",
                   help="where the face encoder the model was trained with lives, if not where it was")
    return p


def _explain_path(base: str, clip: Path, several: bool) -> Path:
    base = Path(base)
    if not several:
        return base
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in clip.stem)
    return base.with_name(f"{base.stem}.{safe}{base.suffix or '.png'}")


def _human(pred: Prediction) -> str:
    where = f" [{pred.start:7.2f}-{pred.end:7.2f} s]" if pred.start is not None else ""
    if pred.emotion is None:
        return f"{pred.clip}{where}: no prediction ({'; '.join(pred.warnings)})"
    cover = "" if pred.face_coverage is None else f", face in {100 * pred.face_coverage:.0f}% of frames"
    lines = [f"{pred.clip}{where}: {pred.emotion} ({pred.probabilities[pred.emotion]:.2f}) "
             f"from {' + '.join(pred.modalities)}{cover}"]
    ranked = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])
    lines.append("    " + "  ".join(f"{c} {p:.2f}" for c, p in ranked))
    lines += [f"    warning: {w}" for w in pred.warnings]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hop is not None and args.window is None:
        print("avemo-predict: --hop needs --window", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, args.device, args.face_encoder)
    except CheckpointError as e:
        print(f"avemo-predict: {e}", file=sys.stderr)
        return 2
    paths = media_files(args.paths)
    if not paths:
        print("avemo-predict: no media files found in " + ", ".join(args.paths), file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        try:
            if args.window:
                preds = []
                for pred in model.predict_timeline(path, args.window, args.hop):
                    preds.append(pred)
                    print(json.dumps(pred.to_dict(), ensure_ascii=False) if args.json else _human(pred), flush=True)
                if args.explain and preds:
                    from avemo.explain import plot_timeline
                    plot_timeline(preds, _explain_path(args.explain, path, len(paths) > 1))
            else:
                pred = model.predict(path)
                print(json.dumps(pred.to_dict(), ensure_ascii=False) if args.json else _human(pred), flush=True)
                if args.explain:
                    from avemo.explain import plot_prediction
                    plot_prediction(pred, _explain_path(args.explain, path, len(paths) > 1))
        except ClipError as e:
            failed += 1
            if args.json:
                print(json.dumps({"clip": str(path), "emotion": None, "error": str(e)}, ensure_ascii=False))
            print(f"avemo-predict: {path}: {e}", file=sys.stderr)
        except CheckpointError as e:   # the extraction the model needs cannot be set up here
            print(f"avemo-predict: {e}", file=sys.stderr)
            return 2
    return 1 if failed else 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
