"""What a solve reports besides the basis: ``EigenInfo`` (attached as ``basis.info``) and ``NoConvergence``."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EigenInfo:
    """Diagnostics of one ``lowest_eigenpairs`` call, per block of the returned basis.

    Attributes:
        backend: what ran: "dense", "lanczos", "scipy", "cupy" or "native", joined by "+" when several did
            ("native+scipy+dense": auto on the CPU with components of every size range; "<krylov>+dense" when some
            blocks or components were small enough for a dense solve).
        iterations: (B,) int64, CPU — restarts (Rayleigh–Ritz steps) of the Lanczos solver per block, a warm-start
            check counting as one (a block the check settled: 1); 0 for blocks solved densely, by native (which
            never restarts) and by ARPACK (scipy/cupy), which does not report its restarts.
        matvecs: (B,) int64, CPU — vectors multiplied by L per block (a block of p vectors counts p; 0 for
            blocks solved densely and for cupy; native counts its Lanczos steps plus the one product per tracked
            pair that verifies its Ritz vectors). The verification product at the end is not counted.
        residuals: (B, k) float64, CPU — ‖L u_j − λ_j u_j‖₂ of every returned pair, computed explicitly from the
            returned vectors with one fresh product by L; 0 in the padding columns j ≥ k_b.
        converged: (B, k) bool, CPU — True where pair j of block b met the tolerance; False in padding columns.
        tol: the absolute residual tolerance the pairs were held to, ``max(tol, floor) · norm``.
        norm: the bound on ‖L‖ the tolerance is relative to (2 for a normalized Laplacian, Gershgorin otherwise).
        block_size: vectors per Krylov block (0 when no Krylov solver ran).
        ncv: the largest Krylov basis per block (0 when no Krylov solver ran).
    """

    backend: str
    iterations: torch.Tensor
    matvecs: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    tol: float
    norm: float
    block_size: int = 0
    ncv: int = 0

    @property
    def num_converged(self) -> int:
        return int(self.converged.sum())

    def __repr__(self) -> str:
        wanted = int(self.converged.numel())
        worst = float(self.residuals.max()) if self.residuals.numel() else 0.0
        return (f"EigenInfo(backend={self.backend!r}, converged={self.num_converged} pairs, matvecs="
                f"{int(self.matvecs.sum())} in all, max restarts={int(self.iterations.max()) if wanted else 0}, "
                f"max residual={worst:.2e}, tol={self.tol:.2e})")


class NoConvergence(RuntimeError):
    """Raised by ``lowest_eigenpairs(..., strict=True)`` when some pairs missed the tolerance within ``maxiter``.

    Like scipy's ``ArpackNoConvergence``, it carries the partial result: ``basis`` is what ``strict=False``
    would have returned (every column filled with the current Ritz approximation, orthonormal per block), and
    ``info.converged`` (also ``basis.info``) says which pairs met the tolerance.
    """

    def __init__(self, message: str, basis: object, info: EigenInfo):
        super().__init__(message)
        self.basis = basis
        self.info = info
