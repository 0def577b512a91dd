"""Pictures of why the model decided: face crops and audio cells weighted by attention.

``plot_prediction`` draws one clip: the sampled face crops titled with their attention
weight (Deep Fusion eq. 8 / FAN alpha) and, for STT over feature-map cells, each cell's
weight as a heatmap over the face (where in the face, and when: one colour scale for the
whole clip), the weights over time, the log-mel spectrogram with
the audio attention of each FCN cell laid over it (Deep Fusion eq. 2), and the class
probabilities. ``plot_timeline`` draws the class probabilities of each window of a long
recording.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from avemo.io import atomic_path

MAX_CROPS = 16


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only: never needs a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_prediction(pred, path: str | os.PathLike) -> None:
    """Write a PNG explaining one ``Prediction`` (see the module docstring)."""
    plt = _pyplot()
    feats = pred.features
    arrays = feats.arrays if feats is not None else {}
    has_video = "video" in pred.attention and "frame_times" in arrays
    has_audio = "audio" in pred.attention and "mel" in arrays
    rows = [r for r, on in (("crops", has_video and "crops" in arrays), ("video", has_video),
                            ("audio", has_audio)) if on]
    fig = plt.figure(figsize=(13, 2.4 * max(len(rows), 1) + 0.6))
    # column 3 is a spacer: the audio row's right-hand axis label and the class names need the room
    grid = fig.add_gridspec(max(len(rows), 1), 5, width_ratios=[1, 1, 1, 0.3, 0.9], hspace=0.55, wspace=0.75)
    title = f"{Path(pred.clip).name}: {pred.emotion}" + (f"  [{pred.start:.1f}-{pred.end:.1f} s]" if pred.start is not None else "")
    fig.suptitle(title + f"   (from {' + '.join(pred.modalities)})", fontsize=11)

    for r, row in enumerate(rows):
        if row == "crops":
            _crops_row(fig, grid[r, :3], arrays, pred.attention["video"], pred.attention.get("video_cells"))
        elif row == "video":
            ax = fig.add_subplot(grid[r, :3])
            t, w = arrays["frame_times"], pred.attention["video"]
            found = arrays.get("face_mask", np.ones(len(t), bool))
            ax.vlines(t, 0, w, colors="tab:orange", lw=2)
            ax.plot(t[found], w[found], "o", color="tab:orange", label="face")
            ax.plot(t[~found], np.zeros((~found).sum()), "x", color="gray", label="no face (masked)")
            ax.set_xlabel("time in clip (s)")
            ax.set_ylabel("frame attention")
            ax.legend(loc="upper right", fontsize=7)
        else:
            _audio_row(fig.add_subplot(grid[r, :3]), arrays["mel"], pred.attention["audio"], feats.settings)

    ax = fig.add_subplot(grid[:, 4])
    names = list(pred.probabilities)
    probs = np.array([pred.probabilities[n] for n in names])
    colors = ["tab:red" if n == pred.emotion else "tab:gray" for n in names]
    ax.barh(names, probs, color=colors)
    # a late-fusion model (the shipped default) also shows what each modality says on its own
    for m, (marker, colour) in (("audio", ("^", "tab:blue")), ("video", ("o", "tab:orange"))):
        if m in pred.modality_probabilities:
            alone = pred.modality_probabilities[m]
            ax.plot([alone.get(n, np.nan) for n in names], range(len(names)), marker, color=colour, ms=5,
                    ls="none", label=f"{'voice' if m == 'audio' else 'face'} alone")
    if pred.modality_probabilities:
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("probability")
    if pred.warnings:
        # below the axis label, whatever the panel's height
        ax.annotate("\n".join(w[:70] for w in pred.warnings[:4]), (0, 0), xycoords="axes fraction",
                    xytext=(0, -34), textcoords="offset points", fontsize=7, va="top", color="tab:red")
    _save(fig, path)
    plt.close(fig)


def _crops_row(fig, cell, arrays, weights: np.ndarray, cells: np.ndarray | None = None) -> None:
    """The face crops, bordered by their frame's weight; ``cells`` [T, h, w]: each cell's weight over its face."""
    crops, found = arrays["crops"], arrays.get("face_mask", np.ones(len(arrays["crops"]), bool))
    idx = np.linspace(0, len(crops) - 1, min(len(crops), MAX_CROPS)).round().astype(int)
    sub = cell.subgridspec(1, len(idx), wspace=0.05)
    top = float(weights.max()) or 1.0
    hot = (float(cells.max()) or 1.0) if cells is not None else 1.0
    for j, i in enumerate(idx):
        ax = fig.add_subplot(sub[0, j])
        ax.imshow(crops[i] if found[i] else np.full_like(crops[i], 200))
        if cells is not None and found[i]:
            # the feature map's cells tile the aligned crop the encoder saw
            side_y, side_x = crops[i].shape[:2]
            ax.imshow(cells[i], cmap="inferno", alpha=0.5, vmin=0.0, vmax=hot, interpolation="nearest",
                      extent=(-0.5, side_x - 0.5, side_y - 0.5, -0.5))
            if j == 0:
                ax.set_ylabel("attention per\nface cell", fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
        # border thickness follows the weight, so the frames that mattered stand out
        for spine in ax.spines.values():
            spine.set_edgecolor("tab:orange")
            spine.set_linewidth(0.5 + 4.5 * float(weights[i]) / top)
        ax.set_title(f"{arrays['frame_times'][i]:.1f}s\n{weights[i]:.2f}" if found[i]
                     else f"{arrays['frame_times'][i]:.1f}s\nno face", fontsize=7)


def _audio_row(ax, mel: np.ndarray, cells: np.ndarray, settings: dict) -> None:
    hop_s = settings.get("hop_length", 160) / settings.get("sample_rate", 16000)
    seconds = mel.shape[1] * hop_s
    extent = (0, seconds, 0, mel.shape[0])
    ax.imshow(mel, origin="lower", aspect="auto", cmap="gray_r", extent=extent)
    # each FCN cell covers a block of mel bins x frames: stretch the grid over the spectrogram
    ax.imshow(cells, origin="lower", aspect="auto", cmap="inferno", alpha=0.45, extent=extent,
              interpolation="nearest")
    ax.set_xlabel("speech time (s, silence trimmed)")
    ax.set_ylabel("mel bin")
    twin = ax.twinx()
    profile = cells.sum(0)
    centres = (np.arange(len(profile)) + 0.5) * seconds / len(profile)
    twin.plot(centres, profile, color="tab:cyan", lw=2)
    twin.set_ylabel("audio attention\n(summed over frequency)", fontsize=8)
    twin.set_ylim(0, max(float(profile.max()) * 1.1, 1e-6))


def plot_timeline(preds: Sequence, path: str | os.PathLike) -> None:
    """Write a PNG of per-window class probabilities over a long recording."""
    plt = _pyplot()
    classes = next((list(p.probabilities) for p in preds if p.probabilities), [])
    mids = np.array([(p.start + p.end) / 2 for p in preds])
    probs = np.array([[p.probabilities.get(c, np.nan) for c in classes] for p in preds]).reshape(len(preds), -1)
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(12, 4.5), sharex=True,
                                    gridspec_kw={"height_ratios": [4, 1], "hspace": 0.1})
    for j, c in enumerate(classes):
        ax.plot(mids, probs[:, j], marker="o", ms=3, label=c)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.legend(loc="upper right", ncol=min(len(classes), 7), fontsize=7)
    ax.set_title(f"{Path(preds[0].clip).name if preds else ''}: emotion per window")
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(classes)}
    for i, p in enumerate(preds):
        # overlapping windows: each one owns the stretch up to the next window's start
        right = min(p.end, preds[i + 1].start) if i + 1 < len(preds) else p.end
        strip.axvspan(p.start, right, color=colors.get(p.emotion, "lightgray"), alpha=0.8, lw=0)
        if p.emotion:
            strip.text((p.start + right) / 2, 0.5, p.emotion, ha="center", va="center", fontsize=6)
    strip.set_yticks([])
    strip.set_xlabel("time (s)")
    _save(fig, path)
    plt.close(fig)
