"""Table 1's metrics from a confusion matrix: accuracy, macro precision, macro recall (and macro F1).

Conventions (those of scikit-learn's ``zero_division=0``): a class never predicted has precision 0, a class
absent from the labels has recall 0; macro averages weigh every class equally, absent ones included.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["classification_metrics", "confusion_matrix", "mean_std"]


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[t, p] = number of documents of true class t predicted as p: (C, C) int64."""
    if labels.shape != predictions.shape or labels.dim() != 1:
        raise ValueError(f"labels and predictions must be 1-D of one length, got shapes {tuple(labels.shape)} "
                         f"and {tuple(predictions.shape)}")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in "
                             f"[{int(values.min())}, {int(values.max())}]")
    flat = labels.to(torch.int64).cpu() * num_classes + predictions.to(torch.int64).cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """accuracy, macro_precision, macro_recall, macro_f1 from a (C, C) confusion matrix (rows: true class)."""
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be square (C, C), got shape {tuple(confusion.shape)}")
    counts = confusion.to(torch.float64)
    total = float(counts.sum())
    if total == 0:
        raise ValueError("confusion is all zeros: no documents were scored")
    correct = counts.diagonal()
    predicted = counts.sum(0)
    actual = counts.sum(1)
    precision = torch.where(predicted > 0, correct / predicted.clamp_min(1), torch.zeros_like(correct))
    recall = torch.where(actual > 0, correct / actual.clamp_min(1), torch.zeros_like(correct))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(correct))
    return {"accuracy": float(correct.sum()) / total, "macro_precision": float(precision.mean()),
            "macro_recall": float(recall.mean()), "macro_f1": float(f1.mean())}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); the deviation is 0 for a single value."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
