"""SpectralBasis against float64 references: eigenvalues (numpy eigvalsh / scipy eigsh), residuals,
orthonormality and projectors U_b U_bᵀ, never raw eigenvectors (they are unique only up to sign and rotation)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.csgraph import laplacian as scipy_laplacian

from spectralkern import GraphLaplacian, ParameterGraph, SpectralBasis

SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**31 - 1)

# Projectors are compared only where the k_b-th and (k_b+1)-th eigenvalues are at least this far apart:
# below it the reference subspace itself is ill-defined (Davis–Kahan: error ~ eps·‖L‖ / gap).
GAP = 1e-6


def sizes_to_ptr(sizes: list[int]) -> list[int]:
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()


def random_block_adjacency(rng: np.random.Generator, ptr: list[int], density: float, *, cross: float = 0.0,
                           isolated: float = 0.15) -> np.ndarray:
    n = ptr[-1]
    block = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    prob = np.where(block[:, None] == block[None, :], density, cross)
    upper = np.triu((rng.random((n, n)) < prob) * rng.uniform(0.1, 3.0, (n, n)), 1)
    dead = rng.random(n) < isolated
    upper[dead, :] = 0
    upper[:, dead] = 0
    return upper + upper.T


def check_basis(basis: SpectralBasis, L_ref: np.ndarray, ptr: list[int], k: int) -> None:
    """The full contract of a basis against the float64 Laplacian L_ref, block by block. Tolerances follow
    from the basis dtype's machine epsilon: eigenvalues and residuals ~ eps·‖L‖, orthonormality ~ eps,
    projectors ~ eps·‖L‖ / gap (Davis–Kahan)."""
    eps = 100 * torch.finfo(basis.dtype).eps
    num_blocks = len(ptr) - 1
    n = ptr[-1]
    U = basis.U.double().numpy()
    ev = basis.eigenvalues.double().numpy()
    assert U.shape == (n, k) and ev.shape == (num_blocks, k)
    assert basis.block_ptr.tolist() == ptr and basis.block_ptr.dtype == torch.int64
    assert basis.block_k.tolist() == [min(k, s) for s in np.diff(ptr)]
    for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
        n_b = stop - start
        k_b = min(k, n_b)
        # unused columns exactly zero, padded eigenvalues exactly zero
        assert np.all(U[start:stop, k_b:] == 0), f"block {b}: columns >= k_b are not zero"
        assert np.all(ev[b, k_b:] == 0), f"block {b}: padded eigenvalues are not zero"
        if n_b == 0:
            continue
        L_b = L_ref[start:stop, start:stop]
        scale = max(1.0, float(np.abs(L_b).max()))
        ref_values, ref_vectors = np.linalg.eigh(L_b)
        U_b, lam = U[start:stop, :k_b], ev[b, :k_b]
        assert np.all(np.diff(lam) >= -eps * scale), f"block {b}: eigenvalues not ascending: {lam}"
        np.testing.assert_allclose(lam, ref_values[:k_b], rtol=0, atol=eps * scale, err_msg=f"block {b}")
        residual = np.linalg.norm(L_b @ U_b - U_b * lam, axis=0)
        assert residual.max() <= eps * scale, f"block {b}: residuals {residual}"
        np.testing.assert_allclose(U_b.T @ U_b, np.eye(k_b), rtol=0, atol=eps, err_msg=f"block {b}: U_bᵀU_b")
        # projector onto the k_b lowest frequencies: defined only when λ_{k_b} < λ_{k_b+1}
        gap = ref_values[k_b] - ref_values[k_b - 1] if k_b < n_b else np.inf
        if gap > GAP * scale:
            P_ref = ref_vectors[:, :k_b] @ ref_vectors[:, :k_b].T
            np.testing.assert_allclose(U_b @ U_b.T, P_ref, rtol=0, atol=eps * max(1.0, scale / gap),
                                       err_msg=f"block {b}: projector")


# ------------------------------------------------------------------------------ exact dense basis
@SETTINGS
@given(sizes=st.lists(st.integers(0, 8), min_size=1, max_size=4), k=st.integers(1, 10),
       density=st.floats(0.0, 1.0), normalized=st.booleans(), seed=seeds)
def test_block_basis_matches_reference(sizes, k, density, normalized, seed):
    ptr = sizes_to_ptr(sizes)
    W = random_block_adjacency(np.random.default_rng(seed), ptr, density)
    L = ParameterGraph.from_dense(torch.from_numpy(W), block_ptr=ptr).laplacian(normalized)
    assert not L.has_cross_block_edges
    basis = SpectralBasis.from_laplacian(L, k)
    assert basis.dtype == torch.float64 and basis.num_blocks == len(sizes) and basis.k == k
    check_basis(basis, np.asarray(scipy_laplacian(W, normed=normalized)), ptr, k)


@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "combinatorial"])
def test_block_basis_float32(seed, normalized):
    rng = np.random.default_rng(seed)
    ptr = [0, 16, 17, 17, 40, 64]
    W = random_block_adjacency(rng, ptr, 0.4)
    L = ParameterGraph.from_scipy(W, block_ptr=ptr, dtype=torch.float32).laplacian(normalized)
    basis = SpectralBasis.from_laplacian(L, 6)
    assert basis.dtype == torch.float32
    # the float32 Laplacian's own entries are the reference: eigh in float32 is then judged, not the rounding
    check_basis(basis, L.to_dense().double().numpy(), ptr, 6)


def test_cross_block_edges_give_a_global_basis():
    # a path of 12 nodes split into ragged blocks but linked across them: one global basis, B = 1
    n, k = 12, 5
    g = ParameterGraph.chain(n, block_ptr=[0, 3, 3, 4, 12], link_blocks=True, dtype=torch.float64)
    assert g.has_cross_block_edges
    L = g.laplacian(normalized=False)
    basis = SpectralBasis.from_laplacian(L, k)
    assert basis.num_blocks == 1 and basis.block_ptr.tolist() == [0, n]
    # combinatorial Laplacian of the path P_n: λ_j = 2 − 2 cos(π j / n)
    exact = 2 - 2 * np.cos(np.pi * np.arange(k) / n)
    np.testing.assert_allclose(basis.eigenvalues[0].numpy(), exact, rtol=0, atol=1e-12)
    check_basis(basis, L.to_dense().numpy(), [0, n], k)
    # the unlinked chain keeps its blocks
    unlinked = SpectralBasis.from_laplacian(
        ParameterGraph.chain(n, block_ptr=[0, 3, 3, 4, 12], dtype=torch.float64).laplacian(normalized=False), k)
    assert unlinked.block_ptr.tolist() == [0, 3, 3, 4, 12]


@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "combinatorial"])
def test_global_basis_matches_eigsh(seed, normalized):
    rng = np.random.default_rng(seed)
    ptr = [0, 20, 45, 60]
    W = random_block_adjacency(rng, ptr, 0.3, cross=0.02, isolated=0.0)
    # a path through every node keeps the graph connected (and crosses the blocks): Lanczos (eigsh) cannot
    # resolve the multiplicity of the zero eigenvalue of a disconnected graph, so the reference needs this
    path = np.arange(59)
    W[path, path + 1] = W[path + 1, path] = np.maximum(W[path, path + 1], 0.5)
    g = ParameterGraph.from_scipy(scipy.sparse.csr_array(W), block_ptr=ptr)
    L = g.laplacian(normalized)
    basis = SpectralBasis.from_laplacian(L, 6)
    assert basis.num_blocks == 1
    L_ref = scipy_laplacian(scipy.sparse.csr_array(W), normed=normalized).astype(np.float64)
    reference = scipy.sparse.linalg.eigsh(L_ref, k=6, which="SA", tol=1e-12, v0=rng.standard_normal(60),
                                          return_eigenvectors=False)
    np.testing.assert_allclose(basis.eigenvalues[0].numpy(), np.sort(reference), rtol=0, atol=1e-9)
    check_basis(basis, L_ref.toarray(), [0, 60], 6)


@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "combinatorial"])
def test_graph_without_edges(normalized):
    ptr = [0, 3, 3, 4, 6]
    g = ParameterGraph.from_dense(torch.zeros(6, 6, dtype=torch.float64), block_ptr=ptr)
    basis = SpectralBasis.from_laplacian(g.laplacian(normalized), 2)
    assert torch.all(basis.eigenvalues == 0)
    # every eigenvalue is 0: no projector to compare, but each U_b is orthonormal and a valid basis
    check_basis(basis, np.zeros((6, 6)), ptr, 2)
    # k >= every n_b: each block's basis spans its block, U_b U_bᵀ = I
    full = SpectralBasis.from_laplacian(g.laplacian(normalized), 4)
    for b in range(full.num_blocks):
        U_b, _ = full.block(b)
        torch.testing.assert_close(U_b @ U_b.T, torch.eye(U_b.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, ptr", [(0, [0, 0]), (1, [0, 1]), (0, [0, 0, 0, 0]), (3, [0, 0, 1, 1, 3])])
def test_tiny_and_empty_layouts(n, ptr):
    g = ParameterGraph.chain(n, block_ptr=ptr, dtype=torch.float64)
    basis = SpectralBasis.from_laplacian(g.laplacian(), 3)
    assert basis.U.shape == (n, 3) and basis.eigenvalues.shape == (len(ptr) - 1, 3)
    check_basis(basis, np.asarray(scipy_laplacian(g.to_dense().numpy(), normed=True)), ptr, 3)
    x = torch.randn(n, 2, dtype=torch.float64)
    assert basis.project(x).shape == (len(ptr) - 1, 3, 2)
    assert basis.reconstruct(basis.project(x)).shape == (n, 2)


def test_float32_large_weights_keep_every_eigenvector(seed):
    """Regression: the padding of short blocks used eigenvalue bound + 1, which rounds to the bound in float32
    once degrees pass ~1e7; the top eigenvalue of an even cycle equals the bound, sorted after the padding, and
    its eigenvector was replaced by a zero column."""
    rng = np.random.default_rng(seed)
    for _ in range(20):
        w = float(rng.uniform(1e7, 1e9))
        m = int(rng.choice([2, 4, 6]))
        n = 7 + m
        A = np.zeros((n, n))
        A[:7, :7] = np.triu(rng.uniform(0, 10, (7, 7)), 1)
        A += A.T
        ring = 7 + np.arange(m)
        A[ring, np.roll(ring, 1)] = w
        A[np.roll(ring, 1), ring] = w
        L = ParameterGraph.from_scipy(A, block_ptr=[0, 7, n], dtype=torch.float32).laplacian(normalized=False)
        basis = SpectralBasis.from_laplacian(L, 8)
        U_b, lam = basis.block(1)
        assert U_b.shape == (m, m)
        torch.testing.assert_close(U_b.double().T @ U_b.double(), torch.eye(m, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        assert float(lam.max()) == pytest.approx(float(L.to_dense()[7:, 7:].double().diagonal().max()) * 2,
                                                 rel=1e-5)


# ---------------------------------------------------------------------------- project / reconstruct
@SETTINGS
@given(sizes=st.lists(st.integers(0, 7), min_size=1, max_size=4), k=st.integers(1, 8), d=st.integers(1, 4),
       seed=seeds)
def test_project_reconstruct_round_trip(sizes, k, d, seed):
    rng = np.random.default_rng(seed)
    ptr = sizes_to_ptr(sizes)
    n = ptr[-1]
    W = random_block_adjacency(rng, ptr, 0.7)
    basis = SpectralBasis.from_laplacian(ParameterGraph.from_dense(torch.from_numpy(W), block_ptr=ptr).laplacian(), k)
    x = torch.from_numpy(rng.standard_normal((n, d)))
    coefficients = basis.project(x)
    assert coefficients.shape == (len(sizes), k, d) and coefficients.dtype == x.dtype
    for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
        k_b = min(k, stop - start)
        assert torch.all(coefficients[b, k_b:] == 0)
        U_b, lam = basis.block(b)
        assert U_b.shape == (stop - start, k_b) and lam.shape == (k_b,)
        torch.testing.assert_close(coefficients[b, :k_b], U_b.T @ x[start:stop], rtol=0, atol=1e-12)
    # reconstruct(project(x)) = U Uᵀ x with U block-diagonal: the packed U gives it in one product per block
    y = basis.reconstruct(coefficients)
    U = basis.U
    expected = torch.zeros_like(x)
    for start, stop in zip(ptr[:-1], ptr[1:]):
        expected[start:stop] = U[start:stop] @ (U[start:stop].T @ x[start:stop])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    # a projector: applying it twice changes nothing, and with k >= n_b everywhere it is the identity
    torch.testing.assert_close(basis.reconstruct(basis.project(y)), y, rtol=0, atol=1e-12)
    if k >= max(sizes):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12)


def test_project_in_the_input_dtype(seed):
    ptr = [0, 5, 12]
    g = ParameterGraph.chain(12, block_ptr=ptr, dtype=torch.float64)
    basis = SpectralBasis.from_laplacian(g.laplacian(), 3)
    x = torch.randn(12, 4)
    c = basis.project(x)
    assert c.dtype == torch.float32
    torch.testing.assert_close(c.double(), basis.project(x.double()), rtol=0, atol=1e-5)
    assert basis.reconstruct(c).dtype == torch.float32
    b32 = basis.to(dtype=torch.float32)
    assert b32.dtype == torch.float32 and b32.eigenvalues.dtype == torch.float32
    assert torch.equal(b32.block_ptr, basis.block_ptr)
    cached = basis.block_ptr_on(torch.device("cpu"))
    assert cached is basis.block_ptr_on(torch.device("cpu")) and cached.tolist() == ptr


def test_constructor_accepts_a_valid_layout():
    U = torch.zeros(5, 2)
    basis = SpectralBasis(U, torch.zeros(2, 2), [0, 2, 5])
    assert basis.block_ptr.tolist() == [0, 2, 5] and basis.block_ptr.dtype == torch.int64
    basis = SpectralBasis(U, torch.zeros(2, 2), torch.tensor([0, 2, 5], dtype=torch.int32))
    assert basis.block_ptr.dtype == torch.int64
    repr(basis)


# -------------------------------------------------------------------------------------- bad inputs
def test_from_laplacian_bad_inputs():
    L = ParameterGraph.chain(6).laplacian()
    for k, exc, match in [(0, ValueError, "k must be positive, got 0"), (-2, ValueError, "k must be positive, got -2"),
                          (2.0, TypeError, "k must be an int, got float"), (None, TypeError, "k must be an int")]:
        with pytest.raises(exc, match=match):
            SpectralBasis.from_laplacian(L, k)
    with pytest.raises(TypeError, match=r"laplacian must be a GraphLaplacian .*got Tensor"):
        SpectralBasis.from_laplacian(L.to_dense(), 2)
    with pytest.raises(TypeError, match=r"laplacian must be a GraphLaplacian .*got ParameterGraph"):
        SpectralBasis.from_laplacian(ParameterGraph.chain(6), 2)


def test_constructor_bad_inputs():
    U, ev = torch.zeros(5, 2), torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"U must be 2-D, got shape \(5,\)"):
        SpectralBasis(torch.zeros(5), ev, [0, 2, 5])
    with pytest.raises(TypeError, match=r"U must be a torch\.Tensor, got ndarray"):
        SpectralBasis(np.zeros((5, 2)), ev, [0, 2, 5])
    with pytest.raises(TypeError, match=r"U must be a floating-point tensor, got torch\.int64"):
        SpectralBasis(torch.zeros(5, 2, dtype=torch.int64), ev, [0, 2, 5])
    with pytest.raises(ValueError, match=r"eigenvalues must have shape \(B, k\) = \(2, 2\), got \(3, 2\)"):
        SpectralBasis(U, torch.zeros(3, 2), [0, 2, 5])
    with pytest.raises(ValueError, match=r"eigenvalues must be 2-D, got shape \(2,\)"):
        SpectralBasis(U, torch.zeros(2), [0, 2, 5])
    with pytest.raises(ValueError, match=r"eigenvalues is on meta but U is on cpu"):
        SpectralBasis(U, torch.empty(2, 2, device="meta"), [0, 2, 5])
    with pytest.raises(ValueError, match=r"block_ptr must start at 0 and end at the number of nodes \(5\)"):
        SpectralBasis(U, ev, [0, 2, 6])
    with pytest.raises(ValueError, match=r"block_ptr must be non-decreasing"):
        SpectralBasis(U, ev, [0, 6, 5])
    with pytest.raises(TypeError, match=r"block_ptr must hold integers, got 2\.0"):
        SpectralBasis(U, ev, [0, 2.0, 5])


def test_helpers_bad_inputs():
    basis = SpectralBasis.from_laplacian(ParameterGraph.chain(6, block_ptr=[0, 2, 6]).laplacian(), 3)
    with pytest.raises(ValueError, match=r"x must have 6 rows \(the basis has 6 nodes\), got shape \(5, 2\)"):
        basis.project(torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"x must be 2-D, got shape \(6,\)"):
        basis.project(torch.randn(6))
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got torch\.int64"):
        basis.project(torch.ones(6, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x is on meta but the basis \(U\) is on cpu"):
        basis.project(torch.empty(6, 2, device="meta"))
    with pytest.raises(ValueError, match=r"coefficients must have shape \(B, k, d\) = \(2, 3, d\), got \(2, 2, 4\)"):
        basis.reconstruct(torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"coefficients must be 3-D, got shape \(2, 3\)"):
        basis.reconstruct(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"coefficients must be a floating-point tensor, got torch\.int64"):
        basis.reconstruct(torch.zeros(2, 3, 1, dtype=torch.int64))
    for b in (-1, 2):
        with pytest.raises(IndexError, match=rf"b must be a block index in \[0, 2\), got {b}"):
            basis.block(b)
    with pytest.raises(TypeError, match=r"b must be an int block index, got str"):
        basis.block("0")


# -------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cross", [False, True], ids=["block-diagonal", "cross-block"])
def test_cuda_basis(seed, cross):
    rng = np.random.default_rng(seed)
    ptr = [0, 9, 9, 10, 33]
    W = random_block_adjacency(rng, ptr, 0.5, cross=0.05 if cross else 0.0)
    g = ParameterGraph.from_scipy(W, block_ptr=ptr).to("cuda")
    assert g.has_cross_block_edges == bool(cross and g.to("cpu").has_cross_block_edges)
    L = g.laplacian()
    basis = SpectralBasis.from_laplacian(L, 4)
    assert basis.device.type == "cuda" and basis.block_ptr.device.type == "cpu"
    out_ptr = [0, 33] if L.has_cross_block_edges else ptr
    check_basis(basis.to("cpu"), np.asarray(scipy_laplacian(W, normed=True)), out_ptr, 4)
    x = torch.randn(33, 3, dtype=torch.float64, device="cuda")
    y = basis.reconstruct(basis.project(x))
    expected = basis.to("cpu").reconstruct(basis.to("cpu").project(x.cpu()))
    torch.testing.assert_close(y.cpu(), expected, rtol=0, atol=1e-12)
    assert basis.block_ptr_on(torch.device("cuda")).device.type == "cuda"
    moved = SpectralBasis.from_laplacian(L.to("cpu"), 4).to("cuda")
    assert moved.device.type == "cuda"
