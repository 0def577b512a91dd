"""The audio stream: a fully convolutional encoder over the log-mel spectrogram, pooled by attention.

Deep Fusion feeds the spectrogram to an FCN so that any length works; its output grid of
L = F' * T' cells a_i in R^C is pooled by the scaled-softmax attention (eq. 1-3).
Padded time steps are zeroed after every layer and excluded from the normalisation
statistics, so a clip's output does not depend on how much padding its batch needed.
In evaluation a long spectrogram goes through the FCN in overlapping chunks, so that an
hour of audio needs the memory of a few minutes (``EVAL_FRAMES``).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from avemo.model.attention import ScaledSoftmaxAttention

# clip-frames (batch size x time steps) one evaluation pass of the FCN may take: about 1 GB of
# activations on the CPU, whose convolutions unfold 9 x C_in values per cell
EVAL_FRAMES = 16384


def clip_level(mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each clip's loudness [B]: the log of its mean mel power over every bin of its valid frames.

    Recording gain g adds 2 ln g to every cell of a log-mel spectrogram, so ``mel - clip_level`` (the
    ``level`` mel normalisation) is the same for a clip played at any volume. ``mel`` is [B, n_mels, T]
    natural-log power, ``mask`` [B, T] (None: every frame valid); float32 whatever the input's dtype. A clip
    without a valid frame (no audio) gets 0.
    """
    x = mel.float()
    if mask is None:
        mask = torch.ones(mel.shape[0], mel.shape[2], dtype=torch.bool, device=mel.device)
    x = x.masked_fill(~mask[:, None, :], float("-inf"))
    cells = mask.sum(1, dtype=torch.float32) * mel.shape[1]
    level = torch.logsumexp(x.flatten(1), dim=1) - torch.log(cells.clamp_min(1.0))
    return torch.where(cells > 0, level, torch.zeros_like(level))


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from valid (unpadded) time steps only.

    Padded steps are zeroed on the way in and come out zero, so the next convolution sees
    zeros there, as it would at the clip's own end.
    """

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # x [B, C, F, T]; keep [B, 1, 1, T] in x's dtype, 1 valid and 0 padded, or None when
        # nothing in the batch is padded (then this is plain BatchNorm)
        if keep is None:
            return super().forward(x)
        dtype = x.dtype
        x = x * keep.to(dtype)
        if self.training:
            # With padding at zero, the whole-tensor moments give the valid ones in closed form:
            # r = all cells / valid cells, mean = r m_all, var = r v_all - r (r - 1) m_all^2.
            # One fused var_mean instead of masked elementwise passes: on the CPU those were half
            # of a training step. float32 throughout: under bf16 autocast the moments of a channel
            # whose mean is large against its spread would otherwise lose its variance.
            n = (keep.sum(dtype=torch.float32) * x.shape[2]).clamp_min(1.0)
            r = x[:, 0].numel() / n
            var_all, mean_all = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
            mean = mean_all * r
            var = (r * var_all - r * (r - 1) * mean_all.square()).clamp_min(0.0)
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        # y = (x - mean) / sqrt(var + eps) * w + b as one multiply-add; the shift is masked too,
        # so padded steps stay zero
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return torch.addcmul(shift[None, :, None, None] * keep, x, scale[None, :, None, None]).to(dtype)


def rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved before blocks had ``n_convs`` named their single layer ``blocks.i.conv`` / ``.bn``;
    today that layer is ``blocks.i.convs.0`` / ``.bns.0``. Other keys pass unchanged."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for i in range(len(parts) - 2):
            if parts[i] == "blocks" and parts[i + 1].isdigit() and parts[i + 2] in ("conv", "bn"):
                parts[i + 2:i + 3] = [parts[i + 2] + "s", "0"]
                break
        out[".".join(parts)] = value
    return out


class ConvBlock(nn.Module):
    """``n_convs`` x (3x3 conv -> masked BN -> ReLU) -> 2x2 max-pool, re-zeroing padded time steps.

    Two convolutions per block (as in VGG) see a 5x5 neighbourhood before each pool, at the
    cost of one more layer per block; one is the original, shallower FCN.
    """

    def __init__(self, c_in: int, c_out: int, pool: bool, n_convs: int = 1):
        super().__init__()
        if n_convs < 1:
            raise ValueError(f"a conv block needs at least one convolution, got {n_convs}")
        self.convs = nn.ModuleList(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False)
                                   for i in range(n_convs))
        self.bns = nn.ModuleList(MaskedBatchNorm2d(c_out) for _ in range(n_convs))
        self.pool = pool

    def forward(self, x: torch.Tensor, mask: torch.Tensor, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # the masked BatchNorm leaves padded time steps at zero, so the next 3x3 conv sees zeros
        # there, not this layer's response to padding
        keep = mask[:, None, None, :].to(x.dtype) if padded else None          # [B, 1, 1, T]
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x), keep))
        if self.pool:
            # ceil_mode: a window straddling the end of a clip sees real values and zeros, and
            # max(relu output, 0) is the real value, so padding cannot leak in
            x = F.max_pool2d(x, 2, ceil_mode=True)
            mask = mask[:, ::2]
        return x, mask


class FCNAudioStream(nn.Module):
    """Log-mel [B, n_mels, T] -> FCN grid [B, C, F', T'] -> attention over the F'*T' cells -> [B, C].

    In evaluation (BatchNorm on its running statistics, so no cell depends on the rest of the
    batch) a batch of more than ``eval_frames`` clip-frames goes through the FCN in chunks of
    time. Each chunk carries a margin of one receptive field on either side, and its starts are
    multiples of the pooling stride, so every kept cell sees exactly the frames it sees in one
    pass: the grid is the same, and the memory is that of one chunk, not of the whole clip.
    """

    eval_frames = EVAL_FRAMES

    def __init__(self, n_mels: int, channels: tuple[int, ...] = (32, 64, 128, 128),
                 attention_hidden: int = 64, lam: float = 1.0, convs_per_block: int = 2):
        super().__init__()
        if not channels:
            raise ValueError("the audio FCN needs at least one conv block")
        blocks, c_in = [], 1
        for c in channels:
            blocks.append(ConvBlock(c_in, c, pool=True, n_convs=convs_per_block))
            c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.attention = ScaledSoftmaxAttention(c_in, attention_hidden, lam)
        self.out_dim = c_in
        self.n_mels = n_mels
        self.stride = 2 ** len(blocks)
        # receptive field in frames: a 3x3 conv at stride s adds 2s, a 2x2 pool adds s
        field = 1 + sum(2 ** k * (2 * convs_per_block + 1) for k in range(len(blocks)))
        self.margin = -(-field // self.stride) * self.stride

    def _grid(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padded = not bool(mask.all())                            # equal lengths: skip the masking work
        for block in self.blocks:
            x, mask = block(x, mask, padded)
        return x, mask

    def _grid_in_chunks(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, total = self.stride, x.shape[-1]
        step = max(self.eval_frames // x.shape[0], 4 * self.margin) // s * s
        grids, masks = [], []
        for start in range(0, total, step):
            end = min(start + step, total)
            lo, hi = max(start - self.margin, 0), min(end + self.margin, total)
            g, m = self._grid(x[..., lo:hi], mask[:, lo:hi])
            keep = slice((start - lo) // s, -(-end // s) - lo // s)
            grids.append(g[..., keep])
            masks.append(m[:, keep])
        return torch.cat(grids, -1), torch.cat(masks, -1)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # mel [B, n_mels, T] (normalised, zero where padded), mask [B, T] bool
        x = mel.unsqueeze(1)                                     # [B, 1, n_mels, T]
        if self.training or x.shape[0] * x.shape[-1] <= self.eval_frames:
            x, mask = self._grid(x, mask)                        # [B, C, F', T'], [B, T']
        else:
            x, mask = self._grid_in_chunks(x, mask)
        b, c, f, t = x.shape
        cells = x.flatten(2).transpose(1, 2)                     # [B, F'*T', C], cell index = f * T' + t
        cell_mask = mask[:, None, :].expand(b, f, t).reshape(b, f * t)
        pooled, alpha = self.attention(cells, cell_mask)         # [B, C], [B, F'*T']
        return pooled, alpha.view(b, f, t)
