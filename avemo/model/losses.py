"""Classification losses, chosen by name (``LOSSES``)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class CompactSoftmaxCE(nn.Module):
    """Compact softmax cross-entropy (after STT): CE plus a symmetric KL term on the non-target classes.

    The non-target probabilities, renormalised to sum to one, are pulled towards uniform by
    KL(q||u) + KL(u||q): no wrong class is singled out, which tightens each class's
    features around its own direction. ``beta`` weighs the term.
    """

    def __init__(self, beta: float = 0.5, label_smoothing: float = 0.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing)
        c = logits.shape[-1]
        if c < 3:
            return ce  # one non-target class: its renormalised distribution is trivially uniform
        keep = ~F.one_hot(target, c).bool()                                   # [B, C]
        nt_logits = logits.float().masked_select(keep).view(-1, c - 1)        # [B, C-1]
        log_q = F.log_softmax(nt_logits, dim=-1)
        log_u = -torch.log(torch.tensor(c - 1.0, device=logits.device))
        q = log_q.exp()
        sym_kl = (q * (log_q - log_u)).sum(-1) + ((log_u - log_q) / (c - 1)).sum(-1)
        return ce + self.beta * sym_kl.mean()


def build_loss(name: str, label_smoothing: float = 0.0, weight: torch.Tensor | None = None,
               compact_beta: float = 0.5) -> nn.Module:
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "compact":
        return CompactSoftmaxCE(compact_beta, label_smoothing, weight)
    raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")


LOSSES = ("ce", "compact")
