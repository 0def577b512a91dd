"""Small faces in HD video: what the second look (``ExtractionSettings.small_face_side``) finds and costs,
and how small a face can be before the face expert's answer stops being the full-size face's.

    python benchmarks/bench_small_faces.py [--frames 16] [--repeats 3] [--threads 1]

Table 1: made-up wide shots (the astronaut photo in a grey room, ``tests/mediagen.py``): 1080p and
720p with a small face, a face of the usual size and no one; each extracted with the second look
off (``small_face_side=0``, the baseline) and on (the default), best of ``--repeats`` runs, the
random-weight face encoder of the tests (detection is the cost, not the encoder). Table 2: the
bundled CREMA-D videos (faces about 130 px tall) shrunk into a 1080p frame, faces found on the
second look's terms, and the shipped ``default`` model's face expert on them: how far its
probabilities move from the full-size face's (total variation) and how often its answer stays.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from avemo.encoders import load_encoder  # noqa: E402
from avemo.extraction import ClipExtractor  # noqa: E402
from avemo.faces import FaceDetector, align_face, track_primary_face  # noqa: E402
from avemo.features import ExtractionSettings  # noqa: E402
from avemo.model import load_model  # noqa: E402
from mediagen import moving_face, random_encoder, sampled_frames, tone, write_video  # noqa: E402

SCENES = [("1080p, small face (photo 170 px)", 1080, 1920, 170), ("1080p, usual face (photo 400 px)", 1080, 1920, 400),
          ("1080p, no one", 1080, 1920, 0), ("720p, small face (photo 150 px)", 720, 1280, 150),
          ("720p, no one", 720, 1280, 0)]
SCALES = (1.0, 0.5, 0.35, 0.25, 0.18, 0.13)


def timed_extraction(work: Path, frames: int, repeats: int) -> None:
    enc = random_encoder(work / "enc.pt")
    ways = {"off": ClipExtractor(ExtractionSettings(frames=frames, encoder=str(enc), small_face_side=0), "cpu"),
            "on": ClipExtractor(ExtractionSettings(frames=frames, encoder=str(enc)), "cpu")}
    print(f"| scene ({frames} frames) | second look off: s, frames with a face | on (default): s, frames with a face "
          "| face height px | on / off |")
    print("|---|---|---|---|---:|")
    for name, h, w, side in SCENES:
        n = 2 * frames
        clip = write_video(work / f"{h}_{side}.mp4", moving_face(n, (w // 2, h // 3, side), (w // 2 + 30, h // 3, side),
                                                                  h, w, shown=range(n) if side else range(0)),
                           fps=10, audio=tone(n / 10, 16000))
        best, found, height = {}, {}, ""
        for _ in range(repeats):
            for way, ex in ways.items():        # taking turns: a busy machine disturbs both alike
                t = time.perf_counter()
                f = ex.extract(clip)
                best[way] = min(best.get(way, np.inf), time.perf_counter() - t)
                mask = f.arrays["face_mask"]
                found[way] = int(mask.sum())
                if way == "on" and mask.any():
                    b = f.arrays["boxes"][mask]
                    height = f"{np.median(b[:, 3] - b[:, 1]):.0f}"
        print(f"| {name} | {best['off']:.2f}, {found['off']} | {best['on']:.2f}, {found['on']} | {height or '-'} | "
              f"{best['on'] / best['off']:.2f}x |")


def answers_by_size(frames: int) -> None:
    net, _ = load_model("default")
    enc = load_encoder("default")
    det = FaceDetector("cpu", 20, 0.9, 0.0).for_small_faces()
    det.min_box = 0                             # every face found, to see where answers stop holding
    head = net.fusion.video_head
    clips = sorted((REPO / "examples" / "cremad").glob("*.flv"))
    probs: dict[float, list] = {}
    for clip in clips:
        shots = sampled_frames(clip, frames, 10_000)
        for scale in SCALES:
            canvas = np.full((len(shots), 1080, 1920, 3), 90, np.uint8)
            for i, f in enumerate(shots):
                g = cv2.resize(f, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                canvas[i, 100:100 + g.shape[0], 300:300 + g.shape[1]] = g
            d = det.detect(canvas)
            chosen = track_primary_face(d)
            kept = [(i, j) for i, j in enumerate(chosen) if j >= 0]
            if not kept:
                probs.setdefault(scale, []).append(None)
                continue
            crops = np.stack([align_face(canvas[i], d[i].landmarks[j], 112) for i, j in kept])
            with torch.no_grad():
                p = torch.softmax(head(enc.embed(crops).mean(0)), -1).numpy()
            height = float(np.median([d[i].boxes[j, 3] - d[i].boxes[j, 1] for i, j in kept]))
            probs.setdefault(scale, []).append((height, p))
    full = [r[1] for r in probs[1.0]]
    print("\n| bundled CREMA-D face shrunk by | clips with a face | face height px | total variation from full size "
          "| same answer as full size |")
    print("|---:|---:|---:|---:|---:|")
    for scale in SCALES:
        rows = [(r, f) for r, f in zip(probs[scale], full) if r is not None]
        tv = [0.5 * np.abs(r[1] - f).sum() for r, f in rows]
        same = sum(int(r[1].argmax() == f.argmax()) for r, f in rows)
        print(f"| {scale:g} | {len(rows)}/{len(full)} | {np.mean([r[0] for r, _ in rows]):.0f} | "
              f"{np.mean(tv):.2f} | {same}/{len(rows)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=16, help="frames sampled per clip (default 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        timed_extraction(Path(tmp), args.frames, args.repeats)
    answers_by_size(args.frames)


if __name__ == "__main__":
    main()
