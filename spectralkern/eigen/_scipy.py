"""The ``scipy`` backend: ``scipy.sparse.linalg.eigsh`` (ARPACK) on each Krylov item, one after the other.

Each item is one connected component (see _plan), so ARPACK never has to discover a multiplicity across
components. ARPACK targets the low end through the flip: the largest algebraic ('LA') eigenvalues θ of
c·I − L, never 'SM' (which without shift-invert converges slowly) nor 'SA' (whose criterion
‖r‖ ≤ tol·|θ| gets stricter as θ → 0).
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


def arpack_tol(problem: Problem, tol_abs: float) -> float:
    """ARPACK stops at ‖r‖ ≤ tol·|θ|: divide the absolute tolerance by the largest |θ| there can be."""
    theta_max = abs(problem.shift) if problem.psd else abs(problem.shift) + problem.norm
    return tol_abs / max(theta_max, np.finfo(np.float64).tiny)


def scipy_solve(problem: Problem, items: Items, k: int, tol_abs: float, maxiter: int | None, ncv: int | None,
                start: torch.Tensor | None, tick: Callable[[], None] | None = None) -> Candidates:
    """k lowest pairs (or all, if the item is smaller) of every item; ``start`` (N, s) warm-start vectors."""
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
        calls = [0]

        def matvec(x: np.ndarray, flipped=flipped, calls=calls) -> np.ndarray:
            calls[0] += 1
            return flipped @ x

        operator = scipy.sparse.linalg.LinearOperator(flipped.shape, matvec=matvec, dtype=dtype)
        v0 = start_np[nodes].sum(axis=1).astype(dtype) if start_np is not None else None
        if v0 is not None and not np.any(v0):
            v0 = None
        try:
            theta, vecs = scipy.sparse.linalg.eigsh(operator, k=want, which="LA", tol=tol, maxiter=maxiter,
                                                    ncv=ncv if ncv is None else min(max(ncv, want + 1), size),
                                                    v0=v0)
            ok = np.ones(theta.size, dtype=bool)
        except scipy.sparse.linalg.ArpackNoConvergence as exc:  # keep what converged, flag the rest
            theta, vecs = exc.eigenvalues, exc.eigenvectors
            ok = np.ones(theta.size, dtype=bool)
        order = np.argsort(-theta, kind="stable")
        got = order.size
        values[g, :got] = problem.shift - theta[order]
        vectors[g, :size, :got] = vecs[:, order]
        converged[g, :got] = ok[order]
        count[g] = got
        matvecs[g] = calls[0]
        if tick is not None:
            tick()
    device, tdtype = problem.device, problem.dtype
    return Candidates(items=items, values=torch.as_tensor(values, dtype=tdtype, device=device),
                      vectors=torch.as_tensor(vectors, dtype=tdtype, device=device), count=count,
                      converged=torch.as_tensor(converged, device=device),
                      iterations=torch.zeros(num_items, dtype=torch.int64), matvecs=matvecs)
