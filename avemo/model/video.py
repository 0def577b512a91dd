"""Video streams over per-frame face features, chosen by name (``VIDEO_STREAMS``).

Every stream maps features [B, T, D] and a frame mask [B, T] (True = a face was found in a
real, unpadded frame) to a clip vector [B, out_dim] and per-frame weights [B, T] that are
exactly zero on masked frames.
"""
from __future__ import annotations

import torch
from torch import nn

from avemo.model.attention import ScaledSoftmaxAttention


class AttentionVideoStream(nn.Module):
    """Deep Fusion video branch: v~_i = W v_i + b (eq. 6), then scaled-softmax attention (eq. 7-9)."""

    def __init__(self, in_dim: int, hidden: int = 128, attention_hidden: int = 64, lam: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        self.reduce = nn.Linear(in_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.attention = ScaledSoftmaxAttention(hidden, attention_hidden, lam)
        self.out_dim = hidden

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.drop(self.reduce(v))                 # eq. 6, [B, T, hidden]
        return self.attention(v, mask)                # eq. 7-9, [B, hidden], [B, T]


class FrameAttentionStream(nn.Module):
    """Frame Attention Networks (Meng et al. 2019) over cached frame features.

    Self-attention alpha_i = sigmoid(f_i . q0), f'_v = sum alpha_i f_i / sum alpha_i; with
    ``relation``: beta_i = sigmoid([f_i : f'_v] . q1) and
    f_v = sum alpha_i beta_i [f_i : f'_v] / sum alpha_i beta_i.
    """

    def __init__(self, in_dim: int, hidden: int = 128, relation: bool = True, dropout: float = 0.0):
        super().__init__()
        self.reduce = nn.Linear(in_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.q0 = nn.Linear(hidden, 1)
        self.q1 = nn.Linear(2 * hidden, 1) if relation else None
        self.out_dim = 2 * hidden if relation else hidden

    @staticmethod
    def _weighted_mean(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # w [B, T] (zero on masked frames), x [B, T, C] -> [B, C]
        return torch.einsum("bt,btc->bc", w, x) / w.sum(1, keepdim=True).clamp_min(1e-6)

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.drop(torch.relu(self.reduce(v)))                                  # [B, T, H]
        alpha = torch.sigmoid(self.q0(f).squeeze(-1)).masked_fill(~mask, 0.0)      # [B, T]
        f_prime = self._weighted_mean(alpha, f)                                    # f'_v, [B, H]
        if self.q1 is None:
            return f_prime, alpha / alpha.sum(1, keepdim=True).clamp_min(1e-6)
        fr = torch.cat([f, f_prime[:, None, :].expand_as(f)], dim=-1)             # [f_i : f'_v], [B, T, 2H]
        beta = torch.sigmoid(self.q1(fr).squeeze(-1))                              # [B, T]
        w = alpha * beta
        return self._weighted_mean(w, fr), w / w.sum(1, keepdim=True).clamp_min(1e-6)


class TemporalBlock(nn.Module):
    """Pre-norm transformer encoder layer that also returns its (head-averaged) attention."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, 1+T, dim], pad [B, 1+T] bool (True = ignore as a key)
        h = self.norm1(x)
        a, w = self.attn(h, h, h, key_padding_mask=pad, need_weights=True, average_attn_weights=True)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, w                                                                # w [B, 1+T, 1+T]


class SpatioTemporalStream(nn.Module):
    """Temporal transformer over frame tokens with learnable position embeddings and a class token (after STT).

    The class token is always a valid key, so a clip with no usable frame still gets a
    finite output (the model swaps in its stand-in for such clips anyway).
    """

    def __init__(self, in_dim: int, hidden: int = 128, layers: int = 2, heads: int = 4,
                 max_frames: int = 256, dropout: float = 0.1):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"stt hidden size {hidden} must be divisible by heads {heads}")
        self.embed = nn.Linear(in_dim, hidden)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos = nn.Parameter(torch.zeros(1, max_frames + 1, hidden))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        self.blocks = nn.ModuleList(TemporalBlock(hidden, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.max_frames = max_frames
        self.out_dim = hidden

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = v.shape
        if t > self.max_frames:
            raise ValueError(f"stt stream was built for at most {self.max_frames} frames, got {t}; "
                             "raise stt_max_frames or extract fewer frames per clip")
        x = torch.cat([self.cls.expand(b, 1, -1), self.embed(v)], dim=1)          # [B, 1+T, H]
        x = x + self.pos[:, : t + 1]
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=v.device), ~mask], dim=1)
        w = None
        for block in self.blocks:
            x, w = block(x, pad)
        # what the class token attended to in the last layer, renormalised over frames
        frame_w = w[:, 0, 1:].masked_fill(~mask, 0.0)
        frame_w = frame_w / frame_w.sum(1, keepdim=True).clamp_min(1e-12)
        return self.norm(x[:, 0]), frame_w


class MeanVideoStream(nn.Module):
    """The mean of the frame features over the frames with a face; no weights of its own.

    Followed by a linear classifier this is a frame-level image classifier applied to video:
    the clip's logits are the mean of each frame's logits. The shipped default model uses it
    with the face encoder's own classifier, which was trained on still images (FER2013) and
    has no temporal training data to learn attention from.
    """

    def __init__(self, in_dim: int):
        super().__init__()
        self.out_dim = in_dim

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = mask.to(v.dtype)
        w = w / w.sum(1, keepdim=True).clamp_min(1.0)                              # [B, T], zero on masked frames
        return torch.einsum("bt,btd->bd", w, v), w


VIDEO_STREAMS = ("attention", "fan", "stt", "mean")
