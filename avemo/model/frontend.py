"""Pretrained audio front-ends: the FCN audio stream trained on many speakers, shipped as a file.

Deep Fusion does not train its FCN from scratch on the target corpus; it starts from a
pretrained network. ``avemo-train-audio`` trains the audio-only model on several corpora and
exports it here: a self-describing file with the whole audio-only classifier (so it can be
evaluated on its own), the mel normalisation it was trained with, the extraction settings
its spectrograms must match, the data it saw, the command, its figures and its licence.
``avemo-train --audio-init NAME|PATH`` copies the audio stream and its normalisation into
a new model whose head is new for the user's classes.

Loading never executes code from the file (``avemo.checkpoint`` uses ``weights_only=True``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avemo.checkpoint import DIGEST_KEY, CheckpointError, load_checkpoint, require, save_checkpoint
from avemo.encoders import _plain, file_sha256
from avemo.features import AUDIO_SETTING_KEYS
from avemo.model.net import AVEmoNet, ModelConfig, build_model, validate_model_checkpoint

FRONTEND_KIND = "avemo-audio-frontend"
FRONTEND_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# the ModelConfig fields that shape the audio stream: a model initialised from a front-end takes them from it
AUDIO_ARCH_FIELDS = ("n_mels", "audio_channels", "audio_convs_per_block", "audio_attention_hidden", "audio_lambda",
                     "audio_norm")
_BARE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class AudioFrontend:
    """A loaded front-end file: the audio-only model it holds and what it records about itself."""

    name: str
    path: Path
    sha256: str
    config: ModelConfig
    classes: list[str]
    state: dict[str, torch.Tensor]
    audio_settings: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)   # data, command, metrics, licence, training

    def arch(self) -> dict[str, Any]:
        """The audio-stream fields of ModelConfig that a model must share to take these weights."""
        cfg = self.config.to_dict()
        return {k: cfg[k] for k in AUDIO_ARCH_FIELDS}

    def model(self) -> AVEmoNet:
        """The pretraining classifier itself (eval mode), e.g. to evaluate it on another corpus."""
        net = build_model(self.config)
        net.load_state_dict(self.state)
        return net.eval()

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse spectrograms made differently from the ones this front-end learned from."""
        diff = [f"{k} {settings.get(k)!r} (front-end: {self.audio_settings.get(k)!r})"
                for k in AUDIO_SETTING_KEYS if settings.get(k) != self.audio_settings.get(k)]
        if diff:
            raise ValueError(f"audio front-end '{self.name}' was trained on spectrograms with other extraction "
                             f"settings than this cache's: {'; '.join(diff)}. Re-extract the cache with the "
                             "front-end's settings, or train from scratch with --audio-init none")

    def init_audio(self, model: AVEmoNet) -> None:
        """Copy the audio stream and its mel normalisation into ``model`` (everything else stays as built)."""
        if not model.cfg.uses_audio:
            raise ValueError("this model has no audio stream to initialise")
        mine = {k: v for k, v in model.cfg.to_dict().items() if k in AUDIO_ARCH_FIELDS}
        if mine != self.arch():
            diff = [f"{k} {mine[k]!r} (front-end: {self.arch()[k]!r})" for k in AUDIO_ARCH_FIELDS
                    if mine[k] != self.arch()[k]]
            raise ValueError(f"the model's audio stream differs from front-end '{self.name}': {'; '.join(diff)}")
        audio = {k[len("audio."):]: v for k, v in self.state.items() if k.startswith("audio.")}
        model.audio.load_state_dict(audio)
        model.set_normalisation({k: self.state[k] for k in ("mel_mean", "mel_std")})

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about the front-end it started from."""
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "classes": self.classes,
                "licence": self.info.get("licence", ""),
                "data": [{k: d.get(k) for k in ("name", "clips", "speakers")} for d in self.info.get("data", [])]}


def export_frontend(path: str | os.PathLike, model: AVEmoNet, classes: list[str], settings: dict[str, Any],
                    info: dict[str, Any]) -> None:
    """Write an audio-only ``model`` as a front-end file (atomic; float32 CPU tensors; plain values only)."""
    if model.cfg.modalities != "audio":
        raise ValueError(f"a front-end is an audio-only model, got modalities '{model.cfg.modalities}'")
    for key in ("data", "command", "metrics", "licence"):
        if key not in info:
            raise ValueError(f"a front-end file must record its {key}")
    payload = {
        "config": model.cfg.to_dict(),
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu().float().clone() for k, v in model.state_dict().items()},
        "audio_settings": {k: settings.get(k) for k in AUDIO_SETTING_KEYS},
        **_plain(info),
    }
    save_checkpoint(path, payload, FRONTEND_KIND, FRONTEND_VERSION)


def available_frontends() -> list[str]:
    return sorted(p.stem.removeprefix("audio_") for p in WEIGHTS_DIR.glob("audio_*.pt"))


def resolve_frontend_path(name_or_path: str | os.PathLike) -> Path:
    """A bare name ("default") means ``avemo/model/weights/audio_NAME.pt``; anything else is a path."""
    text = os.fspath(name_or_path)
    if _BARE_NAME.match(text) and not text.endswith(".pt") and os.sep not in text:
        return WEIGHTS_DIR / f"audio_{text}.pt"
    return Path(text).expanduser()


def load_frontend(name_or_path: str | os.PathLike = "default") -> AudioFrontend:
    """Load a front-end by name (shipped in ``avemo/model/weights``) or by file path."""
    path = resolve_frontend_path(name_or_path)
    if not path.is_file():
        names = available_frontends()
        hint = f"; shipped front-ends: {', '.join(names)}" if names else "; none is shipped in this install"
        raise CheckpointError(f"audio front-end '{os.fspath(name_or_path)}' not found (looked for {path}){hint}")
    data = load_checkpoint(path, FRONTEND_KIND, (FRONTEND_VERSION,))
    missing = [k for k in ("config", "classes", "state_dict", "audio_settings") if k not in data]
    if missing:
        raise CheckpointError(f"{path}: front-end file lacks {', '.join(missing)}")
    require(isinstance(data["audio_settings"], dict), path, "its audio settings are not a table")
    modalities = data["config"].get("modalities") if isinstance(data["config"], dict) else None
    require(modalities == "audio", path, f"a front-end is an audio-only model, this one is {modalities!r}")
    # the same checks as a model checkpoint's (bounds, tensor shapes on the meta device, finite weights)
    cfg, _ = validate_model_checkpoint({"config": data["config"], "classes": data["classes"],
                                        "extraction_settings": data["audio_settings"], "model": data["state_dict"]},
                                       path)
    info = {k: v for k, v in data.items() if k not in ("config", "classes", "state_dict", "audio_settings",
                                                       "format", "format_version", DIGEST_KEY)}
    return AudioFrontend(name=path.stem.removeprefix("audio_"), path=path, sha256=file_sha256(path), config=cfg,
                         classes=list(data["classes"]), state=data["state_dict"],
                         audio_settings=dict(data["audio_settings"]), info=info)
