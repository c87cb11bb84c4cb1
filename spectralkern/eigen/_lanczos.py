"""Batched thick-restart block Lanczos for the largest eigenpairs of A = c·I − L on G padded items at once.

Every item advances in lockstep: one ``A.apply_rows`` per block step covers all active items (one ``baddbmm``
or one sparse matmul, never a loop over items), and the Gram–Schmidt, QR and Rayleigh–Ritz steps are batched
GEMMs, QRs and ``eigh`` calls over the item dimension.

One cycle, per item (V: orthonormal basis, W = A V kept alongside, so no product is ever recomputed):
    1. expand: P_next = orth((I − V Vᵀ) A P), block Lanczos with full reorthogonalisation (block classical
       Gram–Schmidt twice, then a Householder QR of the block), until V holds ``ncv`` vectors;
    2. Rayleigh–Ritz: H = Vᵀ W, filled one row block per step (its first Gram–Schmidt coefficients; the
       lower triangle is mirrored at the Rayleigh–Ritz step), eigh(H);
    3. residuals of the Ritz pairs straight from the stored W: r = Sᵀ W − θ Sᵀ V = A y − θ y, exact up to
       rounding whatever V is (a Krylov space, a warm start, random refills), so a pair is declared converged
       on its true residual, not on an estimate that assumes Krylov structure;
    4. thick restart: keep the ``keep`` best Ritz vectors (and their images Sᵀ W) and continue from the p
       dominant directions of their residuals; in a Krylov space these span exactly the next block Lanczos
       would have produced. Every 16 restarts the kept vectors are re-orthonormalised and their products
       taken afresh, because carrying W through restarts drifts by about eps·√m each time.
Items whose wanted pairs have all converged leave the batch (the operator is restricted to the rest), so
early finishers stop costing. A vector that Gram–Schmidt wipes out (an invariant subspace was reached:
repeated eigenvalues, a small item) is replaced by a random one orthogonalised against V, as ARPACK does.

Repeated eigenvalues: a start block of p vectors sees multiplicities up to p in exact arithmetic; the planner
(_plan) keeps at most p connected components in one item, so the repeated eigenvalues that disconnected
components produce are always within reach. Higher multiplicities inside one component are found through
rounding and random refills, as in single-vector Lanczos.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._dense import eigh_small
from ._operator import PaddedOperator

# A row that loses more than this fraction of its norm in the second Gram–Schmidt pass (or in QR) was rounding
# noise after the first: it is replaced by a random direction.
_LOST = 0.5
_MAX_REFILLS = 4
# Restarts between fresh products of the kept Ritz vectors (see step 4 in block_lanczos): the drift stays under
# about eps·√(m·16) = 4·√m·eps, below the default tolerance floor, for a cost of keep/16 products per restart.
_REFRESH_EVERY = 16


@dataclass
class LanczosResult:
    """Per item g: the ``want[g]`` lowest eigenpairs of L (λ = c − θ), ascending, in the first columns."""

    values: torch.Tensor      # (G, kw)
    vectors: torch.Tensor     # (G, n_pad, kw)
    residuals: torch.Tensor   # (G, kw) ‖A y − θ y‖ from the last Rayleigh–Ritz step
    converged: torch.Tensor   # (G, kw) bool
    iterations: torch.Tensor  # (G,) int64, CPU: restarts
    matvecs: torch.Tensor     # (G,) int64, CPU


# Vectors are stored as rows: a block of q vectors of item g is x[g] of shape (q, n_pad). With that layout every
# product below is a GEMM whose long dimension is contiguous in both operands (Householder QR of x.mT, a
# column-major view, needs no copy either, and its Q.mT is row-contiguous again); measured here, the
# column layout made the skinny Gram–Schmidt GEMMs 2–4× slower.
def _random(shape: tuple[int, ...], mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian (G, q, n_pad) rows, zero on padding; ``mask`` is (G, 1, n_pad) 0/1 of the target dtype."""
    return torch.randn(shape, dtype=mask.dtype, device=mask.device, generator=generator) * mask


def _qr_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal rows Q (G, q, n) spanning x's rows, and R (G, q, q) with x = Rᵀ Q (Householder)."""
    q, r = torch.linalg.qr(x.mT)
    return q.mT, r


def orthonormalize(x: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                   first: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal rows spanning the part of x's rows outside span(basis' rows); padding columns stay zero.

    x (G, q, n); basis (G, j, n) with orthonormal rows (j may be 0); mask (G, 1, n) 0/1; ``first`` = x basisᵀ
    when the caller already has it (a row block of H).

    Block classical Gram–Schmidt run twice ("twice is enough"; one pass lets the basis' own rounding-level
    non-orthogonality grow by ‖x‖/‖result‖ per step — measured: 6e-6 after 20 Lanczos steps), then a Householder
    QR of the rows among themselves. A row that loses more than half its norm in the second pass, or that QR
    finds dependent on the rows before it, was rounding noise: it is replaced by a random direction and the
    block is orthonormalised again. Rows lost in Gram–Schmidt are refilled before the QR, and of the rows QR
    finds dependent only the first of each item is: past a dependent row, Householder's Q row is an arbitrary
    direction that later rows are measured against, so their R diagonal says nothing, and swapping them out
    would drop genuine directions (e.g. the old vectors of a warm start after a column that was zero).
    """
    for _ in range(_MAX_REFILLS + x.shape[1]):
        y = x - (first if first is not None else x @ basis.mT) @ basis
        first = None
        norm1 = torch.linalg.vector_norm(y, dim=-1)
        y = y - (y @ basis.mT) @ basis
        norm2 = torch.linalg.vector_norm(y, dim=-1)
        lost = (norm2 < _LOST * norm1) | (norm2 == 0)
        if not bool(lost.any()):
            q, diagonal = _orthonormal_rows(y, norm2)
            if diagonal is None:
                return q * mask
            lost = diagonal < _LOST * norm2
            lost &= torch.cumsum(lost.to(torch.int64), dim=-1) == 1     # the first dependent row of each item
            if not bool(lost.any()):
                return q * mask
        x = torch.where(lost.unsqueeze(-1), _random(y.shape, mask, generator), y * mask)
    return _orthonormal_rows(y, norm2)[0] * mask  # rows still lost are noise; their Ritz values are never wanted


def _orthonormal_rows(y: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Orthonormal rows spanning y's (G, q, n) rows and |R|'s diagonal (None for q = 1: y / ‖y‖)."""
    if y.shape[1] == 1:
        return y / norm.unsqueeze(-1).clamp_min(torch.finfo(y.dtype).tiny), None
    q, r = _qr_rows(y)
    return q, r.diagonal(dim1=-2, dim2=-1).abs()


def _symmetric_from_rows(H: torch.Tensor) -> torch.Tensor:
    """H as filled by ``expand``: each row block holds its columns up to its own diagonal block. The strict lower
    triangle, mirrored, plus the diagonal is the symmetric matrix (the upper half of each diagonal block equals
    the mirrored lower half up to rounding)."""
    lower = H.tril(-1)
    return lower + lower.mT + torch.diag_embed(H.diagonal(dim1=-2, dim2=-1))


def _dominant_rows(R: torch.Tensor, p: int) -> torch.Tensor:
    """The p dominant directions of the residual rows R (G, kk, n): top left singular vectors of Rᵀ, from the
    eigenvectors of the small Gram matrix R Rᵀ, as unit rows (G, p, n).

    In a Krylov space every Ritz residual lies in the span of the p-vector block Lanczos would add next, so
    these are that block; weighting by residual size keeps them accurate (picking the residual of one nearly
    converged pair gave a direction off by ~eps·‖A‖/‖r‖, and the error compounded over restarts: 1.7× more
    products than ARPACK on a 4096-node kNN Laplacian, k = 64). After a warm start the residuals span more than
    p directions and these are the p that carry most of the error.
    """
    gram = R @ R.mT
    _, vectors = eigh_small(0.5 * (gram + gram.mT))
    rows = vectors[:, :, -p:].flip(-1).mT @ R
    return rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(torch.finfo(R.dtype).tiny)


def default_keep(m: int, p: int, kw: int) -> int:
    """Ritz vectors kept at a restart: the wanted ones plus a quarter of the spare room, leaving room for at
    least one block. Measured (1 thread, float64, tol 1e-8, products per block): 4096-node kNN blocks, k = 64,
    m = 132, p = 2: keep a quarter 582, keep none 660, keep half 574 but 14 restarts instead of 10; 1000-node
    blocks, k = 16, m = 48: a quarter 210, none 250."""
    return min(m - p, max(kw + p, kw + (m - kw) // 4))


def block_lanczos(op: PaddedOperator, valid: torch.Tensor, want: torch.Tensor, *, ncv: int, block: int,
                  tol: float, maxiter: int, generator: torch.Generator, keep: int | None = None,
                  start: torch.Tensor | None = None,
                  on_restart: Callable[[int, int], None] | None = None) -> LanczosResult:
    """The ``want[g]`` largest eigenpairs of each item's A, returned as the lowest of L (λ = shift − θ).

    Args:
        op: the flipped operator on G items of n_pad rows.
        valid: (G, n_pad) bool, True on the item's nodes. Every item must have more than ``ncv + block``
            nodes so that a fresh direction always exists.
        want: (G,) int64 CPU, pairs wanted per item, 1 ≤ want ≤ ncv − block.
        ncv: basis size per item; block: vectors per Krylov block (p).
        tol: absolute residual tolerance ‖A y − θ y‖ ≤ tol.
        maxiter: most restarts (Rayleigh–Ritz steps) per item.
        generator: random numbers for the start block and for refills.
        keep: Ritz vectors carried over a restart (default ``default_keep``).
        start: optional (G, n_pad, s) warm-start vectors (a previous basis): the first block is p random
            combinations of them.
        on_restart: called after each restart with (pairs converged so far, pairs wanted).
    """
    num_items, n_pad = valid.shape
    device, dtype = op.val.device, op.val.dtype
    kw = int(want.max())
    p, m = block, ncv
    if keep is None:
        keep = default_keep(m, p, kw)
    mask = valid.to(dtype).unsqueeze(1)
    want_dev = want.to(device)
    shift = op.shift

    values = torch.zeros(num_items, kw, dtype=dtype, device=device)
    vectors = torch.zeros(num_items, n_pad, kw, dtype=dtype, device=device)
    residuals = torch.full((num_items, kw), float("inf"), dtype=dtype, device=device)
    converged = torch.zeros(num_items, kw, dtype=torch.bool, device=device)
    iterations = torch.zeros(num_items, dtype=torch.int64)
    matvecs = torch.zeros(num_items, dtype=torch.int64)

    active = torch.arange(num_items)            # CPU indices of the items still running
    V = torch.zeros(num_items, m, n_pad, dtype=dtype, device=device)   # basis vectors as rows
    W = torch.zeros_like(V)                                            # W = A V, row by row
    H = torch.zeros(num_items, m, m, dtype=dtype, device=device)       # Vᵀ A V

    # All active items advance in lockstep, so one counter of products serves them all; an item's count is
    # read when it leaves the batch.
    products = 0

    def expand(P: torch.Tensor, j: int) -> None:
        """Append the rows P at row j of V, their images to W, and their row block to H's lower triangle."""
        nonlocal products
        width = P.shape[1]
        V[:, j:j + width] = P
        W[:, j:j + width] = op.apply_rows(P)
        products += width
        H[:, j:j + width, :j + width] = W[:, j:j + width] @ V[:, :j + width].mT

    # First block: p random vectors, or p random combinations of the warm-start vectors (the caller has already
    # checked those themselves, see _warm). Measured on a drifting 3 × 400-node kNN graph (k = 10, weights ×
    # (1 + 1%·N(0, 1)) per refresh): keeping the old vectors in the basis and expanding from their residuals took
    # 1.5–3× *more* products than a cold start (their residuals span s directions, chased p at a time); a start
    # inside a nearly invariant subspace cannot re-resolve a clustered low spectrum quickly either (its Krylov
    # basis is a Vandermonde system on clustered θ), so below the drift's own residual level the warm start saves
    # only 5–25% (see _warm).
    none = V[:, :0]
    if start is not None:
        mix = torch.randn(start.shape[-1], p, dtype=dtype, device=device, generator=generator)
        P = orthonormalize((start @ mix).mT * mask, none, mask, generator)
    else:
        P = orthonormalize(_random((num_items, p, n_pad), mask, generator), none, mask, generator)
    expand(P, 0)
    j = P.shape[1]
    # Rayleigh–Ritz checkpoints of the first cycle: a warm start checks early and often; every later cycle checks
    # when the basis is full.
    checkpoints = [m]
    if start is not None:
        point = kw + 2 * p
        while point < m:
            checkpoints.insert(-1, point)
            point = point + max(p, point // 2)
    since_refresh = 0
    total_wanted = int(want.sum())
    rank = torch.arange(m, device=device)

    while True:
        # 1. block Lanczos steps until the next checkpoint (normally: the basis is full)
        stop = checkpoints.pop(0) if checkpoints else m
        while j + p <= stop:
            P = orthonormalize(W[:, j - p:j], V[:, :j], mask, generator, first=H[:, j - p:j, :j])
            expand(P, j)
            j += p
        # 2. Rayleigh–Ritz on the j rows filled; largest θ of A (lowest λ of L) first
        theta, S = eigh_small(_symmetric_from_rows(H[:, :j, :j]))
        kk = min(keep, j) if j + p > m else j   # an early checkpoint keeps every vector: a pure check
        theta, S = theta.flip(-1)[:, :kk], S.flip(-1)[:, :, :kk]
        Y = S.mT @ V[:, :j]                                             # (G, kk, n_pad) Ritz vectors
        AY = S.mT @ W[:, :j]
        R = AY - theta.unsqueeze(-1) * Y
        res = torch.linalg.vector_norm(R, dim=-1)                       # (G, kk)
        iterations[active] += 1
        # 3. items whose wanted pairs all converged, or out of restarts, leave the batch
        needed = rank[:kk].unsqueeze(0) < want_dev[active].unsqueeze(1)
        ok = res <= tol
        finish = (ok | ~needed).all(dim=1) | (iterations[active] >= maxiter).to(device)
        if bool(finish.any()):
            matvecs[active[finish.cpu()]] = products
            rows = active.to(device)[finish]
            values[rows] = shift - theta[finish, :kw]
            vectors[rows] = Y[finish, :kw].mT
            residuals[rows] = res[finish, :kw]
            converged[rows] = (ok & needed)[finish, :kw]
        if on_restart is not None:
            on_restart(int(converged.sum()) + int((ok & needed)[~finish].sum()), total_wanted)
        if bool(finish.all()):
            break
        # 4. thick restart of the others: keep kk Ritz pairs, continue from the dominant residual directions
        if bool(finish.any()):
            stay = torch.nonzero(~finish).flatten()
            active = active[stay.cpu()]
            op = op.restrict(stay)
            V, W, H, mask = V[stay], W[stay], H[stay], mask[stay]
            theta, Y, AY, R = theta[stay], Y[stay], AY[stay], R[stay]
        H.zero_()
        since_refresh += 1
        if since_refresh >= _REFRESH_EVERY:
            # W = A V is carried through restarts as Sᵀ W; rounding makes it drift from A V (and V from
            # orthonormal) by about eps·√m per restart. Re-orthonormalise the kept vectors and take fresh products.
            since_refresh = 0
            Y = orthonormalize(Y, V[:, :0], mask, generator)
            AY = op.apply_rows(Y)
            products += kk
            gram = AY @ Y.mT
            H[:, :kk, :kk] = 0.5 * (gram + gram.mT)
        else:
            H[:, :kk, :kk] = torch.diag_embed(theta)
        V[:, :kk] = Y
        W[:, :kk] = AY
        P = orthonormalize(_dominant_rows(R, p), V[:, :kk], mask, generator)
        expand(P, kk)
        j = kk + p
    return LanczosResult(values, vectors, residuals, converged, iterations, matvecs)
