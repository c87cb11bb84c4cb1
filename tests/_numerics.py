"""Numerical helpers shared by the op tests."""
from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (the denominator floored at 1e-30)."""
    return (actual.double() - expected.double()).norm().item() / max(expected.double().norm().item(), 1e-30)
