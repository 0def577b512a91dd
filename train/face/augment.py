"""Face-appropriate augmentation on whole batches of tensors (CPU or GPU).

Faces are upright and roughly centred, so the geometry is gentle: a mirror image, a
small rotation, scale and shift (one affine warp per image), then photometric jitter
and random erasing (occlusion by hands, glasses, hair is common in the wild).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5            # probability of a horizontal mirror
    rotate: float = 15.0         # degrees, uniform in [-rotate, rotate]
    scale: float = 0.15          # zoom uniform in [1 - scale, 1 + scale]
    shift: float = 0.10          # translation as a fraction of the side
    brightness: float = 0.25     # multiplicative jitter, fraction
    contrast: float = 0.25       # contrast jitter around the image mean, fraction
    erase: float = 0.5           # probability of erasing one random rectangle
    erase_area: tuple[float, float] = (0.02, 0.20)


def augment(pixels: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B, C, S, S] -> float32 [B, C, S, S] in 0..255, randomly transformed."""
    x = pixels.float()
    b, dev = x.shape[0], x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand((b, *shape), generator=gen, device="cpu").to(dev) * (hi - lo) + lo

    # one affine matrix per image: mirror * rotation * zoom, plus shift (normalised coords)
    angle = u(-cfg.rotate, cfg.rotate) * (math.pi / 180)
    zoom = 1.0 / u(1 - cfg.scale, 1 + cfg.scale)                  # sampling grid shrinks = image grows
    mirror = torch.where(u(0, 1) < cfg.flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([
        torch.stack([cos * mirror, -sin, u(-cfg.shift, cfg.shift) * 2], -1),
        torch.stack([sin * mirror, cos, u(-cfg.shift, cfg.shift) * 2], -1),
    ], 1)                                                          # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * u(1 - cfg.contrast, 1 + cfg.contrast, 1, 1, 1) + mean
    x = x * u(1 - cfg.brightness, 1 + cfg.brightness, 1, 1, 1)

    if cfg.erase > 0:
        x = _erase(x, cfg, u)
    return x.clamp_(0, 255)


def _erase(x: torch.Tensor, cfg: AugmentConfig, u) -> torch.Tensor:
    b, c, h, w = x.shape
    area = u(*cfg.erase_area) * h * w
    aspect = torch.exp(u(math.log(0.3), math.log(3.3)))
    eh = (area * aspect).sqrt().clamp(1, h)
    ew = (area / aspect).sqrt().clamp(1, w)
    top = u(0, 1) * (h - eh)
    left = u(0, 1) * (w - ew)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    box = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
           & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)))     # [B, H, W]
    box &= (u(0, 1) < cfg.erase).view(b, 1, 1)
    noise = u(0, 255, c, h, w)
    return torch.where(box[:, None], noise, x)
