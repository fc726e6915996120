"""The paper's metrics (method §6), computed with scikit-learn from class probabilities."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

METRICS = ("auc", "accuracy", "precision", "balanced_accuracy", "f1", "kappa", "specificity")


def compute_metrics(labels: np.ndarray, probs: np.ndarray, num_classes: int,
                    averaged_over: str = "present") -> dict[str, float]:
    """AUC (macro one-vs-rest), accuracy, macro precision, balanced accuracy, macro F1,
    quadratic-weighted kappa and macro specificity.

    A class absent from ``labels`` (a small test split) is left out of the AUC, which is then
    the mean over the classes present; ``classes_absent`` says how many were left out.
    ``averaged_over`` says which classes the macro precision, F1 and specificity average over
    when one is absent: ``"present"``, the classes in ``labels``; ``"sklearn"``, the classes
    in ``labels`` or in the predictions, as scikit-learn's ``precision_score`` /
    ``f1_score`` and imblearn's ``specificity_score`` do by default (the released code's
    metrics; a predicted but absent class counts with precision 0). With every class present
    both give the same numbers.

    Args:
        labels: ``[N]`` int true classes.
        probs: ``[N, C]`` probabilities.
        num_classes: ``C``.
        averaged_over: ``"present"`` or ``"sklearn"``.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        f1_score,
        precision_score,
        roc_auc_score,
    )

    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(1)
    classes = list(range(num_classes))
    present = [c for c in classes if (labels == c).any()]
    if averaged_over not in ("present", "sklearn"):
        raise ValueError(f"averaged_over must be 'present' or 'sklearn', got {averaged_over!r}")
    averaged = (present if averaged_over == "present"
                else sorted(set(present) | {int(c) for c in np.unique(pred)}))
    if len(present) >= 2:
        aucs = [roc_auc_score(labels == c, probs[:, c]) for c in present]
        auc = float(np.mean(aucs))
    else:
        auc = math.nan
    cm = confusion_matrix(labels, pred, labels=classes)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = cohen_kappa_score(labels, pred, labels=classes, weights="quadratic")
        balanced = balanced_accuracy_score(labels, pred)
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(labels, pred)),
        "precision": float(precision_score(labels, pred, labels=averaged, average="macro",
                                           zero_division=0)),
        "balanced_accuracy": float(balanced),
        "f1": float(f1_score(labels, pred, labels=averaged, average="macro", zero_division=0)),
        "kappa": float(kappa) if np.isfinite(kappa) else math.nan,
        "specificity": float(np.nanmean(specificity[averaged])),
        "classes_absent": float(num_classes - len(present)),
    }


def class_mean(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """``values`` ``[N]`` averaged within each class of ``labels``, then over the classes
    present: with ``values = (predicted == labels)`` it is the balanced accuracy (macro recall,
    scikit-learn's ``balanced_accuracy_score``)."""
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, values.double())
    present = counts > 0
    return float((sums[present] / counts[present]).mean())


def confusion(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` confusion matrix (rows true, columns predicted)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, np.asarray(probs).argmax(1), labels=list(range(num_classes)))


def format_table(rows: dict[str, dict[str, float]], metrics: tuple[str, ...] = METRICS,
                 stds: dict[str, dict[str, float]] | None = None) -> str:
    """A markdown table: one row per entry of ``rows``, one column per metric (in %)."""
    header = "| | " + " | ".join(metrics) + " |"
    lines = [header, "|---" * (len(metrics) + 1) + "|"]
    for name, values in rows.items():
        cells = []
        for m in metrics:
            v = values.get(m, math.nan)
            cell = "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.2f}"
            if stds is not None and cell != "n/a":
                s = stds.get(name, {}).get(m, math.nan)
                if s is not None and math.isfinite(s):
                    cell += f" ± {100 * s:.2f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
