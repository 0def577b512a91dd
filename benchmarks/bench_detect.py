"""Face detection time per frame: facenet-pytorch's MTCNN, avemo.mtcnn, and avemo with tracking.

    python benchmarks/bench_detect.py [PATH ...] [--frames 16] [--repeats 3] [--threads 1]

PATH: video files (default: the bundled examples/cremad/*.flv). Each clip's frames are
sampled and shrunk as extraction does (``--frames`` a clip, long side at most
``detect_max_side``) and detected as one batch, as ``ClipExtractor`` does with its default
``batch_frames``. The three ways take turns ``--repeats`` times and the best time of each is
kept, so a busy machine disturbs the comparison less. facenet-pytorch is imported only here,
as the reference.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from avemo.faces import FaceDetector, FaceTrack  # noqa: E402
from avemo.features import ExtractionSettings  # noqa: E402
from avemo.mtcnn import MTCNN  # noqa: E402
from mediagen import sampled_frames  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", help="video files (default: the bundled CREMA-D clips)")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per clip (default 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from facenet_pytorch import MTCNN as FacenetMTCNN

    s = ExtractionSettings()
    paths = args.paths or sorted((REPO / "examples" / "cremad").glob("*.flv"))
    clips = [sampled_frames(path, args.frames, s.detect_max_side) for path in paths]
    n_frames = sum(len(c) for c in clips)
    sizes = {max(s.min_face_size, int(s.min_face_frac * min(c.shape[1:3]))) for c in clips}
    if len(sizes) > 1:
        sys.exit("clips of different sizes: give them one run each")
    min_face = sizes.pop()
    facenet = FacenetMTCNN(keep_all=True, select_largest=False, min_face_size=min_face).eval()
    ours = MTCNN("cpu", min_face)
    detector = FaceDetector("cpu", s.min_face_size, s.min_face_prob, s.min_face_frac)
    ways = {
        "facenet-pytorch MTCNN.detect": lambda c: facenet.detect(c, landmarks=True),
        "avemo.mtcnn MTCNN.detect": ours.detect,
        "avemo FaceDetector, tracking": lambda c: detector.detect(c, FaceTrack()),
    }
    for way in ways.values():                       # warm up
        way(clips[0][:2])
    best = {name: np.inf for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            t = time.perf_counter()
            for c in clips:
                way(c)
            best[name] = min(best[name], time.perf_counter() - t)
    h, w = clips[0].shape[1:3]
    print(f"{len(clips)} clips x {args.frames} frames of {w}x{h}, min face {min_face} px, "
          f"{args.threads} thread(s), best of {args.repeats}")
    base = best["facenet-pytorch MTCNN.detect"]
    for name, t in best.items():
        print(f"  {name:32s} {1000 * t / n_frames:6.1f} ms/frame   x{base / t:.2f}")


if __name__ == "__main__":
    main()
