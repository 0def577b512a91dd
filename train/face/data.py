"""Class-folder image trees (FER2013, RAF-DB, AffectNet exports) decoded once into memory.

Layout: ``ROOT/<class>/<image>`` for one split, ``DATA_DIR/{train,validation,test}/...``
for a dataset. Class names come from the folder names. Images may be grey or colour and
of any size; each is converted once by the encoder's own ``to_model_pixels`` into a
uint8 tensor, so training augments tensors in batches and never touches the disk again.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from avemo.encoders import to_model_pixels

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"validation": ("validation", "val"), "train": ("train",), "test": ("test",)}


class DataError(ValueError):
    """A dataset folder that cannot be used as given, with the reason."""


@dataclass
class ImageSet:
    pixels: torch.Tensor        # [N, C, S, S] uint8, already in the encoder's input contract
    labels: torch.Tensor        # [N] int64 indices into ``classes``
    classes: list[str]
    skipped: list[str]          # files that were not readable images

    def __len__(self) -> int:
        return len(self.labels)


def find_split(data_dir: str | Path, split: str) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory")
    for name in SPLIT_ALIASES[split]:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise DataError(f"{data_dir}: missing the '{split}' split: expected a folder {data_dir / split} "
                    f"with one sub-folder per class (layout DATA_DIR/{{{','.join(SPLITS)}}}/<class>/<image>)")


def class_folders(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root}: empty folder: expected one sub-folder per class with images inside")
    return names


def decode_image(path: Path) -> np.ndarray | None:
    """RGB uint8 [H, W, 3], or None when the file is not a readable image."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if raw.size == 0:
        return None
    img = cv2.imdecode(raw, cv2.IMREAD_COLOR)   # grey files come back with 3 equal channels
    if img is None or img.ndim != 3 or min(img.shape[:2]) < 1:
        return None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image_folder(root: str | Path, size: int, grayscale: bool, classes: list[str] | None = None) -> ImageSet:
    """Decode ``root/<class>/*`` into the encoder's input contract.

    ``classes`` fixes the label order (e.g. the training split's); every class folder
    found must be one of them. Unreadable files are skipped, counted and named in a
    warning; a class folder without any readable image is an error.
    """
    root = Path(root)
    found = class_folders(root)
    if classes is None:
        classes = found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{root}: class folder(s) {', '.join(unknown)} not among the known classes "
                        f"({', '.join(classes)})")
    pixels, labels, skipped = [], [], []
    stray = [p for p in root.iterdir() if p.is_file()]
    skipped += [str(p) for p in stray]
    for name in found:
        files = sorted(p for p in (root / name).iterdir() if p.is_file())
        images = []
        for f in files:
            img = decode_image(f)
            if img is None:
                skipped.append(str(f))
            else:
                images.append(img)
        if not images:
            raise DataError(f"{root / name}: class '{name}' has no readable images"
                            + (f" ({len(files)} file(s), none decodable)" if files else " (empty folder)"))
        pixels.append(_convert(images, size, grayscale))
        labels.append(torch.full((len(images),), classes.index(name), dtype=torch.int64))
    if skipped:
        shown = ", ".join(skipped[:5]) + (f", ... ({len(skipped) - 5} more)" if len(skipped) > 5 else "")
        warnings.warn(f"{root}: skipped {len(skipped)} file(s) that are not readable images: {shown}",
                      stacklevel=2)
    return ImageSet(torch.cat(pixels), torch.cat(labels), list(classes), skipped)


def _convert(images: list[np.ndarray], size: int, grayscale: bool) -> torch.Tensor:
    if all(im.shape == images[0].shape for im in images):
        out = [to_model_pixels(np.stack(images[i:i + 4096]), size, grayscale) for i in range(0, len(images), 4096)]
        return torch.cat(out)
    return to_model_pixels(images, size, grayscale)


def read_dataset(data_dir: str | Path, size: int, grayscale: bool) -> dict[str, ImageSet]:
    """The three splits; validation and test use the training split's class order."""
    roots = {s: find_split(data_dir, s) for s in SPLITS}
    train = read_image_folder(roots["train"], size, grayscale)
    out = {"train": train}
    for s in ("validation", "test"):
        out[s] = read_image_folder(roots[s], size, grayscale, classes=train.classes)
    return out
