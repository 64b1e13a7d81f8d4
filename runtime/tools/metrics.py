"""Classification metrics in numpy, shared by training (torch) and runtime evaluation (no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts; rows are true labels, columns predictions."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int
) -> dict:
    """accuracy, macro precision / recall / F1 and the confusion matrix.

    Macro averages run over the classes that occur in `y_true` or `y_pred` (as scikit-learn does); a class
    never predicted has precision 0, which pulls the macro precision down rather than being skipped.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has {y_pred.shape}")
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    true_positive = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    seen = (predicted + actual) > 0
    precision = np.divide(true_positive, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros(num_classes), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(num_classes), where=denominator > 0)
    count = int(y_true.size)
    return {
        "accuracy": float(true_positive.sum() / count) if count else 0.0,
        "macro_precision": float(precision[seen].mean()) if seen.any() else 0.0,
        "macro_recall": float(recall[seen].mean()) if seen.any() else 0.0,
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "count": count,
        "confusion_matrix": matrix.tolist(),
    }


def format_metrics_table(metrics: dict) -> str:
    """A plain-text table: one row per modality subset, then the overall row."""
    rows = [(key, value) for key, value in metrics.get("subsets", {}).items()]
    rows.append(("all present", metrics))
    width = max(len(key) for key, _ in rows)
    lines = [f"{'modalities':<{width}}  accuracy  macro_P  macro_R  macro_F1      n"]
    for key, value in rows:
        lines.append(
            f"{key:<{width}}  {value['accuracy']:8.4f}  {value['macro_precision']:7.4f}  "
            f"{value['macro_recall']:7.4f}  {value['macro_f1']:8.4f}  {value['count']:5d}"
        )
    return "\n".join(lines)
