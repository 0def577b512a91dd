"""Classification metrics (WAR, UAR, macro-F1, per-class recall) and the confusion matrix files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from avemo.io import atomic_path


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """cm[i, j] = clips of true class i predicted as class j."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """accuracy is WAR; UAR and macro-F1 average over the classes present in ``y_true``."""
    cm = confusion(y_true, y_pred, len(classes))
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = np.diag(cm)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(len(classes)), where=present)
    precision = np.divide(tp, predicted, out=np.zeros(len(classes)), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(classes)),
                   where=(precision + recall) > 0)
    n = int(support.sum())
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "uar": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_recall": {c: float(recall[i]) for i, c in enumerate(classes) if present[i]},
        "confusion": cm.tolist(),
    }


def write_confusion(out_dir: str | Path, cm: np.ndarray | list, classes: list[str], title: str) -> None:
    """confusion.csv (rows: true class, columns: predicted) and confusion.png, both atomic."""
    out_dir = Path(out_dir)
    cm = np.asarray(cm)
    df = pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=classes)
    with atomic_path(out_dir / "confusion.csv") as tmp:
        df.to_csv(tmp)
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
