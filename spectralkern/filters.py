"""Gain functions g(λ) of the graph frequencies, for ``spectral_filter(x, basis, gains)``.

Each filter is a callable: ``gains = heat(t=2.0)(basis.eigenvalues)`` maps eigenvalues of any shape to gains
of the same shape and dtype. ``learnable_gains`` makes a trainable parameter instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .basis import SpectralBasis


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _non_negative(name: str, value: object) -> float:
    if _finite(name, value) < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return float(value)


@dataclass(frozen=True)
class LowPass:
    """Ideal low-pass: g(λ) = 1 for λ ≤ cutoff, else 0."""
    cutoff: float

    def __call__(self, eigenvalues: torch.Tensor) -> torch.Tensor:
        return (eigenvalues <= self.cutoff).to(eigenvalues.dtype)


@dataclass(frozen=True)
class Heat:
    """Heat kernel: g(λ) = exp(−t·λ)."""
    t: float

    def __call__(self, eigenvalues: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.t * eigenvalues)


@dataclass(frozen=True)
class Tikhonov:
    """Tikhonov (graph-smoothness) filter: g(λ) = 1 / (1 + τ·λ)."""
    tau: float

    def __call__(self, eigenvalues: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + self.tau * eigenvalues)


def low_pass(cutoff: float) -> LowPass:
    """The ideal low-pass gain function: ``low_pass(c)(eigenvalues)`` is 1 where λ ≤ c, else 0 (same shape)."""
    # a negative cutoff passes nothing (graph frequencies are >= 0): a mistake, not a filter
    return LowPass(_non_negative("cutoff", cutoff))


def heat(t: float) -> Heat:
    """The heat-kernel gain function: ``heat(t)(eigenvalues)`` is exp(−t·λ) (same shape); t ≥ 0."""
    return Heat(_non_negative("t", t))


def tikhonov(tau: float) -> Tikhonov:
    """The Tikhonov gain function: ``tikhonov(tau)(eigenvalues)`` is 1 / (1 + τ·λ) (same shape); τ ≥ 0."""
    return Tikhonov(_non_negative("tau", tau))


def learnable_gains(basis: SpectralBasis, init: float | LowPass | Heat | Tikhonov = 1.0, *,
                    shared: bool = False) -> torch.nn.Parameter:
    """A trainable gain tensor for ``basis``: (k,) when ``shared`` across blocks, else (B, k).

    ``init`` is a constant or a filter evaluated at the basis' eigenvalues (with ``shared``, at the mean
    eigenvalue of each slot over the blocks that hold it).
    """
    if not isinstance(basis, SpectralBasis):
        raise TypeError(f"basis must be a SpectralBasis, got {type(basis).__name__}")
    eigenvalues = basis.eigenvalues.detach()
    if callable(init):
        values = init(eigenvalues)
        if shared:
            held = (torch.arange(basis.k).unsqueeze(0) < basis.block_k.unsqueeze(1)).to(values)  # (B, k)
            values = (values * held).sum(0) / held.sum(0).clamp_min(1)
    else:
        values = torch.full((basis.k,) if shared else tuple(eigenvalues.shape), _finite("init", init), dtype=eigenvalues.dtype,
                            device=eigenvalues.device)
    return torch.nn.Parameter(values.clone())


def chebyshev_coefficients(gain, order: int, lambda_max: float) -> torch.Tensor:
    """Coefficients c_0..c_K of the Chebyshev interpolant of ``gain`` on [0, λ_max], for ``chebyshev_filter``.

    g(λ) ≈ Σ_{m=0..K} c_m T_m(2λ/λ_max − 1), exact at the K+1 Chebyshev nodes λ_j = λ_max/2 (1 + cos θ_j),
    θ_j = π (j + ½) / (K + 1). Same nodes and quadrature as PyGSP's ``compute_cheby_coeff``, but with the full
    weight on c_0 (PyGSP stores 2·c_0 and halves it when filtering).

    Args:
        gain: a callable mapping a float64 tensor of λ values to gains of the same shape (``heat(1.0)``, ...).
        order: K ≥ 0.
        lambda_max: the interval's end, > 0.
    Returns:
        (K + 1,) float64 tensor on the CPU.
    """
    if not callable(gain):
        raise TypeError(f"gain must be a callable g(λ) (e.g. spectralkern.heat(1.0)), got {type(gain).__name__}")
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"order must be an int, got {type(order).__name__}")
    if order < 0:
        raise ValueError(f"order must be non-negative, got {order}")
    if _finite("lambda_max", lambda_max) <= 0:
        raise ValueError(f"lambda_max must be positive, got {lambda_max}")
    count = order + 1
    theta = math.pi * (torch.arange(count, dtype=torch.float64) + 0.5) / count
    nodes = 0.5 * float(lambda_max) * (torch.cos(theta) + 1.0)
    values = torch.as_tensor(gain(nodes), dtype=torch.float64)
    if values.shape != nodes.shape:
        raise ValueError(f"gain must return one value per λ: given {count} values it returned shape "
                         f"{tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"gain returned non-finite values on [0, {lambda_max}]: {values.tolist()}")
    coeffs = (2.0 / count) * (torch.cos(torch.outer(torch.arange(count, dtype=torch.float64), theta)) @ values)
    coeffs[0] *= 0.5
    return coeffs
