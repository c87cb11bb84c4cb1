"""The ``native`` backend (compiled single-vector Lanczos, csrc/native) against float64 numpy references: what the
shared contract tests in test_eigen.py do not reach — the kernel called directly on tiny and exhausted items,
multiplicities inside one component, float32, threads, repeatability, step budgets and a missing module."""
from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectralkern as sk
from spectralkern import _backend, _extensions
from spectralkern._backend import BackendUnavailable
from spectralkern.eigen import _native_csr, _native_lanczos, _tuning
from spectralkern.eigen._plan import make_plan
from spectralkern.eigen._problem import prepare, rounding_floor
from spectralkern.eigen._scipy import GUARD_PAIRS
from test_eigen import (DTYPES, check_basis, dense_of, laplacian_of, networkx_laplacian, random_adjacency,
                        sizes_to_ptr)


def test_the_module_is_built():
    """CI installs with a C++ compiler: a build that silently fell back to pure Python would skip the backend."""
    assert _backend.runtime_status("native").live, _extensions.status("native").reason


def kernel_pairs(L: sk.GraphLaplacian, k: int, *, threads: int = 1, maxiter: int | None = None, seed: int = 0,
                 tol: float = 1e-10, semi_orthogonality: float | None = None):
    """The kernel on every connected component of L as its own item (no dense routing): (items, Candidates)."""
    problem = prepare("L", L)
    plan = make_plan(problem, lambda sizes: sizes <= 0, None)     # every component is a Krylov item
    tol_abs = max(tol, rounding_floor(problem)) * problem.norm   # as lowest_eigenpairs: never below rounding
    part = _native_lanczos.native_solve(problem, plan.krylov, k, tol_abs, maxiter, None,
                                torch.Generator().manual_seed(seed), threads,
                                semi_orthogonality=semi_orthogonality)
    return problem, plan.krylov, part


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_on_tiny_and_exhausted_items(seed, dtype):
    """Components of 1, 2, 3, 7 and 40 nodes with k ≥ most sizes: an item whose wanted pairs are all its pairs
    runs Lanczos until the Krylov space is the whole item (refilling after every breakdown)."""
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([1, 2, 3, 7, 40])
    adjacency = random_adjacency(rng, ptr, 1.0, isolated=0.0)   # dense blocks: each block one component
    L = laplacian_of(adjacency, ptr, dtype=dtype)
    k = 9
    problem, items, part = kernel_pairs(L, k)
    dense = dense_of(L)
    for g in range(items.num_items):
        nodes = items.node_map[g, : int(items.sizes[g])].numpy()
        reference = np.linalg.eigvalsh(dense[np.ix_(nodes, nodes)])
        count = int(part.count[g])
        assert count == min(k, nodes.size)
        values = part.values[g, :count].double().numpy()
        np.testing.assert_allclose(values, reference[:count], rtol=0, atol=(1e-10 if dtype == torch.float64 else 1e-4) * 2)
        Y = part.vectors[g, : nodes.size, :count].double().numpy()
        np.testing.assert_allclose(Y.T @ Y, np.eye(count), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
        assert bool(part.converged[g, :count].all())
        steps_cap = nodes.size + count      # products: Lanczos steps (≤ n) + one verification product per pair
        assert 0 < int(part.matvecs[g]) <= steps_cap + GUARD_PAIRS


def test_multiplicities_inside_one_component_are_found(seed):
    """A square grid has double eigenvalues within one connected component (u(a, b) and u(b, a)): single-vector
    Lanczos sees the second copy only through rounding, like ARPACK; the check that every tracked pair
    converged keeps it going until it does (measured: ~150 of 256 steps on the 16 × 16 grid)."""
    for a, b in [(16, 16), (12, 12), (10, 10)]:
        graph = nx.convert_node_labels_to_integers(nx.grid_2d_graph(a, b))
        L = networkx_laplacian(graph)
        n = graph.number_of_nodes()
        basis = sk.lowest_eigenpairs(L, 16, backend="native")
        check_basis(basis, dense_of(L), [0, n], 16, torch.float64)
        values = np.linalg.eigvalsh(dense_of(L))[:16]
        assert np.any(np.abs(np.diff(values)) < 1e-10), "the test graph must have a repeated eigenvalue"


@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_reorthogonalisation_meets_the_contract(seed, dtype):
    """At working tolerances (relative tol ≥ 0.1·√u) the basis is kept only semi-orthogonal: a Gram–Schmidt pass
    against it runs when Simon's estimates of |q_iᵀq_k| cross √u (about one step in ten on these components).
    The returned vectors still meet the whole contract (orthonormal to rounding, after the final Rayleigh–Ritz)."""
    rng = np.random.default_rng(seed)
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    ptr = sizes_to_ptr([700, 400, 550])
    L = laplacian_of(random_adjacency(rng, ptr, 0.015, isolated=0.0), ptr, dtype=dtype)
    torch.manual_seed(seed)
    basis = sk.lowest_eigenpairs(L, 24, tol=tol, backend="native")
    check_basis(basis, dense_of(L), ptr, 24, dtype)


def test_partial_and_full_reorthogonalisation_agree(seed):
    """The same items with a full pass every step (semi_orthogonality=0) and with partial passes: the same
    eigenvalues (to the tolerance's square over the gap, far below it), both with orthonormal vectors."""
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([600, 300])
    L = laplacian_of(random_adjacency(rng, ptr, 0.02, isolated=0.0), ptr)
    _, items, full = kernel_pairs(L, 20, tol=1e-8, semi_orthogonality=0.0, seed=seed)
    _, _, partial = kernel_pairs(L, 20, tol=1e-8, seed=seed)
    for part in (full, partial):
        for g in range(items.num_items):    # the blocks' components: a few are isolated nodes or small islands
            size, count = int(items.sizes[g]), int(part.count[g])
            assert bool(part.converged[g, :count].all())
            Y = part.vectors[g, :size, :count].numpy()
            np.testing.assert_allclose(Y.T @ Y, np.eye(count), rtol=0, atol=1e-12)
    torch.testing.assert_close(partial.values, full.values, rtol=0, atol=1e-9)


def test_lost_orthogonality_falls_back_to_full_passes(seed):
    """semi_orthogonality=1e300: no Gram–Schmidt pass ever runs, the basis loses its orthogonality (copies of
    converged eigenvalues appear in T_j), the final check sees it and the item is solved again with a full pass every
    step — the pairs are still the right ones."""
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([500])
    L = laplacian_of(random_adjacency(rng, ptr, 0.02, isolated=0.0), ptr)
    _, items, part = kernel_pairs(L, 16, tol=1e-8, semi_orthogonality=1e300, seed=seed)
    nodes = items.node_map[0, : int(items.sizes[0])].numpy()
    reference = np.linalg.eigvalsh(dense_of(L)[np.ix_(nodes, nodes)])[:16]
    assert bool(part.converged[0, :16].all())
    np.testing.assert_allclose(part.values[0, :16].numpy(), reference, rtol=0, atol=1e-9)
    Y = part.vectors[0, : nodes.size, :16].numpy()
    np.testing.assert_allclose(Y.T @ Y, np.eye(16), rtol=0, atol=1e-12)


def test_item_whose_entries_are_all_zero(seed):
    """A component whose stored entries are all zero (explicit zero weights), solved right after a normal one by the
    same thread: T = 0 must not overflow inverse iteration's pivots, and nothing of the earlier item may be returned
    (found in review: it returned the 40-node item's eigenvalues as converged)."""
    rng = np.random.default_rng(seed)
    adjacency = random_adjacency(rng, [0, 40], 0.3, isolated=0.0)
    rows, cols = np.nonzero(np.diag(adjacency.sum(axis=1)) - adjacency)
    values = (np.diag(adjacency.sum(axis=1)) - adjacency)[rows, cols]
    path = np.arange(40, 45)
    rows = np.concatenate([rows, path, path + 1, np.arange(40, 46)])
    cols = np.concatenate([cols, path + 1, path, np.arange(40, 46)])
    values = np.concatenate([values, np.zeros(2 * path.size + 6)])
    L = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(values),
                                (46, 46)).coalesce().to_sparse_csr()
    _, items, part = kernel_pairs(L, 6, threads=1, seed=seed)
    assert items.sizes.tolist() == [40, 6]
    assert bool(part.converged.all())
    reference = np.linalg.eigvalsh(np.diag(adjacency.sum(axis=1)) - adjacency)[:6]
    np.testing.assert_allclose(part.values[0].numpy(), reference, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(part.values[1].numpy(), np.zeros(6))
    for g, size in enumerate((40, 6)):
        Y = part.vectors[g, :size, :6].numpy()
        np.testing.assert_allclose(Y.T @ Y, np.eye(6), rtol=0, atol=1e-12)


def test_threads_split_items_without_changing_them(seed):
    """Each item draws its start from its own stream (seed, item), so the thread count changes nothing."""
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([90, 120, 64, 200, 75, 110])
    L = laplacian_of(random_adjacency(rng, ptr, 0.1, isolated=0.0), ptr)
    _, _, one = kernel_pairs(L, 6, threads=1, seed=seed)
    _, _, three = kernel_pairs(L, 6, threads=3, seed=seed)
    assert torch.equal(one.values, three.values) and torch.equal(one.vectors, three.vectors)
    assert torch.equal(one.matvecs, three.matvecs)


def test_solves_repeat_under_a_seed_and_differ_across_seeds(seed):
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([150, 150])
    L = laplacian_of(random_adjacency(rng, ptr, 0.08, isolated=0.0), ptr)
    runs = []
    for torch_seed in (seed, seed, seed + 1):
        torch.manual_seed(torch_seed)
        runs.append(sk.lowest_eigenpairs(L, 5, tol=1e-9, backend="native"))
    assert torch.equal(runs[0].U, runs[1].U)
    assert not torch.equal(runs[0].U, runs[2].U)     # another start vector: other rounding
    torch.testing.assert_close(runs[0].eigenvalues, runs[2].eigenvalues, rtol=0, atol=4e-9)


def test_step_budget_gives_the_partial_result(seed):
    """maxiter caps the Lanczos steps per item (never below the tracked pairs): NoConvergence carries orthonormal
    Ritz vectors and the mask of the pairs that met the tolerance."""
    L = networkx_laplacian(nx.path_graph(600))
    with pytest.raises(sk.NoConvergence, match="did not reach the tolerance") as caught:
        sk.lowest_eigenpairs(L, 12, maxiter=20, backend="native")
    info = caught.value.info
    assert info.backend == "native" and int(info.matvecs[0]) == 20 + 12 + GUARD_PAIRS
    U = caught.value.basis.U.double()
    torch.testing.assert_close(U.T @ U, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-10)
    assert bool((info.residuals[0][~info.converged[0]] > info.tol).all())


def test_auto_routes_by_size(monkeypatch, seed):
    """auto on the CPU: dense up to max(48, 2k) nodes, native up to the registry's node limit (16384; lowered here to
    keep the test small), ARPACK above."""
    rng = np.random.default_rng(seed)
    k = 4
    native = _backend.OPS["lowest_eigenpairs"].backend("native")
    lowered = dataclasses.replace(_backend.OPS["lowest_eigenpairs"], backends=(
        dataclasses.replace(native, limits={"nodes": 400}), _backend.OPS["lowest_eigenpairs"].backend("torch")))
    monkeypatch.setitem(_backend.OPS, "lowest_eigenpairs", lowered)
    _backend._decide.cache_clear()   # decisions cached under the real table
    small, middle, big = _tuning.dense_crossover("native", "cpu", k), 300, 430
    ptr = sizes_to_ptr([small, middle, big])
    L = laplacian_of(random_adjacency(rng, ptr, 0.02, isolated=0.0), ptr)
    try:
        basis = sk.lowest_eigenpairs(L, k, tol=1e-9)
    finally:
        _backend._decide.cache_clear()
    assert basis.info.backend == "native+scipy+dense", basis.info
    assert int(basis.info.matvecs[0]) == 0 and int(basis.info.matvecs[1]) > 0 and int(basis.info.matvecs[2]) > 0
    check_basis(basis, dense_of(L), ptr, k, torch.float64)


def test_threads_are_cut_to_the_memory_budget():
    """Each native thread's basis may grow to n × n values: 16384-node items get budget / 2 GiB threads."""
    itemsize = 8
    per_thread = 16384 * 16384 * itemsize
    assert _tuning.native_threads(64, 16384, itemsize) == _tuning.NATIVE_MEMORY_BUDGET // per_thread
    assert _tuning.native_threads(2, 4096, itemsize) == 2
    assert _tuning.native_threads(64, 10**6, itemsize) == 1


def test_missing_module_is_a_clear_error(monkeypatch, seed):
    off = _extensions.ExtensionStatus(False, "No module named 'spectralkern._native'")
    monkeypatch.setattr(_extensions, "status", lambda name: off)
    L = networkx_laplacian(nx.karate_club_graph())
    with pytest.raises(BackendUnavailable, match=r"lowest_eigenpairs: backend=native cannot run here: No module named"):
        sk.lowest_eigenpairs(L, 3, backend="native")
    basis = sk.lowest_eigenpairs(L, 3)       # auto falls back to dense / ARPACK
    assert basis.info.backend == "dense"


def test_only_on_the_cpu():
    with pytest.raises(ValueError, match="backend='native' runs on the CPU; L is on cuda"):
        _native_csr.require_native(torch.device("cuda"))


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 2, 9, 60, 130]), min_size=1, max_size=4), k=st.integers(1, 9),
       density=st.floats(0.03, 0.6), normalized=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_layouts(sizes, k, density, normalized, seed):
    """Random ragged layouts; blocks above max(48, 2k) nodes (and their big components) go through the kernel."""
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr(sizes)
    L = laplacian_of(random_adjacency(rng, ptr, density), ptr, normalized=normalized)
    torch.manual_seed(seed)
    basis = sk.lowest_eigenpairs(L, k, backend="native")
    check_basis(basis, dense_of(L), ptr, k, torch.float64)


def test_refuses_huge_components():
    n = 16385
    L = networkx_laplacian(nx.path_graph(n))
    with pytest.raises(BackendUnavailable, match=r"lowest_eigenpairs: backend=native cannot run here: "
                                                 r"nodes = 16385 > 16384"):
        sk.lowest_eigenpairs(L, 2, backend="native")


def test_connected_components_match_scipy(seed):
    """The plan's component labels from the compiled union-find against scipy's, on a graph with isolated nodes,
    islands, and an asymmetric stored pattern (an entry links its nodes whatever its direction)."""
    import scipy.sparse
    import scipy.sparse.csgraph

    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([60, 1, 200, 35])
    adjacency = random_adjacency(rng, ptr, 0.02, isolated=0.2)
    adjacency[5, 7] = 1.0                     # one direction only
    matrix = torch.from_numpy(adjacency).to_sparse_csr()
    labels = _native_csr.connected_components(matrix)
    count, reference = scipy.sparse.csgraph.connected_components(scipy.sparse.csr_array(adjacency), directed=True,
                                                                 connection="weak")
    assert labels is not None and labels.max() + 1 == count
    # the same partition: labels map one-to-one
    pairs = set(zip(labels.tolist(), reference.tolist()))
    assert len(pairs) == count


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_summary_matches_torch(seed, dtype):
    """prepare's one compiled pass over L's entries against the torch ops it replaces (still used on GPUs and
    without the module): the same counts, bounds and block crossings, and both symmetry probes pass a symmetric
    matrix and catch a one-sided entry."""
    from spectralkern.eigen import _problem

    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([30, 0, 45, 1, 60])
    adjacency = random_adjacency(rng, ptr, 0.2)
    dense = np.diag(adjacency.sum(axis=1)) - adjacency
    block_ptr = torch.tensor(ptr)

    def summaries(matrix: np.ndarray) -> tuple[dict, dict]:
        csr = torch.from_numpy(matrix).to(dtype).to_sparse_csr()
        return _native_csr.csr_summary(csr, block_ptr), _problem._summary_torch(csr, block_ptr)

    def allowed(summary: dict) -> float:
        return 4 * (summary["max_row_nnz"] + 2) * torch.finfo(dtype).eps * summary["max_abs_row_sum"]

    compiled, reference = summaries(dense)
    for key in ("nonfinite", "max_row_nnz", "crosses_blocks"):
        assert compiled[key] == reference[key], key
    for key in ("max_abs_row_sum", "max_gershgorin_upper"):
        assert compiled[key] == pytest.approx(reference[key], rel=1e-6 if dtype == torch.float32 else 1e-12), key
    assert compiled["nonfinite"] == 0 and not compiled["crosses_blocks"]
    for summary in (compiled, reference):
        assert abs(summary["ytLx"] - summary["xtLy"]) <= allowed(summary)

    crossing = dense.copy()
    crossing[2, 100] = crossing[100, 2] = -0.5
    assert all(summary["crosses_blocks"] for summary in summaries(crossing))
    broken = dense.copy()
    broken[[3, 40, 41], [3, 41, 40]] = [np.nan, np.inf, -np.inf]
    assert [summary["nonfinite"] for summary in summaries(broken)] == [3, 3]
    one_sided = dense.copy()
    one_sided[5, 20] = -2.0
    for summary in summaries(one_sided):
        assert abs(summary["ytLx"] - summary["xtLy"]) > allowed(summary)


def test_loose_tolerance_does_not_lose_an_interior_eigenvalue(monkeypatch):
    """At tol 1e-4 a Lanczos run may stop while an eigenvector of the wanted range is still weak in its Krylov
    space: every returned residual is small, but the 15th of 16 values is missing (found on the bench's 1024-node
    kNN blocks, this start: block 35). Stopping at ARPACK's capped tolerance instead keeps it."""
    from spectralkern.bench.cases.eigensolver import knn_graph

    L = knn_graph(64, 1024).laplacian(normalized=True)
    block = 35
    dense = L.to_scipy().tocsr()[block * 1024:(block + 1) * 1024, block * 1024:(block + 1) * 1024].toarray()
    reference = np.linalg.eigvalsh(dense)[:16]

    def solve() -> np.ndarray:
        torch.manual_seed(0)      # the start of each item (the thread count does not matter: per-item streams)
        basis = sk.lowest_eigenpairs(L, 16, tol=1e-4, backend="native")
        return basis.eigenvalues[block].double().numpy()

    assert np.abs(solve() - reference).max() < 4e-4
    monkeypatch.setattr(_native_lanczos, "ARPACK_TOL_CAP", 1.0)      # stop at the requested tolerance: the plain miss
    assert np.abs(solve() - reference).max() > 1e-3
