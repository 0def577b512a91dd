"""EfficientFace (Zhao et al., AAAI 2021): a light expression network.

Three parts, as in the paper:
- a ShuffleNet-V2 style backbone of depth-wise and point-wise convolutions;
- a local-feature extractor: the stem's feature map is cut into 2x2 regions and each
  region is convolved depth-wise on its own, so local detail (eyes, mouth) survives;
- a channel-spatial modulator on the global branch: a channel gate (global pooling +
  two FC layers) times a spatial gate (1x1 reduce, dilated 3x3s, 1x1 to one map),
  squashed by a sigmoid, re-weights the stage-2 features.

The paper feeds 224x224 RGB. The stem stride, the max-pool and all widths are
settings here so the same network runs at FER2013's native 48x48 (stem stride 1
keeps a 24x24 map where the paper has 56x56) and fits a CPU budget.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _dw(in_ch: int, out_ch: int, stride: int = 1, padding: int = 1, dilation: int = 1) -> nn.Conv2d:
    # depth-wise when in_ch == out_ch; out_ch = k * in_ch gives k filters per input channel
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding, dilation=dilation, groups=in_ch, bias=False)


def _pw(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, bias=False)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet-V2 unit: split (or duplicate when downsampling), transform, concat, shuffle."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        half = out_ch // 2
        if stride == 1 and in_ch != 2 * half:
            raise ValueError(f"a stride-1 unit needs in_ch == out_ch (even), got {in_ch} -> {out_ch}")
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(
                _dw(in_ch, in_ch, stride=2), nn.BatchNorm2d(in_ch),
                _pw(in_ch, half), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        b2_in = in_ch if stride == 2 else half
        self.branch2 = nn.Sequential(
            _pw(b2_in, half), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            _dw(half, half, stride=stride), nn.BatchNorm2d(half),
            _pw(half, half), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            keep, change = x.chunk(2, dim=1)
            out = torch.cat((keep, self.branch2(change)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class LocalFeatureExtractor(nn.Module):
    """Each of the 2x2 regions gets its own two depth-wise 3x3 convs; the outputs are tiled back."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        if out_ch % in_ch:
            raise ValueError(f"local extractor: out channels {out_ch} must be a multiple of in channels {in_ch}")

        def region_net() -> nn.Sequential:
            return nn.Sequential(
                _dw(in_ch, out_ch, stride=2), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
                _dw(out_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))

        self.regions = nn.ModuleList(region_net() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] with H, W even -> out: [B, C', H/2, W/2]
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        if x.shape[-2] != 2 * h or x.shape[-1] != 2 * w:
            raise ValueError(f"local extractor needs an even feature map, got {tuple(x.shape[-2:])}")
        top_left, top_right = x[..., :h, :w], x[..., :h, w:]
        bottom_left, bottom_right = x[..., h:, :w], x[..., h:, w:]
        tl, tr, bl, br = (net(r) for net, r in zip(self.regions, (top_left, top_right, bottom_left, bottom_right)))
        return torch.cat((torch.cat((tl, tr), dim=3), torch.cat((bl, br), dim=3)), dim=2)


class ChannelGate(nn.Module):
    """C(F): global average pool, FC down by `reduction`, BN, ReLU, FC back up."""

    def __init__(self, ch: int, reduction: int = 16):
        super().__init__()
        mid = max(ch // reduction, 4)
        self.mlp = nn.Sequential(nn.Linear(ch, mid), nn.BatchNorm1d(mid), nn.ReLU(inplace=True), nn.Linear(mid, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.mean((2, 3)))[:, :, None, None]          # [B, C, 1, 1]


class SpatialGate(nn.Module):
    """S(F): 1x1 reduce, dilated 3x3 convs, 1x1 to a single map."""

    def __init__(self, ch: int, reduction: int = 16, dilation: int = 4, n_dilated: int = 2):
        super().__init__()
        mid = max(ch // reduction, 4)
        layers: list[nn.Module] = [nn.Conv2d(ch, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True)]
        for _ in range(n_dilated):
            layers += [nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(mid), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(mid, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)                                          # [B, 1, H, W]


class ChannelSpatialModulator(nn.Module):
    def __init__(self, ch: int, reduction: int = 16):
        super().__init__()
        self.channel = ChannelGate(ch, reduction)
        self.spatial = SpatialGate(ch, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F' = sigmoid(C(F) * S(F)) * F   (EfficientFace, channel-spatial modulator)
        return torch.sigmoid(self.channel(x) * self.spatial(x)) * x


class EfficientFace(nn.Module):
    """EfficientFace; ``forward_features`` gives the pooled conv5 vector, ``forward`` the logits.

    Defaults are the paper's widths (stages 4/8/4, channels 29/116/232/464/1024).
    """

    def __init__(self, num_classes: int, in_chans: int = 3,
                 stages_repeats: Sequence[int] = (4, 8, 4),
                 stages_out_channels: Sequence[int] = (29, 116, 232, 464, 1024),
                 stem_stride: int = 2, stem_pool: bool = True, dropout: float = 0.0):
        super().__init__()
        if len(stages_repeats) != 3 or min(stages_repeats) < 1:
            raise ValueError(f"stages_repeats must be 3 positive ints, got {list(stages_repeats)}")
        if len(stages_out_channels) != 5 or min(stages_out_channels) < 1:
            raise ValueError(f"stages_out_channels must be 5 positive ints, got {list(stages_out_channels)}")
        stem_ch, *stage_chs, last_ch = stages_out_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_ch, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(stem_ch), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity())
        stages, ch = [], stem_ch
        for repeats, out_ch in zip(stages_repeats, stage_chs):
            units = [ShuffleUnit(ch, out_ch, 2)] + [ShuffleUnit(out_ch, out_ch, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            ch = out_ch
        self.stage2, self.stage3, self.stage4 = stages
        self.local = LocalFeatureExtractor(stem_ch, stage_chs[0])
        self.modulator = ChannelSpatialModulator(stage_chs[0])
        self.conv5 = nn.Sequential(_pw(ch, last_ch), nn.BatchNorm2d(last_ch), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last_ch, num_classes)
        self.feature_dim, self.num_classes = last_ch, num_classes

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling: [B, D, h, w] (3 x 3 for the shipped encoder at 48 px)."""
        x = self.stem(x)                                   # [B, C0, H/4, W/4] with the paper's stem
        x = self.modulator(self.stage2(x)) + self.local(x)  # global (modulated) + local branch: [B, C1, H/8, W/8]
        x = self.stage4(self.stage3(x))                    # [B, C3, H/32, W/32]
        return self.conv5(x)                               # [B, D, h, w]

    def forward_features_and_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.forward_maps(x)
        return maps.mean((2, 3)), maps                     # the pooled feature is the map's mean: [B, D]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_maps(x).mean((2, 3))           # [B, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))   # [B, num_classes]
