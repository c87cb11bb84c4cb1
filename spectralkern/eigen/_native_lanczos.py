"""The ``native`` backend: compiled single-vector Lanczos for components of up to 16384 nodes on the CPU
(``csrc/native``).

Each item (one connected component, see _plan) runs on one CPU thread, with partial reorthogonalisation (the
basis kept semi-orthogonal; a final Rayleigh–Ritz makes the returned vectors orthonormal) and no restart: the
basis may grow to the item's size, so the solve always converges (the last resort is the whole space, where
Lanczos is a dense tridiagonalisation). Products per kNN block at k = 16, tol 1e-8: ~78 at 128 nodes, ~200 at
1024 (ARPACK: 64, 192). Threads split the items; the GIL is released.

Without the compiled module (see _native_csr) ``auto`` keeps to dense + ARPACK on the CPU.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._tuning import native_threads
from ._native_csr import require_native
from ._plan import Candidates, Items
from ._problem import Problem
from ._scipy import ARPACK_TOL_CAP, GUARD_PAIRS, theta_max


def native_solve(problem: Problem, items: Items, k: int, tol_abs: float, maxiter: int | None,
                 start: torch.Tensor | None, generator: torch.Generator, threads: int,
                 on_done: Callable[[int], None] | None = None, semi_orthogonality: float | None = None
                 ) -> Candidates:
    """The min(k, n_g) lowest pairs of every item (each one connected component), ``GUARD_PAIRS`` more tracked.

    Args:
        start: the previous basis (N, s) or None: each item starts from the sum of its old vectors (as the scipy
            backend does), a random vector where that sum is zero.
        maxiter: Lanczos steps per item at most (default: the item's size, where the method is exact).
        threads: CPU threads to split the items across (the caller's torch setting before any one-thread pinning;
            fewer when their bases could outgrow ``_tuning.NATIVE_MEMORY_BUDGET``).
        on_done: called with the number of items finished, chunk by chunk (a progress bar).
        semi_orthogonality: the estimated |q_iᵀq_k| at which a Gram–Schmidt pass against the whole basis runs
            (default √u, u the dtype's unit roundoff: partial reorthogonalisation); 0 runs one every step.
    """
    module = require_native(problem.device)
    matrix = problem.matrix
    dtype = matrix.dtype
    num_items, n_pad = items.node_map.shape
    want = items.sizes.clamp(max=k).contiguous()
    kw = int(want.max()) if num_items else 0
    values = torch.zeros(num_items, kw, dtype=dtype)
    vectors = torch.zeros(num_items, n_pad, kw, dtype=dtype)
    residuals = torch.full((num_items, kw), float("inf"), dtype=torch.float64)
    products = torch.zeros(num_items, dtype=torch.int64)
    if num_items == 0 or kw == 0:
        return Candidates(items, values, vectors, want, residuals <= tol_abs, torch.zeros_like(products), products)

    # Each item copies its rows of L out of L's own CSR (the kernel finds each node's item and row in node_map).
    node_map = items.node_map.contiguous()
    crow = matrix.crow_indices().to(torch.int64).contiguous()
    col = matrix.col_indices().to(torch.int64).contiguous()
    val = matrix.values().contiguous()
    sizes = items.sizes.contiguous()
    first = None
    if start is not None:   # (G, n_pad), zero on padding
        summed = start.sum(dim=1)
        first = torch.where(node_map >= 0, summed[node_map.clamp(min=0)], 0).to(dtype).contiguous()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    max_steps = int(items.sizes.max()) if maxiter is None else maxiter
    # Like ARPACK, a Lanczos run stopped at a loose tolerance can lack an eigenvector that is still weak in its
    # Krylov space — an interior one of the wanted range too (measured at tol 1e-4 on 1024-node kNN blocks: 2 of
    # 256 blocks). So it stops only when the pairs meet the tolerance ARPACK is capped at (see _scipy); whether a
    # pair converged is still judged against tol_abs.
    stop_tol = min(tol_abs, ARPACK_TOL_CAP * theta_max(problem))
    threads = native_threads(max(1, threads), int(items.sizes.max()), val.element_size())
    if semi_orthogonality is None:
        semi_orthogonality = math.sqrt(torch.finfo(dtype).eps / 2)
    # chunks only for the progress bar: each call splits its items across the threads
    chunk = num_items if on_done is None else max(8 * threads, -(-num_items // 20))
    for lo in range(0, num_items, chunk):
        count = min(chunk, num_items - lo)
        module.lowest_eigenpairs(
            str(dtype).removeprefix("torch."), problem.num_nodes, lo, count, n_pad, sizes.data_ptr(),
            node_map.data_ptr(), crow.data_ptr(), col.data_ptr(), val.data_ptr(), want.data_ptr(), kw,
            first.data_ptr() if first is not None else 0, stop_tol, problem.norm, GUARD_PAIRS, max_steps,
            semi_orthogonality, seed, threads, values.data_ptr(), vectors.data_ptr(), residuals.data_ptr(),
            products.data_ptr())
        if on_done is not None:
            on_done(count)
    # converged: the explicit residuals of the kernel's verification products against tol_abs (not stop_tol)
    return Candidates(items=items, values=values, vectors=vectors, count=want, converged=residuals <= tol_abs,
                      iterations=torch.zeros(num_items, dtype=torch.int64), matvecs=products)
