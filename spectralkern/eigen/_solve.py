"""``lowest_eigenpairs``: the k lowest eigenpairs of a graph Laplacian, per block, as a SpectralBasis."""
from __future__ import annotations

import math
import warnings

import torch

from .._backend import backend_of
from .._checks import check_positive_int
from ..basis import SpectralBasis
from . import _tuning
from ._choice import BACKENDS, SolverChoice
from ._cupy import cupy_solve
from ._dense import dense_lowest, size_buckets
from ._info import EigenInfo, NoConvergence
from ._lanczos import block_lanczos, default_keep
from ._native_lanczos import native_solve
from ._operator import PaddedOperator
from ._plan import Candidates, Items, make_plan, merge
from ._problem import Problem, prepare, rounding_floor
from ._scipy import scipy_solve
from ._warm import check_start

SOLVER_ORDER = ("native", "lanczos", "scipy", "cupy")  # the order Krylov parts run in, and EigenInfo.backend names them
# Dense eigh is O(n³) per block; past this many nodes in one block the dense backend refuses.
MAX_DENSE_GLOBAL_NODES = 8192


def lowest_eigenpairs(L: object, k: int, *, tol: float = 0.0, maxiter: int | None = None, ncv: int | None = None,
                      v0: SpectralBasis | None = None, backend: str = "auto", progress: bool = False,
                      strict: bool = True, generator: torch.Generator | None = None) -> SpectralBasis:
    """The k lowest eigenpairs (graph frequencies) of L: per block for a block-diagonal Laplacian, globally when
    entries cross blocks.

    Args:
        L: a ``GraphLaplacian`` (from ``ParameterGraph.laplacian()``), or a symmetric matrix as a torch tensor
            (dense, COO or CSR) or scipy sparse matrix / numpy array (one global block). float32 or float64; the
            basis has L's dtype and device. Checked: square, finite, symmetric (a cheap two-vector probe).
        k: pairs per block. A block with n_b ≤ k nodes gets all n_b of its pairs (the basis layout: columns
            k_b = min(k, n_b) onwards are zero).
        tol: relative residual tolerance: a pair counts as converged when ‖L u − λ u‖ ≤ max(tol, floor)·‖L‖, with
            ‖L‖ bounded by 2 (normalized Laplacian) or Gershgorin's bound, and floor = 8·√(max row nnz + 1)·eps
            the rounding of one product by L in L's dtype (the final check, a fresh product, may add one more
            floor·‖L‖). ``tol=0`` (default): as accurate as the dtype allows, like scipy's tol=0.
        maxiter: most restarts per block (Lanczos), ARPACK's maxiter (scipy/cupy), most Lanczos steps per component
            (native; default its size, where the method is exact). Default for Lanczos:
            10·n_max / (vectors added per restart) + 100, i.e. a block gives up after about 10·n_b products.
        ncv: Krylov basis size per block (> k). Lanczos default max(2k + 4p, k + 32) with block size p (2 on the
            CPU, 8 on a GPU; a smaller ncv shrinks p to fit); scipy/cupy: their own default, raised to fit the
            two guard pairs (see the notes below); native: unused (its basis grows as needed).
        v0: a previous basis of the same layout (same block_ptr, dtype and device), e.g. from the last refresh of
            a slowly changing graph. Every Krylov backend first checks its vectors (one Rayleigh–Ritz step, k
            products per block; a block that misses the tolerance by at most 10× gets a second one on the block
            Krylov space [V, L V, L² V, L³ V] of its old vectors, 3k more): a block whose pairs all meet the
            tolerance is done — the whole solve when the graph moved little relative to the tolerance. The other
            blocks start from it: Lanczos from random combinations of the old vectors, scipy/cupy (ARPACK) from
            their sum. Dense solves ignore it. The check proves the pairs are eigenpairs, not that they are the
            lowest: use v0 only while the drift stays below the gap λ_{k+1} − λ_k, i.e. for refreshes of one
            drifting graph (see ``eigen/_warm.py``).
        backend: "lanczos" (batched block Lanczos in torch, all blocks at once; blocks too small for a Krylov
            space are solved densely), "dense" (batched ``torch.linalg.eigh``, blocks up to 8192 nodes),
            "scipy" (ARPACK per component, CPU), "cupy" (cupyx eigsh per component; needs cupy and a GPU),
            "native" (compiled single-vector Lanczos with partial reorthogonalisation per component, never
            restarted, components split across CPU threads; CPU only, components up to 16384 nodes; needs the
            compiled module ``spectralkern._native`` that a normal install builds), or "auto": the registry's
            choice per block or component (``spectralkern info`` lists it; SPECTRALKERN_BACKEND does not force it):
            on the CPU dense up to max(48, 2k) nodes, native up to 16384 and ARPACK above (without the compiled
            module: dense up to max(160, 4k), ARPACK above); on a GPU dense up to 32 nodes and Lanczos above
            (its cost model and the measurements behind it in ``eigen/_tuning.py``). A forced backend that cannot
            run raises ``BackendUnavailable`` with the reason (native: the module missing, L off the CPU, or a
            component above 16384 nodes).
        progress: show a tqdm progress bar (pairs converged for Lanczos, components done for scipy/cupy/native).
        generator: where every random number of the solve comes from (start vectors, refills, the warm-start
            check): a CPU ``torch.Generator`` (or one on L's device). None (default): torch's global RNG, so
            ``torch.manual_seed`` makes solves repeatable. Given, the solve never touches the global RNG — a
            caller that owns a seeded generator (a filter whose ``state_dict`` must resume bit for bit) passes it.
        strict: when some pair misses the tolerance within ``maxiter``: raise ``NoConvergence`` (True) carrying
            the partial result, or warn and return it (False). Either way unconverged columns hold the current
            Ritz approximations and ``basis.info.converged`` marks the pairs that met the tolerance.

    Returns:
        A ``SpectralBasis`` (U (N, k) block-packed, eigenvalues (B, k) ascending) with ``basis.info`` an
        ``EigenInfo`` (backend, restarts and products per block, explicit residual and convergence per pair).

    Connected components of L's sparsity graph are solved as separate problems inside each block (small ones
    densely), so repeated eigenvalues across components — the zero eigenvalue of a disconnected graph, equal
    spectra of identical components — are always found; see ``eigen/_plan.py``. Eigenvectors are unique only up
    to sign, and up to rotation inside a repeated eigenvalue: compare eigenvalues, residuals and projectors U Uᵀ,
    not raw vectors. On the CPU a Lanczos solve with a basis under 64 MB runs on one thread (``_tuning``).

    The scipy, cupy and native backends track k + 2 pairs, and scipy and cupy ask ARPACK for each to a relative
    tolerance of at most 1e-5: ARPACK asked for exactly k at a loose tolerance misses an eigenvalue of the wanted
    range for ~1% of random starts (``eigen/_scipy.py``). Their cold starts, like Lanczos', are drawn from torch's
    RNG: under ``torch.manual_seed`` a scipy- or native-backend solve repeats exactly (native whatever the thread
    count; Lanczos on the same device and thread count repeats up to the reduction order of its BLAS).
    """
    check_positive_int("k", k)
    tol = _check_tol(tol)
    if maxiter is not None:
        check_positive_int("maxiter", maxiter)
    if ncv is not None:
        check_positive_int("ncv", ncv)
        if ncv <= k:
            raise ValueError(f"ncv must be larger than k = {k} (it is the Krylov basis size), got {ncv}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    for name, flag in (("progress", progress), ("strict", strict)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    problem = prepare("L", L)
    start = _check_v0(v0, problem)
    if backend == "cupy":
        from ._cupy import import_cupy
        import_cupy(problem.device)  # fail before any work when cupy or the GPU is missing
    floor = rounding_floor(problem)
    tol_abs = max(tol, floor) * problem.norm

    sizes = problem.sizes
    n_max = int(sizes.max()) if sizes.numel() else 0
    block = _tuning.block_size(k, problem.device)
    if ncv is not None:
        block = max(1, min(block, ncv - k))
    m = ncv if ncv is not None else _tuning.default_ncv(k, block)
    if backend == "dense" and n_max > MAX_DENSE_GLOBAL_NODES:
        where = (" (L has entries across its graph's blocks, so the basis is global: one block of all nodes)"
                 if problem.num_blocks == 1 and _given_blocks(L) > 1 else "")
        raise ValueError(f"backend='dense' would run a dense eigh on a {n_max}-node block{where} (O(n³)); it is "
                         f"limited to {MAX_DENSE_GLOBAL_NODES} nodes per block — use backend='lanczos' or 'auto'")
    choice = SolverChoice(backend, problem.dtype, problem.device, k, krylov_basis=m + block)
    choice.check()  # a forced backend that cannot run here at all raises with the reason, before any work
    # the batched Lanczos groups a block's components into one item (the largest block's solver is the call's)
    max_components = block if choice.solver(n_max) == "lanczos" else None
    plan = make_plan(problem, choice.dense, max_components)
    krylov_solvers = choice.solvers(plan.krylov.sizes) if plan.krylov is not None else []
    # the batched Lanczos runs alone (the torch backend's preferred or forced solver); the others go item by item
    krylov = min(krylov_solvers, key=SOLVER_ORDER.index) if krylov_solvers else None

    parts: list[Candidates] = []
    ran: list[str] = []   # the Krylov solvers that ran
    workers = torch.get_num_threads()  # before cpu_threads() below may pin torch to one: dense eigh splits its batch
    bar = _progress_bar(progress, plan, k, krylov)
    basis_bytes = 0 if plan.krylov is None or krylov != "lanczos" else (
        plan.krylov.num_items * plan.krylov.node_map.shape[1] * m * problem.matrix.values().element_size())
    try:
        with _tuning.cpu_threads(problem.device, basis_bytes):
            if plan.dense is not None:
                parts += _solve_dense(problem, plan.dense, k, workers)
            krylov_items, check_cost, op = plan.krylov, None, None
            if krylov_items is not None and start is not None:
                settled, krylov_items, check_cost, op = _check_warm_start(problem, krylov_items, k, tol_abs, start,
                                                                          keep_operator=krylov == "lanczos",
                                                                          source=generator)
                if settled is not None:
                    parts.append(settled)
                    if bar is not None:
                        bar.update(settled.items.num_items if krylov != "lanczos" else int(settled.count.sum()))
            if krylov_items is not None:
                for solver, index in _krylov_parts(choice, krylov_items):
                    items = krylov_items if index is None else krylov_items.subset(index)
                    update = bar.update if bar is not None else None
                    if solver == "lanczos":
                        part = _solve_lanczos(problem, items, k, tol_abs, maxiter, m, block, start, bar, op,
                                              generator)
                    elif solver == "native":
                        part = native_solve(problem, items, k, tol_abs, maxiter, start,
                                            _generator(torch.device("cpu"), generator), workers, update)
                    elif solver == "scipy":
                        part = scipy_solve(problem, items, k, tol_abs, maxiter, ncv, start,
                                           _generator(torch.device("cpu"), generator), update)
                    else:
                        part = cupy_solve(problem, items, k, tol_abs, maxiter, ncv, start,
                                          _generator(problem.device, generator), update)
                    if check_cost is not None:   # the products of a failed warm-start check count too
                        part.matvecs += check_cost if index is None else check_cost[index]
                        if solver == "lanczos":     # the other backends do not restart (native) or report it (ARPACK)
                            part.iterations += 1
                    parts.append(part)
                    ran.append(solver)
    finally:
        if bar is not None:
            bar.close()
    merged = merge(problem, k, parts)
    residuals = _explicit_residuals(problem, merged.U, merged.eigenvalues)
    valid = torch.arange(k).unsqueeze(0) < sizes.clamp(max=k).unsqueeze(1)
    # the in-solver residual came from stored products; the fresh one may differ by one product's rounding
    converged = merged.converged & valid & (residuals <= tol_abs + floor * problem.norm)
    if plan.krylov is not None and not ran:   # a warm-start check settled every Krylov item
        ran += sorted(set(krylov_solvers), key=SOLVER_ORDER.index)
    used = "+".join(ran + (["dense"] if plan.dense is not None else []))
    lanczos_ran = plan.krylov is not None and krylov == "lanczos"
    info = EigenInfo(backend=used, iterations=merged.iterations, matvecs=merged.matvecs, residuals=residuals,
                     converged=converged, tol=tol_abs, norm=problem.norm,
                     block_size=block if lanczos_ran else 0, ncv=m if lanczos_ran else 0)
    basis = SpectralBasis(merged.U, merged.eigenvalues, problem.block_ptr, info=info)
    missing = int(valid.sum()) - info.num_converged
    if missing:
        worst = float(residuals[valid & ~converged].max())
        message = (f"{missing} of {int(valid.sum())} eigenpairs did not reach the tolerance {tol_abs:.3g} "
                   f"(worst residual {worst:.3g}) within maxiter; basis.info.converged marks those that did")
        if strict:
            raise NoConvergence(message + " (the partial basis is in exc.basis)", basis, info)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return basis


# ---------------------------------------------------------------------------------------------- helpers
def _check_tol(tol: object) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a real number, got {type(tol).__name__}")
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0 (0 means machine precision), got {tol}")
    return float(tol)


def _check_v0(v0: object, problem: Problem) -> torch.Tensor | None:
    """v0's vectors (N, k_old), after checking that v0 is a basis of the same layout, dtype and device."""
    if v0 is None:
        return None
    if not isinstance(v0, SpectralBasis):
        raise TypeError(f"v0 must be a SpectralBasis (a previous result) or None, got {type(v0).__name__}")
    if v0.num_nodes != problem.num_nodes or not torch.equal(v0.block_ptr, problem.block_ptr):
        raise ValueError(f"v0 must have the same block layout as L: v0 has {v0.num_nodes} nodes in "
                         f"{v0.num_blocks} blocks, L's basis has {problem.num_nodes} nodes in "
                         f"{problem.num_blocks} blocks (block_ptr {_short(v0.block_ptr)} vs "
                         f"{_short(problem.block_ptr)})")
    if v0.dtype != problem.dtype:
        raise TypeError(f"v0 has dtype {v0.dtype} but L has {problem.dtype}; convert one (v0.to(dtype=...))")
    if v0.device != problem.device:
        raise ValueError(f"v0 is on {v0.device} but L is on {problem.device}; move one (v0.to(device))")
    if not bool(torch.isfinite(v0.U).all()):
        raise ValueError("v0.U contains NaN/Inf values; expected a finite basis")
    return v0.U


def _given_blocks(L: object) -> int:
    """Blocks of L's own layout (a GraphLaplacian's block_ptr; 1 for a plain matrix)."""
    block_ptr = getattr(L, "block_ptr", None)
    return block_ptr.numel() - 1 if isinstance(block_ptr, torch.Tensor) else 1


def _short(ptr: torch.Tensor) -> str:
    values = ptr.tolist()
    return str(values) if len(values) <= 6 else f"[{values[0]}, {values[1]}, {values[2]}, ..., {values[-1]}]"


def _solve_dense(problem: Problem, items: Items, k: int, workers: int) -> list[Candidates]:
    """Batched eigh per size bucket, split across ``workers`` CPU threads; padding eigenvalues are pushed above
    the spectrum so they sort last."""
    pad_value = 2.0 * (abs(problem.shift) + problem.norm) + 1.0
    parts = []
    for index in size_buckets(items.sizes):
        sub = items.subset(index)
        values, vectors = dense_lowest(problem.matrix, sub.node_map, k, pad_value, workers)
        count = sub.sizes.clamp(max=k)
        parts.append(Candidates(items=sub, values=values, vectors=vectors, count=count,
                                converged=torch.ones(values.shape, dtype=torch.bool, device=values.device),
                                iterations=torch.zeros(sub.num_items, dtype=torch.int64),
                                matvecs=torch.zeros(sub.num_items, dtype=torch.int64)))
    return parts


def _krylov_parts(choice: SolverChoice, items: Items) -> list[tuple[str, torch.Tensor | None]]:
    """(solver, item indices or None for all) for the Krylov items, by the registry's choice per item (``auto`` on
    the native backend hands the items above its node limit to ARPACK), in SOLVER_ORDER."""
    solvers = choice.solvers(items.sizes)
    used = sorted(set(solvers), key=SOLVER_ORDER.index)
    if len(used) == 1:
        return [(used[0], None)]
    return [(name, torch.tensor([i for i, s in enumerate(solvers) if s == name], dtype=torch.int64))
            for name in used]


def _item_start(start: torch.Tensor, items: Items, columns: int) -> torch.Tensor:
    """The previous basis (N, s) restricted to each item, (G, n_pad, columns): zero on padding, random directions
    in the columns an older, narrower basis lacks."""
    valid = items.valid().unsqueeze(-1).to(start.dtype)
    warm = (start[items.node_map.clamp(min=0)] * valid)[:, :, :columns]
    if warm.shape[-1] < columns:
        extra = torch.randn(*warm.shape[:2], columns - warm.shape[-1], dtype=warm.dtype, device=warm.device)
        warm = torch.cat([warm, extra * valid], dim=-1)
    return warm


def _generator(device: torch.device, source: torch.Generator | None) -> torch.Generator:
    """A generator on ``device`` seeded from ``source`` (the caller's generator) or, when None, from torch's global
    RNG (so ``torch.manual_seed`` makes solves repeatable)."""
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=source,
                                                                        device=source.device if source is not None else "cpu")))


def _products_storage(problem: Problem, n_pad: int) -> str:
    """The registry's storage ("dense" or "csr") of the operator for items of ``n_pad`` rows."""
    return backend_of("lanczos_products", problem.matrix.values(), n_pad=n_pad).algorithm


def _check_warm_start(problem: Problem, items: Items, k: int, tol_abs: float, start: torch.Tensor, *,
                      keep_operator: bool, source: torch.Generator | None
                      ) -> tuple[Candidates | None, Items | None, torch.Tensor | None, PaddedOperator | None]:
    """Rayleigh–Ritz of every Krylov item on the previous basis (see _warm). Returns the settled items' pairs,
    the items still to solve, the products the check spent on each of those ((G',) int64), and their operator
    when ``keep_operator`` (Lanczos reuses it; ARPACK builds its own per item)."""
    valid = items.valid()
    op = PaddedOperator.build(problem.matrix, items.node_map, problem.shift,
                              _products_storage(problem, items.node_map.shape[1]))
    want = items.sizes.clamp(max=k)
    columns = int(want.max())
    old = _item_start(start, items, columns)
    # An item owes only the old pairs that live on it: a block's other pairs were found on its other components
    # (isolated nodes, islands: dense items or other Krylov items), so their columns vanish here. Columns the old
    # basis lacks (v0 narrower than k) are owed by the item too; their random starts fail unless converged.
    kept = min(start.shape[1], columns)
    owned = (old[:, :, :kept].square().sum(dim=1) >= 0.5).sum(dim=1).cpu()
    owed = torch.minimum(want, owned + (columns - kept))
    check = check_start(op, valid, owed, old, tol_abs, _generator(problem.device, source))
    passed = check.passed
    settled = None
    if bool(passed.any()):
        index = torch.nonzero(passed).flatten()
        rows = index.to(problem.device)
        settled = Candidates(items=items.subset(index), values=check.values[rows], vectors=check.vectors[rows],
                             count=owed[index], converged=check.converged[rows],
                             iterations=torch.ones(index.numel(), dtype=torch.int64),
                             matvecs=check.products[index])
    if bool(passed.all()):
        return settled, None, None, None
    index = torch.nonzero(~passed).flatten()
    remaining = items.subset(index)
    n_pad = remaining.node_map.shape[1]
    remaining_op = op.restrict(index, n_pad, _products_storage(problem, n_pad)) if keep_operator else None
    return settled, remaining, check.products[index], remaining_op


def _solve_lanczos(problem: Problem, items: Items, k: int, tol_abs: float, maxiter: int | None, m: int,
                   block: int, start: torch.Tensor | None, bar, op: PaddedOperator | None,
                   source: torch.Generator | None) -> Candidates:
    """Batched Lanczos over ``items``; ``op``: their operator when the warm-start check already built it."""
    valid = items.valid()
    if op is None:
        op = PaddedOperator.build(problem.matrix, items.node_map, problem.shift,
                                  _products_storage(problem, items.node_map.shape[1]))
    want = items.sizes.clamp(max=k)
    kw = int(want.max())
    keep_gain = m - default_keep(m, block, kw)
    if maxiter is None:
        maxiter = 10 * int(items.sizes.max()) // keep_gain + 100
    warm = _item_start(start, items, kw) if start is not None else None
    on_restart = None
    if bar is not None:
        offset = bar.n   # pairs settled before this solve (a passing warm-start check)

        def advance(done: int, total: int) -> None:
            bar.update(offset + done - bar.n)
        on_restart = advance
    result = block_lanczos(op, valid, want, ncv=m, block=block, tol=tol_abs, maxiter=maxiter,
                           generator=_generator(problem.device, source), start=warm, on_restart=on_restart)
    return Candidates(items=items, values=result.values, vectors=result.vectors, count=want,
                      converged=result.converged, iterations=result.iterations, matvecs=result.matvecs)


def _explicit_residuals(problem: Problem, U: torch.Tensor, eigenvalues: torch.Tensor) -> torch.Tensor:
    """(B, k) float64 CPU: ‖L u_j − λ_j u_j‖ of every column, from one fresh product L U."""
    if U.numel() == 0:
        return torch.zeros(eigenvalues.shape, dtype=torch.float64)
    node_block = problem.node_block().to(U.device)
    R = torch.sparse.addmm(U * eigenvalues[node_block], problem.matrix, U, beta=-1.0)   # L U − U Λ, one pass
    R = R.square_() if R.dtype == torch.float64 else R.double().square_()
    squares = torch.zeros(eigenvalues.shape, dtype=torch.float64, device=U.device)
    squares.index_add_(0, node_block, R)
    return squares.sqrt().cpu()


def _progress_bar(enabled: bool, plan, k: int, backend: str):
    if not enabled or plan.krylov is None:
        return None
    from tqdm.auto import tqdm

    if backend in ("scipy", "cupy", "native"):
        return tqdm(total=plan.krylov.num_items, desc=f"lowest_eigenpairs[{backend}]", unit="item")
    total = int(plan.krylov.sizes.clamp(max=k).sum())
    return tqdm(total=total, desc="lowest_eigenpairs[lanczos]", unit="pair")
