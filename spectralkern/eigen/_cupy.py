"""The ``cupy`` backend: ``cupyx.scipy.sparse.linalg.eigsh`` on each Krylov item, one after the other, on GPU.

cupy is optional (``pip install 'spectralkern[cupy]'``, which pulls ``cupy-cuda13x[ctk]`` and its CUDA
libraries, ~1.3 GB) and imported only when this backend is asked for. cupyx's eigsh has no smallest-eigenvalue
mode worth using, so it runs 'LA' on the flipped operator c·I − L, like the scipy backend.

cupyx's eigsh is a thick-restart Lanczos (one start vector, like ARPACK) that stops once the 2-norm of all nev
residual norms is at most ``tol`` — an absolute bound, where ARPACK's is ‖r‖ ≤ tol·|θ| per pair. It gets the
scipy backend's guard pairs and the same absolute cap, by analogy: its misses were never measured (no GPU).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from ._plan import Candidates, Items
from ._problem import Problem
from ._scipy import ARPACK_TOL_CAP, arpack_request, random_start, theta_max

INSTALL_HINT = "pip install 'spectralkern[cupy]' (cupy-cuda13x with its [ctk] CUDA libraries)"


def import_cupy(device: torch.device) -> tuple[ModuleType, ModuleType]:
    """(cupy, cupyx.scipy.sparse.linalg), or a clear error: cupy missing (ImportError), no GPU visible to cupy
    (RuntimeError), L not on a CUDA device (ValueError)."""
    try:
        cupy = importlib.import_module("cupy")
        linalg = importlib.import_module("cupyx.scipy.sparse.linalg")
    except ImportError as exc:
        raise ImportError(f"backend='cupy' needs cupy, which is not installed ({exc}); {INSTALL_HINT}") from exc
    try:
        available = bool(cupy.cuda.is_available())
    except Exception as exc:  # a broken CUDA install raises from inside cupy
        raise RuntimeError(f"backend='cupy': cupy cannot reach a GPU ({exc!r})") from exc
    if not available:
        raise RuntimeError("backend='cupy': cupy is installed but sees no GPU (cupy.cuda.is_available() is False)")
    if device.type != "cuda":
        raise ValueError(f"backend='cupy' runs on a CUDA device, but L is on {device}; move L to the GPU "
                         "(L.to('cuda')) or use backend='lanczos' or 'scipy'")
    return cupy, linalg


def cupy_solve(problem: Problem, items: Items, k: int, tol_abs: float, maxiter: int | None, ncv: int | None,
               start: torch.Tensor | None, generator: torch.Generator,
               tick: Callable[[], None] | None = None) -> Candidates:
    """k lowest pairs of every item with cupyx eigsh (guard pairs as in the scipy backend);
    ``generator`` (on L's device) draws the cold starts; tensors cross between torch and cupy through DLPack."""
    cupy, linalg = import_cupy(problem.device)
    sparse = importlib.import_module("cupyx.scipy.sparse")
    device, dtype = problem.device, problem.dtype
    with torch.cuda.device(device):
        m = problem.matrix
        csr = sparse.csr_matrix((cupy.from_dlpack(m.values().contiguous()),
                                 cupy.from_dlpack(m.col_indices().to(torch.int32).contiguous()),
                                 cupy.from_dlpack(m.crow_indices().to(torch.int32).contiguous())), shape=m.shape)
        num_items = items.num_items
        q = min(k, int(items.sizes.max()))
        n_pad = items.node_map.shape[1]
        values = torch.zeros(num_items, q, dtype=dtype, device=device)
        vectors = torch.zeros(num_items, n_pad, q, dtype=dtype, device=device)
        count = torch.zeros(num_items, dtype=torch.int64)
        tol = min(tol_abs, ARPACK_TOL_CAP * theta_max(problem))   # absolute: see the module docstring
        for g in range(num_items):
            size = int(items.sizes[g])
            nodes_t = items.node_map[g, :size]
            nodes = cupy.from_dlpack(nodes_t.contiguous())
            sub = csr[nodes][:, nodes]
            flipped = problem.shift * sparse.identity(size, dtype=sub.dtype, format="csr") - sub
            want = min(k, size)
            nev, item_ncv = arpack_request(want, size, ncv, room=3)
            v0 = start[nodes_t].sum(dim=1) if start is not None else None
            if v0 is None or not bool(v0.any()):
                v0 = random_start(size, generator).to(dtype)
            theta, vecs = linalg.eigsh(flipped, k=nev, which="LA", tol=tol, maxiter=maxiter, ncv=item_ncv,
                                       v0=cupy.from_dlpack(v0.contiguous()))
            theta_t = torch.from_dlpack(theta)
            order = torch.argsort(-theta_t, stable=True)[:want]   # the guards go
            values[g, :want] = problem.shift - theta_t[order]
            vectors[g, :size, :want] = torch.from_dlpack(vecs)[:, order]
            count[g] = want
            if tick is not None:
                tick()
    # cupyx's eigsh neither counts products nor reports convergence: the explicit residual check decides.
    return Candidates(items=items, values=values, vectors=vectors, count=count,
                      converged=torch.ones(num_items, q, dtype=torch.bool, device=device),
                      iterations=torch.zeros(num_items, dtype=torch.int64),
                      matvecs=torch.zeros(num_items, dtype=torch.int64))
