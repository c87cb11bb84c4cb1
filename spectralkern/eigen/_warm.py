"""The warm-start check every Krylov backend runs first: is the previous basis still good enough?

A training loop refreshes its basis while the graph drifts. When the drift since the last refresh is below the
tolerance, one Rayleigh–Ritz step on the old vectors settles the item (s products by L, s = the old basis'
columns) and no Krylov solve runs. Items that fail go to the backend with the old vectors as its start; the
s products are then lost, which is the price of the check.

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


@dataclass
class WarmCheck:
    """Rayleigh–Ritz of every item on its old vectors: lowest-first ``want[g]`` columns."""

    values: torch.Tensor      # (G, kw) eigenvalues of L
    vectors: torch.Tensor     # (G, n_pad, kw)
    converged: torch.Tensor   # (G, kw) bool
    passed: torch.Tensor      # (G,) bool, CPU: every wanted pair of the item met the tolerance


def check_start(op: PaddedOperator, valid: torch.Tensor, want: torch.Tensor, start: torch.Tensor, tol: float,
                generator: torch.Generator) -> WarmCheck:
    """One Rayleigh–Ritz step of A = shift·I − L on the span of ``start``.

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
    Y = orthonormalize(start.mT * mask, start.new_zeros(start.shape[0], 0, start.shape[1]), mask, generator)
    AY = op.apply_rows(Y)
    gram = AY @ Y.mT
    theta, S = eigh_small(0.5 * (gram + gram.mT))
    kw = int(want.max())
    theta, S = theta.flip(-1)[:, :kw], S.flip(-1)[:, :, :kw]           # largest θ of A = lowest λ of L
    ritz = S.mT @ Y
    residuals = torch.linalg.vector_norm(S.mT @ AY - theta.unsqueeze(-1) * ritz, dim=-1)
    needed = torch.arange(kw, device=theta.device).unsqueeze(0) < want.to(theta.device).unsqueeze(1)
    ok = residuals <= tol
    passed = (ok | ~needed).all(dim=1).cpu()
    return WarmCheck(op.shift - theta, ritz.mT, ok & needed, passed)
