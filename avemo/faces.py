"""Faces: batched MTCNN detection, one primary face tracked over time, five-point alignment."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from avemo.mtcnn import MTCNN

# Canonical positions of eyes, nose tip and mouth corners in a 112 x 112 crop (the
# template used by ArcFace-style alignment); scaled to other crop sizes.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


@dataclass
class Detections:
    """All faces MTCNN found in one frame, best first. K may be 0."""

    boxes: np.ndarray       # [K, 4] x1, y1, x2, y2
    probs: np.ndarray       # [K]
    landmarks: np.ndarray   # [K, 5, 2]

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


class FaceDetector:
    """MTCNN (``avemo.mtcnn``, facenet-pytorch's detector) on batches of equally sized frames."""

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 min_prob: float = 0.9, min_face_frac: float = 0.0):
        self.min_prob = min_prob
        self.min_face_size, self.min_face_frac = min_face_size, min_face_frac
        self.mtcnn = MTCNN(device, min_face_size)

    def detect(self, frames: np.ndarray) -> list[Detections]:
        """``frames``: uint8 RGB [N, H, W, 3] -> faces per frame with probability >= min_prob."""
        if len(frames) == 0:
            return []
        self.mtcnn.min_face_size = max(self.min_face_size, int(self.min_face_frac * min(frames.shape[1:3])))
        return [self._kept(*found) for found in self.mtcnn.detect(frames)]

    def _kept(self, boxes: np.ndarray, probs: np.ndarray, landmarks: np.ndarray) -> Detections:
        keep = probs >= self.min_prob
        order = np.argsort(-probs[keep], kind="stable")
        return Detections(boxes[keep][order], probs[keep][order], landmarks[keep][order])


def track_primary_face(dets: list[Detections], max_jump: float = 0.6,
                       max_scale_change: float = 2.0) -> np.ndarray:
    """Index of the primary person's face in each frame (-1 where that person is not seen).

    Faces are linked over time into tracks: a face continues the track whose last box is
    nearest, if its centre moved less than ``max_jump`` box-sizes and its size changed by
    less than ``max_scale_change`` times. The primary track is the one with the greatest
    sum of probability x sqrt(area): present in the most frames, then largest and surest,
    so a second person who is briefly bigger does not take over.
    """
    tracks: list[dict] = []  # {"box": last box, "members": [(frame, index)], "score": float}
    for i, d in enumerate(dets):
        taken: set[int] = set()
        for j in range(len(d.probs)):
            box = d.boxes[j]
            best, best_dist = None, np.inf
            for t, tr in enumerate(tracks):
                if t in taken:
                    continue
                dist, ratio = _box_motion(tr["box"], box)
                if dist < max_jump and 1 / max_scale_change < ratio < max_scale_change and dist < best_dist:
                    best, best_dist = t, dist
            if best is None:
                tracks.append({"box": box, "members": [], "score": 0.0})
                best = len(tracks) - 1
            taken.add(best)
            tr = tracks[best]
            tr["box"] = box
            tr["members"].append((i, j))
            tr["score"] += float(d.probs[j]) * float(np.sqrt(max(_area(box), 0.0)))
    chosen = np.full(len(dets), -1, dtype=np.int64)
    if tracks:
        primary = max(tracks, key=lambda tr: tr["score"])
        for i, j in primary["members"]:
            chosen[i] = j
    return chosen


def _area(b: np.ndarray) -> float:
    return float((b[2] - b[0]) * (b[3] - b[1]))


def _box_motion(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Centre displacement in units of a's size, and the ratio of b's size to a's."""
    size_a = max(np.sqrt(max(_area(a), 1e-6)), 1e-3)
    size_b = np.sqrt(max(_area(b), 1e-6))
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    return float(np.linalg.norm(cb - ca) / size_a), float(size_b / size_a)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation taking ``src`` points to ``dst``.

    Umeyama (1991), eq. 40-42: R = U S V^T, c = tr(D S) / sigma_src^2, t = mu_dst - c R mu_src.
    Returns the 2 x 3 matrix for ``cv2.warpAffine``.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)                                      # [2, 2]
    u, sv, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1                                           # a reflection is not allowed
    r = u @ sign @ vt
    var_s = (s ** 2).sum() / len(src)
    c = np.trace(np.diag(sv) @ sign) / max(var_s, 1e-12)
    t = mu_d - c * r @ mu_s
    return np.hstack([c * r, t[:, None]])


def align_face(frame: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """Warp ``frame`` so the five ``landmarks`` land on the canonical template; uint8 [size, size, 3]."""
    m = similarity_transform(landmarks, TEMPLATE_112 * (size / 112.0))
    return cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
