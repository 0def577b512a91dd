"""Classification figures: accuracy, UAR (mean per-class recall) and the confusion matrix."""
from __future__ import annotations

from typing import Sequence

import torch


def classification_report(y_true: torch.Tensor, y_pred: torch.Tensor, true_classes: Sequence[str],
                          pred_classes: Sequence[str] | None = None) -> dict:
    """Figures for integer labels; ``true_classes`` index ``y_true``, ``pred_classes`` index ``y_pred``.

    The two lists differ when a model with more classes is evaluated on a subset. UAR
    averages recall over the true classes that occur at least once.
    """
    pred_classes = list(true_classes if pred_classes is None else pred_classes)
    y_true, y_pred = y_true.long().cpu(), y_pred.long().cpu()
    confusion = torch.zeros(len(true_classes), len(pred_classes), dtype=torch.int64)
    confusion.index_put_((y_true, y_pred), torch.ones_like(y_true), accumulate=True)
    # map each true class to its column among the predicted classes (same name)
    correct = torch.tensor([confusion[i, pred_classes.index(c)].item() if c in pred_classes else 0
                            for i, c in enumerate(true_classes)])
    support = confusion.sum(1)
    present = support > 0
    recall = torch.where(present, correct / support.clamp(min=1), torch.zeros(()))
    n = int(support.sum())
    return {
        "n": n,
        "accuracy": float(correct.sum()) / n if n else 0.0,
        "uar": float(recall[present].mean()) if present.any() else 0.0,
        "per_class_recall": {c: float(recall[i]) for i, c in enumerate(true_classes) if present[i]},
        "support": {c: int(support[i]) for i, c in enumerate(true_classes)},
        "confusion": confusion.tolist(),
        "confusion_rows": list(true_classes),
        "confusion_cols": pred_classes,
    }
