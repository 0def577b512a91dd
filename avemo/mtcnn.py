"""MTCNN face detection (Zhang et al., 2016) as facenet-pytorch 2.5.3 runs it, without importing it.

Importing facenet-pytorch imports torchvision (for one NMS call) and through it torch._dynamo:
more than a second of every start-up. This module rebuilds its three networks with the same
layers and parameter names, loads facenet-pytorch's own weight files from the installed
package's folder, and repeats its ``detect_face``: the same image pyramid, thresholds, box
arithmetic, memory layouts and NMS, ties included, so boxes, probabilities and landmarks come
out as ``facenet_pytorch.MTCNN.detect`` gives them (tests/test_mtcnn.py holds it to that).

``MTCNN.refine`` runs only the last two stages on boxes the caller proposes, such as where a
face was one frame earlier: the image pyramid that the first stage scans is most of the cost.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

THRESHOLDS = (0.6, 0.7, 0.7)    # minimum face probability after each stage
FACTOR = 0.709                  # scale step of the image pyramid (an area ratio of 1/2)
NET_BATCH = 512                 # facenet-pytorch runs RNet and ONet in chunks of this size


class PNet(nn.Module):
    """Proposal net: a fully convolutional 12 x 12 face / not-face classifier with box offsets."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement net on 24 x 24 crops."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # the dense weights were converted from TensorFlow, which flattens width-major
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).contiguous().flatten(1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net on 48 x 48 crops: probability, box offsets and five landmarks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).contiguous().flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def weights_dir() -> Path:
    """facenet-pytorch's ``data`` folder, found without importing the package (see the module doc)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    roots = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(roots[0]) / "data" if roots else None
    missing = [n for n in ("pnet.pt", "rnet.pt", "onet.pt") if folder is None or not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MTCNN weights not found ({', '.join(missing)} in facenet-pytorch's data folder"
            f"{f' {folder}' if folder else ''}); install them with: pip install facenet-pytorch==2.5.3 "
            "(or pip install --no-deps facenet-pytorch==2.5.3 to keep your torch)")
    return folder


def load_nets(device: str | torch.device = "cpu") -> tuple[PNet, RNet, ONet]:
    folder = weights_dir()
    nets = []
    for name, net in (("pnet", PNet()), ("rnet", RNet()), ("onet", ONet())):
        net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
        nets.append(net.to(device).eval())
    return tuple(nets)


class MTCNN:
    """The three-stage detector on batches of equally sized uint8 RGB frames [N, H, W, 3].

    ``detect`` and ``refine`` return, per frame, ``(boxes [K, 4] x1 y1 x2 y2, probs [K],
    landmarks [K, 5, 2])`` as float32 numpy arrays, in facenet-pytorch's order (surest first).
    """

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = THRESHOLDS, factor: float = FACTOR):
        self.device = torch.device(device)
        self.min_face_size, self.thresholds, self.factor = min_face_size, thresholds, factor
        self.pnet, self.rnet, self.onet = load_nets(self.device)

    def _images(self, frames) -> torch.Tensor:
        # resampling is faster from planar (NCHW) frames than from the channels-last view that
        # facenet-pytorch resamples, and sums in the same order: the same numbers come out
        imgs = torch.as_tensor(np.asarray(frames), device=self.device)
        return imgs.permute(0, 3, 1, 2).to(torch.float32).contiguous()

    @torch.no_grad()
    def detect(self, frames) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every face in each frame: the image pyramid, then the two refinement stages."""
        imgs = self._images(frames)
        boxes, inds = self._propose(imgs)
        return self._refined(imgs, boxes, inds)

    @torch.no_grad()
    def refine(self, frames, boxes, image_inds) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Faces found by the last two stages (RNet, then ONet) from candidate ``boxes`` [M, 4]
        (frame pixels, ideally square) in frames ``image_inds`` [M]; the pyramid is skipped."""
        imgs = self._images(frames)
        boxes = torch.as_tensor(np.asarray(boxes, np.float32), device=self.device).reshape(-1, 4)
        boxes = torch.cat([boxes, torch.zeros_like(boxes[:, :1])], dim=1)   # score column, unused
        inds = torch.as_tensor(np.asarray(image_inds, np.int64), device=self.device).reshape(-1)
        return self._refined(imgs, boxes, inds)

    def scales(self, h: int, w: int) -> list[float]:
        """The pyramid: the smallest face wanted is scaled to PNet's 12 pixels, then in steps of ``factor``."""
        m = 12.0 / self.min_face_size
        minl = min(h, w) * m
        out, scale = [], m
        while minl >= 12:
            out.append(scale)
            scale, minl = scale * self.factor, minl * self.factor
        return out

    def _propose(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage one: PNet over the pyramid -> square candidate boxes [M, 5] and their frames [M]."""
        h, w = imgs.shape[2:4]
        # a frame smaller than the smallest face has no scales (facenet-pytorch fails on it)
        boxes, inds = [imgs.new_zeros((0, 9))], [torch.zeros(0, dtype=torch.int64, device=imgs.device)]
        for scale in self.scales(h, w):
            im = F.interpolate(imgs, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            # facenet-pytorch's PNet input is channels-last (see _images), and convolutions round
            # differently by layout
            im = im.contiguous(memory_format=torch.channels_last)
            reg, probs = self.pnet((im - 127.5) * 0.0078125)
            b, i = _cells_to_boxes(reg, probs[:, 1], scale, self.thresholds[0])
            pick = batched_nms(b[:, :4], b[:, 4], i, 0.5)
            boxes.append(b[pick])
            inds.append(i[pick])
        boxes, inds = torch.cat(boxes), torch.cat(inds)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds = boxes[pick], inds[pick]
        # PNet's offsets are in units of the cell's size without the +1 that bbreg uses
        regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                             boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh,
                             boxes[:, 4]], dim=1)
        return _square(boxes), inds

    def _refined(self, imgs, boxes, inds):
        """Stages two and three from square candidates, then the per-frame lists."""
        points = torch.zeros(0, 5, 2, device=self.device)
        if len(boxes):
            crops, boxes, inds = _crops(imgs, boxes, inds, 24)
            reg, probs = _run(self.rnet, crops)
            score = probs[:, 1]
            ok = score > self.thresholds[1]
            boxes, inds, reg = torch.cat([boxes[ok, :4], score[ok, None]], dim=1), inds[ok], reg[ok]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
            boxes = _square(_bbreg(boxes[pick], reg[pick]))
            inds = inds[pick]
        if len(boxes):
            crops, boxes, inds = _crops(imgs, boxes, inds, 48)
            reg, marks, probs = _run(self.onet, crops)
            score = probs[:, 1]
            ok = score > self.thresholds[2]
            boxes, inds, reg, marks = (torch.cat([boxes[ok, :4], score[ok, None]], dim=1), inds[ok],
                                       reg[ok], marks[ok])
            # landmarks are fractions of the ONet crop (the box before its own regression)
            bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
            bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
            px = bw * marks[:, :5] + boxes[:, 0, None] - 1
            py = bh * marks[:, 5:] + boxes[:, 1, None] - 1
            points = torch.stack([px, py], dim=2)
            boxes = _bbreg(boxes, reg)
            pick = batched_nms_min(boxes[:, :4], boxes[:, 4], inds, 0.7)
            boxes, inds, points = boxes[pick], inds[pick], points[pick]
        boxes, points, inds = boxes.cpu().numpy(), points.cpu().numpy(), inds.cpu().numpy()
        return [(boxes[inds == i, :4], boxes[inds == i, 4], points[inds == i]) for i in range(len(imgs))]


def _run(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    outs = [net(x[i:i + NET_BATCH]) for i in range(0, max(len(x), 1), NET_BATCH)]
    return tuple(torch.cat(o) for o in zip(*outs))


def _cells_to_boxes(reg, probs, scale: float, threshold: float):
    """PNet cells at or above ``threshold`` -> [M, 9] boxes (x1 y1 x2 y2 score, 4 offsets) in
    frame pixels, and their frame indices. A cell is a 12-pixel window at stride 2."""
    mask = probs >= threshold
    where = mask.nonzero()
    reg = reg.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
    xy = where[:, 1:].to(reg.dtype).flip(1)
    q1 = ((2 * xy + 1) / scale).floor()
    q2 = ((2 * xy + 12) / scale).floor()
    return torch.cat([q1, q2, probs[mask].unsqueeze(1), reg], dim=1), where[:, 0]


def _bbreg(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Shift box edges by offsets in units of the box size (the +1 pixel convention)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    edges = torch.stack([boxes[:, 0] + reg[:, 0] * w, boxes[:, 1] + reg[:, 1] * h,
                         boxes[:, 2] + reg[:, 2] * w, boxes[:, 3] + reg[:, 3] * h], dim=1)
    return torch.cat([edges, boxes[:, 4:]], dim=1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Each box grown to a square on its longer side, about the same centre (``rerec``)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.cat([torch.stack([x1, y1, x1 + side, y1 + side], dim=1), boxes[:, 4:]], dim=1)


def _crops(imgs, boxes, inds, size: int):
    """Each box's pixels (clipped to the frame, whole pixels) resampled to ``size`` x ``size``,
    normalised; boxes wholly outside their frame are dropped (with their rows of ``boxes``)."""
    h, w = imgs.shape[2:4]
    b = boxes[:, :4].trunc().int().cpu()
    x, y = b[:, 0].clamp(min=1), b[:, 1].clamp(min=1)
    ex, ey = b[:, 2].clamp(max=w), b[:, 3].clamp(max=h)
    ok = (ey > y - 1) & (ex > x - 1)
    # facenet-pytorch skips the crop but keeps the box, misaligning boxes and crops (it then
    # fails); here both go
    rows = ok.nonzero()[:, 0]
    x, y, ex, ey, frame = x.tolist(), y.tolist(), ex.tolist(), ey.tolist(), inds.tolist()
    crops = [F.interpolate(imgs[frame[k], :, y[k] - 1:ey[k], x[k] - 1:ex[k]].unsqueeze(0),
                           size=(size, size), mode="area") for k in rows.tolist()]
    crops = torch.cat(crops) if crops else imgs.new_zeros((0, 3, size, size))
    if not bool(ok.all()):
        rows = rows.to(boxes.device)
        boxes, inds = boxes[rows], inds[rows]
    return (crops - 127.5) * 0.0078125, boxes, inds


# ---- non-maximum suppression, as facenet-pytorch gets it from torchvision and from numpy ----

def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision's ``nms``: visit boxes by score (stable sort, ties in input order); keep a box
    unless one kept before overlaps it with IoU > ``threshold``. Indices kept, best first."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores.cpu(), descending=True, stable=True)[1].numpy()
    return torch.from_numpy(_greedy(boxes.cpu().numpy(), order, threshold, union=True))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, inds: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision's ``batched_nms`` on the CPU: NMS within each frame, result ordered by score.

    torchvision switches method at 1000 boxes and the two round differently (one offsets
    each frame's coordinates so that frames never overlap, which costs float precision):
    both are followed, so that IoUs right at the threshold are decided as there.
    """
    device = boxes.device
    boxes, scores, inds = boxes.cpu(), scores.cpu(), inds.cpu()
    if boxes.numel() == 0:
        keep = torch.zeros(0, dtype=torch.int64)
    elif boxes.numel() > 4000:
        kept = torch.zeros(len(boxes), dtype=torch.bool)
        for i in torch.unique(inds):
            rows = torch.where(inds == i)[0]
            kept[rows[nms(boxes[rows], scores[rows], threshold)]] = True
        keep = torch.where(kept)[0]
        keep = keep[scores[keep].sort(descending=True)[1]]
    else:
        keep = nms(boxes + _frame_offsets(boxes, inds), scores, threshold)
    return keep.to(device)


def batched_nms_min(boxes: torch.Tensor, scores: torch.Tensor, inds: torch.Tensor, threshold: float) -> torch.Tensor:
    """facenet-pytorch's final NMS (its ``batched_nms_numpy`` with "Min"): overlap is the
    intersection over the smaller box, areas count pixels inclusively (+1), and ties are visited
    in numpy's ``argsort`` order, reversed."""
    device = boxes.device
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    boxes, scores, inds = boxes.cpu(), scores.cpu(), inds.cpu()
    order = np.argsort(scores.numpy())[::-1]
    keep = _greedy((boxes + _frame_offsets(boxes, inds)).numpy(), order, threshold, union=False)
    return torch.from_numpy(keep).to(device)


def _frame_offsets(boxes: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
    return (inds.to(boxes) * (boxes.max() + 1))[:, None]


def _greedy(boxes: np.ndarray, order: np.ndarray, threshold: float, union: bool) -> np.ndarray:
    """Greedy suppression over float32 ``boxes`` visited in ``order``; each step compares the
    best remaining box with all the others at once. The arithmetic is the references', in their
    order of operations, so the same overlaps come out to the last bit."""
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[order, k]) for k in range(4))
    one = np.float32(0 if union else 1)
    area = (x2 - x1 + one) * (y2 - y1 + one)
    zero = np.float32(0)
    left = np.arange(len(order))
    keep = []
    while len(left):
        i, rest = left[0], left[1:]
        keep.append(i)
        w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one)
        h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one)
        inter = w * h
        overlap = inter / (area[i] + area[rest] - inter) if union else inter / np.minimum(area[i], area[rest])
        left = rest[overlap <= threshold]
    return np.asarray(order, np.int64)[keep]
