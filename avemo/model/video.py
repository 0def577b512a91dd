"""Video streams over per-frame face features, chosen by name (``VIDEO_STREAMS``).

Every stream maps features [B, T, D] and a frame mask [B, T] (True = a face was found in a
real, unpadded frame) to a clip vector [B, out_dim] and per-frame weights [B, T] that are
exactly zero on masked frames. ``CellSpatioTemporalStream`` reads each frame's feature map
instead, [B, T, N, D] (N cells), and gives per-cell weights [B, T, N].
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

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None,
                need_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x [B, 1+T, dim], pad [B, 1+T] bool (True = ignore as a key) or None (every key counts)
        h = self.norm1(x)
        a, w = self.attn(h, h, h, key_padding_mask=pad, need_weights=need_weights, average_attn_weights=True)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, w                                                                # w [B, 1+T, 1+T]


class SpatioTemporalStream(nn.Module):
    """Temporal transformer over frame tokens with learnable position embeddings and a class token.

    One token per frame, the face encoder's pooled vector: no token stands for a face region.
    This is ``stt_tokens="frames"``, avemo's ``stt`` before spatial tokens, kept for its
    checkpoints and for caches without feature maps; ``CellSpatioTemporalStream`` is STT proper.
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


class ClassAttentionBlock(nn.Module):
    """A class token reads the finished tokens: it is the only query, they are the keys and values
    (class attention, CaiT: Touvron et al. 2021, eq. 4-5), so the weights it gives each token
    are the clip's attention over them."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # cls [B, 1, dim], tokens [B, L, dim], pad [B, L] (True = not a key)
        kv = self.norm_kv(tokens)
        a, w = self.attn(self.norm_q(cls), kv, kv, key_padding_mask=pad, need_weights=True,
                         average_attn_weights=True)
        cls = cls + self.drop(a)
        cls = cls + self.drop(self.mlp(self.norm2(cls)))
        return cls, w[:, 0]                                                        # [B, 1, dim], [B, L]


class CellSpatioTemporalStream(nn.Module):
    """STT over spatial tokens (after Ma, Sun, Li 2022): one token per cell of each frame's feature map.

    Tokens z_{t,n} = E x_{t,n} + p^space_n + p^time_t (learnable spatial and temporal position
    embeddings). Each layer attends with *divided* attention, as TimeSformer (Bertasius et al.
    2021) and the STT authors' later code do: first over the N cells within each frame (where in
    the face), then over the T frames of each cell (when), frames without a face never being a
    key. A class token then reads every (frame, cell) token with class attention
    (``ClassAttentionBlock``); its weights are the explanation, [B, T, N], exactly zero on masked
    frames. Divided attention costs O(T N^2 + N T^2) per clip where joint attention over all
    T N tokens costs O((T N)^2): at 16 frames of 3 x 3 cells that is 6x less, and it grows with T.

    A masked frame or a padded one is never a key of a valid token, so its values change no
    output; a clip with no face at all lets its tokens see each other (its output is finite and
    the model swaps in its stand-in for it anyway).
    """

    def __init__(self, in_dim: int, cells: int, hidden: int = 128, layers: int = 2, heads: int = 4,
                 max_frames: int = 256, dropout: float = 0.1):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"stt hidden size {hidden} must be divisible by heads {heads}")
        if cells < 1:
            raise ValueError(f"stt over cells needs at least one cell per frame, got {cells}")
        self.embed = nn.Linear(in_dim, hidden)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos_space = nn.Parameter(torch.zeros(1, 1, cells, hidden))
        self.pos_time = nn.Parameter(torch.zeros(1, max_frames, 1, hidden))
        for p in (self.cls, self.pos_space, self.pos_time):
            nn.init.trunc_normal_(p, std=0.02)
        self.space = nn.ModuleList(TemporalBlock(hidden, heads, dropout) for _ in range(layers))
        self.time = nn.ModuleList(TemporalBlock(hidden, heads, dropout) for _ in range(layers))
        self.readout = ClassAttentionBlock(hidden, heads, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.cells, self.max_frames = cells, max_frames
        self.out_dim = hidden

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, n, _ = v.shape
        if t > self.max_frames:
            raise ValueError(f"stt stream was built for at most {self.max_frames} frames, got {t}; "
                             "raise stt_max_frames or extract fewer frames per clip")
        if n != self.cells:
            raise ValueError(f"stt stream was built for {self.cells} cells per frame, got {n} "
                             "(features from another face encoder?)")
        x = self.embed(v) + self.pos_space + self.pos_time[:, :t]                 # [B, T, N, H]
        hid = x.shape[-1]
        # a clip with no valid frame would give softmax over no key (NaN): there every frame is a key
        keys = mask | ~mask.any(1, keepdim=True)                                   # [B, T]
        time_pad = ~keys.repeat_interleave(n, dim=0)                               # [B*N, T]
        for space, time in zip(self.space, self.time):
            x = space(x.reshape(b * t, n, hid), None, need_weights=False)[0]       # cells of a frame: [B*T, N, H]
            x = x.view(b, t, n, hid).transpose(1, 2).reshape(b * n, t, hid)
            x = time(x, time_pad, need_weights=False)[0]                            # frames of a cell: [B*N, T, H]
            x = x.view(b, n, t, hid).transpose(1, 2)                                # [B, T, N, H]
        pad = ~keys[:, :, None].expand(b, t, n).reshape(b, t * n)
        cls, w = self.readout(self.cls.expand(b, 1, -1), x.reshape(b, t * n, hid), pad)
        cell_w = w.view(b, t, n).masked_fill(~mask[:, :, None], 0.0)
        cell_w = cell_w / cell_w.sum((1, 2), keepdim=True).clamp_min(1e-12)        # sums to 1 over valid cells
        return self.norm(cls[:, 0]), cell_w                                         # [B, H], [B, T, N]


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
STT_TOKENS = ("cells", "frames")     # stt's tokens: feature-map cells of every frame, or one pooled vector a frame
