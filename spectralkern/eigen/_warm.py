"""The warm-start check every Krylov backend runs first: is the previous basis still good enough?

A training loop refreshes its basis while the graph drifts. When the drift since the last refresh is below the
tolerance, one Rayleigh–Ritz step on the old vectors settles the item (s products by L, s = the old basis'
columns) and no Krylov solve runs. When it misses the tolerance by at most EXTEND_WITHIN×, a second
Rayleigh–Ritz step on the block Krylov space [Y, A Y, A² Y, A³ Y] of the old vectors usually settles it
(3s more products). Items that still fail go to the backend with the old vectors as its start; the check's
products are then lost, which is the price of the check.

Measured before this check existed for scipy (Lanczos had its own; 1 thread, float64, 16 kNN blocks of 1024
nodes, k = 16, weights × (1 + drift·N(0, 1)); products per block; the eigensolver bench's drift cases measure
the same with the check in place, see benchmarks/NOTES.md):

    tol    drift   lanczos cold  warm   scipy cold  warm
    1e-4   0.1%    186           38     157         116
    1e-4   1%      183           151    160         127
    1e-8   0.1%    236           202    186         155

The old basis of a 0.1% drift has Ritz residuals of ~1.8e-4 (normalized Laplacian, ‖L‖ ≤ 2), so at tol 1e-4 the
check alone settles most blocks. Below the drift's residual level a Krylov method gains only the first few
orders of magnitude back from the warm start: the low spectrum of these graphs is clustered (gaps ~1e-3 next
to a spread of 2), and the polynomial degree that separates it is set by the gap, not by the start.

Precondition: a passing check proves that every returned pair is an eigenpair to the tolerance, not that they
are the *lowest* ones — an eigenvector that moved into the low end from outside the old span is not seen. That
cannot happen while the drift ‖ΔL‖ stays below the gap λ_{k+1} − λ_k (Weyl); pass ``v0`` for refreshes of a
slowly changing graph, not for a different graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dense import eigh_small
from ._lanczos import orthonormalize
from ._operator import PaddedOperator


# A check that misses the tolerance by at most this factor gets one block-Krylov Rayleigh–Ritz step before the
# backend takes over: the span of [Y, A Y, ..., A^(depth−1) Y] of the old vectors Y (k more products per
# level). Measured in float64 on 1024-node kNN blocks, k = 16, old basis exact for the previous graph (max residual
# over 8 blocks, ‖L‖ ≤ 2): drift 0.1%: 1.9e-4 after the check → 1.9e-5 at depth 4; 1%: 1.9e-3 → 1.9e-4; 3%:
# 5.6e-3 → 5.8e-4 — each level buys about a factor 2, so a check within 10× of the tolerance usually passes at
# depth 4 (64 products per block instead of 140–185 for a Krylov solve at tol 1e-4), and one further away would
# waste the 3k products: it goes straight to the backend.
EXTEND_WITHIN = 10.0
EXTEND_DEPTH = 4


@dataclass
class WarmCheck:
    """Rayleigh–Ritz of every item on its old vectors (and, for near misses, their block Krylov space):
    lowest-first ``want[g]`` columns."""

    values: torch.Tensor      # (G, kw) eigenvalues of L
    vectors: torch.Tensor     # (G, n_pad, kw)
    converged: torch.Tensor   # (G, kw) bool
    passed: torch.Tensor      # (G,) bool, CPU: every wanted pair of the item met the tolerance
    products: torch.Tensor    # (G,) int64, CPU: products by L spent on the item


def check_start(op: PaddedOperator, valid: torch.Tensor, want: torch.Tensor, start: torch.Tensor, tol: float,
                generator: torch.Generator) -> WarmCheck:
    """One Rayleigh–Ritz step of A = shift·I − L on the span of ``start``; items that miss ``tol`` by at most
    EXTEND_WITHIN× get a second one on the block Krylov space of depth EXTEND_DEPTH.

    Args:
        op: the flipped operator of G padded items.
        valid: (G, n_pad) bool, True on the item's nodes.
        want: (G,) int64 CPU, pairs wanted per item (≤ s).
        start: (G, n_pad, s) the previous basis restricted to each item (zero on padding). Columns that are
            zero or dependent on this item (pairs that belonged to another component) are replaced by random
            directions, whose Ritz pairs then fail the check unless they are genuinely converged.
        tol: absolute residual tolerance ‖L y − λ y‖ ≤ tol.
    """
    mask = valid.to(start.dtype).unsqueeze(1)
    s = start.shape[-1]
    Y = orthonormalize(start.mT * mask, start.new_zeros(start.shape[0], 0, start.shape[1]), mask, generator)
    AY = op.apply_rows(Y)
    kw = int(want.max()) if want.numel() else 0
    check = _rayleigh_ritz(Y, AY, want, kw, tol, op.shift)
    products = torch.full((Y.shape[0],), s, dtype=torch.int64)
    if kw == 0:
        return check.result(products)
    worst = check.residuals.where(check.needed, 0).amax(dim=1).cpu()
    near = torch.nonzero(~check.passed & (worst <= EXTEND_WITHIN * tol)).flatten()
    if near.numel() == 0:
        return check.result(products)
    rows = near.to(Y.device)
    sub_op = op.restrict(near)
    V, AV = [Y[rows]], [AY[rows]]
    for _ in range(EXTEND_DEPTH - 1):
        block = orthonormalize(AV[-1], torch.cat(V, dim=1), mask[rows], generator)
        V.append(block)
        AV.append(sub_op.apply_rows(block))
    extended = _rayleigh_ritz(torch.cat(V, dim=1), torch.cat(AV, dim=1), want[near], kw, tol, op.shift)
    check.values[rows], check.vectors[rows] = extended.values, extended.vectors
    check.residuals[rows], check.passed[near] = extended.residuals, extended.passed
    products[near] = EXTEND_DEPTH * s
    return check.result(products)


@dataclass
class _Ritz:
    values: torch.Tensor      # (G, kw) eigenvalues of L
    vectors: torch.Tensor     # (G, n_pad, kw)
    residuals: torch.Tensor   # (G, kw)
    needed: torch.Tensor      # (G, kw) bool: the columns the item owes
    passed: torch.Tensor      # (G,) bool, CPU
    tol: float

    def result(self, products: torch.Tensor) -> WarmCheck:
        return WarmCheck(self.values, self.vectors, (self.residuals <= self.tol) & self.needed, self.passed,
                         products)


def _rayleigh_ritz(V: torch.Tensor, AV: torch.Tensor, want: torch.Tensor, kw: int, tol: float, shift: float
                   ) -> _Ritz:
    """The kw lowest Ritz pairs of L on the orthonormal rows V (G, q, n), given AV = V A; item g owes the
    first ``want[g]`` of them."""
    gram = AV @ V.mT
    theta, S = eigh_small(0.5 * (gram + gram.mT))
    theta, S = theta.flip(-1)[:, :kw], S.flip(-1)[:, :, :kw]           # largest θ of A = lowest λ of L
    ritz = S.mT @ V
    residuals = torch.linalg.vector_norm(S.mT @ AV - theta.unsqueeze(-1) * ritz, dim=-1)
    needed = torch.arange(kw, device=theta.device).unsqueeze(0) < want.to(theta.device).unsqueeze(1)
    passed = ((residuals <= tol) | ~needed).all(dim=1).cpu()
    return _Ritz(shift - theta, ritz.mT, residuals, needed, passed, tol)
