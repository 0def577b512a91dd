"""Accuracy of each video stream, frozen vs end to end, on a CONSTRUCTED clip set (not natural video).

    python benchmarks/video_streams.py --fer ../shared/data/fer2013 --out runs/video_streams
    python benchmarks/video_streams.py --fer ../shared/data/fer2013 --out runs/vs-quick --quick   # smoke run

There is no labelled talking-face video here, so this builds short silent "clips" from still
FER2013 faces: each clip is one FER2013 image (one emotion) moved smoothly over ``--frames``
frames (a small random trajectory of shift, rotation and scale through three key poses, eased
between them, plus a slight linear brightness drift; ``cv2.warpAffine`` with replicated
borders), and now and then one frame is marked as having no face. The expression never
changes within a clip and no two frames show a different face, so the set measures how each
stream copes with motion, missing frames and the encoder's features, not facial dynamics: a
development set, never a benchmark of natural video.

Training and validation clips come from FER2013's train split (one validation group of
five), test clips from its test split, each clip from its own image, so no face is in two
parts. The shipped ``default`` face encoder was trained on FER2013's train split (and chose
its epoch on the validation split): on the training clips its frozen features are those of
images it fitted, on the test clips those of unseen images, as on the encoder's own test
figures. ``--train-source validation`` builds the training clips from the validation split
instead (3,589 images, 56 of them disgust), which the encoder never took a gradient from.

The clips are written as an avemo cache exactly as ``avemo-extract --keep-crops
--feature-maps`` writes one (``extract.cache.Cache``: settings.json, features/, rows/,
manifest.csv): aligned RGB crops at the encoder's input size (FER2013's 48 px), and the
``video_features`` / ``feature_maps`` the shipped ``default`` encoder computes on them
(``FaceEncoder.embed_maps``), its identity in the settings (``with_encoder_identity``). The
detector's outputs (boxes, scores, landmarks) are left out: no detector ran. The clips have
no audio (manifest status "partial", as avemo-extract records a silent video), so the models
train on the video alone.

Then, for each stream (``--streams``, default attention fan stt; stt attends over the cells of
each frame's feature map), each mode (frozen: on the cached features; e2e:
``--finetune-encoder``, the encoder trained from the crops with its own lr, 3 random frames a
clip a step) and each seed, ``train.cli.run_training`` with the product's defaults but the
epoch count, and the test UAR/WAR of best.pt (chosen on validation UAR). A reference row: the
shipped encoder's own classifier on every face frame of a test clip, the mean of the frame
logits, no training (the shipped default model's face expert does this, ``video_stream="mean"``,
then subtracts a class prior and divides by a temperature; here it is the raw classifier).

Everything lands under ``--out``: the cache (named by a hash of the data settings, reused when
the same settings come again), one folder per run (a finished run is reused, an unfinished one
is redone), and results-*.md / .json. Seeds vary the training only; the clip set is fixed by
``--data-seed``. ``--epochs`` (default 15, where avemo-train's default is 40) is the one
setting changed from the product's: measured on a 2-core CPU (2 threads, a busy machine) with
280 clips, an end-to-end epoch took 2.6-4.0 s and a run's fixed costs 2-4 s, so on the default
700 clips an e2e run is about 2-2.5 min (stt the slowest) and a frozen one 5-40 s: the whole
default command (3 streams x 2 modes x 3 seeds) about 25 minutes on 2 threads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avemo.cpu import set_torch_threads  # noqa: E402
from avemo.encoders import FaceEncoder, load_encoder  # noqa: E402
from avemo.extraction import with_encoder_identity  # noqa: E402
from avemo.features import ClipFeatures, ExtractionSettings  # noqa: E402
from avemo.model import VIDEO_STREAMS  # noqa: E402
from avemo.video import sample_times  # noqa: E402
from extract.cache import Cache, read_manifest  # noqa: E402
from train.cli import SplitOptions, run_training  # noqa: E402
from train.loop import TrainConfig  # noqa: E402
from train.metrics import classification_metrics  # noqa: E402

CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
TRAIN_GROUPS = 5                     # fake speakers of the training clips; the last one is validation
TEST_GROUP = "fertest"
MODES = ("frozen", "e2e")
log = logging.getLogger("avemo.bench")


# ----------------------------------------------------------------------------- the clip set

@dataclass(frozen=True)
class ClipSet:
    """Everything that decides the clips (its hash names the cache)."""

    per_class_train: int = 100       # clips per class from the train source (train + validation)
    per_class_test: int = 50         # clips per class from FER2013's test split
    frames: int = 8
    seconds: float = 2.0             # clip length the frame times are spread over
    shift: float = 0.05              # largest shift of a key pose, share of the side (x and y)
    rotate: float = 8.0              # largest in-plane rotation of a key pose, degrees
    scale: float = 0.06              # key-pose scale in [1 - s, 1 + s]
    brightness: float = 0.08         # gain drifts linearly between two values in [1 - b, 1 + b]
    no_face: float = 0.15            # chance a clip has one frame without a face (masked)
    train_source: str = "train"      # FER2013 split the training/validation clips come from
    data_seed: int = 0
    encoder: str = "default"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def list_faces(fer: Path, split: str) -> dict[str, list[Path]]:
    """{class: sorted image paths} of one split of a class-folder image set."""
    out = {}
    for c in CLASSES:
        folder = fer / split / c
        if not folder.is_dir():
            raise SystemExit(f"{folder}: missing; --fer must hold {split}/<class>/ image folders for "
                             f"{', '.join(CLASSES)}")
        out[c] = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return out


def choose_faces(faces: dict[str, list[Path]], per_class: int, rng: np.random.Generator,
                 split: str) -> dict[str, list[Path]]:
    chosen = {}
    for c, paths in faces.items():
        if len(paths) < per_class:
            raise SystemExit(f"FER2013 {split}/{c} has {len(paths)} images, fewer than the {per_class} clips per class "
                             "asked (each clip is its own image): lower the per-class count")
        chosen[c] = [paths[i] for i in sorted(rng.choice(len(paths), per_class, replace=False))]
    return chosen


def _ease(u: float) -> float:
    return u * u * (3.0 - 2.0 * u)     # smoothstep: starts and ends at rest


def moving_clip(face: np.ndarray, cs: ClipSet, rng: np.random.Generator) -> np.ndarray:
    """One grey face [S, S] uint8 -> RGB frames [T, S, S, 3] uint8 moving through three random key poses."""
    s = face.shape[0]
    keys = np.stack([rng.uniform(-cs.shift, cs.shift, 3), rng.uniform(-cs.shift, cs.shift, 3),
                     rng.uniform(-cs.rotate, cs.rotate, 3), 1.0 + rng.uniform(-cs.scale, cs.scale, 3)], 1)   # [3, 4]
    gains = 1.0 + rng.uniform(-cs.brightness, cs.brightness, 2)
    frames = np.empty((cs.frames, s, s, 3), np.uint8)
    centre = ((s - 1) / 2.0, (s - 1) / 2.0)
    for i in range(cs.frames):
        u = i / max(cs.frames - 1, 1)                                   # 0 .. 1 over the clip
        seg = min(int(u * 2), 1)
        pose = keys[seg] + (keys[seg + 1] - keys[seg]) * _ease(u * 2 - seg)
        dx, dy, angle, scale = pose
        m = cv2.getRotationMatrix2D(centre, float(angle), float(scale))
        m[:, 2] += (dx * s, dy * s)
        warped = cv2.warpAffine(face, m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        gain = gains[0] + (gains[1] - gains[0]) * u
        frames[i] = np.clip(warped.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)[..., None]
    return frames


def read_face(path: Path, size: int) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SystemExit(f"{path}: not a readable image")
    if img.shape != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


def plan_clips(fer: Path, cs: ClipSet) -> list[dict]:
    """[{clip, source, label, speaker, part}] in a fixed order; the images drawn with ``cs.data_seed``."""
    rng = np.random.default_rng(cs.data_seed)
    plan = []
    for part, split, per_class in (("train", cs.train_source, cs.per_class_train), ("test", "test", cs.per_class_test)):
        for c, paths in choose_faces(list_faces(fer, split), per_class, rng, split).items():
            for j, p in enumerate(paths):
                group = f"fertrain{j % TRAIN_GROUPS + 1}" if part == "train" else TEST_GROUP
                plan.append({"clip": f"{part}/{c}/{p.stem}.mp4", "source": p, "label": c, "speaker": group,
                             "part": "val" if group == val_group() else part})
    return plan


def val_group() -> str:
    return f"fertrain{TRAIN_GROUPS}"


def build_cache(fer: Path, root: Path, cs: ClipSet, encoder: FaceEncoder) -> tuple[Path, list[dict]]:
    """The clip set as an avemo-extract cache in ``root`` (clips already written are kept)."""
    plan = plan_clips(fer, cs)
    settings = with_encoder_identity(
        ExtractionSettings(frames=cs.frames, face_size=encoder.input_size, keep_crops=True, feature_maps=True,
                           encoder=cs.encoder), encoder)
    cache = Cache(root)
    digest = settings.digest()
    rng = np.random.default_rng([cs.data_seed, 1])        # the motion: its own stream, fixed per clip order
    todo = []
    with cache.locked(exclusive=True):
        cache.claim(settings)
        for item in plan:
            motion_rng = np.random.default_rng(rng.integers(2 ** 63))   # drawn for every clip: reruns agree
            row = cache.read_row(item["clip"])
            if row is None or not cache.features_intact(row, digest):
                todo.append((item, motion_rng))
        t0 = time.perf_counter()
        for k in range(0, len(todo), 64):                   # embed 64 clips' frames in one call
            chunk = todo[k:k + 64]
            clips = []
            for item, mrng in chunk:
                crops = moving_clip(read_face(item["source"], encoder.input_size), cs, mrng)
                mask = np.ones(cs.frames, bool)
                if cs.frames > 1 and mrng.random() < cs.no_face:
                    mask[mrng.integers(cs.frames)] = False
                crops[~mask] = 0
                clips.append((item, crops, mask))
            pooled, maps = encoder.embed_maps(np.concatenate([c[m] for _, c, m in clips]))
            start = 0
            for item, crops, mask in clips:
                n = int(mask.sum())
                write_clip(cache, item, crops, mask, pooled[start:start + n].numpy(), maps[start:start + n].numpy(),
                           settings, cs, digest)
                start += n
            log.info("cache: %d / %d clips written (%.0f s)", k + len(chunk), len(todo), time.perf_counter() - t0)
        cache.write_manifest([item["clip"] for item in plan])
    return root, plan


def write_clip(cache: Cache, item: dict, crops, mask, pooled, maps, settings: ExtractionSettings, cs: ClipSet,
               digest: str) -> None:
    """One clip's features and manifest row, as ``extract.run.clip_row`` writes them for a silent video."""
    t = cs.frames
    feats = np.zeros((t, settings.feature_dim), np.float32)
    feats[mask] = pooled
    fmaps = np.zeros((t, *maps.shape[1:]), np.float16)
    fmaps[mask] = maps
    arrays = {"video_features": feats, "face_mask": mask, "frame_times": sample_times(0.0, cs.seconds, t),
              "crops": crops, "feature_maps": fmaps}
    warnings = ["audio: no audio stream"]
    clip = ClipFeatures(clip=item["clip"], settings=settings.to_dict(), duration=cs.seconds, label=item["label"],
                        speaker=item["speaker"], warnings=warnings, arrays=arrays)
    row = {"clip": item["clip"], "status": "partial", "reason": "; ".join(warnings), "label": item["label"],
           "speaker": item["speaker"], "feature_file": cache.feature_file(item["clip"]), "duration": cs.seconds,
           "frames_sampled": t, "face_coverage": round(clip.face_coverage, 4), "audio_seconds": 0.0,
           "has_video": clip.has_video, "has_audio": False, "crops": True, "feature_maps": True,
           "settings_hash": digest}
    clip.save(cache.root / row["feature_file"])
    cache.write_row(row, Path(item["source"]))


# ----------------------------------------------------------------------------- the reference and the runs

def encoder_reference(cache: Path, plan: list[dict], encoder: FaceEncoder) -> dict:
    """The encoder's own classifier on every face frame of each test clip, logits averaged over the frames."""
    t0 = time.perf_counter()
    test = [item for item in plan if item["part"] == "test"]
    y_true, y_pred = [], []
    for item in test:
        c = ClipFeatures.load(cache / Cache(cache).feature_file(item["clip"]), with_crops=True, with_maps=False)
        mask = c.arrays["face_mask"]
        logits = encoder.logits(c.arrays["crops"][mask]).mean(0)
        y_true.append(CLASSES.index(item["label"]))
        y_pred.append(int(logits.argmax()))
    m = classification_metrics(np.array(y_true), np.array(y_pred), list(CLASSES), encoder.classes)
    return {"uar": m["uar"], "accuracy": m["accuracy"], "n": len(test), "seconds": time.perf_counter() - t0}


def one_run(cache: Path, out: Path, stream: str, mode: str, seed: int, epochs: int) -> dict:
    """Train one model (or read back the finished run in ``out``); returns its figures and wall time."""
    done = out / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    if out.exists():
        shutil.rmtree(out)                                  # an unfinished run: its time would not be whole
    out.mkdir(parents=True)
    handler = logging.FileHandler(out / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    train_log = logging.getLogger("avemo.train")
    train_log.addHandler(handler)
    try:
        cfg = TrainConfig(epochs=epochs, seed=seed, finetune_encoder=mode == "e2e", progress=False)
        t0 = time.perf_counter()
        report = run_training(cache, out, {"video_stream": stream, "modalities": "video"}, cfg,
                              SplitOptions(val_speakers=val_group(), test_speakers=TEST_GROUP))
        wall = time.perf_counter() - t0
    finally:
        train_log.removeHandler(handler)
        handler.close()
    result = {"stream": stream, "mode": mode, "seed": seed, "epochs": epochs, "uar": report["uar"],
              "accuracy": report["accuracy"], "n_test": report["n"], "best_epoch": report["best_epoch"],
              "seconds": wall}
    done.write_text(json.dumps(result, indent=1))
    return result


def mean_std(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def describe(cs: ClipSet, plan: list[dict], cache: Path) -> str:
    parts = {p: [i for i in plan if i["part"] == p] for p in ("train", "val", "test")}
    counts = {p: len(v) for p, v in parts.items()}
    manifest = read_manifest(cache)
    masked = int((manifest["face_coverage"] < 1).sum())
    lines = [
        "**A constructed development set, not natural video**: every clip is one still FER2013 face moved by a "
        "synthetic trajectory; its expression never changes. Figures on it compare the streams with each other; "
        "they are no measure of accuracy on real talking-face video.",
        "",
        f"- clips: {counts['train']} train + {counts['val']} validation (FER2013 `{cs.train_source}` split, "
        f"{cs.per_class_train} per class, one image each; validation = one of {TRAIN_GROUPS} groups, dealt "
        f"round-robin within each class) and {counts['test']} test (FER2013 `test` split, {cs.per_class_test} per "
        f"class); 7 classes ({', '.join(CLASSES)}); no image is in two clips",
        f"- each clip: {cs.frames} frames over {cs.seconds:g} s, 48 px grey face as RGB crops; motion through three "
        f"key poses (start, middle, end) eased with smoothstep: shift up to ±{cs.shift:g} of the side in x and y, "
        f"rotation up to ±{cs.rotate:g}°, scale 1 ± {cs.scale:g}; brightness gain drifting linearly between two "
        f"values in 1 ± {cs.brightness:g}; borders replicated (cv2.warpAffine); with chance {cs.no_face:g} one "
        f"random frame has no face (masked, zero crop and features): {masked} of {len(manifest)} clips",
        f"- features: the shipped `{cs.encoder}` face encoder (EfficientFace, FER2013-trained on its train split) on "
        "those crops, pooled vectors and 3x3 feature maps, as `avemo-extract --keep-crops --feature-maps` writes "
        "them; no audio",
        f"- images drawn and motion sampled with data seed {cs.data_seed} (the same clips for every run); cache "
        f"`{cache}`",
    ]
    if cs.train_source == "train":
        lines.append("- the encoder was trained on the FER2013 train split, so on the training clips its frozen "
                     "features are of images it fitted; the test clips' images it never saw")
    return "\n".join(lines)


def table(results: list[dict], ref: dict, seeds: list[int], epochs: int) -> str:
    rows = ["| stream | mode | runs | test UAR mean ± std | test WAR mean ± std | best epoch (mean) | s per run |",
            "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["stream"], r["mode"]) for r in results},
                  key=lambda k: (VIDEO_STREAMS.index(k[0]), MODES.index(k[1])))
    for stream, mode in keys:
        rs = [r for r in results if (r["stream"], r["mode"]) == (stream, mode)]
        rows.append(f"| {stream} | {mode} | {len(rs)} | {mean_std([r['uar'] for r in rs])} | "
                    f"{mean_std([r['accuracy'] for r in rs])} | {np.mean([r['best_epoch'] for r in rs]):.1f} | "
                    f"{np.mean([r['seconds'] for r in rs]):.0f} |")
    rows.append(f"| the shipped encoder's own classifier, mean of frame logits | frozen, no training | 1 | "
                f"{ref['uar']:.3f} | {ref['accuracy']:.3f} | | {ref['seconds']:.0f} |")
    note = (f"\n\nSeeds {', '.join(map(str, seeds))} (training only; std with ddof=1 across seeds). {epochs} epochs, "
            "otherwise avemo-train's defaults (AdamW lr 3e-3 one-cycle, batch 32, label smoothing 0.1; e2e: "
            "encoder lr 1e-4, 3 random face frames a clip a step, all at evaluation, the encoder's own crop "
            "augmentation); best.pt by validation UAR, evaluated on the test clips. s per run: wall time of "
            "run_training (data loading, training, evaluation).")
    return "\n".join(rows) + note


def main(argv: list[str] | None = None) -> int:
    d = ClipSet()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fer", required=True, type=Path, help="FER2013 in class folders: train/, validation/, test/")
    p.add_argument("--out", required=True, type=Path, help="work folder: cache, runs, results")
    p.add_argument("--per-class-train", type=int, default=d.per_class_train,
                   help="clips per class from the train source (one in five becomes validation)")
    p.add_argument("--per-class-test", type=int, default=d.per_class_test, help="test clips per class (FER2013 test)")
    p.add_argument("--frames", type=int, default=d.frames, help="frames per clip")
    p.add_argument("--shift", type=float, default=d.shift)
    p.add_argument("--rotate", type=float, default=d.rotate)
    p.add_argument("--scale", type=float, default=d.scale)
    p.add_argument("--brightness", type=float, default=d.brightness)
    p.add_argument("--no-face", type=float, default=d.no_face, help="chance a clip has one frame without a face")
    p.add_argument("--train-source", choices=("train", "validation"), default=d.train_source,
                   help="FER2013 split of the training/validation clips")
    p.add_argument("--data-seed", type=int, default=d.data_seed)
    p.add_argument("--streams", nargs="+", choices=VIDEO_STREAMS, default=["attention", "fan", "stt"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15,
                   help="epochs of every run (an e2e run on the default set takes about 2-3 min on 2 CPU threads)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the CPUs this process may use)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 10 train / 4 test clips per class, 1 epoch, seed 0 (overrides those flags)")
    args = p.parse_args(argv)
    if args.quick:
        args.per_class_train, args.per_class_test, args.epochs, args.seeds = 10, 4, 1, [0]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    threads = set_torch_threads(1, args.threads)

    cs = ClipSet(per_class_train=args.per_class_train, per_class_test=args.per_class_test, frames=args.frames,
                 shift=args.shift, rotate=args.rotate, scale=args.scale, brightness=args.brightness,
                 no_face=args.no_face, train_source=args.train_source, data_seed=args.data_seed)
    encoder = load_encoder(cs.encoder)
    work = args.out / f"clips-{cs.digest()}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "clipset.json").write_text(json.dumps(asdict(cs), indent=1))
    cache, plan = build_cache(args.fer, work / "cache", cs, encoder)
    ref = encoder_reference(cache, plan, encoder)

    results = []
    for stream in args.streams:
        for mode in args.modes:
            for seed in args.seeds:
                r = one_run(cache, work / "runs" / f"{stream}-{mode}-e{args.epochs}-seed{seed}", stream, mode, seed,
                            args.epochs)
                log.info("%s %s seed %d: test UAR %.3f WAR %.3f (best epoch %s) in %.0f s", stream, mode, seed,
                         r["uar"], r["accuracy"], r["best_epoch"], r["seconds"])
                results.append(r)

    text = (f"## Video streams, frozen vs end to end, on a constructed clip set\n\n{describe(cs, plan, cache)}\n\n"
            f"{table(results, ref, args.seeds, args.epochs)}\n\nCPU threads: {threads}.\n")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (work / f"results-{stamp}.md").write_text(text, encoding="utf-8")
    (work / f"results-{stamp}.json").write_text(json.dumps({"clipset": asdict(cs), "reference": ref, "runs": results,
                                                            "threads": threads, "argv": sys.argv[1:]}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
