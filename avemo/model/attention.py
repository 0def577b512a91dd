"""Masked attention pooling: the scaled-softmax block of Deep Fusion (eq. 1-3)."""
from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where masked-out entries get exactly zero weight.

    A row with no valid entry comes out all zeros (the caller substitutes a stand-in).
    """
    # a row with nothing valid would be softmax(all -inf) = NaN, whose gradient poisons the
    # weights even when masked afterwards; let such rows see everything, then zero them
    usable = mask | ~mask.any(dim=dim, keepdim=True)
    weights = torch.softmax(scores.float().masked_fill(~usable, float("-inf")), dim=dim)
    return weights.masked_fill(~mask, 0.0).to(scores.dtype)


class ScaledSoftmaxAttention(nn.Module):
    """e_i = u^T tanh(W x_i + b) (eq. 1), alpha = softmax(lambda * e) (eq. 2), x = sum_i alpha_i x_i (eq. 3).

    ``lam`` in [0, 1] sets how peaked the weights are; 0 gives the plain mean of valid steps.
    """

    def __init__(self, dim: int, hidden: int, lam: float = 1.0):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"attention lambda must be in [0, 1], got {lam}")
        self.proj = nn.Linear(dim, hidden)
        self.u = nn.Linear(hidden, 1, bias=False)
        self.lam = lam

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, L, C], mask [B, L] bool -> pooled [B, C], alpha [B, L]
        e = self.u(torch.tanh(self.proj(x))).squeeze(-1)          # eq. 1, [B, L]
        alpha = masked_softmax(self.lam * e, mask)                 # eq. 2
        pooled = torch.einsum("bl,blc->bc", alpha.to(x.dtype), x)  # eq. 3
        return pooled, alpha
