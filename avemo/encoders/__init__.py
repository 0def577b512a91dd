"""Face-expression encoders: build by name, export a self-describing file, load it back.

An encoder file holds the weights together with everything needed to use them (the
architecture and its settings, class names, the input contract: side length, grey or
colour, normalisation) plus its test metrics and how it was trained. ``load_encoder``
rebuilds the network from the file alone and never executes code from it
(``avemo.checkpoint`` loads with ``weights_only=True``).

``FaceEncoder`` is the one place where face crops of any size and colour become the
network's input tensor; training (``train.face``) uses the same ``to_model_pixels`` and
``normalize``.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avemo.checkpoint import CheckpointError, load_checkpoint, require, save_checkpoint
from avemo.io import first_line

ENCODER_FORMAT = "avemo-face-encoder"
ENCODER_FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_BARE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _efficientface(num_classes: int, **cfg) -> nn.Module:
    from avemo.encoders.efficientface import EfficientFace
    return EfficientFace(num_classes, **cfg)


def _transfer(num_classes: int, **cfg) -> nn.Module:
    from avemo.encoders.transfer import TransFER
    return TransFER(num_classes, **cfg)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "efficientface": _efficientface,
    "transfer": _transfer,
}


# Named architecture settings (``avemo-train-face --arch-cfg NAME``). An exported encoder
# records the resolved settings, never the name, so it reloads without this table.
ARCH_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "efficientface": {
        # the paper's widths (stages 4/8/4, channels 29/116/232/464/1024) with a stride-1 stem,
        # so a 48-px face keeps a 24x24 map after the pool (the paper has 56x56 at 224 px)
        "fer48": {"stem_stride": 1},
        # the official network as published (zengqunzhao/EfficientFace): stride-2 stem and
        # max-pool, for 224-px input (--input-size 224 --color)
        "paper": {"stages_repeats": [4, 8, 4], "stages_out_channels": [29, 116, 232, 464, 1024],
                  "stem_stride": 2, "stem_pool": True},
    },
    "transfer": {
        # three IR units at 32/64/128 and a 2-block, 128-d encoder: trains on a CPU
        "small": {"stem_channels": [32, 64, 128], "stem_depth": 1, "embed_dim": 128, "depth": 2, "heads": 4,
                  "mlp_ratio": 2.0, "max_tokens": 256, "lanet_reduction": 8},
        # Xue et al. (ICCV 2021) as the authors' release builds it: IR-50's first three stages
        # (3/4/14 units at 64/128/256; 14x14 cells from a 112-px face, --input-size 112 --color),
        # 2 LANets (channel reduction 16), MAD p = 0.6, an 8-block encoder of width 768 with
        # 8 heads and MLP ratio 3, MSAD p = 0.3, no dropout, 196 tokens + the class token
        "paper": {"stem_channels": [64, 128, 256], "stem_depth": [3, 4, 14], "num_lanets": 2,
                  "lanet_reduction": 16, "mad_p": 0.6, "embed_dim": 768, "depth": 8, "heads": 8,
                  "mlp_ratio": 3.0, "msad_p": 0.3, "dropout": 0.0, "max_tokens": 196},
    },
}
DEFAULT_PRESET = {"efficientface": "fer48", "transfer": "small"}


def resolve_arch_cfg(arch: str, arch_cfg: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """Settings for ``build_encoder``: a preset NAME, or a table of settings laid over the
    architecture's default preset (``None``: the default preset itself)."""
    presets = ARCH_PRESETS.get(arch, {})
    if isinstance(arch_cfg, str):
        if arch_cfg not in presets:
            raise ValueError(f"unknown preset '{arch_cfg}' for '{arch}' "
                             f"(choose from {', '.join(presets) or 'none'}, or give a JSON table of settings)")
        return dict(presets[arch_cfg])
    if arch_cfg is not None and not isinstance(arch_cfg, dict):
        raise ValueError(f"architecture settings must be a preset name or a table, got {type(arch_cfg).__name__}")
    return {**presets.get(DEFAULT_PRESET.get(arch, ""), {}), **(arch_cfg or {})}


def build_encoder(arch: str, num_classes: int, **arch_cfg) -> nn.Module:
    """A fresh network by name; it has ``.feature_dim``, ``.num_classes``, ``.forward_features(x) -> [B, D]``,
    ``.forward_features_and_maps(x) -> ([B, D], [B, D, h, w])`` (the pooled feature and the last spatial
    map it comes from) and ``.forward(x) -> [B, num_classes]`` logits."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown encoder architecture '{arch}' (choose from {', '.join(ARCHITECTURES)})")
    if num_classes < 2:
        raise ValueError(f"an expression encoder needs at least 2 classes, got {num_classes}")
    try:
        return ARCHITECTURES[arch](num_classes, **arch_cfg)
    except TypeError as e:
        raise ValueError(f"bad settings for '{arch}': {e}") from None


# ---- the input contract: the single conversion from face crops to network input ----

def to_model_pixels(crops, size: int, grayscale: bool) -> torch.Tensor:
    """Face crops -> uint8 [N, C, size, size] (C = 1 if grayscale else 3).

    ``crops``: uint8 RGB [N, H, W, 3] (numpy or torch), grey [N, H, W] / [N, H, W, 1],
    or a sequence of such single images with different sizes.
    """
    if isinstance(crops, (list, tuple)):
        if not crops:
            raise ValueError("no face crops given")
        return torch.cat([to_model_pixels(_as_tensor(c)[None], size, grayscale) for c in crops])
    x = _as_tensor(crops)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"face crops must be [N, H, W, 3] RGB or [N, H, W] grey, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no face crops given")
    if x.dtype != torch.uint8:
        raise ValueError(f"face crops must be uint8 pixels (0-255), got {x.dtype}")
    x = x.permute(0, 3, 1, 2).float()                            # [N, C_in, H, W]
    if grayscale and x.shape[1] == 3:
        # ITU-R BT.601 luma, the same weights OpenCV/PIL use for RGB -> L
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif not grayscale and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)              # [N, C, size, size]


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or 0-255 float) [N, C, S, S] -> float32 (x / 255 - mean) / std, per channel."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() / 255.0 - m) / s


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    raise TypeError(f"face crops must be a numpy array or torch tensor, got {type(x).__name__}")


# ---- files ----

def export_encoder(path: str | os.PathLike, model: nn.Module, arch: str, arch_cfg: dict[str, Any],
                   classes: Sequence[str], input_size: int, grayscale: bool,
                   mean: Sequence[float], std: Sequence[float],
                   metrics: dict[str, Any] | None = None, training: dict[str, Any] | None = None) -> None:
    """Write a self-describing encoder file atomically (weights as CPU float32 tensors)."""
    channels = 1 if grayscale else 3
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} value(s) for {'grey' if grayscale else 'RGB'} input, "
                         f"got {len(mean)}/{len(std)}")
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a {model.num_classes}-class network")
    payload = {
        "arch": arch,
        "arch_cfg": _plain(arch_cfg),
        "classes": [str(c) for c in classes],
        "input_size": int(input_size),
        "grayscale": bool(grayscale),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "feature_dim": int(model.feature_dim),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metrics": _plain(metrics or {}),
        "training": _plain(training or {}),
    }
    save_checkpoint(path, payload, ENCODER_FORMAT, ENCODER_FORMAT_VERSION)


def available_encoders() -> list[str]:
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))


def load_named_encoder(name: str, sha256: str | None, device: str | torch.device = "cpu") -> FaceEncoder:
    """The encoder that extraction settings name, with the hash they recorded.

    When a release replaces a shipped encoder (``default``), the one it replaced stays in the
    package under another name (``default-v1``): a shipped name whose file no longer has the
    recorded hash is looked up by that hash among the shipped encoders, so caches and models
    made with an earlier release keep extracting what they were trained on. Paths are never
    swapped; a hash found nowhere is left for the caller's check to name.
    """
    encoder = load_encoder(name, device)
    if not sha256 or encoder.sha256 == sha256 or not is_shipped_name(name):
        return encoder
    other = shipped_encoder_with(sha256)
    return load_encoder(other, device) if other else encoder


def shipped_encoder_with(sha256: str) -> str | None:
    """The name of the shipped encoder whose file has this sha256, if one has."""
    return next((n for n in available_encoders() if file_sha256(WEIGHTS_DIR / f"{n}.pt") == sha256), None)


def resolve_encoder_path(name_or_path: str | os.PathLike) -> Path:
    """A bare name ("default") means ``avemo/encoders/weights/NAME.pt``; anything else is a path."""
    text = os.fspath(name_or_path)
    if is_shipped_name(text):
        return WEIGHTS_DIR / f"{text}.pt"
    return Path(text).expanduser()


def is_shipped_name(name: str | os.PathLike) -> bool:
    """True for a bare encoder name (resolved inside the package), False for anything path-like."""
    text = os.fspath(name)
    return bool(_BARE_NAME.match(text)) and not text.endswith(".pt") and os.sep not in text


class FaceEncoder:
    """An encoder in eval mode with its input contract; embeds or classifies face crops."""

    def __init__(self, model: nn.Module, name: str, sha256: str, classes: list[str], input_size: int,
                 grayscale: bool, mean: Sequence[float], std: Sequence[float], metrics: dict | None = None,
                 training: dict | None = None, arch: str = "", arch_cfg: dict | None = None,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # measured ~1.5x faster depth-wise convolutions on CPU in channels-last layout
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.name, self.sha256 = name, sha256
        self.arch, self.arch_cfg = arch, dict(arch_cfg or {})
        self.feature_dim = int(model.feature_dim)
        self.classes = list(classes)
        self.input_size, self.grayscale = int(input_size), bool(grayscale)
        self.mean, self.std = list(mean), list(std)
        self.metrics, self.training = dict(metrics or {}), dict(training or {})

    def __repr__(self) -> str:
        return (f"FaceEncoder({self.name!r}, arch={self.arch!r}, feature_dim={self.feature_dim}, "
                f"input={self.input_size}px {'grey' if self.grayscale else 'RGB'}, classes={self.classes})")

    def preprocess(self, crops) -> torch.Tensor:
        """uint8 RGB crops [N, H, W, 3] of any size -> normalised float32 [N, C, S, S] on the CPU."""
        return normalize(to_model_pixels(crops, self.input_size, self.grayscale), self.mean, self.std)

    @torch.inference_mode()
    def embed(self, crops, batch_size: int = 256) -> torch.Tensor:
        """[N, feature_dim] float32 CPU tensor: the pooled feature before the classifier."""
        return self._run(crops, batch_size, self.model.forward_features)

    @torch.inference_mode()
    def embed_maps(self, crops, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features [N, D], last feature maps [N, h, w, D]) float32 CPU tensors, from one pass."""
        feats, maps = self._run(crops, batch_size, self.model.forward_features_and_maps)
        return feats, maps.permute(0, 2, 3, 1)

    @property
    def map_grid(self) -> tuple[int, int]:
        """(h, w): the cells of the last feature map, from one blank crop (the same for every face)."""
        if not hasattr(self, "_map_grid"):
            blank = np.zeros((1, self.input_size, self.input_size, 3), np.uint8)
            self._map_grid = tuple(self.embed_maps(blank)[1].shape[1:3])
        return self._map_grid

    @torch.inference_mode()
    def logits(self, crops, batch_size: int = 256) -> torch.Tensor:
        """[N, len(classes)] classifier logits (CPU)."""
        return self._run(crops, batch_size, self.model)

    def classify(self, crops, batch_size: int = 256) -> torch.Tensor:
        """[N, len(classes)] softmax probabilities (CPU)."""
        return self.logits(crops, batch_size).softmax(-1)

    def _run(self, crops, batch_size: int, fn):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x = self.preprocess(crops)
        out = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(self.device)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            y = fn(xb)
            out.append(tuple(t.float().cpu() for t in y) if isinstance(y, tuple) else y.float().cpu())
        if isinstance(out[0], tuple):       # several outputs per crop: each concatenated on its own
            return tuple(torch.cat(parts) for parts in zip(*out))
        return torch.cat(out)


def load_encoder(name_or_path: str | os.PathLike = "default", device: str | torch.device = "cpu") -> FaceEncoder:
    """Load an encoder by name (shipped in ``avemo/encoders/weights``) or by file path."""
    path = resolve_encoder_path(name_or_path)
    if not path.is_file():
        names = available_encoders()
        hint = f"; shipped encoders: {', '.join(names)}" if names else "; no encoders are shipped in this install"
        raise CheckpointError(f"face encoder '{os.fspath(name_or_path)}' not found (looked for {path}){hint}")
    data = load_checkpoint(path, ENCODER_FORMAT, (ENCODER_FORMAT_VERSION,))
    _validate_encoder(data, path)
    try:
        with torch.device("meta"):     # shapes first, allocating nothing: a tampered arch_cfg cannot exhaust memory
            expected = {k: tuple(v.shape) for k, v in
                        build_encoder(data["arch"], len(data["classes"]), **data["arch_cfg"]).state_dict().items()}
        stored = {k: tuple(v.shape) for k, v in data["state_dict"].items()}
        if stored != expected:
            k = sorted(set(stored) ^ set(expected) or {k for k in expected if stored[k] != expected[k]})[0]
            raise ValueError(f"'{k}': stored {stored.get(k, 'missing')}, expected {expected.get(k, 'none')}")
        model = build_encoder(data["arch"], len(data["classes"]), **data["arch_cfg"])
        model.load_state_dict(data["state_dict"])
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit the architecture they name: {first_line(e)}") from None
    return FaceEncoder(model, name=path.stem, sha256=file_sha256(path), classes=data["classes"],
                       input_size=data["input_size"], grayscale=data["grayscale"], mean=data["mean"],
                       std=data["std"], metrics=data.get("metrics"), training=data.get("training"),
                       arch=data["arch"], arch_cfg=data["arch_cfg"], device=device)


def _validate_encoder(data: dict, path) -> None:
    """Types and values an encoder file must have, checked before anything is built from it."""
    missing = [k for k in ("arch", "arch_cfg", "classes", "input_size", "grayscale", "mean", "std", "state_dict")
               if k not in data]
    require(not missing, path, f"encoder file lacks {', '.join(missing)}")
    require(data["arch"] in ARCHITECTURES, path, f"unknown architecture {first_line(data['arch'])!r}")
    require(isinstance(data["arch_cfg"], dict), path, "'arch_cfg' must be a table of settings")
    require(isinstance(data["classes"], list) and len(data["classes"]) >= 2
            and all(isinstance(c, str) for c in data["classes"]), path, "'classes' must be a list of class names")
    require(isinstance(data["input_size"], int) and 8 <= data["input_size"] <= 1024, path,
            "'input_size' must be a side in pixels (8 to 1024)")
    channels = 1 if data["grayscale"] else 3
    for key in ("mean", "std"):
        v = data[key]
        require(isinstance(v, list) and len(v) == channels and all(isinstance(x, (int, float)) for x in v),
                path, f"'{key}' must hold {channels} number(s)")
    # a zero or non-finite std divides every pixel into NaN or inf features
    require(all(math.isfinite(x) for x in data["mean"]) and all(math.isfinite(x) and x > 0 for x in data["std"]),
            path, "'mean' must be finite and 'std' finite and above zero")
    state = data["state_dict"]
    require(isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values()), path,
            "its weights ('state_dict') are not tensors")
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    require(not bad, path, f"its weights hold NaN or infinite values ('{bad[0] if bad else ''}')")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(obj):
    """Tuples -> lists, numpy scalars -> Python numbers, str subclasses -> str: what weights_only loading accepts."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, str)):
        return str(obj)     # str subclasses (torch.__version__ is one) would not load with weights_only
    if isinstance(obj, (bool, int, float)) or obj is None:
        return obj
    raise TypeError(f"encoder metadata must be plain values, got {type(obj).__name__}")
