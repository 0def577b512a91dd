"""Fusion of the audio vector a and video vector v, chosen by name (``FUSIONS``)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F


class FactorizedBilinearPooling(nn.Module):
    """z = SumPool(U~^T a o V~^T v, k) (Deep Fusion eq. 12), then dropout, signed sqrt, L2 norm (MFB).

    U~ is [m, k*o] and V~ is [n, k*o]: output i is the low-rank bilinear form
    z_i = a^T W_i v with W_i = U_i V_i^T, U_i and V_i the i-th group of k columns.
    """

    def __init__(self, audio_dim: int, video_dim: int, k: int = 4, o: int = 256, dropout: float = 0.1):
        super().__init__()
        if k < 1 or o < 1:
            raise ValueError(f"fbp needs k >= 1 and o >= 1, got k={k}, o={o}")
        self.U = nn.Linear(audio_dim, k * o, bias=False)
        self.V = nn.Linear(video_dim, k * o, bias=False)
        self.k, self.o = k, o
        self.drop = nn.Dropout(dropout)
        self.out_dim = o

    def bilinear(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # a [B, m], v [B, n] -> z [B, o]; column j of U~ belongs to output j // k
        joint = self.U(a) * self.V(v)                              # [B, k*o]
        return joint.view(-1, self.o, self.k).sum(-1)              # SumPool(., k), [B, o]

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        z = self.drop(self.bilinear(a, v))
        z = torch.sign(z) * torch.sqrt(z.abs() + 1e-8)             # signed square root (power norm)
        return F.normalize(z, dim=-1)


class ConcatFusion(nn.Module):
    """[a ; v]: the linear baseline (the classifier on top sees a and v only additively)."""

    def __init__(self, audio_dim: int, video_dim: int, dropout: float = 0.1):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.out_dim = audio_dim + video_dim

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.cat([a, v], dim=-1))


class ProductOfExperts(nn.Module):
    """Late fusion: each modality its own classifier, their class posteriors multiplied.

    If audio and face are independent given the emotion y, Bayes' rule gives
    p(y | a, v) = p(y | a) p(y | v) / p(y); with the uniform prior of balanced classes the
    fused log-probability is log p(y | a) + log p(y | v) up to a constant. A clip missing a
    modality simply loses that term, so it is decided by what it has, with no stand-in. The
    heads' logits are the experts' (tempered, prior-corrected) logits: a temperature and a
    log-prior correction are a scale and a shift of a linear head, so calibrating a model
    (see ``train.default_model``) rewrites the heads and adds no parameters.

    Unlike fbp and concat it needs no clip with both modalities to learn from, which makes it
    the sound fusion for modalities trained on different corpora (the shipped default model).
    """

    def __init__(self, audio_dim: int, video_dim: int, n_classes: int):
        super().__init__()
        self.audio_head = nn.Linear(audio_dim, n_classes)
        self.video_head = nn.Linear(video_dim, n_classes)

    def forward(self, a: torch.Tensor, v: torch.Tensor, has_audio: torch.Tensor, has_video: torch.Tensor,
                audio_mix: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fused log-probabilities, audio log-probabilities, video log-probabilities), each [B, n_classes].
        ``audio_mix`` rewrites the audio expert's log-probabilities before the product (the voice head's)."""
        log_a = F.log_softmax(self.audio_head(a).float(), dim=-1)
        if audio_mix is not None:
            log_a = audio_mix(log_a)
        log_v = F.log_softmax(self.video_head(v).float(), dim=-1)
        fused = log_a * has_audio[:, None].to(log_a.dtype) + log_v * has_video[:, None].to(log_v.dtype)
        return F.log_softmax(fused, dim=-1), log_a, log_v


FUSIONS = ("fbp", "concat", "product")
