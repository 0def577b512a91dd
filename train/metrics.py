"""Classification metrics (WAR, UAR, macro-F1, per-class recall) and the confusion matrix files,
for the fused model and the face encoder alike."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from avemo.io import atomic_path
from avemo.tables import write_csv_atomic


def _labels(y) -> np.ndarray:
    """Integer labels from a numpy array, a list, or a (CPU or GPU) tensor."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    return np.asarray(y, dtype=np.int64)


def confusion(y_true, y_pred, n_classes: int, n_pred_classes: int | None = None) -> np.ndarray:
    """cm[i, j] = clips of true class i predicted as class j."""
    cm = np.zeros((n_classes, n_pred_classes or n_classes), np.int64)
    np.add.at(cm, (_labels(y_true), _labels(y_pred)), 1)
    return cm


def classification_metrics(y_true, y_pred, classes: Sequence[str],
                           pred_classes: Sequence[str] | None = None) -> dict:
    """accuracy is WAR; UAR and macro-F1 average over the classes present in ``y_true``.

    ``classes`` names ``y_true``'s indices and ``pred_classes`` (default: the same) those of
    ``y_pred``; they differ when a model with more classes is evaluated on a subset, and a
    true class counts as recognised when the prediction carries its name.
    """
    classes = list(classes)
    pred_classes = classes if pred_classes is None else list(pred_classes)
    cm = confusion(y_true, y_pred, len(classes), len(pred_classes))
    column = [pred_classes.index(c) if c in pred_classes else -1 for c in classes]
    tp = np.array([cm[i, j] if j >= 0 else 0 for i, j in enumerate(column)])
    predicted = np.array([cm[:, j].sum() if j >= 0 else 0 for j in column])
    support = cm.sum(1)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(len(classes)), where=present)
    precision = np.divide(tp, predicted, out=np.zeros(len(classes)), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(classes)),
                   where=(precision + recall) > 0)
    n = int(support.sum())
    report = {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "uar": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_recall": {c: float(recall[i]) for i, c in enumerate(classes) if present[i]},
        "support": {c: int(support[i]) for i, c in enumerate(classes)},
        "confusion": cm.tolist(),
    }
    if pred_classes != classes:
        report["confusion_rows"], report["confusion_cols"] = classes, pred_classes
    return report


def write_confusion(out_dir: str | Path, cm: np.ndarray | list, classes: list[str], title: str) -> None:
    """confusion.csv (rows: true class, columns: predicted) and confusion.png, both atomic."""
    out_dir = Path(out_dir)
    cm = np.asarray(cm)
    df = pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=classes)
    write_csv_atomic(out_dir / "confusion.csv", df)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    size = 1.2 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    with atomic_path(out_dir / "confusion.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
