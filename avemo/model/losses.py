"""Classification losses, chosen by name (``LOSSES``)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class CompactSoftmaxCE(nn.Module):
    """Compact softmax cross-entropy (``--loss compact``), after STT (Ma, Sun, Li, arXiv 2205.04749).

    For logits z over C classes and target y, with ``beta`` (``--compact-beta``):

        p = softmax(z)                                                     (A1)
        L_CE = -log p_y     (label smoothing and class weights as in F.cross_entropy)
        q_j = p_j / (1 - p_y) = softmax(z_{j != y})_j,   j != y            (A2)
        L_KL = KL(q || u) + KL(u || q),   u_j = 1 / (C - 1)                (A3)
        L = L_CE + beta * mean over the batch of L_KL                      (A4)

    (A3) pulls the non-target probabilities towards one another, so no wrong class is singled
    out. q is the softmax of the non-target logits alone, so dL_KL/dz_y = 0: the target logit
    is moved by the cross-entropy only (dL/dz_y = p_y - 1 per sample, before the batch mean).

    Provenance: (A1)-(A4) are avemo's reading, not a transcription of the paper. The STT
    abstract says only that the loss makes features have "the minimum intra-class distance and
    the maximum inter-class distance"; DESIGN.md records it as cross-entropy plus a symmetric
    KL over the non-target predictions. The paper's own equations and code could not be
    consulted for this project, so a different published form (for example one that also
    moves the target logit) cannot be ruled out.
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
            return ce  # one non-target class: its distribution q is trivially uniform
        keep = ~F.one_hot(target, c).bool()                                   # [B, C]
        nt_logits = logits.float().masked_select(keep).view(-1, c - 1)        # [B, C-1]
        log_q = F.log_softmax(nt_logits, dim=-1)                              # (A2)
        log_u = -torch.log(torch.tensor(c - 1.0, device=logits.device))
        q = log_q.exp()
        # (A3): KL(q||u) = sum_j q_j (log q_j - log u_j); KL(u||q) = sum_j u_j (log u_j - log q_j)
        sym_kl = (q * (log_q - log_u)).sum(-1) + ((log_u - log_q) / (c - 1)).sum(-1)
        return ce + self.beta * sym_kl.mean()                                 # (A4)


def build_loss(name: str, label_smoothing: float = 0.0, weight: torch.Tensor | None = None,
               compact_beta: float = 0.5) -> nn.Module:
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if name == "compact":
        return CompactSoftmaxCE(compact_beta, label_smoothing, weight)
    raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")


LOSSES = ("ce", "compact")
