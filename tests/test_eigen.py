"""lowest_eigenpairs against float64 references (numpy eigh per block, scipy eigsh): eigenvalues, residuals,
orthonormality and projectors U Uᵀ (never raw eigenvectors: they are unique only up to sign and rotation)."""
from __future__ import annotations

import sys
import types
import warnings

import networkx as nx
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.csgraph import laplacian as scipy_laplacian

import spectralkern as sk
from spectralkern import _extensions
from spectralkern.eigen import _dense, _lanczos, _tuning

DTYPES = [torch.float64, torch.float32]
# the accuracy bar: eigenvalues within this fraction of ‖L‖ of the float64 reference
EIG_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
ORTH_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
# projectors are compared only where λ_{k_b} and λ_{k_b+1} are this far apart (relative to ‖L‖)
GAP = 1e-3


def sizes_to_ptr(sizes: list[int]) -> list[int]:
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()


def random_adjacency(rng: np.random.Generator, ptr: list[int], density: float, *, cross: float = 0.0,
                     isolated: float = 0.1) -> np.ndarray:
    """Symmetric weighted adjacency, edges inside blocks (and across with probability ``cross``), some isolated
    nodes (each one is a component of its own, with eigenvalue 0)."""
    n = ptr[-1]
    block = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    prob = np.where(block[:, None] == block[None, :], density, cross)
    upper = np.triu((rng.random((n, n)) < prob) * rng.uniform(0.1, 3.0, (n, n)), 1)
    dead = rng.random(n) < isolated
    upper[dead, :] = 0
    upper[:, dead] = 0
    return upper + upper.T


def laplacian_of(adjacency: np.ndarray, ptr: list[int], normalized: bool = True,
                 dtype: torch.dtype = torch.float64) -> sk.GraphLaplacian:
    graph = sk.ParameterGraph.from_scipy(scipy.sparse.csr_array(adjacency), block_ptr=ptr, dtype=dtype)
    return graph.laplacian(normalized=normalized)


def check_basis(basis: sk.SpectralBasis, L_ref: np.ndarray, ptr: list[int], k: int, dtype: torch.dtype) -> None:
    """The contract of a computed basis against the float64 matrix L_ref, block by block."""
    info = basis.info
    num_blocks = len(ptr) - 1
    U = basis.U.double().numpy()
    ev = basis.eigenvalues.double().numpy()
    assert basis.dtype == dtype and U.shape == (ptr[-1], k) and ev.shape == (num_blocks, k)
    assert basis.block_ptr.tolist() == ptr
    assert info.residuals.shape == (num_blocks, k) and info.converged.shape == (num_blocks, k)
    assert info.iterations.shape == (num_blocks,) and info.matvecs.shape == (num_blocks,)
    assert bool(info.converged.sum() == basis.block_k.sum()), info
    norm = info.norm
    for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
        n_b = stop - start
        k_b = min(k, n_b)
        assert np.all(U[start:stop, k_b:] == 0) and np.all(ev[b, k_b:] == 0), f"block {b}: padding not zero"
        assert not info.converged[b, k_b:].any()
        if n_b == 0:
            continue
        L_b = L_ref[start:stop, start:stop]
        ref_values, ref_vectors = np.linalg.eigh(L_b)
        U_b, lam = U[start:stop, :k_b], ev[b, :k_b]
        np.testing.assert_allclose(lam, ref_values[:k_b], rtol=0, atol=EIG_RTOL[dtype] * norm,
                                   err_msg=f"block {b}")
        assert np.all(np.diff(lam) >= -EIG_RTOL[dtype] * norm), f"block {b}: not ascending {lam}"
        residual = np.linalg.norm(L_b @ U_b - U_b * lam, axis=0)
        # the float64 residual of the returned (dtype-rounded) pairs is within the reported tolerance
        assert residual.max() <= 2 * info.tol, f"block {b}: residuals {residual.max():.3g} > 2·tol {info.tol:.3g}"
        np.testing.assert_allclose(U_b.T @ U_b, np.eye(k_b), rtol=0, atol=ORTH_TOL[dtype],
                                   err_msg=f"block {b}: U_bᵀU_b")
        gap = ref_values[k_b] - ref_values[k_b - 1] if k_b < n_b else np.inf
        if gap > GAP * norm:
            P_ref = ref_vectors[:, :k_b] @ ref_vectors[:, :k_b].T
            np.testing.assert_allclose(U_b @ U_b.T, P_ref, rtol=0, atol=10 * max(info.tol, 1e-15 * norm) / gap
                                       + ORTH_TOL[dtype], err_msg=f"block {b}: projector")


def dense_of(L: sk.GraphLaplacian) -> np.ndarray:
    return L.to_dense().double().numpy()


# ------------------------------------------------------------------------------------- backends agree
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["lanczos", "auto", "dense", "scipy", "native"])
def test_ragged_blocks_match_numpy(seed, backend, dtype):
    """Ragged layout: empty, one-node, k ≥ n_b, and blocks big enough for the Krylov path (dense items inside
    a 300-node block use the CSR operator, 70..90-node ones the dense-block operator); isolated nodes give
    repeated zero eigenvalues."""
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([0, 1, 5, 300, 90, 0, 70, 3])
    L = laplacian_of(random_adjacency(rng, ptr, 0.15), ptr, dtype=dtype)
    basis = sk.lowest_eigenpairs(L, 6, backend=backend)
    check_basis(basis, dense_of(L), ptr, 6, dtype)
    if backend == "lanczos":
        assert basis.info.backend == "lanczos+dense"
        assert int(basis.info.matvecs[3]) > 0 and int(basis.info.matvecs[2]) == 0  # small blocks: dense


@pytest.mark.parametrize("normalized", [True, False])
def test_combinatorial_and_normalized_laplacians_match_scipy_eigsh(seed, normalized):
    """Against scipy's eigsh (shift-invert at 0 as the reference mode) on a kNN graph of random rows."""
    rows = torch.randn(400, 12, dtype=torch.float64)
    graph = sk.ParameterGraph.knn(rows, k=6, block_size=200)
    L = graph.laplacian(normalized=normalized)
    basis = sk.lowest_eigenpairs(L, 8, tol=1e-10, backend="lanczos")
    W = graph.to_scipy()
    for b in range(2):
        Lb = scipy_laplacian(W[200 * b:200 * (b + 1), 200 * b:200 * (b + 1)], normed=normalized)
        ref = np.sort(scipy.sparse.linalg.eigsh(Lb.tocsc(), k=8, sigma=-1e-3, which="LM", tol=1e-12)[0])
        np.testing.assert_allclose(basis.eigenvalues[b].numpy(), ref, rtol=0, atol=1e-8 * basis.info.norm)
    assert float(basis.info.residuals.max()) <= 1e-10 * basis.info.norm + basis.info.tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_blocks_default_tol(seed, dtype):
    rows = torch.randn(3 * 256, 16, dtype=torch.float64)
    graph = sk.ParameterGraph.knn(rows.to(dtype), k=8, block_size=256)
    L = graph.laplacian()
    basis = sk.lowest_eigenpairs(L, 12)
    check_basis(basis, dense_of(L), graph.block_ptr.tolist(), 12, dtype)
    assert basis.info.tol <= 64 * torch.finfo(dtype).eps * L.spectrum_bound() * 8  # tol=0: the rounding floor


def test_cross_block_edges_give_one_global_basis(seed):
    ptr = [0, 120, 260, 400]
    rows = torch.randn(400, 10, dtype=torch.float64)
    knn = sk.ParameterGraph.knn(rows, k=5, block_ptr=ptr)
    chain = sk.ParameterGraph.chain(400, block_ptr=ptr, link_blocks=True, dtype=torch.float64)
    graph = sk.ParameterGraph.from_dense(knn.to_dense() + 0.5 * chain.to_dense(), block_ptr=ptr)
    L = graph.laplacian()
    basis = sk.lowest_eigenpairs(L, 10, tol=1e-10)
    assert basis.block_ptr.tolist() == [0, 400]
    check_basis(basis, dense_of(L), [0, 400], 10, torch.float64)


# ----------------------------------------------------------------------- graphs nobody here made
def networkx_laplacian(graph: nx.Graph, ptr: list[int] | None = None) -> sk.GraphLaplacian:
    adjacency = nx.to_scipy_sparse_array(graph, weight="weight", format="csr").astype(np.float64)
    n = adjacency.shape[0]
    return sk.ParameterGraph.from_scipy(adjacency, block_ptr=ptr or [0, n]).laplacian()


NETWORKX = {
    "karate": lambda: nx.karate_club_graph(),
    "les_miserables": lambda: nx.les_miserables_graph(),
    "grid_2d_12x9": lambda: nx.grid_2d_graph(12, 9),               # repeated eigenvalues from symmetry
    "barbell_20_5": lambda: nx.barbell_graph(20, 5),               # cliques: eigenvalue 20/19, multiplicity 36
    "star_60": lambda: nx.star_graph(60),                          # eigenvalue 1 with multiplicity 59
    "petersen": lambda: nx.petersen_graph(),
}


@pytest.mark.parametrize("name", sorted(NETWORKX))
@pytest.mark.parametrize("backend", ["lanczos", "scipy", "native"])
def test_networkx_graphs(name, backend):
    graph = nx.convert_node_labels_to_integers(NETWORKX[name]())
    L = networkx_laplacian(graph)
    n = graph.number_of_nodes()
    k = min(12, n)
    # small graphs would be solved densely: force the Krylov path with a small basis
    basis = sk.lowest_eigenpairs(L, k, backend=backend, ncv=min(k + 8, n - 3) if n > k + 11 else None)
    check_basis(basis, dense_of(L), [0, n], k, torch.float64)


def test_disjoint_copies_in_one_block_repeat_every_eigenvalue():
    """Four components in one block, three of them identical: the zero eigenvalue has multiplicity 4 and every
    eigenvalue of the copied graph multiplicity 3 — single-vector Lanczos cannot see those from one start."""
    parts = [nx.grid_2d_graph(10, 8), nx.grid_2d_graph(10, 8), nx.grid_2d_graph(10, 8), nx.karate_club_graph()]
    graph = nx.convert_node_labels_to_integers(nx.disjoint_union_all(parts))
    L = networkx_laplacian(graph)
    n = graph.number_of_nodes()
    for backend in ("lanczos", "scipy", "native", "auto"):
        basis = sk.lowest_eigenpairs(L, 16, backend=backend)
        check_basis(basis, dense_of(L), [0, n], 16, torch.float64)
        assert int((basis.eigenvalues.abs() < 1e-10).sum()) == 4


def test_disconnected_blocks_many_components_and_copies(seed):
    """Each of several blocks is itself a disjoint union (components of sizes 1..60, some repeated)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(3):
        sizes = [60, 60, 45] + list(rng.integers(1, 12, size=8))
        parts = [nx.cycle_graph(int(s)) if s > 2 else nx.path_graph(int(s)) for s in sizes]
        blocks.append(nx.disjoint_union_all(parts))
    graph = nx.convert_node_labels_to_integers(nx.disjoint_union_all(blocks))
    ptr = sizes_to_ptr([b.number_of_nodes() for b in blocks])
    L = networkx_laplacian(graph, ptr)
    basis = sk.lowest_eigenpairs(L, 20, backend="lanczos")
    check_basis(basis, dense_of(L), ptr, 20, torch.float64)


# ------------------------------------------------------------------------------- general matrices
def test_symmetric_matrix_with_negative_eigenvalues_torch_and_scipy_inputs(seed):
    rng = np.random.default_rng(seed)
    a = scipy.sparse.random(300, 300, density=0.03, random_state=rng, data_rvs=lambda s: rng.normal(size=s))
    a = (a + a.T).tocsr()
    ref = np.linalg.eigvalsh(a.toarray())[:7]
    for matrix in (a, torch.tensor(a.toarray()), torch.tensor(a.toarray()).to_sparse_coo()):
        basis = sk.lowest_eigenpairs(matrix, 7, tol=1e-12)
        np.testing.assert_allclose(basis.eigenvalues[0].numpy(), ref, rtol=0, atol=1e-8 * basis.info.norm)
        assert ref[0] < 0 and basis.block_ptr.tolist() == [0, 300]


# ------------------------------------------------------------------------------------ tolerances
@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerance_is_relative_to_the_norm_bound(seed, dtype):
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([150, 180])
    L = laplacian_of(random_adjacency(rng, ptr, 0.1, isolated=0.0), ptr, normalized=False, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-7
    basis = sk.lowest_eigenpairs(L, 5, tol=tol, backend="lanczos")
    assert basis.info.norm == pytest.approx(L.spectrum_bound())  # Gershgorin for the combinatorial Laplacian
    assert basis.info.tol == pytest.approx(tol * basis.info.norm)
    assert float(basis.info.residuals.max()) <= basis.info.tol * 1.5
    # a looser tolerance never needs more products than the default (tol=0: the dtype's rounding floor);
    # convergence is checked once per restart, so both may stop at the same restart
    tight = sk.lowest_eigenpairs(L, 5, backend="lanczos")
    assert tight.info.tol < basis.info.tol
    assert int(tight.info.matvecs.sum()) >= int(basis.info.matvecs.sum())


def test_early_finishers_stop_costing(seed):
    """A block whose pairs converge fast leaves the batch: its product count stays below the hard block's."""
    easy = nx.complete_graph(120)                                     # λ = 0 and 120/119 only: instant
    hard = nx.path_graph(400)                                         # clustered low end: slow
    graph = nx.convert_node_labels_to_integers(nx.disjoint_union(easy, hard))
    L = networkx_laplacian(graph, [0, 120, 520])
    basis = sk.lowest_eigenpairs(L, 6, tol=1e-10, backend="lanczos")
    check_basis(basis, dense_of(L), [0, 120, 520], 6, torch.float64)
    iterations, matvecs = basis.info.iterations.tolist(), basis.info.matvecs.tolist()
    assert iterations[0] < iterations[1] and matvecs[0] < matvecs[1], basis.info


def test_dense_backend_matches_from_laplacian(seed):
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([7, 0, 30, 1, 64])
    L = laplacian_of(random_adjacency(rng, ptr, 0.3), ptr)
    ours = sk.lowest_eigenpairs(L, 9, backend="dense")
    theirs = sk.SpectralBasis.from_laplacian(L, 9)
    torch.testing.assert_close(ours.eigenvalues, theirs.eigenvalues, rtol=0, atol=1e-12)
    assert ours.info.backend == "dense" and int(ours.info.matvecs.sum()) == 0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dense_solve_split_across_threads_is_the_same_basis(seed, threads, monkeypatch):
    """The CPU dense path splits each size bucket's eigh across torch's thread count: any split (more threads
    than a bucket has blocks included) gives the basis of the one-call solve."""
    monkeypatch.setattr(_dense, "_MIN_WORK_PER_THREAD", 1)   # split even these small buckets
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([40, 1, 0, 33, 12, 40, 2, 37])
    L = laplacian_of(random_adjacency(rng, ptr, 0.3, isolated=0.0), ptr)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = sk.lowest_eigenpairs(L, 6, backend="dense")
        torch.set_num_threads(threads)
        split = sk.lowest_eigenpairs(L, 6, backend="dense")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(split.eigenvalues, single.eigenvalues, rtol=0, atol=1e-12)
    check_basis(split, dense_of(L), ptr, 6, torch.float64)


def test_eigh_small_workers_and_columns(seed, monkeypatch):
    """Split across workers or not, eigh_small returns the lowest ``columns`` pairs, in their own storage; a
    batch too small to be worth a thread is one call."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 6, 6, dtype=torch.float64, generator=gen)
    calls = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(m.shape[0]) or real_eigh(m))
    _dense.eigh_small(a + a.mT, workers=4)
    assert calls == [4]                                      # 4 · 6³ ≪ the work worth a thread
    monkeypatch.setattr(_dense, "_MIN_WORK_PER_THREAD", 1)
    calls.clear()
    _dense.eigh_small(a + a.mT, workers=3)
    assert sorted(calls) == [1, 1, 2]
    monkeypatch.undo()
    a = torch.randn(5, 9, 9, dtype=torch.float64, generator=gen)
    matrices = a + a.mT
    values, vectors = torch.linalg.eigh(matrices)
    for workers in (1, 2, 7):
        got_values, got_vectors = _dense.eigh_small(matrices, columns=4, workers=workers)
        assert got_values.shape == (5, 4) and got_vectors.shape == (5, 9, 4)
        torch.testing.assert_close(got_values, values[:, :4], rtol=0, atol=1e-12)
        torch.testing.assert_close(got_vectors @ got_vectors.mT, vectors[..., :4] @ vectors[..., :4].mT,
                                   rtol=0, atol=1e-10)
        assert got_vectors.untyped_storage().nbytes() == got_vectors.numel() * 8   # not a view of all 9 columns


def test_eigh_small_names_the_failed_matrix_in_the_whole_batch(monkeypatch):
    """LAPACK numbers a failed matrix within its worker's chunk; the error names its index in the whole batch."""
    monkeypatch.setattr(_dense, "_MIN_WORK_PER_THREAD", 1)
    matrices = torch.eye(6, dtype=torch.float64).repeat(5, 1, 1)
    matrices[4] = float("nan")                                # chunks of 2, 2, 1: the last chunk's element 0
    with pytest.raises(torch.linalg.LinAlgError, match=r"Batch element 4\b"):
        _dense.eigh_small(matrices, workers=3)


@pytest.mark.parametrize("backend", ["lanczos", "scipy", "native"])
def test_many_big_components_in_one_block_are_all_krylov_items(seed, backend):
    """A block of five components too big for dense (block size p = 2 for k = 3): the Krylov items take them two
    at a time and none is solved densely; every pair matches numpy."""
    from spectralkern.eigen import _plan, _problem

    rng = np.random.default_rng(seed)
    sizes = [70, 60, 55, 50, 45]
    ptr = sizes_to_ptr([sum(sizes), 20])
    adjacency = np.zeros((ptr[-1], ptr[-1]))
    for start, stop in zip(sizes_to_ptr(sizes)[:-1], sizes_to_ptr(sizes)[1:]):   # a ring + chords per component
        n = stop - start
        ring = np.roll(np.eye(n), 1, axis=1) * rng.uniform(0.5, 2.0, n)
        chords = np.triu(rng.random((n, n)) < 0.08, 2) * rng.uniform(0.1, 1.0, (n, n))
        adjacency[start:stop, start:stop] = ring + chords
    adjacency[ptr[1]:, ptr[1]:] = np.triu(rng.random((20, 20)) < 0.3, 1)
    adjacency = np.triu(adjacency + adjacency.T, 1)
    L = laplacian_of(adjacency + adjacency.T, ptr)
    k = 3
    dense_max = _tuning.default_ncv(k, 2) + 2
    plan = _plan.make_plan(_problem.prepare("L", L), lambda sizes: sizes <= dense_max,
                           2 if backend == "lanczos" else None)
    assert plan.dense is None or int(plan.dense.sizes.max()) <= dense_max
    expected = [70 + 60, 55 + 50, 45] if backend == "lanczos" else sizes
    assert sorted(plan.krylov.sizes.tolist()) == sorted(expected)
    basis = sk.lowest_eigenpairs(L, k, tol=1e-10, backend=backend)
    check_basis(basis, dense_of(L), ptr, k, torch.float64)


def test_scipy_backend_finds_the_eigenvalue_plain_arpack_misses(monkeypatch):
    """ARPACK asked for exactly k pairs at a loose tolerance sometimes stops before an eigenvalue of the wanted
    range shows up (~2% of random starts on this 256-node kNN block at tol 1e-3): its k-th value is then the
    (k+1)-th. From such a start the scipy backend (guard pairs, capped tolerance) returns the k lowest."""
    from spectralkern.bench.cases.eigensolver import knn_graph
    from spectralkern.eigen import _scipy

    k, tol = 16, 1e-3
    L = knn_graph(1, 256, seed=0).laplacian(normalized=True)
    block = L.to_scipy()
    expected = np.linalg.eigvalsh(block.toarray())[:k]
    flipped = scipy.sparse.csr_array(2 * scipy.sparse.identity(256, format="csr") - block)
    for start_seed in range(400):   # the first start from which plain ARPACK misses one
        v0 = np.random.default_rng(start_seed).uniform(-1, 1, 256)
        plain = np.sort(2 - scipy.sparse.linalg.eigsh(flipped, k=k, which="LA", tol=tol, v0=v0)[0])
        if np.abs(plain - expected).max() > 1e-3:
            break
    else:
        raise AssertionError("plain ARPACK found every eigenvalue from 400 starts: the example lost its point")
    monkeypatch.setattr(_scipy, "random_start", lambda size, generator: torch.from_numpy(v0))
    basis = sk.lowest_eigenpairs(L, k, tol=tol, backend="scipy")
    np.testing.assert_allclose(basis.eigenvalues[0].numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("want, size, ncv, room, expected", [
    (16, 200, None, 1, (18, None)),     # two guards, ARPACK's default ncv
    (16, 18, None, 1, (17, None)),      # one guard fits below the size
    (16, 17, 17, 1, (16, 17)),          # none fits: nev stays at what is wanted
    (16, 200, 17, 1, (18, 19)),         # a caller's ncv too small for the guards is raised
    (16, 19, 17, 3, (16, 19)),          # cupyx: nev + 2 ≤ ncv < size leaves no room for guards
    (16, 30, 20, 3, (18, 21)),
])
def test_arpack_request_guards_fit_the_item(want, size, ncv, room, expected):
    from spectralkern.eigen import _scipy

    assert _scipy.arpack_request(want, size, ncv, room) == expected


def test_scipy_cold_starts_repeat_under_a_seed():
    """Cold ARPACK starts come from torch's RNG: torch.manual_seed makes a scipy-backend solve repeat exactly."""
    from spectralkern.bench.cases.eigensolver import knn_graph

    L = knn_graph(2, 128, seed=1).laplacian(normalized=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(sk.lowest_eigenpairs(L, 4, tol=1e-6, backend="scipy"))
    assert runs[0].info.backend == "scipy"
    assert torch.equal(runs[0].U, runs[1].U) and torch.equal(runs[0].info.matvecs, runs[1].info.matvecs)


# --------------------------------------------------------------------------------------- warm start
def drifting_graph(seed: int, steps: int, drift: float = 0.01, num_blocks: int = 3, n: int = 400):
    """kNN graph of rows on a low-dimensional manifold; every refresh multiplies each edge weight by
    1 + drift·N(0, 1) (the same factor for both directions)."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(num_blocks * n, 3, dtype=torch.float64, generator=gen)
    rows = latent @ torch.randn(3, 24, dtype=torch.float64, generator=gen)
    graph = sk.ParameterGraph.knn(rows + 0.05 * torch.randn(rows.shape, dtype=torch.float64, generator=gen),
                                  k=8, block_size=n)
    key = torch.minimum(graph.row, graph.col) * graph.num_nodes + torch.maximum(graph.row, graph.col)
    graphs = [graph]
    for _ in range(steps):
        factor = 1 + drift * torch.randn(int(key.max()) + 1, dtype=torch.float64, generator=gen)[key]
        graphs.append(sk.ParameterGraph(graph.num_nodes, graph.block_ptr, graph.row, graph.col,
                                        graphs[-1].weight * factor))
    return graphs


@pytest.mark.parametrize("backend", ["lanczos", "scipy", "native", "auto"])
def test_warm_start_after_a_drift_below_the_tolerance_is_one_check(seed, backend):
    """An accurate basis of the previous graph, weights drifted by 0.02% (old pairs' residuals ~3e-5 against a
    tolerance of 2e-4): checking the old vectors (k products per block) is the whole solve, whatever the
    Krylov backend (auto: ARPACK for these 400-node blocks on the CPU)."""
    graphs = drifting_graph(seed, steps=1, drift=0.0002)
    k = 10
    previous = sk.lowest_eigenpairs(graphs[0].laplacian(), k, tol=1e-10)
    L = graphs[1].laplacian()
    cold = sk.lowest_eigenpairs(L, k, tol=1e-4, backend=backend)
    warm = sk.lowest_eigenpairs(L, k, tol=1e-4, backend=backend, v0=previous, progress=True)
    assert warm.info.matvecs.tolist() == [k] * 3 and warm.info.iterations.tolist() == [1] * 3
    assert int(cold.info.matvecs.sum()) >= 2 * int(warm.info.matvecs.sum())
    assert bool(warm.info.converged.all()) and float(warm.info.residuals.max()) <= 2 * warm.info.tol
    # a Ritz value lies within its residual norm of an eigenvalue: here, of the k lowest
    dense = dense_of(L)
    for b, (start, stop) in enumerate(zip(graphs[1].block_ptr[:-1].tolist(), graphs[1].block_ptr[1:].tolist())):
        reference = np.linalg.eigvalsh(dense[start:stop, start:stop])[:k]
        np.testing.assert_allclose(warm.eigenvalues[b].numpy(), reference, rtol=0, atol=2 * warm.info.tol)


@pytest.mark.parametrize("backend", ["lanczos", "scipy", "native"])
def test_warm_start_solves_only_the_blocks_that_moved(seed, backend):
    """Block 1 of three drifted by 5%, the others not at all: blocks 0 and 2 are settled by the check, block 1
    is solved (its failed check counted in its products), and the merged basis is right everywhere."""
    graphs = drifting_graph(seed, steps=1, drift=0.05)
    n = 400
    moved = torch.where((graphs[0].row // n) == 1, graphs[1].weight, graphs[0].weight)
    graph = sk.ParameterGraph(graphs[0].num_nodes, graphs[0].block_ptr, graphs[0].row, graphs[0].col, moved)
    k = 8
    previous = sk.lowest_eigenpairs(graphs[0].laplacian(), k, tol=1e-10, backend=backend)
    L = graph.laplacian()
    warm = sk.lowest_eigenpairs(L, k, tol=1e-8, backend=backend, v0=previous, progress=True)
    check_basis(warm, dense_of(L), graph.block_ptr.tolist(), k, torch.float64)
    matvecs = warm.info.matvecs.tolist()
    assert matvecs[0] == matvecs[2] == k and matvecs[1] > 2 * k, matvecs
    assert warm.info.iterations.tolist()[0::2] == [1, 1]
    assert warm.info.iterations.tolist()[1] >= (2 if backend == "lanczos" else 0)


@pytest.mark.parametrize("backend", ["lanczos", "scipy", "native"])
def test_warm_start_settles_blocks_whose_lowest_pairs_include_islands(seed, backend):
    """Block 0 has isolated nodes among its k lowest pairs (solved densely, or in another item): the Krylov item
    owes only the old pairs that live on it, so a refresh of an unchanged graph is one check everywhere."""
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([150, 150])
    adjacency = random_adjacency(rng, ptr, 0.08, isolated=0.0)
    adjacency[:, :3] = 0
    adjacency[:3, :] = 0                      # block 0: three isolated nodes (eigenvalue 0 each)
    L = laplacian_of(adjacency, ptr)
    k = 6
    previous = sk.lowest_eigenpairs(L, k, tol=1e-8, backend=backend)
    warm = sk.lowest_eigenpairs(L, k, tol=1e-8, backend=backend, v0=previous)
    check_basis(warm, dense_of(L), ptr, k, torch.float64)
    assert warm.info.iterations.tolist() == [1, 1], warm.info
    assert int(warm.info.matvecs.max()) <= k, warm.info


def test_warm_start_chained_refreshes(seed):
    """Each refresh of a 1%-per-step drifting graph starts from the previous result: every pair converges, and
    over the refreshes the warm starts take fewer products than cold solves (by 5–25% at this tolerance: the
    drift moves the pairs by far more than tol, and a Krylov method must re-resolve the clustered low end)."""
    graphs = drifting_graph(seed, steps=3, drift=0.01)
    k, tol = 10, 1e-6
    previous = sk.lowest_eigenpairs(graphs[0].laplacian(), k, tol=tol, backend="lanczos")
    cold_total = warm_total = 0
    for graph in graphs[1:]:
        L = graph.laplacian()
        cold = sk.lowest_eigenpairs(L, k, tol=tol, backend="lanczos")
        warm = sk.lowest_eigenpairs(L, k, tol=tol, backend="lanczos", v0=previous)
        check_basis(warm, dense_of(L), graph.block_ptr.tolist(), k, torch.float64)
        cold_total += int(cold.info.matvecs.sum())
        warm_total += int(warm.info.matvecs.sum())
        previous = warm
    assert warm_total < cold_total, (warm_total, cold_total)


def test_warm_start_from_a_smaller_basis_and_with_scipy(seed):
    graphs = drifting_graph(seed, steps=1, num_blocks=2, n=300)
    old = sk.lowest_eigenpairs(graphs[0].laplacian(), 4, tol=1e-8)
    L = graphs[1].laplacian()
    for backend in ("lanczos", "scipy", "native", "dense"):
        basis = sk.lowest_eigenpairs(L, 8, tol=1e-9, v0=old, backend=backend)
        check_basis(basis, dense_of(L), graphs[1].block_ptr.tolist(), 8, torch.float64)


# ------------------------------------------------------------------------------- no convergence
def test_strict_raises_no_convergence_with_the_partial_result(seed):
    L = networkx_laplacian(nx.path_graph(600))
    with pytest.raises(sk.NoConvergence, match="did not reach the tolerance") as caught:
        sk.lowest_eigenpairs(L, 12, maxiter=2, backend="lanczos")
    exc = caught.value
    assert isinstance(exc.basis, sk.SpectralBasis) and exc.basis.info is exc.info
    assert exc.info.converged.shape == (1, 12) and not bool(exc.info.converged.all())
    U = exc.basis.U.double()
    torch.testing.assert_close(U.T @ U, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-10)
    converged = exc.info.converged[0]
    assert bool((exc.info.residuals[0][converged] <= exc.info.tol * 2).all())
    assert bool((exc.info.residuals[0][~converged] > exc.info.tol).all())


def test_not_strict_warns_and_returns_the_mask(seed):
    L = networkx_laplacian(nx.path_graph(600))
    with pytest.warns(RuntimeWarning, match="did not reach the tolerance"):
        basis = sk.lowest_eigenpairs(L, 12, maxiter=2, strict=False)
    assert basis.info.num_converged < 12 and basis.info.converged.dtype == torch.bool


def test_scipy_partial_result_with_a_gap_is_not_passed_off_as_converged(monkeypatch):
    """ARPACK's partial result (maxiter reached) may skip a wanted pair; with guard pairs asked for, the k
    returned would then look complete. None of a partial result counts as converged: NoConvergence is raised."""
    from spectralkern.bench.cases.eigensolver import knn_graph

    k = 16
    L = knn_graph(1, 256, seed=0).laplacian(normalized=True)
    values, vectors = np.linalg.eigh(L.to_dense().numpy())
    kept = [*range(k - 1), k, k + 1]                        # pair k − 1 never converged

    def partial_eigsh(operator, k, **kwargs):
        raise scipy.sparse.linalg.ArpackNoConvergence("maxiter reached", 2 - values[kept], vectors[:, kept])

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", partial_eigsh)
    with pytest.raises(sk.NoConvergence) as caught:
        sk.lowest_eigenpairs(L, k, tol=1e-8, backend="scipy")
    assert not bool(caught.value.info.converged.any())


# --------------------------------------------------------------------------------------------- progress
def test_progress_bar(capsys):
    L = networkx_laplacian(nx.path_graph(300))
    basis = sk.lowest_eigenpairs(L, 5, tol=1e-8, progress=True, backend="lanczos")
    err = capsys.readouterr().err
    assert "lowest_eigenpairs[lanczos]" in err and "5/5" in err
    assert basis.info.num_converged == 5
    sk.lowest_eigenpairs(L, 5, tol=1e-8, progress=True, backend="scipy")
    assert "lowest_eigenpairs[scipy]" in capsys.readouterr().err
    sk.lowest_eigenpairs(L, 5, tol=1e-8, progress=True, backend="native")
    assert "lowest_eigenpairs[native]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture(scope="module")
def small_laplacian() -> sk.GraphLaplacian:
    return networkx_laplacian(nx.karate_club_graph())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(k=0), ValueError, "k must be positive, got 0"),
    (dict(k=-3), ValueError, "k must be positive, got -3"),
    (dict(k=2.5), TypeError, "k must be an int, got float"),
    (dict(k=True), TypeError, "k must be an int, got bool"),
    (dict(tol=-1e-3), ValueError, "tol must be a finite number >= 0.*got -0.001"),
    (dict(tol=float("nan")), ValueError, "tol must be a finite number >= 0.*got nan"),
    (dict(tol="1e-6"), TypeError, "tol must be a real number, got str"),
    (dict(maxiter=0), ValueError, "maxiter must be positive, got 0"),
    (dict(ncv=4), ValueError, "ncv must be larger than k = 4.*got 4"),
    (dict(backend="arpack"), ValueError, "backend must be one of 'auto', 'lanczos'.*got 'arpack'"),
    (dict(progress=1), TypeError, "progress must be a bool, got int"),
    (dict(strict="yes"), TypeError, "strict must be a bool, got str"),
    (dict(v0="basis"), TypeError, "v0 must be a SpectralBasis .* got str"),
])
def test_bad_arguments(small_laplacian, kwargs, error, match):
    kwargs = {"k": 4, **kwargs}
    with pytest.raises(error, match=match):
        sk.lowest_eigenpairs(small_laplacian, **kwargs)


@pytest.fixture(params=["compiled-checks", "torch-checks"])
def check_path(request, monkeypatch):
    """Run a test on both paths of prepare's input checks: the compiled pass, and the torch ops (GPUs, installs
    without the compiled module)."""
    if request.param == "torch-checks":
        off = _extensions.ExtensionStatus(False, "disabled by the test")
        monkeypatch.setattr(_extensions, "status", lambda name: off)
    return request.param


@pytest.mark.parametrize("matrix, error, match", [
    ([[1.0, 0.0], [0.0, 1.0]], TypeError, "L must be a GraphLaplacian, a torch tensor or a scipy sparse matrix, "
                                          "got list"),
    (torch.zeros(3, 4, dtype=torch.float64), ValueError, r"L must be square, got shape \(3, 4\)"),
    (torch.zeros(2, 3, 3, dtype=torch.float64), ValueError, r"L must be a 2-D matrix, got shape \(2, 3, 3\)"),
    (torch.eye(3, dtype=torch.int64), TypeError, "L must have dtype float32 or float64, got int64"),
    (torch.eye(3, dtype=torch.float16), TypeError, "L must have dtype float32 or float64, got float16"),
    (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=torch.float64), ValueError,
     "L contains 2 NaN/Inf value"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]], dtype=torch.float64), ValueError, "L contains 1 NaN/Inf"),
    (torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]], dtype=torch.float64), ValueError,
     "L must be symmetric"),
    (np.array([["a", "b"], ["c", "d"]]), TypeError, "L must have a real dtype"),
])
def test_bad_matrices(matrix, error, match, check_path):
    with pytest.raises(error, match=match):
        sk.lowest_eigenpairs(matrix, 1)


def test_non_symmetric_graph_laplacian_matrix_is_caught(seed, check_path):
    L = networkx_laplacian(nx.path_graph(50))
    dense = L.to_dense()
    dense[3, 20] = -0.7  # one-sided edge
    forged = sk.GraphLaplacian(dense.to_sparse_csr(), L.block_ptr, True, False)
    with pytest.raises(ValueError, match=r"L must be symmetric: for random unit vectors x, y, yᵀ\(L x\)"):
        sk.lowest_eigenpairs(forged, 3)


def test_v0_must_match_layout_dtype_and_device(seed):
    rows = torch.randn(120, 8, dtype=torch.float64)
    L = sk.ParameterGraph.knn(rows, k=4, block_size=60).laplacian()
    other = sk.ParameterGraph.knn(rows, k=4, block_size=40).laplacian()
    old = sk.lowest_eigenpairs(other, 3)
    with pytest.raises(ValueError, match=r"v0 must have the same block layout as L: v0 has 120 nodes in 3 blocks, "
                                         r"L's basis has 120 nodes in 2 blocks"):
        sk.lowest_eigenpairs(L, 3, v0=old)
    good = sk.lowest_eigenpairs(L, 3)
    with pytest.raises(TypeError, match="v0 has dtype torch.float32 but L has torch.float64"):
        sk.lowest_eigenpairs(L, 3, v0=good.to(dtype=torch.float32))
    bad = sk.SpectralBasis(good.U.clone(), good.eigenvalues, good.block_ptr)
    bad.U[0, 0] = float("nan")
    with pytest.raises(ValueError, match="v0.U contains NaN/Inf"):
        sk.lowest_eigenpairs(L, 3, v0=bad)


def test_dense_backend_refuses_huge_blocks():
    L = networkx_laplacian(nx.path_graph(9000))
    with pytest.raises(ValueError, match="backend='dense' would run a dense eigh on a 9000-node block"):
        sk.lowest_eigenpairs(L, 2, backend="dense")
    # ten 1000-node blocks made global by one edge across blocks: the message says why the block is so big
    ring = scipy.sparse.csr_array(nx.to_scipy_sparse_array(nx.path_graph(10_000)))
    L = sk.ParameterGraph.from_scipy(ring, block_ptr=list(range(0, 10_001, 1000))).laplacian()
    with pytest.raises(ValueError, match="10000-node block .L has entries across its graph's blocks"):
        sk.lowest_eigenpairs(L, 2, backend="dense")


def test_scipy_input_raises_no_torch_sparse_warnings(small_laplacian):
    matrix = small_laplacian.to_scipy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        basis = sk.lowest_eigenpairs(matrix, 2)
    assert basis.U.shape == (matrix.shape[0], 2)


# ------------------------------------------------------------------------------------------------ cupy
def test_cupy_missing_is_a_clear_import_error(monkeypatch, small_laplacian):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(ImportError, match=r"backend='cupy' needs cupy.*pip install 'spectralkern\[cupy\]'"):
        sk.lowest_eigenpairs(small_laplacian, 3, backend="cupy")


def fake_cupy(available: bool) -> dict[str, types.ModuleType]:
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(is_available=lambda: available)
    cupyx = types.ModuleType("cupyx")
    sci = types.ModuleType("cupyx.scipy")
    sparse = types.ModuleType("cupyx.scipy.sparse")
    linalg = types.ModuleType("cupyx.scipy.sparse.linalg")
    return {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": sci, "cupyx.scipy.sparse": sparse,
            "cupyx.scipy.sparse.linalg": linalg}


def test_cupy_without_a_gpu_and_on_cpu_tensors(monkeypatch, small_laplacian):
    for name, module in fake_cupy(available=False).items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(RuntimeError, match=r"cupy is installed but sees no GPU"):
        sk.lowest_eigenpairs(small_laplacian, 3, backend="cupy")
    for name, module in fake_cupy(available=True).items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(ValueError, match="backend='cupy' runs on a CUDA device, but L is on cpu"):
        sk.lowest_eigenpairs(small_laplacian, 3, backend="cupy")


# ------------------------------------------------------------------------------------------- hypothesis
@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 2, 9, 40, 75]), min_size=1, max_size=4), k=st.integers(1, 9),
       density=st.floats(0.05, 0.6), normalized=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_layouts(sizes, k, density, normalized, seed):
    """Random ragged layouts through the Krylov path (a small basis makes 40/75-node blocks Krylov items)."""
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr(sizes)
    L = laplacian_of(random_adjacency(rng, ptr, density), ptr, normalized=normalized)
    torch.manual_seed(seed)
    basis = sk.lowest_eigenpairs(L, k, backend="lanczos", ncv=k + 8)
    check_basis(basis, dense_of(L), ptr, k, torch.float64)


def test_refill_keeps_padding_zero_and_rows_orthonormal(seed):
    """orthonormalize on a block with dependent rows and a basis that spans almost everything."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 1, 12, dtype=torch.float64)
    mask[1, :, 9:] = 0
    basis = torch.linalg.qr(torch.randn(2, 12, 7, dtype=torch.float64, generator=gen) * mask.mT).Q.mT * mask
    x = torch.randn(2, 1, 12, dtype=torch.float64, generator=gen).expand(2, 2, 12) * mask  # two equal rows
    q = _lanczos.orthonormalize(x.contiguous(), basis, mask, gen)
    assert torch.all(q[1, :, 9:] == 0)
    torch.testing.assert_close(q @ q.mT, torch.eye(2, dtype=torch.float64).expand(2, 2, 2), rtol=0, atol=1e-12)
    assert float((q @ basis.mT).abs().max()) < 1e-12


@pytest.mark.parametrize("lost_rows", [[1], [0, 1], [0, 2]])
def test_refill_of_lost_rows_keeps_the_span_of_the_other_rows(seed, lost_rows):
    """Zero rows, or rows that repeat an earlier one, among the rows to orthonormalise are refilled at random; the
    other rows' span must survive. (Past a zero row, Householder's Q row is arbitrary: measuring later rows
    against it flagged genuine rows as dependent, and swapping Q rows dropped part of later rows' span — the old
    vectors of a warm start whose first columns belonged to isolated nodes were lost.)"""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 1, 40, dtype=torch.float64)
    # orthonormal rows, like an old basis (random rows may legitimately lose half their norm to earlier rows)
    x = torch.linalg.qr(torch.randn(2, 40, 6, dtype=torch.float64, generator=gen)).Q.mT.contiguous()
    x[0, lost_rows] = 0                                      # item 0: zero rows
    x[1, lost_rows] = x[1, 5].clone()                        # item 1: copies of its last row
    q = _lanczos.orthonormalize(x, x.new_zeros(2, 0, 40), mask, gen)
    torch.testing.assert_close(q @ q.mT, torch.eye(6, dtype=torch.float64).expand(2, 6, 6), rtol=0, atol=1e-12)
    kept = x[:, [i for i in range(6) if i not in lost_rows]]
    outside = kept - (kept @ q.mT) @ q                       # the part of each kept row outside span(q)
    assert float(outside.abs().max()) < 1e-12


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_reference(seed, dtype):
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr([0, 1, 300, 90, 70, 3, 257])
    L = laplacian_of(random_adjacency(rng, ptr, 0.1), ptr, dtype=dtype)
    for backend in ("lanczos", "auto", "dense"):
        basis = sk.lowest_eigenpairs(L.to("cuda"), 6, backend=backend)
        assert basis.device.type == "cuda"
        cpu = sk.SpectralBasis(basis.U.cpu(), basis.eigenvalues.cpu(), basis.block_ptr, info=basis.info)
        check_basis(cpu, dense_of(L), ptr, 6, dtype)


@pytest.mark.gpu
def test_cuda_warm_start_and_device_mismatch(seed):
    graphs = drifting_graph(seed, steps=1)
    old = sk.lowest_eigenpairs(graphs[0].laplacian().to("cuda"), 8, tol=1e-8)
    L = graphs[1].laplacian()
    with pytest.raises(ValueError, match="v0 is on cuda:0 but L is on cpu"):
        sk.lowest_eigenpairs(L, 8, v0=old)
    warm = sk.lowest_eigenpairs(L.to("cuda"), 8, tol=1e-8, v0=old)
    cold = sk.lowest_eigenpairs(L.to("cuda"), 8, tol=1e-8)
    assert 2 * int(warm.info.matvecs.sum()) <= int(cold.info.matvecs.sum())
