"""The voice head: a frozen, pretrained speaker encoder's statistics and a linear classifier on them.

The FCN learns its spectrogram features from the few hundred clips of one cache. A network
pretrained on thousands of speakers knows voices better than that: the GE2E speaker encoder
(Wan, Wang, Papir, Lopez Moreno, *Generalized end-to-end loss for speaker verification*,
ICASSP 2018; a 3-layer LSTM of 256 units on 40-band mel frames) in the weights Resemblyzer
publishes (Apache-2.0, ``weights/voice_ge2e.LICENSE``; trained on LibriSpeech, VoxCeleb 1 and
2) is shipped here as its LSTM alone. Its embedding is built to ignore what a speaker says
and how, but its layers' activations still carry it: the mean and standard deviation over
time of the outputs of its second and third layers (2 x 2 x 256 = 1,024 numbers per clip),
through a class-balanced logistic regression fitted on the training clips, beat the FCN on
speakers it never saw, and their probabilities averaged with the FCN's beat both (measured in
the README's speech benchmark). The first layer, nearest the spectrum, carries the speaker and
the recording more than the emotion: alone it scored 0.51 on both corpora, and leaving it out
raised the regression on the other two from 0.66 to 0.70 (EmoDB) and 0.61 to 0.63 (RAVDESS).
The encoder is never trained: the regression is fitted once, after the FCN.

The encoder reads the cache's log-mel directly: its 40 slaney-scale bands (0-8 kHz, area
normalised, as librosa makes them) are a fixed linear map of the cache's bands, fitted by
least squares on the two filterbanks, and each clip's power is scaled to one level (what
Resemblyzer's -30 dBFS normalisation does to the waveform), so the head is blind to the
recording gain as the FCN is meant to be. No cache needs re-extracting.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "voice_ge2e.npz"
ENCODER_BANDS = 40                     # the encoder's mel bands (slaney scale, 0 to 8 kHz)
ENCODER_RATE = 16000
LAYERS, HIDDEN = 3, 256
LAYER_STATS = 2 * HIDDEN               # a layer's mean and standard deviation over time
DEFAULT_LAYERS = (2, 3)                # the layers whose statistics the head reads (the first: see above)
# mean over a clip's frames of the 40 bands' summed power, for speech at -30 dBFS RMS with 25 ms Hann
# windows (measured with librosa on EmoDB clips: 0.417 +- 0.061): the level the encoder was trained at
FRAME_POWER = 0.42
CHUNK_FRAMES = 6000                    # an hour of audio runs through the LSTM a minute at a time
BATCH_FRAMES = 4096                    # clips of similar length share an LSTM batch up to this many padded frames


class VoiceError(ValueError):
    """A cache whose spectrograms the voice head cannot read (the reason in words)."""


@lru_cache(maxsize=1)
def encoder() -> nn.ModuleList:
    """The frozen LSTM layers, one module each (so the statistics of every layer can be taken),
    loaded once per process from the shipped file; float32, eval mode, no gradients."""
    if not WEIGHTS.is_file():
        raise VoiceError(f"the voice encoder's weights are missing ({WEIGHTS}); reinstall avemo, or train "
                         "without the voice head (--voice-head 0)")
    with np.load(WEIGHTS, allow_pickle=False) as z:
        w = {k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files}
    layers = nn.ModuleList()
    for i in range(LAYERS):
        lstm = nn.LSTM(ENCODER_BANDS if i == 0 else HIDDEN, HIDDEN, 1, batch_first=True)
        lstm.load_state_dict({f"{k}_l0": w[f"{k}_l{i}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
        layers.append(lstm)
    return layers.eval().requires_grad_(False)


def band_map(settings: dict) -> torch.Tensor:
    """[n_mels, 40]: the encoder's mel bands as a linear map of a cache's (least squares on the filterbanks).

    The cache's bands are torchaudio's (HTK scale, unnormalised triangles) between its f_min and
    f_max; the encoder's are slaney-scale, area-normalised, 0 to 8 kHz, on the same FFT bins.
    """
    sr, n_fft, n_mels = int(settings["sample_rate"]), int(settings["n_fft"]), int(settings["n_mels"])
    f_max = settings.get("f_max") or sr / 2
    if sr < ENCODER_RATE or f_max < ENCODER_RATE / 2 * 0.95:
        raise VoiceError(f"the voice head reads 0-8 kHz; this cache's spectrograms stop at {f_max:g} Hz "
                         f"({sr} Hz audio): train with --voice-head 0, or re-extract at 16 kHz or more")
    import torchaudio                   # only fitting needs it: loading a model stays light
    n_freqs = n_fft // 2 + 1
    ours = torchaudio.functional.melscale_fbanks(n_freqs, float(settings.get("f_min") or 0.0), float(f_max),
                                                  n_mels, sr).double()
    theirs = torchaudio.functional.melscale_fbanks(n_freqs, 0.0, ENCODER_RATE / 2, ENCODER_BANDS, sr,
                                                    norm="slaney", mel_scale="slaney").double()
    return torch.linalg.lstsq(ours, theirs).solution.float()


@torch.no_grad()
def voice_stats(mel: torch.Tensor, bands: torch.Tensor, layers: tuple[int, ...] = DEFAULT_LAYERS) -> torch.Tensor:
    """One clip's log-mel ([n_mels, T], natural log of power + 1e-6, as ``avemo.audio.log_mel`` writes it)
    -> [512 per layer]: mean and (unbiased) standard deviation over time of the outputs of the encoder's
    ``layers`` (1-3, in order)."""
    return voice_stats_batch([mel], bands, layers)[0]


@torch.no_grad()
def voice_stats_batch(mels: list[torch.Tensor], bands: torch.Tensor,
                      layers: tuple[int, ...] = DEFAULT_LAYERS) -> torch.Tensor:
    """``voice_stats`` of many clips ([N, 512 per layer]; zeros for a clip of no frames), the clips of similar
    length run through the LSTM together (``BATCH_FRAMES``): the same numbers, up to float rounding."""
    device = mels[0].device if mels else bands.device
    out = torch.zeros(len(mels), LAYER_STATS * len(layers), device=device)
    with torch.autocast(device.type, enabled=False):
        frames = [_encoder_frames(m, bands) for m in mels]
        lstms = encoder().to(device)[:max(layers)]
        order = sorted((i for i, f in enumerate(frames) if len(f)), key=lambda i: -len(frames[i]))
        k = 0
        while k < len(order):
            group = order[k:k + max(1, BATCH_FRAMES // len(frames[order[k]]))]
            k += len(group)
            sums, n = _layer_sums([frames[i] for i in group], lstms)          # [L, 2, B, H], [B]
            mean = sums[:, 0] / n[:, None]
            std = ((sums[:, 1] - n[:, None] * mean ** 2) / (n[:, None] - 1).clamp_min(1)).clamp_min(0.0).sqrt()
            out[group] = torch.cat([torch.cat([mean[j - 1], std[j - 1]], 1) for j in layers], 1).float()
    return out


def _encoder_frames(mel: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """[n_mels, T] cached log-mel -> [T, 40] encoder frames at the power level it was trained at."""
    from avemo.audio import LOG_EPS     # not at the top: avemo.audio loads PyAV, which a model never needs
    power = (mel.float().exp() - LOG_EPS).clamp_min(0.0)                          # [n_mels, T]
    frames = (bands.to(power.device).T @ power).clamp_min(0.0).T                  # [T, 40]
    return frames * (FRAME_POWER / frames.sum(1).mean().clamp_min(1e-12))


def _layer_sums(frames: list[torch.Tensor], lstms: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over time of each layer's outputs and of their squares ([layers, 2, B, 256], float64) for clips
    of frames ([T_b, 40], longest first), and their frame counts [B]. One clip runs a chunk of time at a
    time (its state carried over, so an hour of audio fits in memory); several run as one padded batch,
    whose per-step matrix products are a few times faster than one clip's on a CPU and far less hurt by
    other jobs on its cores (``benchmarks/bench_voice.py``)."""
    from torch.nn.utils.rnn import pad_sequence
    dev = frames[0].device
    sums = torch.zeros(len(lstms), 2, len(frames), HIDDEN, dtype=torch.float64, device=dev)
    n = torch.tensor([len(f) for f in frames], dtype=torch.float64, device=dev)
    if len(frames) == 1:
        state = [None] * len(lstms)
        for t0 in range(0, len(frames[0]), CHUNK_FRAMES):
            h = frames[0][None, t0:t0 + CHUNK_FRAMES]
            for i, lstm in enumerate(lstms):
                h, state[i] = lstm(h, state[i])
                sums[i, 0, 0] += h[0].sum(0).double()
                sums[i, 1, 0] += (h[0].double() ** 2).sum(0)
        return sums, n
    h = pad_sequence(frames, batch_first=True)                                     # [B, T, 40]
    # the LSTM runs forwards, so what follows a clip's end (padding) never reaches its outputs; they are masked
    inside = (torch.arange(h.shape[1], device=dev)[None] < n[:, None]).double()[..., None]
    for i, lstm in enumerate(lstms):
        h, _ = lstm(h)
        out = h.double() * inside
        sums[i, 0] = out.sum(1)
        sums[i, 1] = (out ** 2).sum(1)
    return sums, n


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-2,
                 max_iter: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class-balanced L2 logistic regression on z-scored features: (mean, std, weight [C, D], bias [C]).

    Convex with the penalty, so it starts from zero (no random state) and L-BFGS finds the one optimum.
    """
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    counts = np.bincount(y, minlength=n_classes)
    weight = torch.tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    lin = nn.Linear(xt.shape[1], n_classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=max_iter)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(xt), yt, weight=weight) + l2 * (lin.weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mu.astype(np.float32), sd.astype(np.float32), lin.weight.detach().numpy(), lin.bias.detach().numpy()


class VoiceHead(nn.Module):
    """The encoder statistics' classifiers and how much they weigh: the model's probabilities become
    ``(1 - w) p_model + w p_voice`` once fitted (``fitted`` 0 until then: training sees the FCN alone).

    Two regressions: one on the statistics as they are, for a clip alone, and one on each training
    speaker's statistics less that speaker's mean, for a model adapted to a group of clips (one speaker's:
    ``adapt``), whose mean then stands in for the speaker's. Who is speaking is most of what a speaker
    encoder's statistics hold; removing it leaves how they speak (the classic speaker normalisation of
    speech emotion work, measured in the README's speech benchmark).
    """

    def __init__(self, n_mels: int, n_classes: int, weight: float, layers: tuple[int, ...]):
        super().__init__()
        self.weight, self.layers = weight, tuple(layers)
        dim = LAYER_STATS * len(self.layers)
        self.register_buffer("bands", torch.zeros(n_mels, ENCODER_BANDS))
        self.register_buffer("stats_mean", torch.zeros(dim))
        self.register_buffer("stats_std", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros(()))
        # their random initialisation (they are fitted, so it is overwritten) is drawn from a forked generator:
        # the model's other layers then draw the same random numbers with or without a head, so the FCN of a
        # seed is the same either way (nn.utils.skip_init does the same, but its first call imports a third of
        # a second of torch internals, which every cold avemo-predict paid)
        with torch.random.fork_rng(devices=[]):
            self.classifier = nn.Linear(dim, n_classes)
            self.speaker_classifier = nn.Linear(dim, n_classes)
        self.register_buffer("centred_std", torch.ones(dim))
        self.register_buffer("speaker_fitted", torch.zeros(()))
        for layer in (self.classifier, self.speaker_classifier):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("group_mean", torch.zeros(dim))
        self.register_buffer("adapted", torch.zeros(()))
        # fitted by L-BFGS after training, never by the optimiser; DDP refuses parameters a step leaves unused
        self.requires_grad_(False)

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted > 0)

    def stats(self, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, T] log-mel batch and its [B, T] mask -> [B, 512 per layer] (zeros for a clip without audio)."""
        lengths = mask.sum(1).tolist()
        return voice_stats_batch([mel[b, :, :int(n)] for b, n in enumerate(lengths)], self.bands, self.layers)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """[N, n_classes]: the plain regression's logits for clips' statistics (``clip_stats``)."""
        x = torch.from_numpy(x).to(self.stats_mean.device)
        with torch.no_grad():
            return self.classifier((x - self.stats_mean) / self.stats_std).cpu().numpy()

    def temper(self, temperature: float) -> None:
        """Divide the plain regression's logits by ``temperature`` (temperature scaling, Guo et al. 2017: a
        scale of a linear layer), so its probabilities are calibrated on clips it did not train on."""
        with torch.no_grad():
            self.classifier.weight.div_(temperature)
            self.classifier.bias.div_(temperature)

    def read_settings(self, settings: dict) -> None:
        """Read spectrograms of a cache with these extraction settings (its band map; VoiceError if it cannot)."""
        self.bands.copy_(band_map(settings))

    def clip_stats(self, mels: list[np.ndarray]) -> np.ndarray:
        """[N, 512 per layer]: the statistics of clips' log-mels (as cached)."""
        return voice_stats_batch([torch.from_numpy(np.asarray(m)) for m in mels], self.bands.cpu(),
                                 self.layers).numpy()

    def fit(self, mels: list[np.ndarray], labels: np.ndarray, speakers: list, settings: dict,
            n_classes: int, noisy: list[list[np.ndarray]] | None = None) -> None:
        """Fit on the training clips' log-mels (as cached), their class indices and their speakers
        (the speaker-relative regression needs two speakers or more; None: unknown). ``noisy``: copies of
        the same clips with noise mixed in ([copy][clip], ``train.augment.noisy_copies``), which the plain
        regression learns from too."""
        self.read_settings(settings)
        self.fit_stats(self.clip_stats(mels), labels, speakers, n_classes,
                       np.stack([self.clip_stats(copy) for copy in noisy]) if noisy else None)

    def fit_stats(self, x: np.ndarray, labels: np.ndarray, speakers: list, n_classes: int,
                  x_noisy: np.ndarray | None = None) -> None:
        """``fit`` on statistics already taken (``clip_stats``, after ``read_settings``; ``x_noisy``: [copies,
        clips, dim], the noisy copies'). The speaker-relative regression reads the clean clips alone: a
        speaker's mean already takes a steady noise away, and its fit on clean and noisy copies was
        better on one corpus and worse on the other (README)."""
        labels = np.asarray(labels)
        plain = x if x_noisy is None else np.concatenate([x, *x_noisy])
        mu, sd, w, b = fit_logistic(plain, np.tile(labels, len(plain) // len(x)), n_classes)
        # stats_mean stays the clean clips' mean (adapt blends a group's mean with it); the bias absorbs the shift
        clean_mu = x.mean(0)
        b = (b + w @ ((clean_mu - mu) / sd)).astype(b.dtype)
        self._set(self.classifier, w, b, stats_mean=clean_mu.astype(mu.dtype), stats_std=sd)
        self.fitted.fill_(1.0)
        known = np.array([s is not None and s != "" for s in speakers])
        if len({s for s, k in zip(speakers, known) if k}) >= 2:
            spk = np.array([str(s) for s in speakers])[known]
            centred = x[known] - np.stack([x[known][spk == s].mean(0) for s in spk])
            _, sd_c, w_c, b_c = fit_logistic(centred, labels[known], n_classes)
            self._set(self.speaker_classifier, w_c, b_c, centred_std=sd_c)
            self.speaker_fitted.fill_(1.0)

    def _set(self, layer: nn.Linear, w: np.ndarray, b: np.ndarray, **buffers: np.ndarray) -> None:
        dev = self.stats_mean.device
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w).to(dev))
            layer.bias.copy_(torch.from_numpy(b).to(dev))
            for name, value in buffers.items():
                getattr(self, name).copy_(torch.from_numpy(value).to(dev))

    def adapt(self, mels: list[np.ndarray], prior_clips: float) -> None:
        """Score with the speaker-relative regression from now on, the mean of the group ``mels`` standing in for
        the speaker's: ``w * group + (1 - w) * training clips'``, ``w = n / (n + prior_clips)`` for n clips, as
        ``avemo.model.adapt`` blends the stream's statistics. Nothing changes without that regression."""
        if not bool(self.speaker_fitted > 0) or not mels:
            return
        group = torch.from_numpy(self.clip_stats(mels).mean(0)).to(self.stats_mean.device)
        w = len(mels) / (len(mels) + prior_clips)
        self.group_mean.copy_(w * group + (1 - w) * self.stats_mean)
        self.adapted.fill_(1.0)

    def mix(self, logits: torch.Tensor, mel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits whose softmax is ``(1 - w) softmax(logits) + w p_voice`` for the clips with audio."""
        with torch.autocast(logits.device.type, enabled=False):
            x = self.stats(mel, mask)
            if bool(self.adapted > 0):
                p_voice = torch.softmax(self.speaker_classifier((x - self.group_mean) / self.centred_std), -1)
            else:
                p_voice = torch.softmax(self.classifier((x - self.stats_mean) / self.stats_std), -1)
            p = torch.softmax(logits.float(), -1)
            has = mask.any(1, keepdim=True)
            p = torch.where(has, (1 - self.weight) * p + self.weight * p_voice, p)
            return p.clamp_min(1e-12).log()
