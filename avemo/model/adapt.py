"""A trained model adapted to one group of unlabelled clips: one speaker, or one recording set-up.

The audio stream standardises each mel bin with its training set's mean and spread, and its FCN
normalises every layer with BatchNorm statistics of the training batches. A new voice or
microphone shifts both, and a model trained on a few speakers has never seen the shift. Given
several clips of the new speaker, no labels needed, ``adapt`` recomputes both on them and
leaves every weight as it was: the mel statistics as training computes them, then each
BatchNorm layer's mean and variance from the group passing through the network (AdaBN: Li,
Wang, Shi, Hou, Liu, "Adaptive Batch Normalization for practical domain adaptation", Pattern
Recognition 80, 2018). It is per-speaker normalisation, the classic remedy for speaker
variation in speech emotion recognition, carried to every layer of the stream.

Only the audio side is adapted; the face side keeps its training statistics (not measured).
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from avemo.batching import length_batches
from avemo.model.audio import EVAL_FRAMES

ADAPT_FRAMES = 1024     # BatchNorm statistics from windows of this many mel frames (about 10 s at a 10 ms hop)
MIN_CLIPS = 10          # fewer clips than this cost accuracy on unseen speakers (README, speech benchmark)


class AdaptError(ValueError):
    """A model or a group that cannot be adapted, with the reason in words."""


def mel_statistics(mels: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-bin mean and standard deviation (at least 1e-3) over every frame of ``mels`` ([n_mels, T] each),
    from running sums: a long recording is never copied."""
    n, total, squares = 0, None, None
    for mel in mels:
        m = np.asarray(mel, np.float64)
        total = m.sum(1) if total is None else total + m.sum(1)
        squares = (m ** 2).sum(1) if squares is None else squares + (m ** 2).sum(1)
        n += m.shape[1]
    if not n:
        raise AdaptError("no audio to compute statistics on")
    mean = total / n
    return {"mel_mean": mean, "mel_std": np.maximum(np.sqrt(np.maximum(squares / n - mean ** 2, 0.0)), 1e-3)}


def check_adaptable(model: nn.Module) -> None:
    """Raise ``AdaptError`` if ``model`` has no group statistics to adapt."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not cfg.uses_audio:
        raise AdaptError("adaptation recomputes the audio stream's normalisation, and this model reads no audio")
    if cfg.audio_norm == "utterance":
        raise AdaptError("this model centres each clip's mel on its own mean (--audio-norm utterance): "
                         "there is no group statistic to adapt")


def adapt(model: nn.Module, mels: Sequence[np.ndarray]) -> nn.Module:
    """A copy of ``model`` normalised for the group whose log-mel spectrograms are ``mels`` ([n_mels, T],
    as extraction writes them), in evaluation mode.

    Every clip is cut into windows of ADAPT_FRAMES, batched by length within EVAL_FRAMES clip-frames (one
    pass of the FCN: in training mode it never runs in chunks), and each BatchNorm layer of the audio
    stream ends with the mean over the batches of their statistics.
    """
    check_adaptable(model)
    if hasattr(model, "members"):               # an Ensemble: each member has statistics of its own
        return type(model)([adapt(m, mels) for m in model.members]).eval()
    cfg = model.cfg
    mels = [np.asarray(m, np.float32) for m in mels if m is not None and np.ndim(m) == 2 and np.shape(m)[1]]
    if not mels:
        raise AdaptError("no clip with usable audio to adapt to")
    if any(m.shape[0] != cfg.n_mels for m in mels):
        raise AdaptError(f"the model reads {cfg.n_mels} mel bins, and a clip to adapt to has another number")
    adapted = copy.deepcopy(model).eval()
    adapted.set_normalisation(mel_statistics(mels))
    device = adapted.mel_mean.device
    norms = [m for m in adapted.audio.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momentum = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    windows = [m[:, s:s + ADAPT_FRAMES] for m in mels for s in range(0, m.shape[1], ADAPT_FRAMES)]
    batches = length_batches(np.array([w.shape[1] for w in windows]), len(windows), EVAL_FRAMES)
    adapted.audio.train()                       # the stream has no dropout: only BatchNorm behaves otherwise
    with torch.no_grad():
        for k, idx in enumerate(batches):
            group = [windows[i] for i in idx.tolist()]
            t = max(w.shape[1] for w in group)
            mel = torch.zeros(len(group), cfg.n_mels, t)
            mask = torch.zeros(len(group), t, dtype=torch.bool)
            for j, w in enumerate(group):
                mel[j, :, :w.shape[1]] = torch.from_numpy(w)
                mask[j, :w.shape[1]] = True
            mel, mask = mel.to(device), mask.to(device)
            for m in norms:
                m.momentum = 1.0 / (k + 1)      # a running mean over the batches, each weighted alike
            adapted.audio(adapted._normalise_mel(mel, mask), mask)
    adapted.eval()
    for m, mom in zip(norms, momentum):
        m.momentum = mom
    return adapted
