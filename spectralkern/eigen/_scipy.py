"""The ``scipy`` backend: ``scipy.sparse.linalg.eigsh`` (ARPACK) on each Krylov item, one after the other.

Each item is one connected component (see _plan), so ARPACK never has to discover a multiplicity across
components. ARPACK targets the low end through the flip: the largest algebraic ('LA') eigenvalues θ of
c·I − L, never 'SM' (which without shift-invert converges slowly) nor 'SA' (whose criterion
‖r‖ ≤ tol·|θ| gets stricter as θ → 0).

ARPACK stops as soon as its nev Ritz pairs meet the tolerance. At a loose tolerance an eigenvalue whose
eigenvector is still weak in the Krylov space can be missing at that moment — an interior one of the wanted
range too — and the pairs returned are then not the lowest. Asking for a few pairs more than wanted, each to a
tolerance no looser than ``ARPACK_TOL_CAP``, makes that rare (measured numbers at the constants below).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from ._plan import Candidates, Items
from ._problem import Problem


def flipped_block(csr: scipy.sparse.csr_array, nodes: np.ndarray, shift: float) -> scipy.sparse.csr_array:
    """c·I − L restricted to ``nodes``, as a scipy CSR array."""
    sub = csr[nodes][:, nodes]
    return scipy.sparse.csr_array(shift * scipy.sparse.identity(nodes.size, dtype=csr.dtype, format="csr") - sub)


GUARD_PAIRS = 2
ARPACK_TOL_CAP = 1e-5


def theta_max(problem: Problem) -> float:
    """The largest |θ| an eigenvalue of the flipped operator c·I − L can have."""
    bound = abs(problem.shift) if problem.psd else abs(problem.shift) + problem.norm
    return max(bound, float(np.finfo(np.float64).tiny))


def arpack_tol(problem: Problem, tol_abs: float) -> float:
    """ARPACK's relative tolerance: it stops at ‖r‖ ≤ tol·|θ|, so the absolute tolerance is divided by the largest
    |θ| there can be, then capped at ``ARPACK_TOL_CAP`` (see the module docstring)."""
    return min(tol_abs / theta_max(problem), ARPACK_TOL_CAP)


def arpack_request(want: int, size: int, ncv: int | None, room: int = 1) -> tuple[int, int | None]:
    """(nev, ncv) to ask for on an item of ``size`` nodes when ``want`` pairs are wanted: ``GUARD_PAIRS`` more
    than wanted while nev ≤ size − ``room`` (ARPACK needs nev < size; cupyx's eigsh nev + 2 ≤ ncv < size, so
    room 3), and the caller's ncv raised to nev + ``room`` where it is too small."""
    nev = max(want, min(want + GUARD_PAIRS, size - room))
    return nev, None if ncv is None else min(max(ncv, nev + room), size)


def random_start(size: int, generator: torch.Generator) -> torch.Tensor:
    """ARPACK's own kind of start, uniform in [−1, 1), drawn from ``generator`` so solves repeat under a seed."""
    return torch.rand(size, dtype=torch.float64, device=generator.device, generator=generator).mul_(2).sub_(1)


def ritz_approximations(operator: scipy.sparse.linalg.LinearOperator, v0: np.ndarray, found: np.ndarray,
                        nev: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``nev`` largest Ritz pairs of ``operator`` on span(found, K_steps(v0)): Lanczos with a full
    Gram–Schmidt pass (twice) every step, then Rayleigh–Ritz. For an item ARPACK gave up on: approximations as
    good as a Krylov space of ``steps`` vectors makes them, never zeros."""
    size = v0.size
    basis = [col / np.linalg.norm(col) for col in found.T] if found.size else []
    q = v0 / (np.linalg.norm(v0) or 1.0)
    for _ in range(max(0, min(steps, size) - len(basis))):
        for _pass in range(2):
            if basis:
                B = np.stack(basis, axis=1)
                q = q - B @ (B.T @ q)
        norm = np.linalg.norm(q)
        if norm < 1e-8:   # an invariant subspace: go on from a direction not yet spanned
            q = np.random.default_rng(len(basis)).uniform(-1, 1, size)
            continue
        basis.append(q / norm)
        q = operator @ basis[-1]
    B = np.stack(basis, axis=1)
    H = B.T @ np.stack([operator @ B[:, i] for i in range(B.shape[1])], axis=1)
    theta, S = np.linalg.eigh(0.5 * (H + H.T))
    top = np.argsort(-theta, kind="stable")[:nev]
    return theta[top], B @ S[:, top]


def scipy_solve(problem: Problem, items: Items, k: int, tol_abs: float, maxiter: int | None, ncv: int | None,
                start: torch.Tensor | None, generator: torch.Generator,
                tick: Callable[[], None] | None = None) -> Candidates:
    """k lowest pairs of every item; ``start`` (N, s) warm-start vectors; ``generator`` (CPU) draws the cold
    starts. The plan sends only items of more than ncv + p ≥ k + 2 nodes here (smaller ones are solved densely);
    ``arpack_request`` keeps nev below the size on its own all the same."""
    m = problem.matrix
    dtype = np.float32 if problem.dtype == torch.float32 else np.float64
    csr = scipy.sparse.csr_array((m.values().cpu().numpy().astype(dtype), m.col_indices().cpu().numpy(),
                                  m.crow_indices().cpu().numpy()), shape=m.shape)
    num_items = items.num_items
    q = min(k, int(items.sizes.max()))
    n_pad = items.node_map.shape[1]
    values = np.zeros((num_items, q))
    vectors = np.zeros((num_items, n_pad, q))
    converged = np.zeros((num_items, q), dtype=bool)
    count = torch.zeros(num_items, dtype=torch.int64)
    matvecs = torch.zeros(num_items, dtype=torch.int64)
    node_map = items.node_map.cpu().numpy()
    start_np = start.detach().cpu().double().numpy() if start is not None else None
    tol = arpack_tol(problem, tol_abs)
    for g in range(num_items):
        size = int(items.sizes[g])
        nodes = node_map[g, :size]
        flipped = flipped_block(csr, nodes, problem.shift)
        want = min(k, size)
        nev, item_ncv = arpack_request(want, size, ncv)
        calls = [0]

        def matvec(x: np.ndarray, flipped=flipped, calls=calls) -> np.ndarray:
            calls[0] += 1
            return flipped @ x

        operator = scipy.sparse.linalg.LinearOperator(flipped.shape, matvec=matvec, dtype=dtype)
        v0 = start_np[nodes].sum(axis=1) if start_np is not None else None
        if v0 is None or not np.any(v0):
            v0 = random_start(size, generator).numpy()
        try:
            theta, vecs = scipy.sparse.linalg.eigsh(operator, k=nev, which="LA", tol=tol, maxiter=maxiter,
                                                    ncv=item_ncv, v0=v0.astype(dtype))
            done = True
        except scipy.sparse.linalg.ArpackNoConvergence as exc:
            # The pairs that converged may skip a wanted one (ARPACK reports them with gaps), which a guard would
            # then fill unnoticed: keep them as approximations, none counted as converged. ARPACK hands back only
            # its converged pairs (often none): the rest become Ritz approximations from a Krylov space of the
            # same size ARPACK was given, so every column is a real approximation with an honest residual.
            theta, vecs = exc.eigenvalues, exc.eigenvectors
            if theta.size < want:
                theta, vecs = ritz_approximations(operator, v0.astype(dtype), exc.eigenvectors, nev,
                                                  item_ncv or min(size, max(2 * nev + 1, 20)))
            done = False
        order = np.argsort(-theta, kind="stable")[:want]   # the guards go
        got = order.size
        values[g, :got] = problem.shift - theta[order]
        vectors[g, :size, :got] = vecs[:, order]
        converged[g, :got] = done
        count[g] = got
        matvecs[g] = calls[0]
        if tick is not None:
            tick()
    device, tdtype = problem.device, problem.dtype
    return Candidates(items=items, values=torch.as_tensor(values, dtype=tdtype, device=device),
                      vectors=torch.as_tensor(vectors, dtype=tdtype, device=device), count=count,
                      converged=torch.as_tensor(converged, device=device),
                      iterations=torch.zeros(num_items, dtype=torch.int64), matvecs=matvecs)
