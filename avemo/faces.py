"""Faces: batched MTCNN detection, one primary face tracked over time, five-point alignment."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from avemo.mtcnn import MTCNN

# Canonical positions of eyes, nose tip and mouth corners in a 112 x 112 crop (the
# template used by ArcFace-style alignment); scaled to other crop sizes.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
# With tracking, the full detector still runs on one frame in this many (and wherever a face
# is lost), so that a face coming into the picture is found within that many frames.
KEYFRAME_INTERVAL = 8
# A followed face is the same face when its box overlaps the box of the frame before by this
# much; within a batched run of frames (``FaceDetector._follow_run``) each must overlap the
# run's starting box by the stricter RUN_IOU, or it is followed again from the frame before.
FOLLOW_IOU = 0.3
RUN_IOU = 0.6
# A second look at a faceless video (avemo.extraction) searches its frames at up to
# ExtractionSettings.small_face_side (1920) px for faces down to SMALL_FACE_PX (MTCNN's smallest window; it boxes faces tighter, down to about
# 0.6 of it) and keeps those whose box is at least SMALL_FACE_KEEP tall. Measured on the
# bundled CREMA-D videos shrunk into a 1080p frame, the face expert's answer stayed that of the
# full-size face (130 px) for all 6 down to 32 px boxes, and for 2 of 6 at 23 px; MTCNN's cost
# on a 1920 px frame at this window is about 7x that of the usual 640 px look.
SMALL_FACE_PX = 32
SMALL_FACE_KEEP = 28


@dataclass
class Detections:
    """All faces MTCNN found in one frame, best first. K may be 0."""

    boxes: np.ndarray       # [K, 4] x1, y1, x2, y2
    probs: np.ndarray       # [K]
    landmarks: np.ndarray   # [K, 5, 2]

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


@dataclass
class FaceTrack:
    """What detection carries from one batch of a clip's frames to the next (one per clip)."""

    faces: Detections = field(default_factory=Detections.empty)   # in the last frame seen
    shape: tuple[int, ...] = ()     # the size of the frames those faces are in
    frames: int = 0                 # frames seen so far
    full: int = 0                   # of which the full detector ran on


class FaceDetector:
    """MTCNN (``avemo.mtcnn``, facenet-pytorch's detector) on batches of equally sized frames."""

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 min_prob: float = 0.9, min_face_frac: float = 0.0,
                 keyframe_interval: int = KEYFRAME_INTERVAL):
        self.min_prob = min_prob
        self.min_face_size, self.min_face_frac = min_face_size, min_face_frac
        self.keyframe_interval = keyframe_interval
        self.min_box = 0                # faces boxed smaller than this (pixels, taller side) are not kept
        self.mtcnn = MTCNN(device, min_face_size)

    def for_small_faces(self) -> "FaceDetector":
        """This detector (the same MTCNN) looking for faces down to ``SMALL_FACE_PX``, whatever the frame size."""
        small = copy.copy(self)
        small.min_face_size, small.min_face_frac, small.min_box = SMALL_FACE_PX, 0.0, SMALL_FACE_KEEP
        return small

    def smallest_face(self, shape: tuple[int, ...]) -> int:
        """The smallest face side (pixels) looked for in frames of ``shape`` ([H, W, ...])."""
        return max(self.min_face_size, int(self.min_face_frac * min(shape[:2])))

    def detect(self, frames: np.ndarray, track: FaceTrack | None = None) -> list[Detections]:
        """``frames``: uint8 RGB [N, H, W, 3] -> faces per frame with probability >= min_prob.

        With ``track`` the frames are the next ones of a clip, in time order. The full
        detector (the image pyramid and the many candidates it proposes: nearly all the
        cost) then runs only on every ``keyframe_interval``-th frame of the clip; on the
        others the last two MTCNN stages look again where the faces of the frame before
        were. A frame with no face before it, or where a face followed is not found again
        (probability under min_prob, moved too far, or smaller than the smallest face
        looked for), gets the full detector too. A face coming into view is found at the
        next keyframe, or as soon as the faces followed are lost.
        """
        if len(frames) == 0:
            return []
        self.mtcnn.min_face_size = self.smallest_face(frames.shape[1:])
        if track is None:
            return [self._kept(*found) for found in self.mtcnn.detect(frames)]
        if track.shape != frames.shape[1:]:
            track.faces, track.shape = Detections.empty(), frames.shape[1:]
        keys = [i for i in range(len(frames)) if (track.frames + i) % self.keyframe_interval == 0]
        out = dict(zip(keys, self.detect(frames[keys]))) if keys else {}     # batched: cheaper on a GPU
        track.full += len(keys)
        i = 0
        while i < len(frames):
            if i in out:
                track.faces = out[i]
                i += 1
                continue
            start, stop = i, min([k for k in keys if k > i] + [len(frames)])
            for found in self._follow_run(frames[i:stop], track.faces):
                out[i] = track.faces = found
                i += 1
            if i < stop:            # lost, or moved away from where the run looked
                # from the frame before, unless that is where the run started (then it is lost)
                found = self._follow(frames[i], track.faces) if i > start else None
                if found is None:
                    found = self.detect(frames[i:i + 1])[0]
                    track.full += 1
                out[i] = track.faces = found
                i += 1
        track.frames += len(frames)
        return [out[i] for i in range(len(frames))]

    def _follow_run(self, frames: np.ndarray, before: Detections) -> list[Detections]:
        """The faces in each of ``frames`` near those ``before`` (the frame before the first),
        all looked for in one batch; stops before the first frame where a face is lost or has
        moved from where it was looked for.

        One batched call of the last two stages costs little more than one frame's, and a
        talking face mostly stays put. The first frame is followed from the frame right before
        it (as ``_follow`` would); a later one is kept only while its faces still overlap
        ``before`` closely (IoU > ``RUN_IOU``), so that a moving face is followed frame by frame
        from where it last was and never from a stale place.
        """
        if not len(before.probs) or not len(frames):
            return []
        n, m = len(frames), len(before.probs)
        found = self.mtcnn.refine(frames, np.tile(_squares(before.boxes), (n, 1)), np.repeat(np.arange(n), m))
        out = []
        for k, faces in enumerate(found):
            kept = self._checked(self._kept(*faces), before, FOLLOW_IOU if k == 0 else RUN_IOU)
            if kept is None:
                break
            out.append(kept)
        return out

    def _follow(self, frame: np.ndarray, before: Detections) -> Detections | None:
        """The faces in ``frame`` near those of the frame ``before``; None if one is lost."""
        if not len(before.probs):
            return None
        found = self.mtcnn.refine(frame[None], _squares(before.boxes), np.zeros(len(before.probs)))[0]
        return self._checked(self._kept(*found), before, FOLLOW_IOU)

    def _checked(self, found: Detections, before: Detections, min_iou: float) -> Detections | None:
        """``found`` if it holds each face ``before`` again (IoU > min_iou) at a size looked for."""
        sides = np.maximum(found.boxes[:, 2] - found.boxes[:, 0], found.boxes[:, 3] - found.boxes[:, 1])
        smallest = self.min_box or self.mtcnn.min_face_size
        if (sides < smallest).any() or not _each_found_again(before.boxes, found.boxes, min_iou):
            return None
        return found

    def _kept(self, boxes: np.ndarray, probs: np.ndarray, landmarks: np.ndarray) -> Detections:
        keep = probs >= self.min_prob
        if self.min_box:
            keep &= np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= self.min_box
        order = np.argsort(-probs[keep], kind="stable")
        return Detections(boxes[keep][order], probs[keep][order], landmarks[keep][order])


def _squares(boxes: np.ndarray) -> np.ndarray:
    """Each box as a square on its longer side about the same centre: the shape MTCNN's
    refinement stages are given."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = np.max(boxes[:, 2:] - boxes[:, :2], axis=1, keepdims=True) / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def _each_found_again(before: np.ndarray, after: np.ndarray, min_iou: float = 0.3) -> bool:
    """Whether every box ``before`` has a box of its own ``after`` that overlaps it (IoU > min_iou)."""
    lo = np.maximum(before[:, None, :2], after[None, :, :2])
    hi = np.minimum(before[:, None, 2:], after[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_b = np.prod(before[:, 2:] - before[:, :2], axis=1)
    area_a = np.prod(after[:, 2:] - after[:, :2], axis=1)
    iou = inter / (area_b[:, None] + area_a[None, :] - inter)
    taken: set[int] = set()
    for row in iou:
        match = next((j for j in np.argsort(-row) if row[j] > min_iou and j not in taken), None)
        if match is None:
            return False
        taken.add(match)
    return True


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
