"""spectral_filter: Triton kernel (interpreter on CPU) and torch backend against float64 references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectralkern as sk
from spectralkern.ops import spectral_filter as spectral_filter_ops
from spectralkern.ops.spectral_filter import (_launch_triton, spectral_filter_gains_grad_reference,
                                              spectral_filter_reference)

# torch-<algorithm>: the torch backend with that algorithm forced (the ragged layouts here rule out "batched",
# which test_batched_algorithm_on_uniform_blocks covers)
BACKENDS = ["torch", "torch-padded", "torch-loop", "native", pytest.param("triton", marks=pytest.mark.triton)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _native_or_torch(real, x, k, block_ptr):
    """The native backend for float32/float64 inputs whatever the layout (the registry keeps uniform layouts on
    torch), torch for half precision (not compiled)."""
    if x.dtype in (torch.float32, torch.float64):
        return real(x, k, None, "native")
    return real(x, k, block_ptr, "torch")


def force_algorithm(monkeypatch, algorithm: str) -> None:
    """Make the op's torch backend run ``algorithm`` whatever the cost model prefers."""
    real = spectral_filter_ops.spectral_filter_backend
    monkeypatch.setattr(spectral_filter_ops, "spectral_filter_backend",
                        lambda x, k, block_ptr=None, backend=None, algorithm=None: real(x, k, block_ptr, backend,
                                                                                        algorithm_forced))
    algorithm_forced = algorithm


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    name, _, algorithm = request.param.partition("-")
    if name == "native":  # the compiled kernel takes ragged layouts only: run it on any layout here
        real = spectral_filter_ops.spectral_filter_backend
        monkeypatch.setattr(spectral_filter_ops, "spectral_filter_backend",
                            lambda x, k, block_ptr=None, backend=None, algorithm=None: _native_or_torch(real, x, k,
                                                                                                         block_ptr))
    monkeypatch.setenv("SPECTRALKERN_BACKEND", name)
    if algorithm:
        force_algorithm(monkeypatch, algorithm)
    return request.param


def ragged_basis(sizes: list[int], k: int, dtype=torch.float64, cross_block: bool = False) -> sk.SpectralBasis:
    """Exact basis of a random kNN graph with the given block sizes (kNN of random rows)."""
    ptr = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    rows = torch.randn(ptr[-1], 6, dtype=torch.float64)
    graph = sk.ParameterGraph.knn(rows, k=3, block_ptr=ptr)
    if cross_block:
        graph = sk.ParameterGraph.from_dense(graph.to_dense() + sk.ParameterGraph.chain(
            ptr[-1], block_ptr=ptr, link_blocks=True, dtype=torch.float64).to_dense(), block_ptr=ptr)
    return sk.SpectralBasis.from_laplacian(graph.laplacian(), k).to(dtype=dtype)


def dense_reference(x: torch.Tensor, basis: sk.SpectralBasis, gains: torch.Tensor, h: float) -> torch.Tensor:
    """float64 y = h x + U_bd diag(g − h) U_bdᵀ x with U_bd the explicit block-diagonal (N × B·k) matrix."""
    num_blocks, k = basis.num_blocks, basis.k
    U = basis.U.double()
    block_diag = torch.zeros(basis.num_nodes, num_blocks * k, dtype=torch.float64)
    for b in range(num_blocks):
        start, stop = int(basis.block_ptr[b]), int(basis.block_ptr[b + 1])
        block_diag[start:stop, b * k:(b + 1) * k] = U[start:stop]
    g = gains.double().expand(num_blocks, k).reshape(-1)
    xs = x.double()
    return h * xs + block_diag @ ((g - h).unsqueeze(1) * (block_diag.T @ xs))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.norm().item()
    return (actual.double() - expected).norm().item() / max(scale, 1e-30)


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("passthrough", [0.0, 0.35])
def test_matches_float64_reference_on_ragged_blocks(backend, seed, dtype, passthrough):
    sizes = [5, 1, 0, 23, 2, 17, 0]  # one-node, empty, k >= n_b blocks
    basis = ragged_basis(sizes, k=4, dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    x = torch.randn(sum(sizes), 19, dtype=torch.float64).to(dtype)
    gains = torch.rand(basis.num_blocks, basis.k, dtype=basis.dtype)
    y = sk.spectral_filter(x, basis, gains, passthrough=passthrough)
    assert y.dtype == dtype and y.shape == x.shape
    assert relative_error(y, dense_reference(x, basis, gains, passthrough)) <= TOLERANCE[dtype]


def test_reference_equals_dense_formula(seed):
    basis = ragged_basis([3, 0, 9, 1], k=5)
    x = torch.randn(13, 4, dtype=torch.float64)
    gains = torch.randn(4, 5, dtype=torch.float64)
    y = spectral_filter_reference(x, basis.U, basis.block_ptr, gains, -0.7)
    torch.testing.assert_close(y, dense_reference(x, basis, gains, -0.7), rtol=1e-12, atol=1e-12)


def test_global_basis_of_a_graph_with_cross_block_edges(backend, seed):
    basis = ragged_basis([6, 4, 7], k=5, dtype=torch.float32, cross_block=True)
    assert basis.num_blocks == 1
    x = torch.randn(17, 9)
    gains = sk.heat(0.8)(basis.eigenvalues)
    y = sk.spectral_filter(x, basis, gains, passthrough=0.1)
    assert relative_error(y, dense_reference(x, basis, gains, 0.1)) <= 1e-5


@pytest.mark.parametrize("layout", ["transposed", "strided", "vector", "d=1"])
def test_non_contiguous_and_thin_inputs(backend, seed, layout):
    basis = ragged_basis([4, 1, 9], k=3, dtype=torch.float32)
    n = basis.num_nodes
    x = {"transposed": torch.randn(7, n).T, "strided": torch.randn(n, 14)[:, ::2], "vector": torch.randn(n),
         "d=1": torch.randn(n, 1)}[layout]
    gains = torch.rand(3)
    y = sk.spectral_filter(x, basis, gains, passthrough=0.2)
    expected = dense_reference(x.reshape(n, -1), basis, gains, 0.2).reshape(x.shape)
    assert y.shape == x.shape and y.is_contiguous()
    assert relative_error(y, expected) <= 1e-5


def test_shared_gains_equal_per_block_gains(backend, seed):
    basis = ragged_basis([3, 8, 5], k=4, dtype=torch.float32)
    x = torch.randn(16, 5)
    shared = torch.rand(4)
    torch.testing.assert_close(sk.spectral_filter(x, basis, shared),
                               sk.spectral_filter(x, basis, shared.expand(3, 4).clone()), rtol=0, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("passthrough", [0.0, 0.5])
def test_triton_writes_every_output_element(seed, passthrough):
    """Poisoned output: every entry must be overwritten, including rows of one-node blocks and k >= n_b blocks."""
    basis = ragged_basis([1, 0, 6, 2, 11], k=4, dtype=torch.float32)
    x = torch.randn(20, 70)  # 70 columns: a partial column tile
    out = torch.full((20, 70), float("nan"))
    gains = torch.rand(basis.num_blocks, 4)
    y, _ = _launch_triton(x, basis.U, basis.block_ptr, gains, passthrough, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert bool(torch.isfinite(out).all())
    assert relative_error(out, dense_reference(x, basis, gains, passthrough)) <= 1e-5


@pytest.mark.triton
def test_triton_gains_grad_partials_cover_every_block(seed):
    basis = ragged_basis([3, 0, 5, 1], k=3, dtype=torch.float64)
    grad_y, x = torch.randn(9, 40, dtype=torch.float64), torch.randn(9, 40, dtype=torch.float64)
    gains = torch.rand(4, 3, dtype=torch.float64)
    _, grads = _launch_triton(grad_y, basis.U, basis.block_ptr, gains, 0.0, saved_x=x, write_y=False)
    expected = spectral_filter_gains_grad_reference(grad_y, x, basis.U, basis.block_ptr)
    torch.testing.assert_close(grads, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
       k=st.integers(1, 9), d=st.integers(1, 40), passthrough=st.sampled_from([0.0, 0.5, -1.0]),
       shared=st.booleans(), data_seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes_triton(sizes, k, d, passthrough, shared, data_seed):
    torch.manual_seed(data_seed)
    basis = ragged_basis(sizes, k=k, dtype=torch.float32)
    x = torch.randn(sum(sizes), d)
    gains = torch.rand(k) if shared else torch.rand(basis.num_blocks, k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRALKERN_BACKEND", "triton")
        y = sk.spectral_filter(x, basis, gains, passthrough=passthrough)
    assert relative_error(y, dense_reference(x, basis, gains, passthrough)) <= 1e-5


# ----------------------------------------------------------------------------------------------- backward
def test_gradcheck_x_and_gains(backend, seed):
    basis = ragged_basis([4, 1, 0, 6], k=3)
    x = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    gains = torch.rand(basis.num_blocks, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, g_: sk.spectral_filter(x_, basis, g_, passthrough=0.4),
                                    (x, gains), fast_mode=backend == "triton")


def test_gradcheck_shared_gains(backend, seed):
    basis = ragged_basis([5, 2], k=4)
    x = torch.randn(7, 2, dtype=torch.float64)
    gains = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g_: sk.spectral_filter(x, basis, g_), (gains,))


@pytest.mark.parametrize("needs", ["x", "gains", "both"])
def test_backward_matches_autograd_of_the_reference(backend, seed, needs):
    basis = ragged_basis([6, 0, 1, 9], k=4)
    x = torch.randn(16, 21, dtype=torch.float64, requires_grad=needs in ("x", "both"))
    gains = torch.rand(4, 4, dtype=torch.float64, requires_grad=needs in ("gains", "both"))
    grad_y = torch.randn(16, 21, dtype=torch.float64)
    inputs = [t for t in (x, gains) if t.requires_grad]
    ours = torch.autograd.grad(sk.spectral_filter(x, basis, gains, 0.3), inputs, grad_y)
    ref = torch.autograd.grad(spectral_filter_reference(x, basis.U, basis.block_ptr, gains, 0.3), inputs, grad_y)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_opcheck(backend, seed):
    basis = ragged_basis([3, 0, 5], k=2, dtype=torch.float32)
    x = torch.randn(8, 4, requires_grad=True)
    gains = torch.rand(3, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.spectralkern.spectral_filter.default,
                          (x, basis.U, basis.block_ptr, gains, 0.25))


def test_torch_compile_fullgraph_with_backward(backend, seed):
    basis = ragged_basis([4, 7], k=3, dtype=torch.float32)
    x = torch.randn(11, 6, requires_grad=True)
    gains = torch.rand(3, requires_grad=True)
    compiled = torch.compile(lambda x_, g_: sk.spectral_filter(x_, basis, g_, 0.1).square().sum(), fullgraph=True)
    compiled(x, gains).backward()
    grads = (x.grad.clone(), gains.grad.clone())
    x.grad = gains.grad = None
    sk.spectral_filter(x, basis, gains, 0.1).square().sum().backward()
    torch.testing.assert_close(grads, (x.grad, gains.grad), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ filters
@pytest.mark.parametrize("lap_type", ["normalized", "combinatorial"])
def test_full_basis_filters_match_pygsp(seed, lap_type):
    pygsp = pytest.importorskip("pygsp")
    n = 10
    rng = np.random.default_rng(seed)
    adjacency = rng.random((n, n)) * (rng.random((n, n)) < 0.5)
    adjacency = np.triu(adjacency, 1) + np.triu(adjacency, 1).T
    graph = pygsp.graphs.Graph(adjacency, lap_type=lap_type)
    graph.compute_fourier_basis()
    basis = sk.SpectralBasis.from_laplacian(
        sk.ParameterGraph.from_dense(torch.from_numpy(adjacency)).laplacian(normalized=lap_type == "normalized"), n)
    x = rng.standard_normal((n, 3))
    tau = 1.7
    cases = [(pygsp.filters.Heat(graph, scale=tau), sk.heat(tau / graph.lmax)),
             (pygsp.filters.Filter(graph, lambda lam: 1.0 / (1.0 + tau * lam)), sk.tikhonov(tau))]
    for theirs, ours in cases:
        expected = theirs.filter(x, method="exact")
        y = sk.spectral_filter(torch.from_numpy(x), basis, ours(basis.eigenvalues))
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_gain_functions_values():
    lam = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(sk.low_pass(0.5)(lam), torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(sk.heat(2.0)(lam), torch.exp(-2.0 * lam))
    torch.testing.assert_close(sk.tikhonov(3.0)(lam), 1 / (1 + 3.0 * lam))
    with pytest.raises(ValueError, match="t must be non-negative"):
        sk.heat(-1.0)
    with pytest.raises(TypeError, match="cutoff must be a finite number"):
        sk.low_pass(float("nan"))


def test_learnable_gains_shapes_and_training(seed):
    basis = ragged_basis([5, 2, 6], k=3, dtype=torch.float32)
    per_block = sk.learnable_gains(basis, sk.heat(1.0))
    shared = sk.learnable_gains(basis, 0.5, shared=True)
    assert per_block.shape == (3, 3) and shared.shape == (3,) and per_block.requires_grad
    torch.testing.assert_close(per_block.detach(), torch.exp(-basis.eigenvalues))
    target = torch.randn(13, 4)
    x = torch.randn(13, 4)
    loss = (sk.spectral_filter(x, basis, shared) - target).square().sum()
    loss.backward()
    assert shared.grad is not None and bool(torch.isfinite(shared.grad).all())


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument(seed):
    basis = ragged_basis([3, 4], k=2, dtype=torch.float32)
    x = torch.randn(7, 3)
    gains = torch.rand(2)
    with pytest.raises(TypeError, match="basis must be a SpectralBasis"):
        sk.spectral_filter(x, basis.U, gains)
    with pytest.raises(ValueError, match=r"x must have 7 rows .* got shape \(6, 3\)"):
        sk.spectral_filter(torch.randn(6, 3), basis, gains)
    with pytest.raises(ValueError, match="x must be 1-D or 2-D, got shape"):
        sk.spectral_filter(torch.randn(7, 3, 1), basis, gains)
    with pytest.raises(TypeError, match="x must have dtype in"):
        sk.spectral_filter(torch.ones(7, 3, dtype=torch.int64), basis, gains)
    with pytest.raises(ValueError, match=r"gains of shape \(k,\) must have k = 2"):
        sk.spectral_filter(x, basis, torch.rand(3))
    with pytest.raises(ValueError, match=r"gains must have shape \(B, k\) = \(2, 2\)"):
        sk.spectral_filter(x, basis, torch.rand(3, 2))
    with pytest.raises(TypeError, match="passthrough must be a finite float"):
        sk.spectral_filter(x, basis, gains, passthrough=float("inf"))
    with pytest.raises(ValueError, match="x is on meta but basis.U is on cpu"):
        sk.spectral_filter(x.to("meta"), basis, gains)
    with pytest.raises(TypeError, match="gains must be a torch.Tensor"):
        sk.spectral_filter(x, basis, [1.0, 2.0])


# -------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_matches_float64_reference(seed, dtype):
    basis = ragged_basis([128, 1, 0, 77, 300, 512], k=32, dtype=torch.float32).to("cuda")
    x = torch.randn(basis.num_nodes, 1000, device="cuda").to(dtype)
    gains = torch.rand(basis.num_blocks, 32, device="cuda")
    y = sk.spectral_filter(x, basis, gains, passthrough=0.25)
    expected = dense_reference(x.cpu(), basis.to("cpu"), gains.cpu(), 0.25)
    assert relative_error(y.cpu(), expected) <= TOLERANCE[dtype]


def test_batched_algorithm_on_uniform_blocks(monkeypatch, seed):
    """Uniform blocks as (B, n, ·) views: forward against the dense float64 formula, gradcheck w.r.t. x and gains."""
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    force_algorithm(monkeypatch, "batched")
    basis = ragged_basis([6, 6, 6], k=4)
    x = torch.randn(18, 5, dtype=torch.float64, requires_grad=True)
    gains = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    for h in (0.0, 0.4):
        assert relative_error(sk.spectral_filter(x, basis, gains, h), dense_reference(x, basis, gains, h)) <= 1e-12
        assert torch.autograd.gradcheck(lambda a, g: sk.spectral_filter(a, basis, g, passthrough=h), (x, gains))
    with torch.no_grad():  # the eager path without the custom op
        y = sk.spectral_filter(x[:, :2].T.contiguous().T, basis, gains)  # column-major x: no (B, n, ·) view
    assert relative_error(y, dense_reference(x[:, :2], basis, gains, 0.0)) <= 1e-12


def test_large_k_leaves_the_triton_backend(monkeypatch, seed):
    from spectralkern._backend import TRITON_MAX_K
    from spectralkern.ops.spectral_filter import spectral_filter_backend
    monkeypatch.delenv("SPECTRALKERN_BACKEND", raising=False)
    x = torch.randn(4, 2)
    assert spectral_filter_backend(x, TRITON_MAX_K + 1) != "triton"
    basis = ragged_basis([TRITON_MAX_K + 3], k=TRITON_MAX_K + 1, dtype=torch.float32)
    x = torch.randn(basis.num_nodes, 2)
    gains = torch.rand(basis.k)
    assert relative_error(sk.spectral_filter(x, basis, gains), dense_reference(x, basis, gains, 0.0)) <= 1e-5


def test_padding_columns_are_masked_only_where_a_block_is_narrower_than_k():
    """NaN gains in padding columns (a block with fewer than k nodes) never reach y; bases whose blocks all hold k
    columns skip the mask (``holds_every_column``), and replacing U by a narrower one re-derives it."""
    gen = torch.Generator().manual_seed(5)
    narrow = sk.SpectralBasis(torch.linalg.qr(torch.randn(8, 4, generator=gen, dtype=torch.float64))[0],
                              torch.rand(2, 4, dtype=torch.float64), torch.tensor([0, 3, 8]))
    narrow.U[:3, 3] = 0.0  # block 0 holds 3 columns
    assert not narrow.holds_every_column
    gains = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    gains[0, 3] = float("nan")
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    y = sk.spectral_filter(x, narrow, gains)
    masked = gains.clone()
    masked[0, 3] = 0.0
    expected = spectral_filter_ops.spectral_filter_reference(x, narrow.U, narrow.block_ptr, masked, 0.0)
    assert torch.isfinite(y).all() and torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    wide = sk.SpectralBasis(narrow.U, narrow.eigenvalues, torch.tensor([0, 4, 8]))
    assert wide.holds_every_column
    wide.U = wide.U[:, :2].contiguous()
    wide.eigenvalues = wide.eigenvalues[:, :2].contiguous()
    assert wide.holds_every_column and wide.k == 2
    wide.U = torch.zeros(8, 5, dtype=torch.float64)
    assert not wide.holds_every_column  # 5 columns, blocks of 4 nodes
