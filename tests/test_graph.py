"""ParameterGraph and GraphLaplacian against float64 references (scipy.sparse.csgraph.laplacian, dense numpy).

Every test draws fresh inputs from a seed: the ``seed`` fixture (conftest.py) or a hypothesis-drawn integer, so a
failure prints what is needed to replay it.
"""
from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.csgraph import laplacian as scipy_laplacian

from spectralkern import GraphLaplacian, ParameterGraph

SETTINGS = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------------------------------------- helpers
def sizes_to_ptr(sizes: list[int]) -> list[int]:
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()


def random_adjacency(rng: np.random.Generator, n: int, density: float, *, block_ptr=None,
                     cross_density: float = 0.0, isolated: float = 0.2) -> np.ndarray:
    """Symmetric, non-negative, zero-diagonal float64 adjacency; edges inside blocks with ``density``, between
    blocks with ``cross_density``; about ``isolated`` of the nodes lose every edge."""
    if block_ptr is None:
        block_ptr = [0, n]
    block = np.zeros(n, dtype=np.int64)
    for b in range(len(block_ptr) - 1):
        block[block_ptr[b]:block_ptr[b + 1]] = b
    same = block[:, None] == block[None, :]
    prob = np.where(same, density, cross_density)
    upper = np.triu((rng.random((n, n)) < prob) * rng.uniform(0.1, 3.0, (n, n)), 1)
    dead = rng.random(n) < isolated
    upper[dead, :] = 0
    upper[:, dead] = 0
    return upper + upper.T


def reference_laplacian(adjacency, normalized: bool) -> np.ndarray:
    dense = adjacency.toarray() if scipy.sparse.issparse(adjacency) else np.asarray(adjacency, dtype=np.float64)
    return np.asarray(scipy_laplacian(dense.astype(np.float64), normed=normalized))


def edge_set(g: ParameterGraph) -> set[tuple[int, int]]:
    return set(zip(g.row.tolist(), g.col.tolist()))


def dtype_tol(dtype: torch.dtype) -> float:
    return {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]


@st.composite
def block_layouts(draw, max_blocks: int = 4, max_size: int = 7) -> list[int]:
    """Ragged block sizes, including empty blocks and blocks of one node."""
    return draw(st.lists(st.integers(0, max_size), min_size=1, max_size=max_blocks))


seeds = st.integers(0, 2**31 - 1)


# --------------------------------------------------------------------------------- Laplacian vs scipy
@SETTINGS
@given(sizes=block_layouts(), density=st.floats(0.0, 1.0), cross=st.sampled_from([0.0, 0.3]),
       normalized=st.booleans(), seed=seeds)
def test_laplacian_matches_scipy_on_random_graphs(sizes, density, cross, normalized, seed):
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr(sizes)
    n = ptr[-1]
    W = random_adjacency(rng, n, density, block_ptr=ptr, cross_density=cross)
    ref = reference_laplacian(W, normalized)
    for g in (ParameterGraph.from_scipy(scipy.sparse.csr_array(W), block_ptr=ptr),
              ParameterGraph.from_dense(torch.from_numpy(W), block_ptr=ptr)):
        assert g.dtype == torch.float64
        L = g.laplacian(normalized=normalized)
        assert isinstance(L, GraphLaplacian) and L.normalized == normalized
        assert L.matrix.layout == torch.sparse_csr
        np.testing.assert_allclose(L.to_dense().numpy(), ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(L.to_scipy().toarray(), ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(L.diagonal().numpy(), np.diag(ref), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(g.to_dense().numpy(), W)
        np.testing.assert_array_equal(g.to_scipy().toarray(), W)
        np.testing.assert_allclose(g.degrees().numpy(), W.sum(1), rtol=1e-12, atol=0)
        assert g.has_cross_block_edges == L.has_cross_block_edges
        block = np.repeat(np.arange(len(sizes)), sizes)
        assert g.has_cross_block_edges == bool((W[block[:, None] != block[None, :]] > 0).any())
    # float32 storage: the same Laplacian to float32 accuracy
    L32 = ParameterGraph.from_scipy(scipy.sparse.csr_array(W), block_ptr=ptr, dtype=torch.float32).laplacian(normalized)
    assert L32.dtype == torch.float32
    np.testing.assert_allclose(L32.to_dense().double().numpy(), ref, rtol=0, atol=1e-5 * max(1.0, np.max(np.abs(ref), initial=0.0)))


def _with_isolated_nodes() -> nx.Graph:
    G = nx.cycle_graph(5)
    G.add_nodes_from([5, 6, 7])  # three isolated nodes
    G.add_edge(8, 9, weight=2.5)
    return G


def _disconnected() -> nx.Graph:
    G = nx.disjoint_union(nx.path_graph(4), nx.complete_graph(3))
    G = nx.disjoint_union(G, nx.star_graph(3))
    G.add_node(100)
    return G


def _with_self_loops() -> nx.Graph:
    G = nx.path_graph(5)
    G.add_edge(2, 2, weight=7.0)  # scipy ignores the diagonal, and so must we
    G.add_edge(4, 4)
    return G


NETWORKX_GRAPHS = {
    "karate_club(weighted)": nx.karate_club_graph,
    "les_miserables(weighted)": nx.les_miserables_graph,
    "petersen": nx.petersen_graph,
    "florentine_families": nx.florentine_families_graph,
    "davis_southern_women(bipartite)": nx.davis_southern_women_graph,
    "isolated_nodes": _with_isolated_nodes,
    "disconnected": _disconnected,
    "self_loops": _with_self_loops,
    "empty_graph_5": lambda: nx.empty_graph(5),
}


@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "combinatorial"])
@pytest.mark.parametrize("name", list(NETWORKX_GRAPHS))
def test_laplacian_matches_scipy_on_networkx_graphs(name, normalized):
    G = NETWORKX_GRAPHS[name]()
    A = nx.to_scipy_sparse_array(G, weight="weight", dtype=np.float64, format="csr")
    ref = reference_laplacian(A, normalized)
    for matrix in (A, scipy.sparse.csr_matrix(A), A.toarray()):  # sparray, spmatrix, ndarray
        g = ParameterGraph.from_scipy(matrix)
        L = g.laplacian(normalized=normalized)
        np.testing.assert_allclose(L.to_dense().numpy(), ref, rtol=0, atol=1e-12)
    # the adjacency without its diagonal, and the edge count of the simple graph
    no_loops = A.toarray()
    np.fill_diagonal(no_loops, 0.0)
    np.testing.assert_array_equal(g.to_dense().numpy(), no_loops)
    assert g.num_edges == G.number_of_edges() - nx.number_of_selfloops(G)
    if name.endswith("(weighted)"):
        assert len(set(g.weight.tolist())) > 1, "the weighted graph lost its weights"


def test_normalized_laplacian_spectrum_in_0_2(seed):
    rng = np.random.default_rng(seed)
    W = random_adjacency(rng, 30, 0.3, isolated=0.1)
    L = ParameterGraph.from_dense(torch.from_numpy(W)).laplacian()
    eig = np.linalg.eigvalsh(L.to_dense().numpy())
    assert eig.min() > -1e-12 and eig.max() <= 2.0 + 1e-12
    assert L.spectrum_bound() == 2.0


@SETTINGS
@given(n=st.integers(1, 12), density=st.floats(0.0, 1.0), seed=seeds)
def test_combinatorial_spectrum_bound(n, density, seed):
    W = random_adjacency(np.random.default_rng(seed), n, density)
    L = ParameterGraph.from_dense(torch.from_numpy(W)).laplacian(normalized=False)
    eig = np.linalg.eigvalsh(L.to_dense().numpy())
    assert eig.max() <= L.spectrum_bound() + 1e-9


# ------------------------------------------------------------------------------------------- L @ X
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("l_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "combinatorial"])
def test_laplacian_matmul_matches_dense(seed, x_dtype, l_dtype, normalized):
    rng = np.random.default_rng(seed)
    ptr = [0, 5, 5, 6, 14, 20]
    W = random_adjacency(rng, 20, 0.5, block_ptr=ptr, cross_density=0.1)
    L = ParameterGraph.from_scipy(W, block_ptr=ptr, dtype=l_dtype).laplacian(normalized)
    dense = torch.from_numpy(reference_laplacian(W, normalized))
    tol = max(dtype_tol(x_dtype), dtype_tol(l_dtype)) * (1.0 if normalized else 10.0)
    x2 = torch.randn(20, 7, dtype=torch.float64)
    cases = {
        "2-D": x2,
        "1-D": x2[:, 0].clone(),
        "non-contiguous": x2.T.contiguous().T,
        "strided columns": x2[:, ::3],
        "d=1": x2[:, :1],
    }
    for label, x64 in cases.items():
        x = x64.to(x_dtype)
        y = L @ x
        assert y.dtype == x_dtype and y.shape == x.shape, label
        ref = dense @ x.double()  # reference on the rounded input, so only the product is judged
        scale = max(1.0, float(ref.abs().max()))
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol * scale, msg=lambda m: f"{label}: {m}")
    assert (L @ torch.randn(20, 0)).shape == (20, 0)


def test_matmul_on_empty_graph():
    L = ParameterGraph.chain(0).laplacian()
    assert (L @ torch.randn(0, 3)).shape == (0, 3)
    assert (L @ torch.randn(0)).shape == (0,)


# ----------------------------------------------------------------------------------------- chain
@SETTINGS
@given(sizes=block_layouts(max_blocks=5, max_size=5), link=st.booleans(), w=st.floats(0.01, 100.0))
def test_chain_structure(sizes, link, w):
    ptr = sizes_to_ptr(sizes)
    n = ptr[-1]
    g = ParameterGraph.chain(n, block_ptr=ptr, weight=w, link_blocks=link, dtype=torch.float64)
    block = np.repeat(np.arange(len(sizes)), sizes)
    expected = {(i, i + 1) for i in range(n - 1) if link or block[i] == block[i + 1]}
    expected |= {(j, i) for i, j in expected}
    assert edge_set(g) == expected
    assert torch.all(g.weight == w)
    assert g.has_cross_block_edges == (link and any(block[i] != block[i + 1] for i in range(n - 1)))
    assert torch.equal(g.block_ptr, torch.tensor(ptr))
    W = np.zeros((n, n))
    for i, j in expected:
        W[i, j] = w
    for normalized in (True, False):
        np.testing.assert_allclose(g.laplacian(normalized).to_dense().numpy(), reference_laplacian(W, normalized),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [0, 1])
def test_chain_with_zero_or_one_node(n):
    g = ParameterGraph.chain(n)
    assert g.num_nodes == n and g.num_edges == 0 and g.num_blocks == 1
    assert g.block_ptr.tolist() == [0, n]
    assert not g.has_cross_block_edges
    for normalized in (True, False):
        L = g.laplacian(normalized)
        assert L.to_dense().shape == (n, n) and torch.all(L.to_dense() == 0)
        assert L.diagonal_blocks().shape == (1, n, n)
    assert ParameterGraph.chain(n, block_size=4).block_ptr.tolist() == [0, n]
    repr(g), repr(g.laplacian())


def test_chain_block_size_and_link():
    g = ParameterGraph.chain(10, block_size=4)
    assert g.block_ptr.tolist() == [0, 4, 8, 10]
    assert (3, 4) not in edge_set(g) and (7, 8) not in edge_set(g)
    linked = ParameterGraph.chain(10, block_size=4, link_blocks=True)
    assert linked.num_edges == 9 and linked.has_cross_block_edges and not g.has_cross_block_edges


# ------------------------------------------------------------------------------------------- knn
def reference_knn(weight: np.ndarray, k: int, ptr: list[int]) -> dict[tuple[int, int], float]:
    """Brute-force float64 cosine kNN inside blocks, symmetrised with the larger weight."""
    norms = np.linalg.norm(weight, axis=1, keepdims=True)
    unit = np.divide(weight, norms, out=np.zeros_like(weight), where=norms > 0)
    edges: dict[tuple[int, int], float] = {}
    for start, stop in zip(ptr[:-1], ptr[1:]):
        kk = min(k, stop - start - 1)
        if kk <= 0:
            continue
        sim = unit[start:stop] @ unit[start:stop].T
        np.fill_diagonal(sim, -np.inf)
        for i in range(stop - start):
            order = np.argsort(-sim[i], kind="stable")[:kk]
            for j in order:
                if sim[i, j] > 0:
                    a, b = start + i, start + int(j)
                    w = min(float(sim[i, j]), 1.0)
                    for key in ((a, b), (b, a)):
                        edges[key] = max(edges.get(key, 0.0), w)
    return edges


def _knn_checks(g: ParameterGraph, weight: np.ndarray, k: int, ptr: list[int]) -> None:
    n = weight.shape[0]
    row, col, w = g.row.numpy(), g.col.numpy(), g.weight.double().numpy()
    # symmetric, no self-loops, weights in (0, 1], sorted by (row, col), inside blocks only
    assert not np.any(row == col)
    assert np.all(w > 0) and np.all(w <= 1)
    W = g.to_dense().double().numpy()
    np.testing.assert_array_equal(W, W.T)
    keys = row * n + col
    assert np.all(np.diff(keys) > 0)
    assert not g.has_cross_block_edges
    block = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    assert np.all(block[row] == block[col])
    # every node keeps at least min(k, n_b - 1) neighbours among those with cosine > 0
    norms = np.linalg.norm(weight, axis=1, keepdims=True)
    unit = np.divide(weight, norms, out=np.zeros_like(weight), where=norms > 0)
    degree = np.bincount(row, minlength=n)
    for start, stop in zip(ptr[:-1], ptr[1:]):
        sim = unit[start:stop] @ unit[start:stop].T
        np.fill_diagonal(sim, 0.0)
        positive = (sim > 1e-5).sum(1)
        kk = max(min(k, stop - start - 1), 0)
        assert np.all(degree[start:stop] >= np.minimum(kk, positive))
        zero_rows = norms[start:stop, 0] == 0
        assert np.all(degree[start:stop][zero_rows] == 0)


@SETTINGS
@given(sizes=block_layouts(max_blocks=4, max_size=9), d=st.integers(1, 6), k=st.integers(1, 10),
       zero_rows=st.booleans(), seed=seeds)
def test_knn_matches_reference(sizes, d, k, zero_rows, seed):
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr(sizes)
    n = ptr[-1]
    weight = rng.standard_normal((n, d))
    if zero_rows and n:
        weight[rng.random(n) < 0.3] = 0.0
    g = ParameterGraph.knn(torch.from_numpy(weight), k=k, block_ptr=ptr)
    assert g.dtype == torch.float64 and g.num_nodes == n
    _knn_checks(g, weight, k, ptr)
    ref = reference_knn(weight, k, ptr)
    got = dict(zip(zip(g.row.tolist(), g.col.tolist()), g.weight.tolist()))
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-12)


def test_knn_is_deterministic_and_breaks_ties_by_index(seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((6, 4))
    weight = torch.from_numpy(np.concatenate([base, base, base]))  # every row has two exact duplicates
    first = ParameterGraph.knn(weight, k=2, block_size=9)
    for _ in range(3):
        again = ParameterGraph.knn(weight.clone(), k=2, block_size=9)
        assert torch.equal(first.row, again.row) and torch.equal(first.col, again.col)
        assert torch.equal(first.weight, again.weight)
    # exact ties (cos = 1 to nodes 1 and 2, computed without rounding): the lower index wins
    exact = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    g = ParameterGraph.knn(exact, k=1)
    assert edge_set(g) == {(0, 1), (1, 0), (0, 2), (2, 0)}  # 0 -> 1, 1 -> 0, 2 -> 0; node 3 has cos 0 only
    assert torch.all(g.weight == 1.0)


def test_knn_is_scale_invariant(seed):
    weight = torch.randn(20, 5, dtype=torch.float64)
    scale = torch.rand(20, 1, dtype=torch.float64) * 10 + 0.1
    a = ParameterGraph.knn(weight, k=3, block_size=7)
    b = ParameterGraph.knn(weight * scale, k=3, block_size=7)
    assert edge_set(a) == edge_set(b)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_knn_low_precision_weights(seed, dtype):
    weight = torch.randn(40, 16).to(dtype)
    g = ParameterGraph.knn(weight, k=5, block_size=16)
    assert g.dtype == torch.float32
    # computed in float32 from the rounded rows: identical to knn of the upcast tensor
    ref = ParameterGraph.knn(weight.float(), k=5, block_size=16)
    assert torch.equal(g.row, ref.row) and torch.equal(g.col, ref.col) and torch.equal(g.weight, ref.weight)
    _knn_checks(g, weight.double().numpy(), 5, g.block_ptr.tolist())


def test_knn_degenerate_inputs():
    g = ParameterGraph.knn(torch.zeros(5, 3), k=2)
    assert g.num_edges == 0 and g.num_nodes == 5
    g = ParameterGraph.knn(torch.randn(0, 3), k=2)
    assert g.num_nodes == 0 and g.num_edges == 0
    g = ParameterGraph.knn(torch.randn(4, 3), k=3, block_size=1)  # n_b = 1: no neighbour possible
    assert g.num_edges == 0 and g.num_blocks == 4
    # opposite vectors have cos = -1: no edge
    g = ParameterGraph.knn(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), k=1)
    assert g.num_edges == 0
    L = g.laplacian()
    assert torch.all(L.to_dense() == 0)


# ----------------------------------------------------------------------------------- conversions
def test_graph_to_dtype_and_laplacian_to_dtype(seed):
    W = random_adjacency(np.random.default_rng(seed), 12, 0.5)
    g = ParameterGraph.from_dense(torch.from_numpy(W).float(), block_ptr=[0, 4, 12])
    g64 = g.to(dtype=torch.float64)
    assert g64.dtype == torch.float64 and g.dtype == torch.float32
    assert torch.equal(g64.row, g.row) and torch.equal(g64.block_ptr, g.block_ptr)
    assert g.to("cpu").dtype == torch.float32
    L = g.laplacian(normalized=False)
    for dtype in (torch.float64, torch.float32):
        Ld = L.to(dtype=dtype)
        assert Ld.dtype == dtype and Ld.matrix.layout == torch.sparse_csr
        assert Ld.normalized == L.normalized and torch.equal(Ld.block_ptr, L.block_ptr)
        torch.testing.assert_close(Ld.to_dense(), L.to_dense().to(dtype))
        x = torch.randn(12, 3, dtype=dtype)
        torch.testing.assert_close(Ld @ x, (L.to_dense().double() @ x.double()).to(dtype), rtol=1e-5, atol=1e-5)
    assert L.to("cpu").matrix.layout == torch.sparse_csr


@SETTINGS
@given(sizes=block_layouts(max_blocks=5, max_size=5), cross=st.sampled_from([0.0, 0.5]),
       pad=st.sampled_from([0.0, 3.5]), seed=seeds)
def test_diagonal_blocks(sizes, cross, pad, seed):
    ptr = sizes_to_ptr(sizes)
    W = random_adjacency(np.random.default_rng(seed), ptr[-1], 0.6, block_ptr=ptr, cross_density=cross)
    L = ParameterGraph.from_dense(torch.from_numpy(W), block_ptr=ptr).laplacian(normalized=False)
    blocks = L.diagonal_blocks(pad_value=pad)
    n_max = max(sizes)
    assert blocks.shape == (len(sizes), n_max, n_max)
    dense = L.to_dense()
    for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
        n_b = stop - start
        expected = torch.diag(torch.full((n_max,), pad, dtype=torch.float64))
        expected[:n_b, :n_b] = dense[start:stop, start:stop]
        assert torch.equal(blocks[b], expected)


def test_diagonal_blocks_all_empty():
    L = ParameterGraph.chain(0, block_ptr=[0, 0, 0, 0]).laplacian()
    assert L.num_blocks == 3
    assert L.diagonal_blocks(pad_value=1.0).shape == (3, 0, 0)


def test_from_scipy_nearly_symmetric_and_duplicates():
    W = np.array([[0.0, 1.0, 0.0], [1.0 + 1e-9, 0.0, 2.0], [0.0, 2.0, 0.0]])
    g = ParameterGraph.from_scipy(W)  # within tolerance: symmetrised with the larger weight
    assert g.to_dense()[0, 1] == g.to_dense()[1, 0] == 1.0 + 1e-9
    # duplicate COO entries are summed, as scipy does
    coo = scipy.sparse.coo_array(([0.5, 0.5, 1.0], ([0, 0, 1], [1, 1, 0])), shape=(2, 2))
    assert ParameterGraph.from_scipy(coo).to_dense()[0, 1] == 1.0
    g = ParameterGraph.from_scipy(np.array([[0, 1], [1, 0]], dtype=np.int8))
    assert g.dtype == torch.float32 and g.num_edges == 1


# ----------------------------------------------------------------------------------- bad inputs
BAD_BLOCK_PTR = [
    ([1, 3, 6], ValueError, r"block_ptr must start at 0 and end at the number of nodes \(6\).*first=1"),
    ([0, 3, 5], ValueError, r"block_ptr must start at 0 and end at the number of nodes \(6\).*last=5"),
    ([0, 4, 2, 6], ValueError, r"block_ptr must be non-decreasing; block 1 has offsets 4 > 2"),
    ([0], ValueError, r"block_ptr must hold at least 2 offsets"),
    ([0, 2.5, 6], TypeError, r"block_ptr must hold integers, got 2\.5 at position 1"),
    ([0, True, 6], TypeError, r"block_ptr must hold integers, got True"),
    (torch.tensor([0.0, 6.0]), TypeError, r"block_ptr must be an integer tensor, got torch\.float32"),
    (torch.tensor([[0, 6]]), ValueError, r"block_ptr must be 1-D, got shape \(1, 2\)"),
    (np.array([0, 6]), TypeError, r"block_ptr must be a torch\.Tensor, got ndarray"),
]


@pytest.mark.parametrize("ptr, exc, match", BAD_BLOCK_PTR, ids=[str(i) for i in range(len(BAD_BLOCK_PTR))])
def test_bad_block_ptr(ptr, exc, match):
    with pytest.raises(exc, match=match):
        ParameterGraph.chain(6, block_ptr=ptr)
    with pytest.raises(exc, match=match):
        ParameterGraph.knn(torch.randn(6, 3), k=2, block_ptr=ptr)
    with pytest.raises(exc, match=match):
        ParameterGraph.from_dense(torch.zeros(6, 6), block_ptr=ptr)
    with pytest.raises(exc, match=match):
        ParameterGraph.from_scipy(np.zeros((6, 6)), block_ptr=ptr)


def test_block_ptr_accepts_tensors_and_numpy_ints():
    assert ParameterGraph.chain(6, block_ptr=torch.tensor([0, 2, 6], dtype=torch.int32)).block_ptr.dtype == torch.int64
    assert ParameterGraph.chain(6, block_ptr=[0, np.int64(2), 6]).block_ptr.tolist() == [0, 2, 6]
    with pytest.raises(ValueError, match="block_size or block_ptr, not both"):
        ParameterGraph.chain(6, block_size=2, block_ptr=[0, 6])
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        ParameterGraph.knn(torch.randn(6, 3), block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int, got float"):
        ParameterGraph.chain(6, block_size=2.0)


@pytest.mark.parametrize("weight, exc, match", [
    ([[1.0, 2.0]], TypeError, r"weight must be a torch\.Tensor, got list"),
    (torch.randn(6), ValueError, r"weight must be 2-D, got shape \(6,\)"),
    (torch.randn(2, 3, 4), ValueError, r"weight must be 2-D, got shape \(2, 3, 4\)"),
    (torch.ones(6, 3, dtype=torch.int64), TypeError, r"weight must have dtype in \(.*\), got int64"),
    (torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), ValueError, r"weight contains 1 NaN/Inf value\(s\)"),
    (torch.tensor([[1.0, float("inf")], [-float("inf"), 2.0]]).half(), ValueError,
     r"weight contains 2 NaN/Inf value\(s\)"),
])
def test_knn_bad_weight(weight, exc, match):
    with pytest.raises(exc, match=match):
        ParameterGraph.knn(weight, k=2)


@pytest.mark.parametrize("k, exc, match", [
    (0, ValueError, "k must be positive, got 0"),
    (-3, ValueError, "k must be positive, got -3"),
    (2.0, TypeError, "k must be an int, got float"),
    (True, TypeError, "k must be an int, got bool"),
])
def test_knn_bad_k(k, exc, match):
    with pytest.raises(exc, match=match):
        ParameterGraph.knn(torch.randn(6, 3), k=k)


def test_from_dense_bad_inputs():
    with pytest.raises(ValueError, match=r"adjacency must be square, got shape \(3, 4\)"):
        ParameterGraph.from_dense(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"adjacency must be 2-D, got shape \(3,\)"):
        ParameterGraph.from_dense(torch.zeros(3))
    with pytest.raises(TypeError, match=r"adjacency must have dtype in \(float32, float64\), got float16"):
        ParameterGraph.from_dense(torch.zeros(3, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"adjacency must be a torch\.Tensor, got ndarray"):
        ParameterGraph.from_dense(np.zeros((3, 3)))
    bad = torch.tensor([[0.0, -1.0], [-1.0, 0.0]])
    with pytest.raises(ValueError, match=r"adjacency must be non-negative .* smallest entry is -1\.0"):
        ParameterGraph.from_dense(bad)
    with pytest.raises(ValueError, match=r"adjacency contains 2 NaN/Inf"):
        ParameterGraph.from_dense(torch.tensor([[0.0, float("nan")], [float("nan"), 0.0]]))
    asym = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"adjacency must be symmetric; adjacency\[0, 1\] = 1\.0 but "
                                         r"adjacency\[1, 0\] = 0\.5"):
        ParameterGraph.from_dense(asym)
    asym = torch.tensor([[0.0, 1.0], [1.0 + 1e-3, 0.0]])
    with pytest.raises(ValueError, match="adjacency must be symmetric"):
        ParameterGraph.from_dense(asym)


@pytest.mark.parametrize("kind", ["csr_array", "csr_matrix", "coo_matrix", "lil_matrix", "ndarray"])
def test_from_scipy_asymmetric_message(kind):
    dense = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 2.0, 0.0]])
    matrix = dense if kind == "ndarray" else getattr(scipy.sparse, kind)(dense)
    with pytest.raises(ValueError, match=r"^matrix must be symmetric; matrix\[0, 1\] = 1\.0 but "
                                         r"matrix\[1, 0\] = 0\.0$"):
        ParameterGraph.from_scipy(matrix)


def test_from_scipy_bad_inputs():
    with pytest.raises(ValueError, match=r"matrix must be square, got shape \(2, 3\)"):
        ParameterGraph.from_scipy(scipy.sparse.csr_matrix(np.ones((2, 3))))
    with pytest.raises(ValueError, match=r"matrix must be non-negative .* smallest entry is -2\.0"):
        ParameterGraph.from_scipy(scipy.sparse.csr_array(np.array([[0.0, -2.0], [-2.0, 0.0]])))
    with pytest.raises(ValueError, match=r"matrix contains 2 NaN/Inf"):
        ParameterGraph.from_scipy(np.array([[0.0, np.inf], [np.inf, 0.0]]))
    with pytest.raises(TypeError, match=r"matrix must be a scipy sparse matrix/array or numpy array, got list"):
        ParameterGraph.from_scipy([[0, 1], [1, 0]])
    with pytest.raises(TypeError, match=r"matrix must be a scipy sparse matrix/array or numpy array, got Tensor"):
        ParameterGraph.from_scipy(torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"matrix must have a real .* dtype, got complex128"):
        ParameterGraph.from_scipy(np.array([[0, 1 + 1j], [1 - 1j, 0]]))
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got torch\.float16"):
        ParameterGraph.from_scipy(np.zeros((2, 2)), dtype=torch.float16)


def test_chain_bad_inputs():
    with pytest.raises(ValueError, match=r"num_nodes must be a non-negative int, got -1"):
        ParameterGraph.chain(-1)
    with pytest.raises(ValueError, match=r"num_nodes must be a non-negative int, got 3\.0"):
        ParameterGraph.chain(3.0)
    for w in (0.0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="weight must be a positive finite number"):
            ParameterGraph.chain(3, weight=w)
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got torch\.bfloat16"):
        ParameterGraph.chain(3, dtype=torch.bfloat16)


def test_conversion_and_matmul_bad_inputs():
    g = ParameterGraph.chain(5)
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got torch\.float16"):
        g.to(dtype=torch.float16)
    L = g.laplacian()
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got torch\.int64"):
        L.to(dtype=torch.int64)
    with pytest.raises(ValueError, match=r"x must have 5 rows \(the Laplacian has 5 nodes\), got shape \(4, 2\)"):
        L @ torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"x must be 1-D or 2-D, got shape \(5, 2, 1\)"):
        L @ torch.randn(5, 2, 1)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got torch\.int64"):
        L @ torch.ones(5, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got ndarray"):
        L.matmul(np.ones(5))
    with pytest.raises(ValueError, match=r"x is on meta but the Laplacian is on cpu"):
        L @ torch.empty(5, 2, device="meta")


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_graph_and_matmul(seed, x_dtype):
    rng = np.random.default_rng(seed)
    ptr = [0, 7, 7, 8, 30]
    W = random_adjacency(rng, 30, 0.4, block_ptr=ptr, cross_density=0.05)
    g = ParameterGraph.from_scipy(W, block_ptr=ptr)
    gc = g.to("cuda")
    assert gc.device.type == "cuda" and gc.block_ptr.device.type == "cpu"
    assert gc.has_cross_block_edges == g.has_cross_block_edges
    for normalized in (True, False):
        Lc = gc.laplacian(normalized)
        assert Lc.device.type == "cuda" and Lc.matrix.layout == torch.sparse_csr
        ref = torch.from_numpy(reference_laplacian(W, normalized))
        torch.testing.assert_close(Lc.to_dense().cpu(), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(g.laplacian(normalized).to("cuda").to_dense().cpu(), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(Lc.diagonal_blocks().cpu(), g.laplacian(normalized).diagonal_blocks())
        for shape in ((30, 5), (30,)):
            x = torch.randn(shape, device="cuda").to(x_dtype)
            y = Lc @ x
            assert y.dtype == x_dtype and y.device == x.device
            expected = ref @ x.double().cpu()
            torch.testing.assert_close(y.double().cpu(), expected, rtol=0,
                                       atol=dtype_tol(x_dtype) * 10 * max(1.0, float(expected.abs().max())))
        with pytest.raises(ValueError, match=r"x is on cpu but the Laplacian is on cuda"):
            Lc @ torch.randn(30, 2)
    # knn on the GPU: same graph as on the CPU, on the GPU
    weight = torch.randn(40, 8, dtype=torch.float64)
    cpu = ParameterGraph.knn(weight, k=4, block_size=16)
    gpu = ParameterGraph.knn(weight.cuda(), k=4, block_size=16)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.row.cpu(), cpu.row) and torch.equal(gpu.col.cpu(), cpu.col)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight)
    chain = ParameterGraph.chain(9, block_size=4, device="cuda")
    assert chain.device.type == "cuda" and chain.laplacian().device.type == "cuda"
