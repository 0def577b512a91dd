"""Fitting the fused model on a cached dataset: one process, CUDA, or torchrun + DDP, same code.

Randomness is re-seeded from (seed, epoch, rank) at the start of every epoch, so a run
resumed from ``last.pt`` (written at epoch ends) continues exactly as if never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from avemo.batching import collate, length_batches, to_device, trim_batch
from avemo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from avemo.cpu import cpu_computes_bf16, release_free_memory
from avemo.features import AUDIO_SETTING_KEYS, ClipFeatures, settings_differences
from avemo.io import Busy, atomic_path, held_lock, write_json_atomic
from avemo.model import (MODEL_KIND, MODEL_VERSION, AVEmoNet, Ensemble, ModelConfig, build_loss, build_model,
                         load_model, save_model)
from avemo.model.adapt import mel_statistics
from avemo.model.audio import EVAL_FRAMES
from avemo.model.frontend import AudioFrontend, load_frontend
from avemo.model.voice import VoiceError
from train.augment import AugmentConfig, BatchAugment, voice_copies
from train.data import TrainingData
from train.finetune import (ENCODER_PREFIX, CropBank, FinetuneError, crop_augment_config, finetune_spec,
                            require_crops, starting_encoder)
from train.metrics import classification_metrics, write_confusion
from train.splits import Split

log = logging.getLogger("avemo.train")


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3                   # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 1e-2
    patience: int = 0                  # epochs without a better val UAR before stopping (0: never stop)
    keep: str = "auto"                 # best.pt: the epoch with the best val UAR (best), the final one (last),
                                       # or auto: last for a pretrained audio stream frozen throughout, else best
    seed: int = 0
    loss: str = "ce"
    label_smoothing: float = 0.1
    schedule: str = "onecycle"         # onecycle: warm-up then anneal, per batch | cosine: per epoch, no warm-up
    warmup: float = 0.3                # onecycle: share of the steps spent rising to lr
    audio_init: str = "default"        # audio stream + mel normalisation from a front-end (name or path) | none
    compact_beta: float = 0.5
    balance: bool = False              # class-balanced loss weights
    ensemble: int = 1                  # members trained with seeds seed, seed+1, ...; probabilities averaged
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    features_on_device: str = "auto"   # auto | yes | no
    amp: bool = True                   # bf16 autocast on CUDA and on CPUs with bf16 in hardware
    max_train_seconds: float = 10.0    # a longer clip trains on a random window this long each time it is drawn
                                       # (bounds a batch's memory; evaluation sees whole clips); 0: no bound
    progress: bool = True
    # end to end (train.finetune): the face encoder the cache was extracted with trains with the video stream
    finetune_encoder: bool = False
    frames_per_clip: int = 3           # random face frames per clip per training step (FAN's 3); 0: all
    encoder_lr: float = 1e-4           # the encoder's peak learning rate (it starts trained; the head does not)
    audio_lr: float | None = None      # the audio stream's peak lr (None: from a front-end, frozen when it
                                       # knows the cache's corpus (audio only), else lr/10; without one, lr;
                                       # 0: a pretrained stream stays frozen)
    audio_frozen_epochs: int = 0       # a pretrained stream stays frozen for this many epochs first (LP-FT)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        if not 0.0 < self.warmup < 1.0:
            raise ValueError(f"warmup must be in (0, 1), got {self.warmup}")
        if self.frames_per_clip < 0 or not self.encoder_lr > 0:
            raise ValueError(f"frames_per_clip must be >= 0 and encoder_lr > 0, got {self.frames_per_clip} and "
                             f"{self.encoder_lr}")
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {', '.join(KEEPS)}, got '{self.keep}'")
        if self.keep == "last" and self.patience:
            raise ValueError("early stopping (patience) ends after the best validation epoch and keeps that one: "
                             "it cannot be combined with keep 'last'")
        if not self.max_train_seconds >= 0:
            raise ValueError(f"max_train_seconds must be >= 0 (0: no bound), got {self.max_train_seconds}")
        if self.audio_frozen_epochs < 0:
            raise ValueError(f"audio_frozen_epochs must be >= 0, got {self.audio_frozen_epochs}")
        if self.audio_lr is not None and not self.audio_lr >= 0:
            raise ValueError(f"audio_lr must be >= 0 (0: the pretrained stream stays frozen), got {self.audio_lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCHEDULES = ("onecycle", "cosine")
KEEPS = ("auto", "best", "last")


class TrainError(RuntimeError):
    """A run that cannot start or continue, with the reason in words."""


class RunBusy(Busy):
    """Another process is training into the same run folder."""


# ----------------------------------------------------------------------------- processes

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_runtime() -> Runtime:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then DDP (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Runtime(device, rank, world)
    return Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _broadcast(rt: Runtime, obj):
    if rt.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- features

class FeatureStore:
    """Batches of a fixed set of clips.

    ``on_device``: the whole set is padded once and kept on the training device, so a
    batch is an index + trim (no loader, no host-to-device copy). Otherwise each batch is
    collated from the clips on the host and copied over, as a data loader would.
    ``crops`` (end-to-end training): the clips' face pixels; a batch then carries ``faces``
    (or, with ``faces=False``, the ``frame_rows`` that ``CropBank.attach`` turns into them).
    ``audio_window`` (training): a clip with more mel frames than this gives a batch a random
    window of that many instead, drawn anew each time; such a store collates per batch, so
    no tensor is ever padded to the long clip.
    """

    def __init__(self, data: TrainingData, indices: list[int], video_dim: int, device: torch.device,
                 on_device: bool, video_cells: int = 0, crops: CropBank | None = None, audio_window: int = 0):
        self.crops = crops
        self.clips = [data.clips[i] for i in indices]
        self.n_mels, self.video_dim, self.video_cells, self.device = data.n_mels, video_dim, video_cells, device
        self.audio_window = audio_window if audio_window and any(
            _mel_frames(c) > audio_window for c in self.clips) else 0
        self.on_device = on_device and not self.audio_window
        self.tensors = (to_device(collate(self.clips, self.n_mels, video_dim, video_cells), device)
                        if self.on_device else None)
        self.labels = torch.as_tensor(data.labels[indices], dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.clips)

    def batch(self, idx: torch.Tensor, faces: bool = True) -> dict[str, torch.Tensor]:
        if self.tensors is not None:
            b = trim_batch({k: v[idx.to(self.device)] for k, v in self.tensors.items()})
        else:
            b = to_device(collate([self._windowed(self.clips[i]) for i in idx.tolist()], self.n_mels,
                                  self.video_dim, self.video_cells), self.device, non_blocking=True)
        if self.crops is None:
            return b
        b["frame_rows"] = self.crops.rows_of(idx, b["video_mask"].shape[1])
        return self.crops.attach(b) if faces else b

    def _windowed(self, clip: ClipFeatures) -> ClipFeatures:
        extra = _mel_frames(clip) - self.audio_window
        if not self.audio_window or extra <= 0:
            return clip
        start = int(torch.randint(extra + 1, ()))
        return dataclasses.replace(clip, arrays={**clip.arrays,
                                                 "mel": clip.arrays["mel"][:, start:start + self.audio_window]})

    def lengths(self) -> np.ndarray:
        """Each clip's longest time axis (mel frames or video frames), for batching alike lengths together."""
        return np.array([max(_mel_frames(c), len(c.arrays.get("face_mask", ()))) for c in self.clips])


def _mel_frames(clip: ClipFeatures) -> int:
    mel = clip.arrays.get("mel")
    return 0 if mel is None or mel.ndim != 2 else mel.shape[1]


def padded_bytes(data: TrainingData, indices: list[int], video_dim: int, video_cells: int = 0) -> int:
    t_a = max((data.clips[i].arrays["mel"].shape[1] for i in indices if data.clips[i].has_audio), default=1)
    t_v = max((len(data.clips[i].arrays.get("face_mask", ())) for i in indices), default=1)
    return len(indices) * (data.n_mels * t_a * 4 + t_a + max(t_v, 1) * ((1 + video_cells) * video_dim * 4 + 1))


def decide_on_device(mode: str, need: int, device: torch.device) -> bool:
    if mode == "yes":
        return True
    if mode == "no":
        return False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.4 * free
    # on the CPU both ways cost about the same (benchmarks/bench_train.py); padding everything to
    # the longest clip is only worth it while it stays a small part of the machine's memory
    return need < 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def normalisation_stats(data: TrainingData, indices: list[int], video_dim: int,
                        video_cells: int = 0, audio_norm: str = "global") -> dict[str, np.ndarray]:
    """Per mel bin and per face-feature dimension mean / std over the training clips' valid frames
    (and, with ``video_cells``, per channel over every cell of their feature maps); the mel's as a model
    with ``audio_norm`` sees it."""
    stats = {}
    mels = [data.clips[i].arrays["mel"] for i in indices if data.clips[i].has_audio]
    if mels:
        stats.update(mel_statistics(mels, audio_norm))
    if video_dim:
        frames = [data.clips[i].arrays["video_features"][np.asarray(data.clips[i].arrays["face_mask"], bool)]
                  for i in indices if data.clips[i].has_video]
        if frames:
            cat = np.concatenate(frames, axis=0).astype(np.float64)
            stats["video_mean"], stats["video_std"] = cat.mean(0), np.maximum(cat.std(0), 1e-3)
    if video_dim and video_cells:
        stats["map_mean"], stats["map_std"] = _map_channel_stats(data, indices, video_dim)
    return stats


def _map_channel_stats(data: TrainingData, indices: list[int], video_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over every cell of the valid frames' feature maps, by running sums
    (the maps are T x cells times larger than the features: never concatenated)."""
    n, total, squares = 0, np.zeros(video_dim), np.zeros(video_dim)
    for i in indices:
        clip = data.clips[i]
        if clip.has_video:
            cells = clip.arrays["feature_maps"][np.asarray(clip.arrays["face_mask"], bool)]
            cells = cells.reshape(-1, video_dim).astype(np.float64)
            n += len(cells)
            total += cells.sum(0)
            squares += (cells ** 2).sum(0)
    mean = total / max(n, 1)
    return mean, np.maximum(np.sqrt(np.maximum(squares / max(n, 1) - mean ** 2, 0.0)), 1e-3)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_outputs(model: torch.nn.Module, store: FeatureStore, batch_size: int, amp: bool,
                    keys: tuple[str, ...] = ("logits",)) -> dict[str, np.ndarray]:
    """The model's outputs named in ``keys`` for every clip of ``store`` (float32, on the host)."""
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    batches = length_batches(store.lengths(), batch_size, EVAL_FRAMES)
    for idx in batches:
        with _autocast(store.device, amp, getattr(model, "cfg", None)):
            out = model(store.batch(idx))
        for k in keys:
            outs[k].append(out[k].float().cpu())
    back = torch.as_tensor(np.argsort(torch.cat(batches).numpy()))
    return {k: torch.cat(v)[back].numpy() for k, v in outs.items()}


def predict_store(model: torch.nn.Module, store: FeatureStore, batch_size: int, amp: bool) -> np.ndarray:
    return predict_outputs(model, store, batch_size, amp)["logits"].argmax(1)


def evaluate(model, store: FeatureStore, classes: list[str], batch_size: int, amp: bool) -> dict:
    pred = predict_store(model, store, batch_size, amp)
    return classification_metrics(store.labels.cpu().numpy(), pred, classes)


def autocast_dtype(device: torch.device, amp: bool, model_cfg: ModelConfig | None) -> torch.dtype | None:
    """bf16 on every CUDA GPU avemo supports. On a CPU with bf16 in hardware (AVX512-BF16 or AMX)
    too, except when a face encoder is trained end to end: measured on one such CPU
    (``benchmarks/bench_train.py``), bf16 trained the default av model 1.3x faster than float32
    and stt over cells 1.4x, while end-to-end video (the encoder's depth-wise convolutions) ran
    0.85x. The model keeps its softmaxes, losses and BatchNorm statistics in float32 either way."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and (model_cfg is None or model_cfg.frame_encoder is None) and cpu_computes_bf16():
        return torch.bfloat16
    return None


def _autocast(device: torch.device, amp: bool, model_cfg: ModelConfig | None):
    dtype = autocast_dtype(device, amp, model_cfg)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------- the run

def _reseed(seed: int, epoch: int, rank: int) -> None:
    torch.manual_seed((seed * 1_000_003 + epoch * 7919 + rank) % (2 ** 63))


def _global_batches(n: int, batch_size: int, world: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's shuffled batches (the same on every rank); a batch too small to share is dropped."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    batches = list(perm.split(batch_size))
    return [b for b in batches if len(b) >= world and (len(b) > 1 or n == 1)]


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """onecycle (Smith & Topin 2019): lr rises for ``warmup`` of the steps then anneals to ~0, stepped
    per batch; cosine: per epoch from lr down, the schedule of earlier avemo versions."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs))
    # each parameter group peaks at its own lr (the frame encoder's is lower, see train.finetune)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                               epochs=max(1, cfg.epochs),
                                               steps_per_epoch=max(1, steps_per_epoch), pct_start=cfg.warmup)


# the audio stream's peak learning rate, as a share of the head's, when it starts from a front-end: measured
# on unseen EmoDB speakers (README, speech benchmark), fine-tuning it at the head's rate lost what it had learnt
PRETRAINED_AUDIO_LR_SCALE = 0.1


def audio_rate(cfg: TrainConfig, pretrained: bool) -> float | None:
    """The audio stream's own peak learning rate; None: it shares the head's."""
    if cfg.audio_lr is not None:
        return cfg.audio_lr
    return cfg.lr * PRETRAINED_AUDIO_LR_SCALE if pretrained else None


def corpus_familiarity(front: AudioFrontend, data: TrainingData, indices: list[int], device: torch.device,
                       batch_size: int, amp: bool) -> dict[str, Any] | None:
    """How well the front-end, as it is, tells apart the classes of the training clips ``indices``:
    its zero-shot UAR (predictions restricted to the cache's classes) against a threshold halfway
    between chance and perfect. None when it cannot say: some class of the cache is not one of its own.

    Why: a frozen stream with a new head kept everything a front-end knew about a corpus it had
    heard (EmoDB: +7 points UAR on new speakers, and +9 to +11 with new training speakers too), tied
    on RAVDESS, and lost 9 points on a corpus it had never heard, where its zero-shot UAR was 0.18
    against 0.45-0.66 on new speakers of its own corpora (README, speech benchmark).
    """
    idx = [i for i in indices if data.has_audio[i]]
    if len(data.classes) < 2 or not set(data.classes) <= set(front.classes) or not idx:
        return None
    store = FeatureStore(data, idx, 0, device, on_device=False)
    logits = predict_outputs(front.model().to(device), store, batch_size, amp)["logits"]
    pred = logits[:, [front.classes.index(c) for c in data.classes]].argmax(1)
    uar = classification_metrics(data.labels[idx], pred, data.classes)["uar"]
    threshold = (1.0 / len(data.classes) + 1.0) / 2
    return {"zero_shot_uar": round(float(uar), 4), "threshold": round(threshold, 4), "clips": len(idx),
            "frozen": bool(uar >= threshold)}


def kept_epoch(cfg: TrainConfig, head_only: bool) -> str:
    """Which epoch becomes best.pt, "best" (validation UAR) or "last", with ``keep`` "auto" resolved;
    ``head_only``: an audio-only model whose pretrained stream stays frozen throughout.

    Why "last" there (without early stopping): only the new head then learns, and picking its epoch by one validation speaker's UAR cost 3-4 points on new speakers
    against the final annealed epoch (18 runs, 13 better and 2 tied), while for a fine-tuned or
    from-scratch stream the two tied (README, speech benchmark)."""
    if cfg.keep != "auto":
        return cfg.keep
    return "last" if head_only and not cfg.patience else "best"


def audio_frozen(cfg: TrainConfig, model: torch.nn.Module, epoch: int) -> bool:
    """Whether the pretrained audio stream is a fixed feature extractor in ``epoch`` (0-based), its
    BatchNorm statistics too: throughout with ``--audio-lr 0``, for the first ``--audio-frozen-epochs``
    otherwise (linear probing, then fine-tuning: LP-FT, Kumar et al., ICLR 2022)."""
    return hasattr(model, "audio") and (cfg.audio_lr == 0 or epoch < cfg.audio_frozen_epochs)


def set_audio_frozen(model: torch.nn.Module, frozen: bool) -> None:
    # called after model.train(): a frozen stream normalises with its running statistics
    for p in model.audio.parameters():
        p.requires_grad_(not frozen)
    if frozen:
        model.audio.eval()


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig, pretrained_audio: bool) -> list[dict[str, Any]]:
    """AdamW groups with their own peaks, since the parts that start trained need to move more slowly
    than the new head: the face encoder (end to end) at ``encoder_lr``, the audio stream at
    ``audio_rate``, everything else at ``lr`` (first: the history's lr column is the first group's)."""
    audio_lr = audio_rate(cfg, pretrained_audio)
    rates = {"rest": cfg.lr, "audio": audio_lr, "encoder": cfg.encoder_lr}
    groups: dict[str, list[torch.nn.Parameter]] = {k: [] for k in rates}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = ("encoder" if name.startswith(ENCODER_PREFIX) else
                    "audio" if name.startswith("audio.") and audio_lr not in (None, cfg.lr) else "rest")
            groups[part].append(p)
    return [{"params": ps, "lr": rates[k]} for k, ps in groups.items() if ps]


def _class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(w, dtype=torch.float32)


def prepare_audio_init(model_cfg: dict[str, Any], cfg: TrainConfig,
                       data: TrainingData) -> tuple[dict[str, Any], AudioFrontend | None]:
    """The front-end the audio stream starts from (None: from scratch) and the model settings it implies.

    The front-end fixes the audio stream's shape; a setting given in ``model_cfg`` that
    contradicts it is an error rather than silently overridden.
    """
    if cfg.audio_init == "none" or model_cfg.get("modalities", "av") == "video":
        return model_cfg, None
    try:
        front = load_frontend(cfg.audio_init)
        front.check_settings(data.settings)
    except (CheckpointError, ValueError) as e:
        raise TrainError(f"--audio-init {cfg.audio_init}: {e}") from None
    arch = front.arch()
    clash = [f"{k} {_plain(model_cfg[k])!r} (front-end: {_plain(v)!r})" for k, v in arch.items()
             if k in model_cfg and _plain(model_cfg[k]) != _plain(v)]
    if clash:
        raise TrainError(f"--audio-init {cfg.audio_init} fixes the audio stream, and these settings differ from "
                         f"it: {'; '.join(clash)}. Leave them unset, or train from scratch with --audio-init none")
    return {**model_cfg, **arch}, front


def prepare_finetune(model_cfg: dict[str, Any], cfg: TrainConfig, data: TrainingData,
                     split: Split) -> tuple[dict[str, Any], Any]:
    """The model settings with the frame encoder the cache was extracted with, and that encoder (to start
    from); every reason it cannot be done is said here, before anything is built."""
    if model_cfg.get("modalities", "av") == "audio":
        raise TrainError("--finetune-encoder trains the face encoder: it needs --modalities video or av")
    try:
        require_crops(data, split.train + split.val + split.test)
        encoder = starting_encoder(data.settings)
    except FinetuneError as e:
        raise TrainError(str(e)) from None
    return {**model_cfg, "frame_encoder": finetune_spec(encoder)}, encoder


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _check_modalities(cfg: ModelConfig, data: TrainingData, train_idx: list[int]) -> None:
    if cfg.uses_audio and not data.has_audio[train_idx].any():
        raise TrainError("--modalities includes audio but no training clip has audio")
    if cfg.uses_video and not data.has_video[train_idx].any():
        raise TrainError("--modalities includes video but no training clip has a face "
                         "(was the cache extracted from audio-only files?)")


def fit(data: TrainingData, split: Split, model_cfg: dict[str, Any], cfg: TrainConfig, out: str | Path,
        resume: bool = False, rt: Runtime | None = None) -> dict[str, Any]:
    """Train on ``split.train``, early-stop on ``split.val`` UAR, report on test (or val) with best.pt
    (the epoch with the best val UAR, or with ``keep`` "last" the final one).

    Writes ``out``/best.pt, last.pt, metrics.csv, split.json, report.json, confusion.csv/.png.
    A second process training into the same ``out`` is refused (``RunBusy``) while this one runs:
    both would start fresh, or resume from one last.pt, and overwrite each other's checkpoints.
    """
    rt = rt or start_runtime()
    out = Path(out)
    if not rt.main:                 # distributed ranks: the main process holds the folder for all
        return _fit(data, split, model_cfg, cfg, out, resume, rt)
    out.mkdir(parents=True, exist_ok=True)
    with held_lock(out / ".lock", busy=RunBusy,
                   message=f"{out} is in use by another training run (the same command started twice?); wait for "
                           "it to finish, or use another --out"):
        return _fit(data, split, model_cfg, cfg, out, resume, rt)


def _fit(data: TrainingData, split: Split, model_cfg: dict[str, Any], cfg: TrainConfig, out: Path,
         resume: bool, rt: Runtime) -> dict[str, Any]:
    last_path, best_path = out / "last.pt", out / "best.pt"
    if (out / "report.json").is_file() and not resume:
        raise TrainError(f"{out} already holds a finished run; choose another --out (or --resume to keep it)")
    if last_path.is_file() and not resume:
        raise TrainError(f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out")
    state = None
    if resume and last_path.is_file():
        state = _load_resume(last_path, data)
        split = Split.from_dict(state["split"])
        model_cfg = ModelConfig.from_stored(state["config"])
        log.info("resuming %s after epoch %d", out, state["resume"]["epoch"])
    elif resume:
        log.info("nothing to resume in %s: starting fresh", out)
    if (out / "report.json").is_file() and state is not None and state["resume"].get("finished"):
        log.info("%s is finished; nothing to do", out)
        return _read_json(out / "report.json")

    front = encoder = None
    if state is None:
        model_cfg, front = prepare_audio_init(model_cfg, cfg, data)
        if cfg.finetune_encoder:
            model_cfg, encoder = prepare_finetune(model_cfg, cfg, data, split)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    mcfg = model.cfg
    _check_modalities(mcfg, data, split.train)
    e2e = mcfg.frame_encoder is not None
    if e2e != cfg.finetune_encoder:
        raise TrainError(f"cannot resume {out} {'with' if cfg.finetune_encoder else 'without'} --finetune-encoder: "
                         f"the run was started {'with' if e2e else 'without'} it")
    if e2e and cfg.augment.mixup > 0:
        raise TrainError("--mixup blends cached features, and with --finetune-encoder the model computes its own "
                         "from the crops: use one or the other")
    video_dim = mcfg.video_dim if mcfg.uses_video else 0
    if state is None:
        model.set_normalisation(normalisation_stats(data, split.train, video_dim, mcfg.map_cells, mcfg.audio_norm))
        if front is not None:
            front.init_audio(model)     # the stream and its mel normalisation; the head stays new
        if encoder is not None:
            model.frame_encoder.net.load_state_dict(encoder.model.state_dict())   # the cache's own encoder
    else:
        model.load_state_dict(state["model"])
    model.to(rt.device)

    def store(indices, audio_window=0):
        cells = 0 if e2e else mcfg.map_cells       # end to end, the model's encoder makes the maps from the crops
        on_dev = decide_on_device(cfg.features_on_device, padded_bytes(data, indices, video_dim, cells), rt.device)
        crops = None
        if e2e:
            crops = CropBank(data, indices, mcfg.frame_encoder)
            crops.place(rt.device, decide_on_device(cfg.features_on_device, crops.nbytes, rt.device))
        return FeatureStore(data, indices, video_dim, rt.device, on_dev, cells, crops, audio_window)

    frames_per_second = data.settings["sample_rate"] / data.settings["hop_length"]
    train_store = store(split.train, round(cfg.max_train_seconds * frames_per_second))
    val_store = store(split.val) if split.val else None
    weights = _class_weights(data.labels[split.train], len(data.classes)) if cfg.balance else None
    criterion = build_loss(cfg.loss, cfg.label_smoothing, weights, cfg.compact_beta).to(rt.device)
    pretrained_audio = front is not None or bool((state or {}).get("audio_init"))
    familiarity = None
    if cfg.audio_lr is None and not cfg.audio_frozen_epochs and mcfg.modalities == "audio" and pretrained_audio:
        # the default for an audio-only model: a stream frozen when its front-end already knows the corpus
        if state is None:
            familiarity = _broadcast(rt, corpus_familiarity(front, data, split.train, rt.device, cfg.batch_size * 2,
                                                            cfg.amp))
        else:
            familiarity = (state.get("audio_init") or {}).get("familiarity")
        if familiarity and familiarity["frozen"]:
            cfg = dataclasses.replace(cfg, audio_lr=0.0)
    if (cfg.audio_lr == 0 or cfg.audio_frozen_epochs) and mcfg.uses_audio and not pretrained_audio:
        raise TrainError("--audio-lr 0 and --audio-frozen-epochs freeze the audio stream, which needs a pretrained "
                         "front-end to start from (--audio-init default|PATH), not --audio-init none")
    head_only = pretrained_audio and cfg.audio_lr == 0 and mcfg.modalities == "audio"
    cfg = dataclasses.replace(cfg, keep=kept_epoch(cfg, head_only))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg, pretrained_audio), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    steps_per_epoch = len(_global_batches(len(train_store), cfg.batch_size, rt.world, cfg.seed, 0))
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    history: list[dict] = []
    start_epoch, best_uar, since_best = 0, -1.0, 0
    if state is not None:
        r = state["resume"]
        try:
            optimizer.load_state_dict(r["optimizer"])
        except ValueError:
            raise TrainError(f"cannot resume {out}: it was started with other learning-rate groups (an older avemo "
                             "gave the audio stream the head's rate; pass --audio-lr with the run's --lr to "
                             "resume it as it was)") from None
        scheduler.load_state_dict(r["scheduler"])
        history, start_epoch, best_uar, since_best = r["history"], r["epoch"], r["best_uar"], r["since_best"]
    train_model = model
    if rt.world > 1:
        # a stream frozen throughout stays out of the gradient all-reduce; one frozen for a while is in it,
        # and unused meanwhile
        always = audio_frozen(cfg, model, cfg.epochs)
        if always:
            set_audio_frozen(model, True)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=audio_frozen(cfg, model, 0) and not always)
    augment = BatchAugment(cfg.augment, frames_per_second, data.settings)
    crop_aug = crop_augment_config(mcfg.frame_encoder) if e2e else None
    audio_init = front.describe() if front is not None else (state or {}).get("audio_init")
    if front is not None and familiarity is not None:
        audio_init = audio_init | {"familiarity": familiarity}
    extra_common = {"split": split.to_dict(), "train_config": cfg.to_dict(), "audio_init": audio_init}
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "split.json", split.to_dict())
        log.info("train %d clips (%s), val %d, test %d; device %s x%d (%s), features %s", len(split.train),
                 ", ".join(split.speakers.get("train", [])) or "all", len(split.val), len(split.test),
                 rt.device, rt.world, "bf16 autocast" if autocast_dtype(rt.device, cfg.amp, mcfg) else "float32",
                 "held on the device" if train_store.on_device else "collated per batch")
        if familiarity is not None and state is None:
            log.info("the audio front-end's zero-shot UAR on the training clips is %.3f (threshold %.3f, halfway "
                     "from chance): %s", familiarity["zero_shot_uar"], familiarity["threshold"],
                     f"it knows this corpus, so its stream stays frozen (--audio-lr "
                     f"{cfg.lr * PRETRAINED_AUDIO_LR_SCALE:g} fine-tunes it)"
                     if familiarity["frozen"] else "it does not know this corpus, so its stream is fine-tuned")
        if head_only and cfg.keep == "last" and val_store is not None:
            log.info("only the head trains, so best.pt will be the final epoch, not the best on validation "
                     "(--keep best picks that one)")
        if audio_rate(cfg, pretrained_audio) is not None and mcfg.uses_audio:
            log.info("audio stream (%s) at its own peak lr %g, the rest at %g",
                     "from a front-end" if pretrained_audio else "from scratch", audio_rate(cfg, pretrained_audio),
                     cfg.lr)
        if e2e:
            log.info("face encoder trained end to end from '%s' (lr %g): %s frames per clip a step, %d face crops %s",
                     mcfg.frame_encoder["started_from"]["name"], cfg.encoder_lr, cfg.frames_per_clip or "all",
                     len(train_store.crops.pixels), "held on the device" if train_store.crops.on_device else "on the host")

    stopped = bool(split.val and cfg.patience and since_best >= cfg.patience)
    for epoch in range(start_epoch, cfg.epochs if not stopped else start_epoch):
        _reseed(cfg.seed, epoch, rt.rank)
        train_model.train()
        if mcfg.uses_audio and pretrained_audio:
            set_audio_frozen(model, audio_frozen(cfg, model, epoch))
        t0 = time.perf_counter()
        batches = _global_batches(len(train_store), cfg.batch_size, rt.world, cfg.seed, epoch)
        total, seen = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr,
                   disable=not (rt.main and cfg.progress) or None)
        for gb in bar:
            idx = gb.tensor_split(rt.world)[rt.rank]
            batch = augment(train_store.batch(idx, faces=False), getattr(model, "mel_mean", None), mcfg.audio_norm)
            if e2e:     # k random face frames per clip, augmented as the encoder was trained (train.finetune)
                batch = train_store.crops.attach(batch, cfg.frames_per_clip, crop_aug)
            batch, partner, lam = augment.mixup(batch)
            target = train_store.labels[idx.to(rt.device)]
            with _autocast(rt.device, cfg.amp, mcfg):
                logits = train_model(batch)["logits"].float()
                loss = criterion(logits, target)
                if partner is not None:
                    loss = lam * loss + (1 - lam) * criterion(logits, target[partner])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            if cfg.schedule == "onecycle":
                scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                # stop before this step reaches a checkpoint: best.pt and last.pt keep the last finite epoch
                raise TrainError(f"the training loss became {value} in epoch {epoch + 1}; no checkpoint was written "
                                 "for it. Lower --lr, or check the cache for extreme feature values")
            total += value * len(idx)
            seen += len(idx)
        if cfg.schedule == "cosine":
            scheduler.step()
        release_free_memory()
        row = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0, "clips_per_s": seen * rt.world / max(time.perf_counter() - t0, 1e-9)}
        improved = True
        if rt.main and val_store is not None:
            m = evaluate(model, val_store, data.classes, cfg.batch_size * 2, cfg.amp)
            row.update(val_uar=m["uar"], val_war=m["accuracy"], val_f1=m["macro_f1"])
            improved = m["uar"] > best_uar
            release_free_memory()
        improved = _broadcast(rt, improved)
        if improved:
            best_uar, since_best = row.get("val_uar", best_uar), 0
        else:
            since_best += 1
        history.append(row)
        stop = bool(val_store is not None and cfg.patience and since_best >= cfg.patience)
        if rt.main:
            log.info("epoch %d/%d loss %.4f%s %.1fs%s", epoch + 1, cfg.epochs, row["train_loss"],
                     f" val UAR {row['val_uar']:.3f} WAR {row['val_war']:.3f}" if "val_uar" in row else "",
                     row["seconds"], " *" if improved and val_store is not None else "")
            metrics = {k: v for k, v in row.items() if k.startswith("val_")} | {"epoch": epoch + 1}
            if improved or cfg.keep == "last":
                save_model(best_path, model, data.classes, data.settings, metrics, extra_common)
            save_model(last_path, model, data.classes, data.settings, metrics, extra_common | {"resume": {
                "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "history": history, "best_uar": best_uar, "since_best": since_best, "finished": False}})
            _write_history(out / "metrics.csv", history)
        if stop:
            if rt.main:
                log.info("early stop: no better val UAR for %d epochs", cfg.patience)
            break
    report = None
    if rt.main:
        report = _final_report(data, split, out, cfg, rt, len(history))
        ckpt = load_checkpoint(last_path, MODEL_KIND, (MODEL_VERSION,))
        ckpt["resume"]["finished"] = True
        save_checkpoint(last_path, ckpt, MODEL_KIND, MODEL_VERSION)
    if rt.world > 1:
        dist.barrier()
    return report


def fit_ensemble(data: TrainingData, split: Split, model_cfg: dict[str, Any], cfg: TrainConfig, out: str | Path,
                 resume: bool = False, rt: Runtime | None = None) -> dict[str, Any]:
    """``cfg.ensemble`` runs of ``fit`` with seeds seed, seed+1, ... in ``out``/member1, member2, ...;
    their best.pt files become one ``Ensemble`` in ``out``/best.pt, reported on as ``fit`` does.

    Each member is an ordinary run, so an interrupted ensemble resumes member by member.
    """
    rt = rt or start_runtime()
    out = Path(out)
    if (out / "report.json").is_file() and not resume:
        raise TrainError(f"{out} already holds a finished run; choose another --out (or --resume to keep it)")
    dirs = [out / f"member{k + 1}" for k in range(cfg.ensemble)]
    for k, member in enumerate(dirs):
        if rt.main:
            log.info("ensemble member %d/%d (seed %d)", k + 1, cfg.ensemble, cfg.seed + k)
        fit(data, split, model_cfg, dataclasses.replace(cfg, seed=cfg.seed + k), member, resume, rt)
    report = None
    if rt.main:
        loaded = [load_model(d / "best.pt") for d in dirs]
        first = loaded[0][1]
        save_model(out / "best.pt", Ensemble([m for m, _ in loaded]), data.classes, data.settings,
                   {"members": [c["metrics"] for _, c in loaded]},
                   {"split": first["split"], "train_config": cfg.to_dict(), "audio_init": first.get("audio_init")})
        write_json_atomic(out / "split.json", first["split"])
        epochs = len(pd.read_csv(dirs[0] / "metrics.csv"))
        report = _final_report(data, Split.from_dict(first["split"]), out, cfg, rt, epochs)
    if rt.world > 1:
        dist.barrier()
    return report


def _final_report(data: TrainingData, split: Split, out: Path, cfg: TrainConfig, rt: Runtime, epochs: int) -> dict:
    model, ckpt = load_model(out / "best.pt", map_location=rt.device)
    part = "test" if split.test else "val" if split.val else "train"
    indices = getattr(split, part)
    if getattr(model, "voice", None) is not None and not model.voice.is_fitted:
        # validation chose the epoch; with a test part, its clips are training data for the head too
        fit_voice_head(model, data, split.train + (split.val if part == "test" else []), cfg.augment.voice_noise,
                       cfg.augment.voice_band)
    video_dim = model.cfg.video_dim if model.cfg.uses_video else 0
    crops = None
    if model.cfg.frame_encoder is not None:
        crops = CropBank(data, indices, model.cfg.frame_encoder).place(rt.device, on_device=False)
    store = FeatureStore(data, indices, video_dim, rt.device, on_device=False,
                         video_cells=0 if crops is not None else model.cfg.map_cells, crops=crops)
    m = evaluate(model, store, data.classes, cfg.batch_size * 2, cfg.amp)
    report = {
        "evaluated_on": part,
        "held_out": part != "train",
        "speakers": split.speakers.get(part, []),
        "split_method": split.method,
        "best_epoch": ckpt["metrics"].get("epoch"),
        "epochs_run": epochs,
        "classes": data.classes,
        **m,
    }
    if part == "train":
        report["note"] = "no held-out part (--no-split): these are training-set figures, not an accuracy estimate"
    write_json_atomic(out / "report.json", report)
    title = f"{out.name}: {part} ({m['n']} clips) UAR {m['uar']:.3f} WAR {m['accuracy']:.3f}"
    write_confusion(out, m["confusion"], data.classes, title)
    ckpt["metrics"] = dict(ckpt["metrics"]) | {f"{part}_{k}": v for k, v in m.items() if k != "confusion"}
    save_model(out / "best.pt", model.cpu(), data.classes, data.settings, ckpt["metrics"],
               {k: ckpt.get(k) for k in ("split", "train_config", "audio_init")})
    log.info("%s %s: UAR %.3f WAR %.3f macro-F1 %.3f (%d clips)", out, part, m["uar"], m["accuracy"],
             m["macro_f1"], m["n"])
    return report


def fit_voice_head(model: AVEmoNet, data: TrainingData, indices: list[int],
                   noise_copies: int = AugmentConfig.voice_noise, band_copies: int = AugmentConfig.voice_band) -> None:
    """Fit a model's voice head (``avemo.model.voice``) on the clips of ``indices`` that have audio, on
    ``noise_copies`` noisy copies of each and ``band_copies`` band-limited ones (``train.augment.voice_copies``);
    where the cache's spectrograms cannot feed it, say why and keep the FCN alone."""
    rows = [i for i in indices if data.clips[i].has_audio]
    t0 = time.perf_counter()
    mels, speakers = [data.clips[i].arrays["mel"] for i in rows], [data.speakers[i] for i in rows]
    try:
        model.voice.read_settings(data.settings)          # before the copies: a cache it cannot read needs none
    except VoiceError as e:
        log.warning("no voice head: %s", e)
        return
    model.voice.fit(mels, data.labels[rows], speakers, data.settings, len(data.classes),
                    voice_copies(mels, speakers, data.settings, noise_copies, band_copies))
    log.info("voice head fitted on %d clips, %d noisy and %d band-limited copies of each (%.1fs): its "
             "probabilities weigh %g", len(rows), noise_copies, band_copies, time.perf_counter() - t0,
             model.cfg.voice_head)


def _load_resume(path: Path, data: TrainingData) -> dict:
    try:
        network, ckpt = load_model(path)
    except CheckpointError as e:
        raise TrainError(f"cannot resume: {e}") from None
    r = ckpt.get("resume")
    kinds = {"epoch": int, "optimizer": dict, "scheduler": dict, "history": list, "best_uar": (int, float),
             "since_best": int, "finished": bool}
    if not isinstance(r, dict) or any(not isinstance(r.get(k), t) for k, t in kinds.items()):
        raise TrainError(f"cannot resume: {path} is not a resumable checkpoint (its optimizer state is missing "
                         "or incomplete); start a new run with another --out")
    try:
        split = Split.from_dict(ckpt["split"])
        parts = [getattr(split, part) for part in ("train", "val", "test")]
        if not all(isinstance(i, int) and 0 <= i < len(data) for part in parts for i in part):
            raise ValueError("clip indices outside this cache")
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"cannot resume: {path} holds no usable split for this cache ({e})") from None
    # a voice-only run reads the spectrogram alone: the cache's face-side settings never reach it
    read = None if network.cfg.uses_video else AUDIO_SETTING_KEYS
    diff = [k for k, _, _ in settings_differences(ckpt["extraction_settings"], data.settings, read)]
    if diff:
        raise TrainError(f"cannot resume {path}: the cache was extracted with different settings "
                         f"({', '.join(diff)}) than the run it continues; use the original cache or a new --out")
    if ckpt["classes"] != data.classes:
        raise TrainError(f"cannot resume {path}: its classes {ckpt['classes']} differ from the cache's {data.classes}")
    return ckpt


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False, float_format="%.6g")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
