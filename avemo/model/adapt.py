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

A handful of clips gives statistics skewed by what those clips happen to say and feel (three angry
clips are not the speaker's average). So the group's statistics are blended with the model's own,
the model counting as PRIOR_CLIPS clips: weight ``n / (n + PRIOR_CLIPS)`` on the group's ``n``
clips (prior-weighted BatchNorm: Schneider, Rusak, Eck, Bringmann, Brendel, Bethge, "Improving
robustness against common corruptions by covariate shift adaptation", NeurIPS 2020). With 3-5
clips plain AdaBN cost 0.07-0.11 UAR on EmoDB's unseen speakers; blended, it gains (README,
speaker adaptation).

Adapting maps a speaker onto the population whose statistics the model holds, which helps only
where that population is the clips the model learned from, of one corpus. ``adaptation_scope``
reads that from the model's record: a stream trained from scratch adapts its mel and BatchNorm
statistics; a stream fine-tuned from a front-end of one corpus keeps the front-end's mel
normalisation (its weights were trained under it) and adapts its BatchNorm statistics
(re-estimated on the clips it was fine-tuned on); a voice side that learned from several corpora
at once (itself, or through its front-end) is refused, since it tells the corpora apart by the very
statistics adaptation removes (README, speaker adaptation), and so is a stream kept frozen from a
front-end, whose statistics are the front-end's corpus, not the clips its head learned from.

Only the audio side is adapted; the face side keeps its training statistics (not measured).
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from avemo.batching import length_batches
from avemo.model.audio import EVAL_FRAMES, clip_level

ADAPT_FRAMES = 1024     # BatchNorm statistics from windows of this many mel frames (about 10 s at a 10 ms hop)
PRIOR_CLIPS = 10        # the model's own statistics weigh as much as this many of the group's clips


class AdaptError(ValueError):
    """A model or a group that cannot be adapted, with the reason in words."""


def mel_statistics(mels: Iterable[np.ndarray], audio_norm: str = "global") -> dict[str, np.ndarray]:
    """Per-bin mean and standard deviation (at least 1e-3) over every frame of ``mels`` ([n_mels, T] each),
    from running sums: a long recording is never copied. With ``audio_norm`` "level", of each clip brought to
    one loudness first, as such a model sees it (``clip_level``)."""
    n, total, squares = 0, None, None
    for mel in mels:
        m = np.asarray(mel, np.float64)
        if audio_norm == "level":
            m = m - float(clip_level(torch.from_numpy(m)[None]))
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


def _corpora(data: object) -> list[str]:
    return sorted({str(d.get("name", "?")) for d in data if isinstance(d, dict)}) if isinstance(data, list) else []


def adaptation_scope(record: dict) -> str:
    """Which audio statistics of a model may adapt, from its checkpoint (or a front-end's info): "all" (mel and
    BatchNorm: a stream trained from scratch on one corpus) or "batchnorm" (a stream fine-tuned from a front-end
    of one corpus). Raises ``AdaptError``, with the reason, for a voice side that learned from several corpora
    at once (itself, or the front-end its stream started from) and for a stream kept frozen from a front-end."""
    init = record.get("audio_init")
    about = record.get("about") or {}
    if init:
        data, whose = init.get("data"), f"its audio stream started from the front-end '{init.get('name', '?')}', which"
    elif isinstance(about.get("data"), dict):
        data, whose = about["data"].get("voice"), "its voice side"
    else:
        data, whose = record.get("data"), "it"
    corpora = _corpora(data)
    if len(corpora) > 1:
        raise AdaptError(
            f"{whose} learned from several corpora at once ({', '.join(corpora)}), and relies on what tells them "
            "apart: adapting its statistics to one speaker takes that away (measured on held-out EmoDB speakers: "
            "such a model 0.64 -> 0.33 UAR, one fine-tuned from it 0.67 -> 0.62). Adaptation needs a model "
            "trained on one corpus: avemo-train CACHE --out RUN --audio-init none on your own clips")
    if init:
        if (record.get("train_config") or {}).get("audio_lr") == 0 or (init.get("familiarity") or {}).get("frozen"):
            raise AdaptError(
                f"this model's audio stream stayed frozen from the front-end '{init.get('name', '?')}', so its "
                f"statistics are those of the front-end's corpus ({', '.join(corpora) or '?'}), not of the clips "
                "its head learned from. Adapt a model whose stream was fine-tuned (avemo-train --audio-lr 3e-4) "
                "or trained from scratch (--audio-init none)")
        return "batchnorm"
    return "all"


def _moments(x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of ``x`` [B, C, F, T] over its valid cells (``keep`` [B, 1, 1, T],
    1 valid and 0 padded, or None), as MaskedBatchNorm2d's training statistics; float64, so a channel whose
    mean is large against its spread keeps its variance."""
    x = x.double()
    if keep is None:
        n = torch.tensor(float(x[:, 0].numel()), dtype=torch.float64)
    else:
        keep = keep.double()
        x = x * keep
        n = (keep.sum() * x.shape[2]).clamp_min(1.0)
    mean = x.sum((0, 2, 3)) / n
    var = (x.square().sum((0, 2, 3)) / n - mean.square()).clamp_min(0.0) * n / (n - 1).clamp_min(1.0)
    return mean, var


def _usable(model: nn.Module, mels: Sequence[np.ndarray]) -> list[np.ndarray]:
    mels = [np.asarray(m, np.float32) for m in mels if m is not None and np.ndim(m) == 2 and np.shape(m)[1]]
    if not mels:
        raise AdaptError("no clip with usable audio to adapt to")
    if any(m.shape[0] != model.cfg.n_mels for m in mels):
        raise AdaptError(f"the model reads {model.cfg.n_mels} mel bins, and a clip to adapt to has another number")
    return mels


def _windows(mels: list[np.ndarray]) -> list[np.ndarray]:
    return [m[:, s:s + ADAPT_FRAMES] for m in mels for s in range(0, m.shape[1], ADAPT_FRAMES)]


def _stream_pass(net: nn.Module, windows: list[np.ndarray], make_hook) -> int:
    """Pass ``windows`` through ``net``'s audio stream (a copy: its modes change) with ``make_hook(i)`` as a
    forward pre-hook on its i-th BatchNorm layer; returns the number of batches.

    Windows are batched by length within EVAL_FRAMES clip-frames. The stream in training mode never runs in
    chunks of time (the batches are bounded instead), and its BatchNorm layers, in evaluation, normalise with
    whatever statistics the hooks set."""
    norms = [m for m in net.audio.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(norms)]
    batches = length_batches(np.array([x.shape[1] for x in windows]), len(windows), EVAL_FRAMES)
    device = net.mel_mean.device
    net.audio.train()
    for m in norms:
        m.eval()
    try:
        with torch.no_grad():
            for idx in batches:
                part = [windows[i] for i in idx.tolist()]
                t = max(x.shape[1] for x in part)
                mel = torch.zeros(len(part), net.cfg.n_mels, t)
                mask = torch.zeros(len(part), t, dtype=torch.bool)
                for j, x in enumerate(part):
                    mel[j, :, :x.shape[1]] = torch.from_numpy(x)
                    mask[j, :x.shape[1]] = True
                mel, mask = mel.to(device), mask.to(device)
                net.audio(net._normalise_mel(mel, mask), mask)
    finally:
        for h in hooks:
            h.remove()
    net.eval()
    return len(batches)


def population_statistics(model: nn.Module, mels: Sequence[np.ndarray]) -> list[dict]:
    """What the clips ``mels`` of a population (a corpus: every clip of a cache) look like to ``model`` as it is:
    their mel statistics and every audio BatchNorm layer's input mean and variance. One entry per member of an
    ensemble (one for a model); ``adapt(..., population=)`` adapts a speaker relative to it."""
    check_adaptable(model)
    if hasattr(model, "members"):
        return [population_statistics(m, mels)[0] for m in model.members]
    mels = _usable(model, mels)
    totals: dict[int, list] = {}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            mean, var = _moments(args[0], args[1] if len(args) > 1 else None)
            t = totals.setdefault(i, [0.0, 0.0])
            t[0], t[1] = t[0] + mean, t[1] + var
        return hook

    n = _stream_pass(copy.deepcopy(model).eval(), _windows(mels), make_hook)
    return [{"mel": mel_statistics(mels, model.cfg.audio_norm), "layers": [(totals[i][0] / n, totals[i][1] / n) for i in sorted(totals)]}]


def _relative(speaker_mean, speaker_var, pop_mean, pop_var, own_mean, own_var):
    """Statistics that map the speaker onto where their population sits under the model's own: the speaker's
    offset and spread against their population are removed, the population's against the model kept."""
    var = speaker_var * own_var / pop_var
    return speaker_mean - (pop_mean - own_mean) * (speaker_var / pop_var) ** 0.5, var


def adapt(model: nn.Module, mels: Sequence[np.ndarray], prior_clips: float = PRIOR_CLIPS,
          scope: str = "all", population: list[dict] | None = None) -> nn.Module:
    """A copy of ``model`` normalised for the group whose log-mel spectrograms are ``mels`` ([n_mels, T],
    as extraction writes them), in evaluation mode.

    Without ``population`` the group's statistics replace the model's (``scope``, from ``adaptation_scope``:
    "all" adapts the mel and BatchNorm statistics, "batchnorm" keeps the model's mel normalisation). With it
    (``population_statistics`` of the corpus the group belongs to), the group is adapted relative to that
    corpus: its deviation from the corpus is removed and the corpus's own offset from the model kept, which
    is right for any model, including one trained on several corpora (``scope`` must then be "all").

    Every clip is cut into windows of ADAPT_FRAMES (a long recording counts as one clip per window), batched
    by length within EVAL_FRAMES clip-frames. Each statistic becomes ``w * group + (1 - w) * model's`` with
    ``w = n / (n + prior_clips)`` for ``n`` windows (0: the group's alone, plain AdaBN). The mel statistics
    come first; then, in one pass per batch, each BatchNorm layer measures its input's moments and normalises
    that batch with them blended, so every later layer measures what it will see once adapted; each layer
    ends with the blend of the mean over the batches of its moments.
    """
    if scope not in ("all", "batchnorm"):
        raise AdaptError(f"scope is all or batchnorm, not {scope!r}")
    if population is not None and scope != "all":
        raise AdaptError("adapting relative to a population adapts every statistic (scope all)")
    if prior_clips < 0:
        raise AdaptError(f"the prior weighs as a number of clips, at least 0, not {prior_clips}")
    check_adaptable(model)
    if hasattr(model, "members"):               # an Ensemble: each member has statistics of its own
        if population is not None and len(population) != len(model.members):
            raise AdaptError(f"population statistics of {len(population)} models for an ensemble of "
                             f"{len(model.members)}")
        return type(model)([adapt(m, mels, prior_clips, scope, None if population is None else [population[k]])
                            for k, m in enumerate(model.members)]).eval()
    pop = population[0] if population is not None else None
    mels = _usable(model, mels)
    windows = _windows(mels)
    w = len(windows) / (len(windows) + prior_clips)
    adapted = copy.deepcopy(model).eval()
    if scope == "all":
        group = mel_statistics(mels, model.cfg.audio_norm)
        own = {k: getattr(model, k).detach().cpu().double().numpy() for k in group}
        mean, var = group["mel_mean"], group["mel_std"] ** 2
        if pop is not None:
            mean, var = _relative(mean, var, pop["mel"]["mel_mean"], pop["mel"]["mel_std"] ** 2,
                                  own["mel_mean"], own["mel_std"] ** 2)
        adapted.set_normalisation({"mel_mean": w * mean + (1 - w) * own["mel_mean"],
                                   "mel_std": np.sqrt(w * var + (1 - w) * own["mel_std"] ** 2)})
    norms = [m for m in adapted.audio.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    prior = [(m.running_mean.detach().clone().double(), m.running_var.detach().clone().double()) for m in norms]
    if pop is not None and len(pop["layers"]) != len(norms):
        raise AdaptError("the population statistics were taken with another network")
    totals = [[0.0, 0.0] for _ in norms]

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            mean, var = _moments(args[0], args[1] if len(args) > 1 else None)
            if pop is not None:
                pop_mean, pop_var = pop["layers"][i]
                mean, var = _relative(mean, var, pop_mean.to(mean.device), pop_var.to(mean.device).clamp_min(1e-12),
                                      *prior[i])
            totals[i][0] = totals[i][0] + mean
            totals[i][1] = totals[i][1] + var
            module.running_mean.copy_(w * mean + (1 - w) * prior[i][0])
            module.running_var.copy_(w * var + (1 - w) * prior[i][1])
        return hook

    n = _stream_pass(adapted, windows, make_hook)
    with torch.no_grad():
        for m, (mean, var), (p_mean, p_var) in zip(norms, totals, prior):
            m.running_mean.copy_(w * mean / n + (1 - w) * p_mean)
            m.running_var.copy_(w * var / n + (1 - w) * p_var)
    if getattr(adapted, "voice", None) is not None and adapted.voice.is_fitted:
        adapted.voice.adapt(mels, prior_clips)
    return adapted.eval()
