"""TransFER (Xue et al., ICCV 2021): local CNN attention + a transformer over face patches.

- stem: an IR-style residual CNN; the paper taps the first three stages of IR-50
  (3/4/14 units at 64/128/256 channels, 14x14 cells at 112 px), the ``paper`` preset
  (``avemo.encoders.ARCH_PRESETS``); the depth and widths are settings, and the ``small``
  default (3 units at 32/64/128) trains on a CPU;
- local CNNs: several LANet branches, each two 1x1 convs and a sigmoid giving one
  attention map; the maps are merged by element-wise max and re-weight the stem features;
- Multi-Attention Dropping (MAD): in training, with probability p, one whole attention
  map (chosen at random) is set to zero before the merge, so no single branch dominates;
- a ViT encoder over the re-weighted feature cells, whose attention blocks apply
  Multi-head Self-Attention Dropping (MSAD): one head's output is zeroed at random.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class IRBlock(nn.Module):
    """Improved residual unit (ArcFace's IR): BN-conv-BN-PReLU-conv-BN plus a shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch),
            nn.PReLU(out_ch), nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.shortcut = (nn.Identity() if stride == 1 and in_ch == out_ch else
                         nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class LANet(nn.Module):
    """One local attention branch: 1x1 conv down, ReLU, 1x1 conv to a single map, sigmoid."""

    def __init__(self, ch: int, reduction: int = 8):
        super().__init__()
        if reduction < 1:
            raise ValueError(f"LANet reduction must be >= 1, got {reduction}")
        mid = max(ch // reduction, 4)
        self.net = nn.Sequential(nn.Conv2d(ch, mid, 1), nn.ReLU(inplace=True), nn.Conv2d(mid, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))                    # [B, 1, H, W]


class MultiAttentionDropping(nn.Module):
    """MAD: in training, with probability p per sample, zero one randomly chosen attention map."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"MAD probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        # maps: [B, N, H, W], N attention maps per sample
        if not self.training or self.p == 0:
            return maps
        b, n = maps.shape[:2]
        drop = torch.rand(b, device=maps.device) < self.p                        # which samples drop one
        which = torch.randint(0, n, (b,), device=maps.device)                     # which map they drop
        keep = ~(F.one_hot(which, n).bool() & drop[:, None])                     # [B, N]
        return maps * keep[:, :, None, None].to(maps.dtype)


class MSADAttention(nn.Module):
    """Multi-head self-attention whose per-head outputs pass through head dropping (MSAD)."""

    def __init__(self, dim: int, heads: int, p_drop_head: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {heads} heads")
        if not 0 <= p_drop_head <= 1:
            raise ValueError(f"MSAD probability must be in [0, 1], got {p_drop_head}")
        self.heads, self.p = heads, p_drop_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, T, d_h]
        # head_i = softmax(Q_i K_i^T / sqrt(d_h)) V_i   (Vaswani et al., Eq. 1)
        out = F.scaled_dot_product_attention(q, k, v)                          # [B, h, T, d_h]
        out = self.drop_one_head(out)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def drop_one_head(self, heads: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return heads
        b, h = heads.shape[:2]
        drop = torch.rand(b, device=heads.device) < self.p
        which = torch.randint(0, h, (b,), device=heads.device)
        keep = ~(F.one_hot(which, h).bool() & drop[:, None])                   # [B, h]
        return heads * keep[:, :, None, None].to(heads.dtype)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, p_drop_head: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MSADAttention(dim, heads, p_drop_head)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))     # pre-norm ViT block
        return x + self.mlp(self.norm2(x))


class TransFER(nn.Module):
    """TransFER with a small IR stem by default; ``forward_features`` is the class token.

    The paper's size is the ``paper`` preset of ``avemo.encoders.ARCH_PRESETS``.
    """

    def __init__(self, num_classes: int, in_chans: int = 3,
                 stem_channels: Sequence[int] = (32, 64, 128), stem_depth: int | Sequence[int] = 1,
                 num_lanets: int = 2, mad_p: float = 0.6, embed_dim: int = 128, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 2.0, msad_p: float = 0.3, dropout: float = 0.1,
                 max_tokens: int = 256, lanet_reduction: int = 8):
        super().__init__()
        depths = [stem_depth] * len(stem_channels) if isinstance(stem_depth, int) else list(stem_depth)
        if len(depths) != len(stem_channels) or min(depths) < 1:
            raise ValueError(f"stem_depth must be a positive int or one per stem stage, got {stem_depth}")
        if num_lanets < 1:
            raise ValueError(f"need at least one LANet branch, got {num_lanets}")
        stem: list[nn.Module] = [nn.Conv2d(in_chans, stem_channels[0], 3, 1, 1, bias=False),
                                 nn.BatchNorm2d(stem_channels[0]), nn.PReLU(stem_channels[0])]
        ch = stem_channels[0]
        for out_ch, n in zip(stem_channels, depths):
            stem += [IRBlock(ch, out_ch, 2)] + [IRBlock(out_ch, out_ch, 1) for _ in range(n - 1)]
            ch = out_ch
        self.stem = nn.Sequential(*stem)
        self.lanets = nn.ModuleList(LANet(ch, lanet_reduction) for _ in range(num_lanets))
        self.mad = MultiAttentionDropping(mad_p)
        self.to_tokens = nn.Conv2d(ch, embed_dim, 1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, max_tokens + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(embed_dim, heads, mlp_ratio, msad_p, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, num_classes)
        self.feature_dim, self.num_classes, self.max_tokens = embed_dim, num_classes, max_tokens

    def attention_maps(self, feats: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([lanet(feats) for lanet in self.lanets], dim=1)   # [B, N, H, W]
        return self.mad(maps)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features_and_maps(x)[0]                         # [B, D]

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features_and_maps(x)[1]                         # [B, D, h, w]

    def forward_features_and_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class token [B, D], the encoder's output tokens of the feature cells as a map [B, D, h, w])."""
        feats = self.stem(x)                                                # [B, C, H, W]
        h, w = feats.shape[-2:]
        # local CNNs: F' = F * max_i(A_i), the maps merged by element-wise max (TransFER, Sec. 3.1)
        feats = feats * self.attention_maps(feats).amax(dim=1, keepdim=True)
        tokens = self.to_tokens(feats).flatten(2).transpose(1, 2)          # [B, T = H*W, D]
        if tokens.shape[1] > self.max_tokens:
            raise ValueError(f"input gives {tokens.shape[1]} tokens, more than max_tokens={self.max_tokens}; "
                             "use a smaller input or a deeper stem")
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed[:, :tokens.shape[1]]               # [B, 1 + T, D]
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        cells = tokens[:, 1:].transpose(1, 2).unflatten(2, (h, w))          # [B, D, h, w]
        return tokens[:, 0], cells

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
