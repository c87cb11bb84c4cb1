"""Table 1's metrics from a confusion matrix (accuracy, macro precision, macro recall, macro F1), and what an
update Δ = W − W₀ looks like in the graph's spectrum (energy outside span(U), Dirichlet energy).

Conventions (those of scikit-learn's ``zero_division=0``): a class never predicted has precision 0, a class
absent from the labels has recall 0; macro averages weigh every class equally, absent ones included.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["band_energy", "classification_metrics", "confusion_matrix", "dirichlet_energy", "mean_std", "update_metrics"]


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


def band_energy(delta: torch.Tensor, basis) -> tuple[float, float]:
    """(‖Δ − U Uᵀ Δ‖², ‖Δ‖²) of one weight's update Δ (N, d), per block of ``basis`` (a SpectralBasis: U (N, k),
    block_ptr (B + 1,)), in float64. U's columns are orthonormal within each block (zero-padded columns add 0)."""
    x = delta.detach().to(torch.float64)
    U = basis.U.detach().to(device=x.device, dtype=torch.float64)
    if U.shape[0] != x.shape[0]:
        raise ValueError(f"delta has {x.shape[0]} rows, the basis {U.shape[0]}")
    ptr = basis.block_ptr.tolist()
    outside = 0.0
    for start, stop in zip(ptr[:-1], ptr[1:]):
        block, Ub = x[start:stop], U[start:stop]
        outside += float((block - Ub @ (Ub.T @ block)).square().sum())
    return outside, float(x.square().sum())


def dirichlet_energy(delta: torch.Tensor, laplacian) -> tuple[float, float]:
    """(tr(Δᵀ L Δ), ‖Δ‖²) of one weight's update Δ (N, d) for a GraphLaplacian L (sk.laplacian_quadratic), float64."""
    from ..ops.laplacian_quadratic import laplacian_quadratic
    x = delta.detach().to(torch.float64)
    return float(laplacian_quadratic(x, laplacian)), float(x.square().sum())


def update_metrics(deltas: dict[str, torch.Tensor], bases: dict, laplacians: dict) -> dict[str, float]:
    """Over the weights named in ``bases`` (a filter's ``bases()`` / ``laplacians()``), with Δ from ``deltas``
    (a missing name: Δ = 0, e.g. a weight the method freezes):

        outside_span  Σ‖Δ − U Uᵀ Δ‖² / Σ‖Δ‖²   share of the update's energy outside span(U)
        dirichlet     Σ tr(Δᵀ L Δ) / Σ‖Δ‖²     Dirichlet energy per unit of update energy (normalized L: in [0, 2])
        delta_norm    (Σ‖Δ‖²)^½
    Both ratios are NaN when no weight moved."""
    outside = dirichlet = total = 0.0
    for name, basis in bases.items():
        delta = deltas.get(name)
        if delta is None:
            continue
        out, norm2 = band_energy(delta, basis)
        quad, _ = dirichlet_energy(delta, laplacians[name])
        outside, dirichlet, total = outside + out, dirichlet + quad, total + norm2
    nan = float("nan")
    return {"outside_span": outside / total if total > 0 else nan,
            "dirichlet": dirichlet / total if total > 0 else nan, "delta_norm": math.sqrt(total)}
