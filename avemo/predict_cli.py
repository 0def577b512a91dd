"""``avemo-predict``: a thin command line over ``avemo.predict`` (like whisper's ``cli()``)."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

from avemo.checkpoint import CheckpointError
from avemo.cpu import set_torch_threads
from avemo.extraction import ClipError
from avemo.io import display_name, first_line, shown_name
from avemo.media import MEDIA_EXTENSIONS
from avemo.model.adapt import PRIOR_CLIPS, AdaptError
from avemo.prediction import MIN_WINDOW_S, Prediction, load_model, media_files


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got '{text}'") from None
    if not math.isfinite(v) or v < MIN_WINDOW_S:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_WINDOW_S} s, got '{text}'")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avemo-predict",
        description="Say which emotion a clip shows, with every class probability and, on request, "
                    "a picture of the frames and sounds that drove the decision.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="clips (video or audio files) or folders of them")
    p.add_argument("--model", default="default", metavar="CKPT|NAME",
                   help="a trained checkpoint (RUN/best.pt), or the name of a model shipped with avemo (default: "
                        "default, audio-visual, trained on public speech and face corpora, for research use)")
    p.add_argument("--json", action="store_true", help="one JSON object per line per clip (per window with --window)")
    p.add_argument("--explain", metavar="OUT.png",
                   help="write a PNG of the attention over face crops and spectrogram (a timeline with "
                        "--window); with several clips, the clip name is added to OUT")
    p.add_argument("--window", type=_seconds, metavar="S", help="slide a window of S seconds over each file")
    p.add_argument("--hop", type=_seconds, metavar="S", help="seconds between window starts (default: --window)")
    p.add_argument("--adapt", action="store_true",
                   help="the files are one speaker (or one recording set-up): first adapt the model's voice side to "
                        "all of them (its mel and BatchNorm statistics, blended with the model's own, which weigh as "
                        f"{PRIOR_CLIPS} clips; no labels), then predict each; the more clips, the more it adapts")
    p.add_argument("--corpus", nargs="+", metavar="PATH",
                   help="with --adapt: clips or folders of the corpus the speaker belongs to (several speakers "
                        "recorded alike; the speaker's own files may be among them): the speaker is adapted relative "
                        "to it, which works with any model that reads audio, the shipped default included; it gains "
                        "from about 20 of the speaker's clips, and a handful may cost a little (README)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--face-encoder", metavar="PATH",
                   help="where the face encoder the model was trained with lives, if not where it was")
    return p


def _explain_path(base: str, clip: Path, several: bool, used: set[str]) -> Path:
    """OUT.png for one clip; with several, OUT.<clip name>.png, made unique when two clips share a name."""
    base = Path(base)
    if not several:
        return base
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in display_name(clip.name))
    name = f"{base.stem}.{safe}{base.suffix or '.png'}"
    if name in used:    # a/x.mp4 and b/x.mp4: tell them apart by their whole path
        tag = hashlib.sha1(os.fsencode(clip)).hexdigest()[:8]
        name = f"{base.stem}.{safe}.{tag}{base.suffix or '.png'}"
    used.add(name)
    return base.with_name(name)


def _explain_folder_problem(base: str) -> str | None:
    """Why pictures cannot be written at ``base`` (checked before any clip is processed), or None."""
    parent = Path(base).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"--explain {shown_name(base)}: {shown_name(parent)} is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"--explain {shown_name(base)}: cannot write in {shown_name(parent)}"
    return None


def _human(pred: Prediction) -> str:
    where = f" [{pred.start:7.2f}-{pred.end:7.2f} s]" if pred.start is not None else ""
    clip = shown_name(pred.clip)
    if pred.emotion is None:
        return f"{clip}{where}: no prediction ({'; '.join(pred.warnings)})"
    cover = "" if pred.face_coverage is None else f", face in {100 * pred.face_coverage:.0f}% of frames"
    lines = [f"{clip}{where}: {pred.emotion} ({pred.probabilities[pred.emotion]:.2f}) "
             f"from {' + '.join(pred.modalities)}{cover}"]
    ranked = sorted(pred.probabilities.items(), key=lambda kv: -kv[1])
    lines.append("    " + "  ".join(f"{c} {p:.2f}" for c, p in ranked))
    for m, probs in pred.modality_probabilities.items():
        top = max(probs, key=probs.get)
        lines.append(f"    {'voice' if m == 'audio' else 'face'} alone: {top} ({probs[top]:.2f})")
    lines += [f"    warning: {w}" for w in pred.warnings]
    return "\n".join(lines)


def _emit(pred: Prediction, as_json: bool) -> None:
    print(json.dumps(pred.to_dict(), ensure_ascii=False, allow_nan=False) if as_json else _human(pred), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hop is not None and args.window is None:
        print("avemo-predict: --hop needs --window", file=sys.stderr)
        return 2
    if args.corpus and not args.adapt:
        print("avemo-predict: --corpus needs --adapt", file=sys.stderr)
        return 2
    if args.explain and (problem := _explain_folder_problem(args.explain)):
        print(f"avemo-predict: {problem}", file=sys.stderr)
        return 2
    urls = [p for p in [*args.paths, *(args.corpus or [])] if URL.match(str(p))]
    if urls:
        print(f"avemo-predict: {urls[0]}: a URL; avemo reads local files only (download it first)", file=sys.stderr)
        return 2
    set_torch_threads()
    try:
        model = load_model(args.model, args.device, args.face_encoder)
    except CheckpointError as e:
        print(f"avemo-predict: {e}", file=sys.stderr)
        return 2
    listing = media_files(args.paths)
    paths = listing.files
    failed = 0
    for folder, why in listing.unlisted.items():   # another user's folder on a shared disk: said, not skipped
        failed += 1
        if args.json:
            print(json.dumps({"clip": display_name(folder), "emotion": None, "error": why}, ensure_ascii=False))
        print(f"avemo-predict: {shown_name(folder)}: {why}", file=sys.stderr)
    if not paths:
        print("avemo-predict: no media files found in " + ", ".join(map(shown_name, args.paths))
              + _hidden_note(listing.hidden) + _others_note(listing.others), file=sys.stderr)
        return 2
    if args.adapt:
        corpus = None
        if args.corpus:
            found = media_files(args.corpus)
            corpus = found.files
            for folder, why in found.unlisted.items():
                print(f"avemo-predict: --corpus: {shown_name(folder)}: {why}", file=sys.stderr)
            if not corpus:
                print("avemo-predict: --corpus: no media files found in " + ", ".join(map(shown_name, args.corpus))
                      + _hidden_note(found.hidden), file=sys.stderr)
                return 2
        if corpus:
            print(f"avemo-predict: --adapt: reading the audio of {len(paths)} file{'s' * (len(paths) != 1)} and "
                  f"{len(corpus)} corpus file{'s' * (len(corpus) != 1)}", file=sys.stderr, flush=True)
        try:
            n, problems = model.adapt_to(paths, corpus=corpus)
        except AdaptError as e:
            print(f"avemo-predict: --adapt: {e}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"avemo-predict: --adapt: left out {problem}", file=sys.stderr)
        relative = ""
        if corpus:
            m = len(corpus) - sum(p.startswith("corpus: ") for p in problems)
            relative = f", relative to a corpus of {m} clip{'s' * (m != 1)}"
        print(f"avemo-predict: adapted the voice side to {n} clip{'s' * (n != 1)}{relative} (their statistics weigh "
              f"{n}/{n + PRIOR_CLIPS} against the model's own)", file=sys.stderr)
    pictures: set = set()
    for path in paths:
        try:
            if not os.path.lexists(path):      # named on the command line (a folder's files exist when listed)
                raise ClipError("no such file or folder")
            if args.window:
                preds = []
                for pred in model.predict_timeline(path, args.window, args.hop):
                    preds.append(pred)
                    _emit(pred, args.json)
                if args.explain and preds:
                    from avemo.explain import plot_timeline
                    _picture(plot_timeline, preds, _explain_path(args.explain, path, len(paths) > 1, pictures))
            else:
                pred = model.predict(path)
                _emit(pred, args.json)
                if args.explain:
                    from avemo.explain import plot_prediction
                    _picture(plot_prediction, pred, _explain_path(args.explain, path, len(paths) > 1, pictures))
        except ClipError as e:
            failed += 1
            if args.json:
                print(json.dumps({"clip": display_name(path), "emotion": None, "error": str(e)}, ensure_ascii=False))
            print(f"avemo-predict: {shown_name(path)}: {e}", file=sys.stderr)
        except CheckpointError as e:   # the extraction the model needs cannot be set up here
            print(f"avemo-predict: {e}", file=sys.stderr)
            return 2
    return 1 if failed else 0


def _others_note(others: list[Path]) -> str:
    """Say what was there instead, so a folder of an unlisted container is not a mystery."""
    if not others:
        return ""
    kinds = sorted({p.suffix.lower() or "(no extension)" for p in others})
    return (f"; {len(others)} file{'s' * (len(others) != 1)} of other types ({', '.join(map(shown_name, kinds[:5]))}"
            f"{', ...' if len(kinds) > 5 else ''}): media files end in one of {', '.join(sorted(MEDIA_EXTENSIONS))}")


def _hidden_note(hidden: int) -> str:
    return f" ({hidden} hidden file{'s' * (hidden != 1)} or folder{'s' * (hidden != 1)} ignored)" if hidden else ""


def _picture(plot, what, out: Path) -> None:
    """Write one explanation picture; a failure is reported and the remaining clips go on."""
    try:
        plot(what, out)
    except OSError as e:
        print(f"avemo-predict: could not write {shown_name(out)}: {first_line(e)}", file=sys.stderr)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
