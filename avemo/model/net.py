"""The fused model: audio stream + video stream + fusion + classifier, rebuilt from its config.

Like whisper's ``ModelDimensions``, ``ModelConfig`` is a plain dataclass stored inside the
checkpoint, so ``load_model`` rebuilds the exact network from the file alone; streams and
fusions are chosen by name (as timm builds models by name).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avemo.checkpoint import CheckpointError, load_checkpoint, require, save_checkpoint
from avemo.encoders import _plain, is_shipped_name
from avemo.features import ExtractionSettings
from avemo.io import dataclass_from_dict, first_line
from avemo.model.audio import FCNAudioStream, clip_level, rename_legacy_keys
from avemo.model.frames import FrameEncoder, check_encoder_spec
from avemo.model.fusion import FUSIONS, ConcatFusion, FactorizedBilinearPooling, ProductOfExperts
from avemo.model.video import (STT_TOKENS, VIDEO_STREAMS, AttentionVideoStream, CellSpatioTemporalStream,
                               FrameAttentionStream, MeanVideoStream, SpatioTemporalStream)
from avemo.model.voice import DEFAULT_LAYERS as VOICE_DEFAULT_LAYERS, LAYERS as VOICE_LAYERS, VoiceHead

MODEL_KIND = "avemo-model"
MODEL_VERSION = 1
MODALITIES = ("audio", "video", "av")
MAX_MEMBERS = 64                           # ensemble members a checkpoint may hold
MAX_WIDTH = 1 << 16                        # any channel count, hidden size or feature size
AUDIO_NORMS = ("global", "level")
# removed options a checkpoint may still name, and why
REMOVED_AUDIO_NORMS = {"utterance": "each clip's own mean per bin, removed 2026-11-26: it lost 0.11 UAR on new "
                                    "speakers (README, speech benchmark)"}
# stt_tokens: before spatial tokens, stt attended over one pooled vector per frame; audio_norm: before the
# loudness step, the per-bin statistics alone
LEGACY_MODEL_FIELDS = {"audio_convs_per_block": 1, "stt_tokens": "frames", "audio_norm": "global", "voice_head": 0.0,
                      "voice_layers": (1, 2, 3)}
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"   # shipped models (NAME.pt) and front-ends (audio_NAME.pt)
DEFAULT_MODEL = "default"
NORMALISATION_BUFFERS = ("mel_mean", "mel_std", "video_mean", "video_std", "map_mean", "map_std")


@dataclass(frozen=True)
class ModelConfig:
    n_classes: int
    modalities: str = "av"                 # audio | video | av
    n_mels: int = 64
    video_dim: int = 0                     # face-feature size D (0 when video is unused)
    audio_channels: tuple[int, ...] = (32, 64, 128, 128)
    audio_convs_per_block: int = 2
    audio_attention_hidden: int = 64
    audio_lambda: float = 1.0              # Deep Fusion's lambda (eq. 2): 0 = mean pooling
    audio_norm: str = "level"              # level: each clip brought to one loudness, then the training-set mean
                                           # and std per bin; global: the same without the loudness step
    voice_head: float = 0.65               # audio-only and late-fusion models: weight of the frozen speaker encoder's
                                           # classifier in the voice's probabilities (avemo.model.voice); 0: the FCN
                                           # alone (0.5 until its regression learnt from noisy copies: README)
    voice_layers: tuple[int, ...] = VOICE_DEFAULT_LAYERS   # the speaker encoder's layers (1-3) the head reads
    video_stream: str = "attention"        # attention | fan | stt | mean
    video_hidden: int = 128
    video_attention_hidden: int = 64
    video_lambda: float = 1.0
    fan_relation: bool = True
    stt_layers: int = 2
    stt_heads: int = 4
    stt_max_frames: int = 256
    stt_tokens: str = "cells"              # cells: each frame's feature-map cells (needs the cache's feature maps)
                                           # | frames: one pooled vector per frame
    video_cells: int = 0                   # cells per frame of the cache's feature maps (stt over cells)
    fusion: str = "fbp"                    # fbp | concat | product (late: each modality its own head)
    fbp_k: int = 4
    fbp_o: int = 256
    dropout: float = 0.3
    modality_dropout: float = 0.0          # training only: chance a two-modality clip loses one
    # end to end (avemo-train --finetune-encoder): the face encoder inside the model, which then reads
    # face pixels instead of cached features (``avemo.model.frames``); None: cached frozen features
    frame_encoder: dict[str, Any] | None = None

    def __post_init__(self):
        object.__setattr__(self, "audio_channels", tuple(int(c) for c in self.audio_channels))
        object.__setattr__(self, "voice_layers", tuple(self.voice_layers))
        if self.n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.n_classes}")
        if self.modalities not in MODALITIES:
            raise ValueError(f"modalities must be one of {', '.join(MODALITIES)}, got '{self.modalities}'")
        if self.video_stream not in VIDEO_STREAMS:
            raise ValueError(f"unknown video stream '{self.video_stream}'; choose one of {', '.join(VIDEO_STREAMS)}")
        if self.stt_tokens not in STT_TOKENS:
            raise ValueError(f"stt_tokens must be one of {', '.join(STT_TOKENS)}, got '{self.stt_tokens}'")
        if self.uses_maps and self.video_cells < 1:
            raise ValueError("stt over cells needs the cache's feature maps (video_cells >= 1): re-extract the "
                             "cache with avemo-extract --feature-maps, or use --stt-tokens frames")
        if self.audio_norm in REMOVED_AUDIO_NORMS:
            raise ValueError(f"audio_norm '{self.audio_norm}' ({REMOVED_AUDIO_NORMS[self.audio_norm]}) is no "
                             f"longer supported; retrain with one of {', '.join(AUDIO_NORMS)}")
        if self.audio_norm not in AUDIO_NORMS:
            raise ValueError(f"audio_norm must be one of {', '.join(AUDIO_NORMS)}, got '{self.audio_norm}'")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion '{self.fusion}'; choose one of {', '.join(FUSIONS)}")
        if self.uses_video and self.video_dim < 1:
            raise ValueError("a model that uses video needs video_dim >= 1 (the cache's face-feature size)")
        sizes = {"n_classes": self.n_classes, "n_mels": self.n_mels, "video_dim": self.video_dim,
                 "audio_attention_hidden": self.audio_attention_hidden, "video_hidden": self.video_hidden,
                 "video_attention_hidden": self.video_attention_hidden, "stt_layers": self.stt_layers,
                 "stt_heads": self.stt_heads, "stt_max_frames": self.stt_max_frames, "video_cells": self.video_cells,
                 "fbp_k": self.fbp_k, "fbp_o": self.fbp_o,
                 **{f"audio_channels[{i}]": c for i, c in enumerate(self.audio_channels)}}
        for name, v in sizes.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_WIDTH:
                raise ValueError(f"{name} must be a whole number from 0 to {MAX_WIDTH}, got {v!r}")
        if not 1 <= len(self.audio_channels) <= 16 or self.fbp_k * self.fbp_o > MAX_WIDTH * 16:
            raise ValueError("audio_channels must list 1 to 16 blocks, and fbp_k * fbp_o be at most "
                             f"{MAX_WIDTH * 16}")
        if not isinstance(self.audio_convs_per_block, int) or not 1 <= self.audio_convs_per_block <= 16:
            raise ValueError(f"audio_convs_per_block must be a whole number from 1 to 16, got "
                             f"{self.audio_convs_per_block!r}")
        if not 0.0 <= self.voice_head < 1.0:
            raise ValueError(f"voice_head must be in [0, 1), got {self.voice_head}")
        if not (self.voice_layers and all(isinstance(k, int) and not isinstance(k, bool) for k in self.voice_layers)
                and list(self.voice_layers) == sorted(set(self.voice_layers))
                and set(self.voice_layers) <= set(range(1, VOICE_LAYERS + 1))):
            raise ValueError(f"voice_layers must list encoder layers from 1 to {VOICE_LAYERS} in increasing order, "
                             f"got {self.voice_layers!r}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if self.frame_encoder is not None:
            if not self.uses_video:
                raise ValueError("a frame encoder needs a model that uses video")
            check_encoder_spec(self.frame_encoder, self.video_dim)

    @property
    def uses_audio(self) -> bool:
        return self.modalities in ("audio", "av")

    @property
    def uses_video(self) -> bool:
        return self.modalities in ("video", "av")

    @property
    def uses_voice_head(self) -> bool:
        """A model whose answer for a clip's audio is a speech classifier's: audio-only, or late fusion (whose
        audio expert the head joins before the product). fbp and concat mix the voice into a joint vector."""
        return self.voice_head > 0 and (self.modalities == "audio" or (self.modalities == "av"
                                                                        and self.fusion == "product"))

    @property
    def uses_maps(self) -> bool:
        """The video stream reads each frame's feature map (batch key ``video_maps``), not only its vector."""
        return self.uses_video and self.video_stream == "stt" and self.stt_tokens == "cells"

    @property
    def map_cells(self) -> int:
        """Cells per frame the model's batches carry (``avemo.batching.collate``'s video_cells); 0: no maps."""
        return self.video_cells if self.uses_maps else 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["audio_channels"] = list(self.audio_channels)
        d["voice_layers"] = list(self.voice_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return dataclass_from_dict(cls, d, "model settings")

    @classmethod
    def from_stored(cls, d: dict[str, Any]) -> "ModelConfig":
        """A config read back from a file: a field it lacks was written before the field existed,
        so it takes the value that rebuilds the network of that time, not today's default."""
        return cls.from_dict({**LEGACY_MODEL_FIELDS, **d})


def build_video_stream(cfg: ModelConfig) -> nn.Module:
    """A video stream by name (``cfg.video_stream``)."""
    if cfg.video_stream == "attention":
        return AttentionVideoStream(cfg.video_dim, cfg.video_hidden, cfg.video_attention_hidden,
                                    cfg.video_lambda, cfg.dropout)
    if cfg.video_stream == "mean":
        return MeanVideoStream(cfg.video_dim)
    if cfg.video_stream == "fan":
        return FrameAttentionStream(cfg.video_dim, cfg.video_hidden, cfg.fan_relation, cfg.dropout)
    if cfg.stt_tokens == "cells":
        return CellSpatioTemporalStream(cfg.video_dim, cfg.video_cells, cfg.video_hidden, cfg.stt_layers,
                                        cfg.stt_heads, cfg.stt_max_frames, cfg.dropout)
    return SpatioTemporalStream(cfg.video_dim, cfg.video_hidden, cfg.stt_layers, cfg.stt_heads,
                                cfg.stt_max_frames, cfg.dropout)


class AVEmoNet(nn.Module):
    """Clip features -> emotion logits, plus the attention weights of each stream.

    Inputs are raw cached features (see ``avemo.batching``); the normalisation statistics of
    the training split live in buffers, so they travel inside the checkpoint. A clip missing
    a modality gets that stream's learned stand-in vector; in training, ``modality_dropout``
    swaps the stand-in in on purpose so that the fused head learns to cope. With the late
    ``product`` fusion each modality has its own head and a missing one is left out instead.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dims = []
        self.late = cfg.modalities == "av" and cfg.fusion == "product"
        if cfg.uses_audio:
            self.audio = FCNAudioStream(cfg.n_mels, cfg.audio_channels, cfg.audio_attention_hidden, cfg.audio_lambda,
                                        cfg.audio_convs_per_block)
            if not self.late:
                self.audio_standin = nn.Parameter(torch.zeros(self.audio.out_dim))
            self.register_buffer("mel_mean", torch.zeros(cfg.n_mels))
            self.register_buffer("mel_std", torch.ones(cfg.n_mels))
            dims.append(self.audio.out_dim)
        if cfg.uses_voice_head:
            self.voice = VoiceHead(cfg.n_mels, cfg.n_classes, cfg.voice_head, cfg.voice_layers)
        if cfg.uses_video:
            self.video = build_video_stream(cfg)
            self.frame_encoder = (FrameEncoder(cfg.frame_encoder, cfg.map_cells) if cfg.frame_encoder is not None
                                  else None)
            if not self.late:
                self.video_standin = nn.Parameter(torch.zeros(self.video.out_dim))
            self.register_buffer("video_mean", torch.zeros(cfg.video_dim))
            self.register_buffer("video_std", torch.ones(cfg.video_dim))
            if cfg.uses_maps:
                # the cells of a map spread wider than their mean (the pooled vector): their own statistics
                self.register_buffer("map_mean", torch.zeros(cfg.video_dim))
                self.register_buffer("map_std", torch.ones(cfg.video_dim))
            dims.append(self.video.out_dim)
        self.head_drop = nn.Dropout(cfg.dropout)
        if self.late:
            self.fusion = ProductOfExperts(dims[0], dims[1], cfg.n_classes)
            return
        if cfg.modalities == "av":
            if cfg.fusion == "fbp":
                self.fusion = FactorizedBilinearPooling(dims[0], dims[1], cfg.fbp_k, cfg.fbp_o, cfg.dropout)
            else:
                self.fusion = ConcatFusion(dims[0], dims[1], cfg.dropout)
            head_dim = self.fusion.out_dim
        else:
            self.fusion = None
            head_dim = dims[0]
        self.classifier = nn.Linear(head_dim, cfg.n_classes)

    def set_normalisation(self, stats: dict[str, Any]) -> None:
        """Per-bin / per-dimension mean and std from the training split (``train`` computes them)."""
        for name in NORMALISATION_BUFFERS:
            if hasattr(self, name) and stats.get(name) is not None:
                value = torch.as_tensor(stats[name], dtype=torch.float32)
                buf = getattr(self, name)
                if value.shape != buf.shape:
                    raise ValueError(f"normalisation '{name}' has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(buf.shape)}")
                buf.copy_(value)

    def normalisation(self) -> dict[str, list[float]]:
        return {n: getattr(self, n).tolist() for n in NORMALISATION_BUFFERS if hasattr(self, n)}

    def _normalise_mel(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :].to(mel.dtype)                                            # [B, 1, T_a]
        if self.cfg.audio_norm == "level":
            mel = mel - clip_level(mel, mask)[:, None, None]
        return (mel - self.mel_mean[None, :, None]) / self.mel_std[None, :, None] * m

    def _video_tokens(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Normalised face features [B, T_v, D], or feature maps [B, T_v, N, D] for stt over cells;
        zero on masked frames. Cached, or (end to end) computed by the model's own encoder from
        the face pixels of the used frames."""
        if self.frame_encoder is not None and "faces" not in batch:
            raise ValueError("this model trains its face encoder end to end: its batch needs the face pixels "
                             "('faces', see avemo.model.frames), not only cached features")
        if self.cfg.uses_maps:
            maps = (self.frame_encoder(batch["faces"], mask, maps=True) if self.frame_encoder is not None
                    else batch["video_maps"])
            v = (maps - self.map_mean) / self.map_std                                  # [B, T_v, N, D]
            return v * mask[:, :, None, None].to(v.dtype)
        feats = self.frame_encoder(batch["faces"], mask) if self.frame_encoder is not None else batch["video"]
        v = (feats - self.video_mean) / self.video_std                                 # [B, T_v, D]
        return v * mask[:, :, None].to(v.dtype)

    def _with_standin(self, x: torch.Tensor, present: torch.Tensor, standin: torch.Tensor) -> torch.Tensor:
        # the stand-in always enters the graph (zero gradient when unused), which DDP requires
        return torch.where(present[:, None], x, standin.to(x.dtype).expand_as(x))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        parts = []
        if self.cfg.uses_audio:
            mask = batch["mel_mask"]                                                  # [B, T_a]
            mel = self._normalise_mel(batch["mel"], mask)                              # [B, n_mels, T_a]
            a, out["audio_attention"] = self.audio(mel, mask)                          # [B, C], [B, F', T']
            has_audio = mask.any(1)
            parts.append((a, has_audio, getattr(self, "audio_standin", None)))
        if self.cfg.uses_video:
            mask = batch["video_mask"]                                                # [B, T_v]
            v, w = self.video(self._video_tokens(batch, mask), mask)                   # [B, H], [B, T_v](, N)
            if w.ndim == 3:
                # where and when: per cell; a frame's weight is the sum of its cells'
                out["video_cell_attention"], w = w, w.sum(-1)                          # [B, T_v, N], [B, T_v]
            out["video_attention"] = w
            parts.append((v, mask.any(1), getattr(self, "video_standin", None)))
        if self.training and self.cfg.modality_dropout > 0 and len(parts) == 2:
            both = parts[0][1] & parts[1][1]
            drop = both & (torch.rand(both.shape, device=both.device) < self.cfg.modality_dropout)
            drop_audio = drop & (torch.rand(both.shape, device=both.device) < 0.5)
            parts[0] = (parts[0][0], parts[0][1] & ~drop_audio, parts[0][2])
            parts[1] = (parts[1][0], parts[1][1] & ~(drop & ~drop_audio), parts[1][2])
        if self.late:
            (a, has_a, _), (v, has_v, _) = parts
            mix = (partial(self.voice.mix, mel=batch["mel"], mask=batch["mel_mask"]) if self._voice_ready()
                   else None)
            out["logits"], out["audio_logits"], out["video_logits"] = self.fusion(
                self.head_drop(a), self.head_drop(v), has_a, has_v, mix)
            return out
        vecs = [self._with_standin(x, present, standin) for x, present, standin in parts]
        h = self.fusion(*vecs) if self.fusion is not None else vecs[0]
        out["logits"] = self.classifier(self.head_drop(h))                            # [B, n_classes]
        if self._voice_ready():
            out["logits"] = self.voice.mix(out["logits"], batch["mel"], batch["mel_mask"])
        return out

    def _voice_ready(self) -> bool:
        """The voice head speaks in evaluation once fitted; training sees the network alone."""
        return self.cfg.uses_voice_head and not self.training and self.voice.is_fitted


class Ensemble(nn.Module):
    """Several AVEmoNets of one config (trained with different seeds); their class probabilities averaged.

    On a few hundred clips one run's accuracy moves by several points with its seed; the
    average of a few runs is both steadier and better. The output has the members' keys:
    ``logits`` is the log of the mean probability (so a softmax of it gives that mean back)
    and each attention map is the members' mean.
    """

    def __init__(self, members: list[AVEmoNet]):
        super().__init__()
        if not members or any(m.cfg != members[0].cfg for m in members):
            raise ValueError("an ensemble needs at least one member, all of one model config")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg

    def normalisation(self) -> dict[str, list[float]]:
        return self.members[0].normalisation()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outs = [m(batch) for m in self.members]
        probs = torch.stack([torch.softmax(o["logits"].float(), dim=-1) for o in outs]).mean(0)   # [B, n_classes]
        out = {"logits": probs.clamp_min(1e-12).log()}
        for key in outs[0]:
            if key != "logits":
                out[key] = torch.stack([o[key].float() for o in outs]).mean(0)
        return out


def build_model(cfg: ModelConfig | dict[str, Any]) -> AVEmoNet:
    """Factory: a model from its config (or the config's dict, as stored in a checkpoint)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    return AVEmoNet(cfg)


def save_model(path: str | os.PathLike, model: AVEmoNet | Ensemble, classes: list[str],
               extraction_settings: dict[str, Any], metrics: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> None:
    """Write a self-describing checkpoint (atomic; loads without executing code)."""
    if len(classes) != model.cfg.n_classes:
        raise ValueError(f"{len(classes)} class names for a {model.cfg.n_classes}-class model")
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": model.cfg.to_dict(),
        "classes": list(classes),
        "extraction_settings": dict(extraction_settings),
        "normalisation": model.normalisation(),
        "metrics": _plain(metrics or {}),     # a numpy number would make the file unloadable with weights_only
    }
    if isinstance(model, Ensemble):
        payload["members"] = len(model.members)
    payload.update(extra or {})
    save_checkpoint(path, payload, MODEL_KIND, MODEL_VERSION)


def available_models() -> list[str]:
    """Names of the models shipped inside the package (``--model NAME``)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt") if not p.stem.startswith("audio_"))


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A bare name ("default") that is not a file in the working folder means the shipped
    ``avemo/model/weights/NAME.pt``; anything else is a path."""
    text = os.fspath(name_or_path)
    if is_shipped_name(text) and not os.path.lexists(text):
        return WEIGHTS_DIR / f"{text}.pt"
    return Path(text).expanduser()


def load_model(path: str | os.PathLike = DEFAULT_MODEL,
               map_location: str | torch.device = "cpu") -> tuple[AVEmoNet | Ensemble, dict[str, Any]]:
    """Rebuild the model (or ensemble) from a checkpoint alone (a path, or the name of a shipped model), on
    ``map_location``; returns (model in eval mode, the checkpoint dict). Everything is validated before
    anything is built."""
    name, path = os.fspath(path), resolve_model_path(path)
    if is_shipped_name(name) and not path.is_file():
        names = available_models()
        hint = f"shipped models: {', '.join(names)}" if names else "no model is shipped in this install"
        raise CheckpointError(f"model '{name}' not found (looked for {path}); {hint}")
    ckpt = load_checkpoint(path, MODEL_KIND, (MODEL_VERSION,), map_location=map_location)
    if isinstance(ckpt.get("model"), dict):
        ckpt["model"] = rename_legacy_keys(ckpt["model"])
    cfg, members = validate_model_checkpoint(ckpt, path)
    try:
        if members:
            model = Ensemble([AVEmoNet(cfg) for _ in range(members)])
        else:
            model = AVEmoNet(cfg)
        model.load_state_dict(ckpt["model"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the model in this checkpoint cannot be rebuilt: {first_line(e)}") from None
    # load_state_dict copies into the modules where they are built (the CPU): move them too
    return model.to(map_location).eval(), ckpt


def validate_model_checkpoint(ckpt: dict[str, Any], path) -> tuple[ModelConfig, int]:
    """(config, ensemble members or 0) of a loaded checkpoint, or ``CheckpointError`` saying what is wrong.

    The config is checked against sane bounds and against the shapes of the stored tensors
    (a network built on the meta device allocates nothing), so a tampered file cannot make
    this process build 100,000 networks or allocate gigabytes before being refused.
    """
    require(isinstance(ckpt.get("config"), dict), path, "its model settings ('config') are missing or not a table")
    try:
        cfg = ModelConfig.from_stored(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model settings are not valid: {first_line(e)}") from None
    classes = ckpt.get("classes")
    require(isinstance(classes, list) and all(isinstance(c, str) and c for c in classes), path,
            "'classes' must be a list of class names")
    require(len(classes) == cfg.n_classes, path, f"{len(classes)} class names for a {cfg.n_classes}-class model")
    settings = ckpt.get("extraction_settings")
    require(isinstance(settings, dict), path, "its extraction settings are missing or not a table")
    try:
        n_mels = ExtractionSettings.from_dict(settings).n_mels
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its extraction settings are not valid: {first_line(e)}") from None
    require(not cfg.uses_audio or n_mels == cfg.n_mels, path,
            f"the model reads {cfg.n_mels} mel bins but its extraction settings make {n_mels}")
    require(isinstance(ckpt.get("metrics", {}), dict), path, "'metrics' must be a table")
    state = ckpt.get("model")
    require(isinstance(state, dict) and bool(state)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()),
            path, "its weights ('model') are missing or are not tensors")
    members = ckpt.get("members") or 0
    stored_members = {k.split(".")[1] for k in state if k.startswith("members.")}
    require(isinstance(members, int) and not isinstance(members, bool) and 0 <= members <= MAX_MEMBERS, path,
            f"'members' must be a whole number from 1 to {MAX_MEMBERS}")
    require(len(stored_members) == members, path,
            f"it says {members} ensemble member(s) but holds weights for {len(stored_members)}")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AVEmoNet(cfg).state_dict().items()}
    except (ValueError, TypeError, RuntimeError) as e:    # e.g. a frame encoder's settings its network refuses
        raise CheckpointError(f"{path}: the model its settings describe cannot be built: {first_line(e)}") from None
    for prefix in ([f"members.{i}." for i in range(members)] if members else [""]):
        got = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        if got != expected:
            diff = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
            k = diff[0]
            raise CheckpointError(f"{path}: its weights do not fit the model its settings describe "
                                  f"('{prefix}{k}': stored {got.get(k, 'missing')}, expected {expected.get(k, 'none')})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    require(not bad, path, f"its weights hold NaN or infinite values ('{bad[0] if bad else ''}'): the training "
                           "that wrote it diverged")
    return cfg, members
