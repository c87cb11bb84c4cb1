"""The largest eigenvalue of a graph Laplacian, for the Chebyshev interval [0, λ_max].

``estimate_lambda_max(L)`` runs a few steps of plain single-vector Lanczos (float64, fixed random start) and
returns an upper estimate: the largest Ritz value θ plus its residual bound, times 1.01, capped at the
rigorous bound ``L.spectrum_bound()`` (2 for the normalized Laplacian, Gershgorin's 2·max L_ii for the
combinatorial one). The tighter interval is worth the one-time cost: a Chebyshev approximation of a given
order is more accurate on [0, 1.3] than on [0, 2]. The result is cached on the GraphLaplacian object, so a
Laplacian is run through Lanczos at most once, however many filters use it.

θ itself is a lower bound on the true λ_max (a Rayleigh quotient), which is what ``check_lambda_max`` uses to
reject a λ_max that cuts the spectrum off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .graph import GraphLaplacian

LANCZOS_STEPS = 24          # the extreme Ritz value converges first; 24 steps cost 24 sparse mat-vecs
SAFETY = 1.01               # the same 1 % margin PyGSP adds to its eigsh estimate
_CACHE_ATTR = "_lambda_max_cache"
_START_SEED = 0             # a fixed start vector: the same Laplacian always gets the same estimate
# Relative slack when comparing a given λ_max with θ: θ is computed in float64 and a user's exact λ_max may have
# gone through float32. Cutting the spectrum by 1e-6 relative changes T_30 there by under 0.2 %.
_BELOW_TOLERANCE = 1e-6


@dataclass(frozen=True)
class LambdaMaxEstimate:
    """What one Lanczos run found: ``ritz`` ≤ true λ_max ≤ (in practice) ``estimate`` ≤ ``bound``."""
    ritz: float        # the largest Ritz value: a lower bound on λ_max
    residual: float    # |β_m s_m|: some eigenvalue lies within this distance of ``ritz``
    bound: float       # L.spectrum_bound(), rigorous
    estimate: float    # min(bound, (ritz + residual) · SAFETY), or 1.0 for an edgeless graph
    steps: int         # Lanczos steps actually taken (fewer at an invariant subspace)


def lanczos_lambda_max(L: GraphLaplacian, steps: int = LANCZOS_STEPS) -> LambdaMaxEstimate:
    """Run plain Lanczos (no reorthogonalisation: the largest Ritz value is never above λ_max, and ghost copies
    of converged values do not matter for it) and return what it found. Not cached; see estimate_lambda_max."""
    n = L.num_nodes
    bound = float(L.spectrum_bound())
    if n == 0 or bound == 0.0:  # no nodes or no edges: the spectrum is {0} (or empty)
        return LambdaMaxEstimate(0.0, 0.0, bound, 1.0, 0)
    matrix = L.matrix.to(torch.float64)
    gen = torch.Generator().manual_seed(_START_SEED)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(L.device)
    q /= q.norm()
    q_prev = torch.zeros_like(q)
    alphas, betas = [], []
    beta = 0.0
    for _ in range(min(steps, n)):
        w = torch.mv(matrix, q) - beta * q_prev
        alpha = float(torch.dot(w, q))
        w -= alpha * q
        alphas.append(alpha)
        beta = float(w.norm())
        betas.append(beta)
        if beta <= 1e-12 * bound:  # invariant subspace: the Ritz values are eigenvalues
            break
        q_prev, q = q, w / beta
    m = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:-1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    ritz = float(values[-1])
    residual = abs(betas[-1] * float(vectors[-1, -1]))
    estimate = (ritz + residual) * SAFETY
    # A zero Laplacian (a normalized one without edges still has bound 2) has spectrum {0}: any interval will do.
    estimate = min(bound, estimate) if estimate > 0 else 1.0
    return LambdaMaxEstimate(ritz, residual, bound, estimate, m)


def _cache(L: GraphLaplacian) -> dict:
    """Per-Laplacian cache, an attribute of the object: it lives exactly as long as the Laplacian does."""
    return L.__dict__.setdefault(_CACHE_ATTR, {})


def _cached(L: GraphLaplacian) -> LambdaMaxEstimate:
    cache = _cache(L)
    if "lanczos" not in cache:
        cache["lanczos"] = lanczos_lambda_max(L)
    return cache["lanczos"]


def _cached_bound(L: GraphLaplacian) -> float:
    """L.spectrum_bound(), once: for a combinatorial Laplacian it reads the diagonal (a device sync on a GPU)."""
    cache = _cache(L)
    if "bound" not in cache:
        cache["bound"] = float(L.spectrum_bound())
    return cache["bound"]


def estimate_lambda_max(L: GraphLaplacian) -> float:
    """An upper estimate of the largest eigenvalue of ``L``, for ``chebyshev_filter(..., lambda_max=...)``.

    A few Lanczos steps with a safety margin (see the module docstring), never above ``L.spectrum_bound()``.
    Computed once per GraphLaplacian object and cached on it; later calls cost nothing. For a graph without
    edges (spectrum {0}) it returns 1.0, so that [0, λ_max] is never empty.
    """
    if not isinstance(L, GraphLaplacian):
        raise TypeError(f"L must be a GraphLaplacian (from ParameterGraph.laplacian()), got {type(L).__name__}")
    return _cached(L).estimate


def check_lambda_max(L: GraphLaplacian, lambda_max: object) -> float:
    """Validate a user's λ_max: a finite positive number not below the spectrum of ``L``.

    Cheap: a λ_max at or above ``L.spectrum_bound()`` (cached) is accepted without further work; a smaller one
    is compared with the cached Lanczos lower bound θ (one Lanczos run per Laplacian, the first time). A λ_max
    between θ and the true λ_max cannot be told apart from a valid one this way; that gap is small once Lanczos
    has converged.
    """
    if isinstance(lambda_max, bool) or not isinstance(lambda_max, (int, float)) or not math.isfinite(lambda_max):
        raise TypeError(f"lambda_max must be a finite number, got {lambda_max!r}")
    lambda_max = float(lambda_max)
    if lambda_max <= 0:
        raise ValueError(f"lambda_max must be positive (the Chebyshev interval is [0, lambda_max]), got {lambda_max}")
    if lambda_max >= _cached_bound(L):
        return lambda_max
    found = _cached(L)
    if lambda_max < found.ritz * (1.0 - _BELOW_TOLERANCE):
        raise ValueError(
            f"lambda_max={lambda_max:.6g} is below the Laplacian's largest eigenvalue: Lanczos found an eigenvalue "
            f"of at least {found.ritz:.6g} (estimate_lambda_max(L) = {found.estimate:.6g}); outside [0, lambda_max] "
            f"the Chebyshev polynomials grow without bound. Pass lambda_max >= {found.estimate:.6g}, or leave it "
            f"None to use the estimate")
    return lambda_max
