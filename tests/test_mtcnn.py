"""avemo.mtcnn gives facenet-pytorch's MTCNN.detect results without importing facenet-pytorch."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import avemo.mtcnn
from avemo.mtcnn import MTCNN, batched_nms, batched_nms_min, nms
from mediagen import astronaut, sampled_frames, two_faces

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
CLIPS = sorted((REPO / "examples" / "cremad").glob("1001_DFA_*_XX.flv"))


@pytest.fixture(scope="module")
def facenet():
    from facenet_pytorch import MTCNN as FacenetMTCNN
    cache = {}

    def detector(min_face_size):
        if min_face_size not in cache:
            cache[min_face_size] = FacenetMTCNN(keep_all=True, select_largest=False,
                                                min_face_size=min_face_size).eval()
        return cache[min_face_size]
    return detector


def assert_same_detections(frames, min_face_size, facenet) -> list[int]:
    boxes, probs, points = facenet(min_face_size).detect(frames, landmarks=True)
    ours = MTCNN(min_face_size=min_face_size).detect(frames)
    counts = []
    for i, (b, p, l) in enumerate(ours):
        counts.append(len(b))
        if boxes[i] is None:
            assert len(b) == len(p) == len(l) == 0, f"frame {i}: faces where facenet-pytorch finds none"
            continue
        assert len(b) == len(boxes[i]), f"frame {i}: {len(b)} faces, facenet-pytorch {len(boxes[i])}"
        # the same arithmetic in the same order: equal to float precision, in the same order
        np.testing.assert_allclose(b, np.asarray(boxes[i], np.float32), rtol=0, atol=1e-3)
        np.testing.assert_allclose(l, np.asarray(points[i], np.float32), rtol=0, atol=1e-3)
        np.testing.assert_allclose(p, np.asarray(probs[i], np.float32), rtol=0, atol=1e-6)
    return counts


@pytest.mark.parametrize("clip", CLIPS, ids=lambda p: p.stem)
def test_bundled_clips_give_facenets_faces(clip, facenet):
    frames = sampled_frames(clip, 4)
    # the smallest face extraction asks for at this size (min_face_frac 0.08), and the default
    for size in (int(0.08 * min(frames.shape[1:3])), 20):
        assert assert_same_detections(frames, size, facenet) == [1] * len(frames)


def test_two_faces_and_no_face(facenet, monkeypatch):
    sizes = []
    spied = avemo.mtcnn.batched_nms
    monkeypatch.setattr(avemo.mtcnn, "batched_nms", lambda b, *a: sizes.append(len(b)) or spied(b, *a))
    frames = np.stack(two_faces(16, size=320))   # one face, then two
    assert assert_same_detections(frames, 20, facenet) == [1] * 8 + [2] * 8
    assert max(sizes) > 1000                     # torchvision's other batched NMS was followed too
    rng = np.random.default_rng(0)
    blank = np.stack([np.full((180, 240, 3), 90, np.uint8),
                      rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)])
    assert assert_same_detections(blank, 20, facenet) == [0, 0]
    assert assert_same_detections(astronaut(200)[None], 20, facenet) == [1]


def test_a_frame_smaller_than_the_smallest_face_has_none():
    # facenet-pytorch fails here (no pyramid scale at all)
    (b, p, l), = MTCNN(min_face_size=20).detect(np.full((1, 16, 40, 3), 90, np.uint8))
    assert b.shape == (0, 4) and p.shape == (0,) and l.shape == (0, 5, 2)


def test_refine_finds_the_face_from_a_nearby_box():
    frame = astronaut(256)[None]
    det = MTCNN(min_face_size=20)
    (box, prob, marks), = det.detect(frame)
    x1, y1, x2, y2 = box[0]
    side = max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2 + 0.1 * side, (y1 + y2) / 2 - 0.05 * side
    guess = [[cx - 0.55 * side, cy - 0.55 * side, cx + 0.55 * side, cy + 0.55 * side]]
    (b, p, l), = det.refine(frame, guess, [0])
    assert len(b) == 1 and p[0] > 0.99
    assert np.abs(l - marks).max() < 3
    # boxes wholly outside the frame are dropped, not a failure
    (b, p, l), = det.refine(frame, [[-500, -500, -400, -400], [1000, 10, 1100, 110]], [0, 0])
    assert len(b) == len(p) == len(l) == 0


def _brute_force_nms(boxes, scores, threshold, overlap):
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])       # stable: ties in input order
    kept = []
    for i in order:
        if all(overlap(boxes[i], boxes[k]) <= threshold for k in kept):
            kept.append(i)
    return kept


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _over_min(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    return w * h / min((a[2] - a[0] + 1) * (a[3] - a[1] + 1), (b[2] - b[0] + 1) * (b[3] - b[1] + 1))


def _random_boxes(rng, n, frames):
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
    return boxes, torch.tensor(rng.random(n), dtype=torch.float32), torch.tensor(rng.integers(0, frames, n))


@pytest.mark.parametrize("n", [0, 1, 300, 1200])     # 1200: past torchvision's switch to per-frame NMS
def test_nms_matches_brute_force(n):
    rng = np.random.default_rng(n)
    boxes, scores, inds = _random_boxes(rng, n, frames=3)
    b, s = boxes.double().tolist(), scores.double().tolist()
    for thr in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, thr).tolist() == _brute_force_nms(b, s, thr, _iou)
        expected, expected_min = [], []
        for f in range(3):
            rows = np.flatnonzero(inds.numpy() == f)
            bf, sf = [b[r] for r in rows], [s[r] for r in rows]
            expected += [rows[k] for k in _brute_force_nms(bf, sf, thr, _iou)]
            expected_min += [rows[k] for k in _brute_force_nms(bf, sf, thr, _over_min)]
        keep = batched_nms(boxes, scores, inds, thr)
        assert sorted(keep.tolist()) == sorted(expected) and bool((scores[keep].diff() <= 0).all())
        assert sorted(batched_nms_min(boxes, scores, inds, thr).tolist()) == sorted(expected_min)


def test_nms_matches_torchvision_ties_included():
    from torchvision.ops import batched_nms as tv_batched_nms
    rng = np.random.default_rng(1)
    for n in (50, 999, 1001, 3000):
        boxes, scores, inds = _random_boxes(rng, n, frames=4)
        boxes = boxes.round()                            # PNet's boxes are whole pixels
        scores = (scores * 8).round() / 8                # many exact ties
        for thr in (0.5, 0.7):
            assert torch.equal(batched_nms(boxes, scores, inds, thr), tv_batched_nms(boxes, scores, inds, thr))


def test_missing_weights_say_how_to_install(monkeypatch):
    monkeypatch.setattr(avemo.mtcnn.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install facenet-pytorch==2\.5\.3"):
        MTCNN()


def test_importing_extraction_leaves_out_facenet_and_torchvision():
    code = ("import sys, avemo.extraction, avemo.predict_cli; print([m for m in sys.modules "
            "if m.split('.')[0] in ('facenet_pytorch', 'torchvision') or m.startswith('torch._dynamo')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
