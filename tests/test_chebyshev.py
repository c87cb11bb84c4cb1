"""chebyshev_filter: both Triton kernels (interpreter on CPU) and the torch backend against float64 references,
PyGSP's own Chebyshev filtering, and the exact U g(Λ) Uᵀ x of a dense eigendecomposition."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectralkern as sk
from spectralkern import lambda_max as lambda_max_module
from spectralkern.filters import chebyshev_coefficients
from spectralkern.ops.chebyshev_filter import (_launch_block, _launch_csr, _prepared, block_layout_fits,
                                               chebyshev_coeffs_grad_reference, chebyshev_filter_reference,
                                               should_materialize)
from _numerics import relative_error  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The shapes here are tiny: with two OpenMP threads on a busy 2-core machine, every sparse product waits
    ~20 ms on the other thread (measured), which would dominate this file's run time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("SPECTRALKERN_BACKEND", request.param)
    return request.param


def ragged_laplacian(sizes: list[int], *, cross_block: bool = False, normalized: bool = True,
                     dtype: torch.dtype = torch.float64) -> sk.GraphLaplacian:
    """Laplacian of a 3-NN graph of random rows, inside blocks of the given sizes (plus a chain through all blocks
    when ``cross_block``)."""
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    rows = torch.randn(ptr[-1], 6, dtype=torch.float64)
    graph = sk.ParameterGraph.knn(rows, k=3, block_ptr=ptr)
    if cross_block:
        links = sk.ParameterGraph.chain(ptr[-1], block_ptr=ptr, link_blocks=True, dtype=torch.float64)
        graph = sk.ParameterGraph.from_scipy(graph.to_scipy() + links.to_scipy(), block_ptr=ptr)
    return graph.to(dtype=dtype).laplacian(normalized=normalized)


def exact_filter(x: torch.Tensor, L: sk.GraphLaplacian, gain) -> torch.Tensor:
    """float64 U g(Λ) Uᵀ x from a dense eigendecomposition of the whole Laplacian."""
    values, vectors = torch.linalg.eigh(L.to_dense().double())
    return vectors @ (gain(values).unsqueeze(1) * (vectors.T @ x.double()))


def dense_chebyshev(x: torch.Tensor, L: sk.GraphLaplacian, coeffs: torch.Tensor, lam: float) -> torch.Tensor:
    """Σ c_m T_m(2L/λ − I) x with dense float64 matrices (differentiable in x and coeffs)."""
    scaled = 2.0 * L.to_dense().double() / lam - torch.eye(L.num_nodes, dtype=torch.float64)
    t_prev, t_cur = x.double(), scaled @ x.double()
    y = coeffs[0] * t_prev + (coeffs[1] * t_cur if coeffs.numel() > 1 else 0.0)
    for m in range(2, coeffs.numel()):
        t_prev, t_cur = t_cur, 2.0 * scaled @ t_cur - t_prev
        y = y + coeffs[m] * t_cur
    return y


# ------------------------------------------------------------------------------------------- coefficients
def test_coefficients_match_pygsp(seed):
    pygsp = pytest.importorskip("pygsp")
    graph = pygsp.graphs.Sensor(30, seed=seed % 1000)
    graph.estimate_lmax()
    kernel = pygsp.filters.Filter(graph, lambda lam: np.exp(-2.0 * lam / graph.lmax))
    theirs = pygsp.filters.approximations.compute_cheby_coeff(kernel, m=9)
    ours = chebyshev_coefficients(sk.heat(2.0 / graph.lmax), 9, graph.lmax)
    theirs[0] /= 2  # PyGSP keeps 2·c_0 and halves it when it filters
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-12, atol=1e-14)


def test_coefficients_interpolate_and_reproduce_polynomials():
    lam_max = 3.5
    cubic = lambda lam: 1.0 - 0.3 * lam + 0.05 * lam ** 3  # noqa: E731 - degree 3: order 3 is exact everywhere
    c = chebyshev_coefficients(cubic, 3, lam_max)
    lam = torch.linspace(0, lam_max, 17, dtype=torch.float64)
    t = torch.cos(torch.outer(torch.arange(4, dtype=torch.float64), torch.arccos(2 * lam / lam_max - 1)))
    torch.testing.assert_close(c @ t, cubic(lam), rtol=1e-12, atol=1e-12)
    order = 7  # a non-polynomial gain is matched exactly at the K+1 Chebyshev nodes
    theta = np.pi * (torch.arange(order + 1, dtype=torch.float64) + 0.5) / (order + 1)
    nodes = lam_max / 2 * (torch.cos(theta) + 1)
    c = chebyshev_coefficients(sk.heat(0.7), order, lam_max)
    t = torch.cos(torch.outer(torch.arange(order + 1, dtype=torch.float64), theta))
    torch.testing.assert_close(c @ t, torch.exp(-0.7 * nodes), rtol=1e-12, atol=1e-12)


def test_coefficients_bad_input():
    with pytest.raises(TypeError, match="gain must be a callable"):
        chebyshev_coefficients(0.5, 3, 2.0)
    with pytest.raises(ValueError, match="order must be non-negative, got -1"):
        chebyshev_coefficients(sk.heat(1.0), -1, 2.0)
    with pytest.raises(ValueError, match="lambda_max must be positive, got 0"):
        chebyshev_coefficients(sk.heat(1.0), 3, 0.0)
    with pytest.raises(ValueError, match=r"gain must return one value per λ: given 4 values it returned shape \(\)"):
        chebyshev_coefficients(lambda lam: lam.sum(), 3, 2.0)
    with pytest.raises(ValueError, match="gain returned non-finite values"):
        chebyshev_coefficients(lambda lam: 1.0 / (lam - lam), 3, 2.0)


# ------------------------------------------------------------------------------------- against references
@pytest.mark.parametrize("lap_type", ["normalized", "combinatorial"])
def test_matches_pygsp_chebyshev_on_pygsp_and_our_graphs(backend, seed, lap_type):
    pygsp = pytest.importorskip("pygsp")
    ours_graph = sk.ParameterGraph.knn(torch.randn(26, 5, dtype=torch.float64), k=3, block_ptr=[0, 12, 26])
    graphs = [pygsp.graphs.Sensor(24, seed=seed % 1000), pygsp.graphs.Graph(ours_graph.to_scipy())]
    rng = np.random.default_rng(seed)
    tau = 1.3
    for graph in graphs:
        graph.compute_laplacian(lap_type)
        # PyGSP's λ_max bound (not its Lanczos estimate: that starts ARPACK from an unseeded vector at tol 5e-3 and
        # came out below the true λ_max once, 1.695 vs ≥ 1.702, which our check rightly refuses); ours gets the same
        graph.estimate_lmax(method="bounds")
        L = sk.ParameterGraph.from_scipy(graph.W).laplacian(normalized=lap_type == "normalized")
        x = rng.standard_normal((graph.N, 3))
        for order in (1, 6) if backend == "triton" else (1, 2, 6, 15):
            kernel = pygsp.filters.Filter(graph, lambda lam: np.exp(-tau * lam))
            expected = kernel.filter(x, method="chebyshev", order=order)
            y = sk.chebyshev_filter(torch.from_numpy(x), L, gain=sk.heat(tau), order=order, lambda_max=graph.lmax)
            np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("normalized", [True, False])
def test_error_falls_as_order_rises(backend, seed, normalized):
    L = ragged_laplacian([9, 14, 1, 6], normalized=normalized)
    x = torch.randn(L.num_nodes, 4, dtype=torch.float64)
    lam = sk.estimate_lambda_max(L)
    gain = sk.heat(4.0 / lam)
    exact = exact_filter(x, L, gain)
    errors = [relative_error(sk.chebyshev_filter(x, L, gain=gain, order=order), exact) for order in (2, 4, 8, 16)]
    assert all(later < earlier / 10 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-9, errors


def test_reference_equals_dense_recursion(seed):
    L = ragged_laplacian([7, 0, 12], cross_block=True, normalized=False)
    x = torch.randn(19, 3, dtype=torch.float64)
    coeffs = torch.randn(7, dtype=torch.float64)
    lam = 1.3 * L.spectrum_bound()
    torch.testing.assert_close(chebyshev_filter_reference(x, L, coeffs, lam), dense_chebyshev(x, L, coeffs, lam),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------- kernels
def _inputs(L: sk.GraphLaplacian, d: int, dtype: torch.dtype, order: int, lam: float = 2.0):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(L.num_nodes, d, dtype=torch.float64).to(dtype)
    coeffs = torch.randn(order + 1, dtype=torch.float64)
    expected = chebyshev_filter_reference(x.double(), L, coeffs, lam)
    return x, coeffs.to(acc), expected, _prepared(L, lam, acc, with_blocks=block_layout_fits(L))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("materialize", [False, True])
def test_block_kernel_on_ragged_blocks_writes_every_element(seed, dtype, materialize):
    """One-node, empty and 23-node blocks (padded to 32), a partial column tile; output poisoned with NaN."""
    L = ragged_laplacian([5, 1, 0, 23, 2, 17, 0])
    x, coeffs, expected, (_, _, _, block_ptr, blocks) = _inputs(L, 70, dtype, order=5)
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    y, _ = _launch_block(x, coeffs, blocks, block_ptr, out=out, materialize=materialize)
    assert y.data_ptr() == out.data_ptr() and bool(torch.isfinite(out).all())
    assert relative_error(out, expected) <= TOLERANCE[dtype]


@pytest.mark.triton
@pytest.mark.parametrize("materialize", [False, True])
def test_block_kernel_on_blocks_of_129_to_256_nodes(seed, materialize):
    """n_pad = 256: Ã is 256 KiB in fp32 and streams through L2 chunk by chunk; order 2 is the first step that
    goes through the scratch tile, order 6 goes through it five times."""
    L = ragged_laplacian([150, 3, 70])
    for order in (2,) if materialize else (2, 6):  # the build pass alone has 48 programs: kept short here
        x, coeffs, expected, (_, _, _, block_ptr, blocks) = _inputs(L, 9, torch.float32, order=order)
        assert blocks.shape == (223, 256)
        y, _ = _launch_block(x, coeffs, blocks, block_ptr, materialize=materialize)
        assert relative_error(y, expected) <= 1e-5


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("order", [1, 2, 3, 6])
def test_csr_kernel_on_a_cross_block_graph_writes_every_element(seed, dtype, order):
    """Orders 1..3 cover the first, second and third (first in-place) steps; 70 columns: a partial tile."""
    L = ragged_laplacian([6, 1, 0, 11, 4], cross_block=True)
    assert not block_layout_fits(L)
    x, coeffs, expected, (crow, col, val, _, blocks) = _inputs(L, 70, dtype, order=order)
    assert blocks.numel() == 0
    out = torch.full(x.shape, float("nan"), dtype=dtype)
    y, _ = _launch_csr(x, coeffs, crow, col, val, out=out)
    assert y.data_ptr() == out.data_ptr() and bool(torch.isfinite(out).all())
    assert relative_error(out, expected) <= TOLERANCE[dtype]


@pytest.mark.triton
@pytest.mark.parametrize("kernel", ["block", "csr"])
def test_coefficient_gradient_partials(seed, kernel):
    L = ragged_laplacian([4, 0, 13, 1], cross_block=kernel == "csr")
    grad_y, x = torch.randn(18, 40, dtype=torch.float64), torch.randn(18, 40, dtype=torch.float64)
    coeffs = torch.randn(5, dtype=torch.float64)
    crow, col, val, block_ptr, blocks = _prepared(L, 2.0, torch.float64, with_blocks=kernel == "block")
    if kernel == "block":
        y, grads = _launch_block(grad_y, coeffs, blocks, block_ptr, saved=x, write_y=False)
    else:
        y, grads = _launch_csr(grad_y, coeffs, crow, col, val, saved=x, write_y=False)
    assert y.numel() == 0
    expected = chebyshev_coeffs_grad_reference(grad_y, x, 4, crow, col, val)
    torch.testing.assert_close(grads, expected, rtol=1e-12, atol=1e-12)


def test_kernel_choice():
    assert block_layout_fits(ragged_laplacian([5, 256, 0]))
    assert not block_layout_fits(ragged_laplacian([5, 257]))
    assert not block_layout_fits(ragged_laplacian([5, 6], cross_block=True))
    assert should_materialize(order=8, block_n=128, d=4096) and not should_materialize(order=8, block_n=128, d=64)
    assert not should_materialize(order=1, block_n=16, d=4096)


@pytest.mark.triton
def test_blocks_over_256_nodes_run_the_csr_kernel(seed, monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")
    L = ragged_laplacian([300, 7])
    x = torch.randn(307, 3)
    coeffs = torch.randn(4)
    assert _prepared(L, 2.0, torch.float32, with_blocks=block_layout_fits(L))[4].numel() == 0
    y = sk.chebyshev_filter(x, L, coeffs, lambda_max=2.0)
    assert relative_error(y, chebyshev_filter_reference(x.double(), L, coeffs.double(), 2.0)) <= 1e-5


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
       d=st.integers(1, 20), order=st.integers(0, 6), cross_block=st.booleans(), data_seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes_triton(sizes, d, order, cross_block, data_seed):
    torch.manual_seed(data_seed)
    L = ragged_laplacian(sizes, cross_block=cross_block, dtype=torch.float32)
    x = torch.randn(L.num_nodes, d)
    coeffs = torch.randn(order + 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRALKERN_BACKEND", "triton")
        y = sk.chebyshev_filter(x, L, coeffs, lambda_max=2.0)
    assert relative_error(y, chebyshev_filter_reference(x.double(), L, coeffs.double(), 2.0)) <= 1e-5


@pytest.mark.parametrize("layout", ["transposed", "strided", "vector", "d=1"])
def test_non_contiguous_and_thin_inputs(backend, seed, layout):
    L = ragged_laplacian([4, 1, 9], dtype=torch.float32)
    n = L.num_nodes
    x = {"transposed": torch.randn(7, n).T, "strided": torch.randn(n, 14)[:, ::2], "vector": torch.randn(n),
         "d=1": torch.randn(n, 1)}[layout]
    coeffs = torch.randn(4)
    y = sk.chebyshev_filter(x, L, coeffs, lambda_max=2.0)
    expected = chebyshev_filter_reference(x.reshape(n, -1).double(), L, coeffs.double(), 2.0).reshape(x.shape)
    assert y.shape == x.shape and y.is_contiguous()
    assert relative_error(y, expected) <= 1e-5


def test_edgeless_and_empty_graphs(backend):
    edgeless = sk.ParameterGraph.chain(6, block_size=1).laplacian()  # L = 0: g(L) x = g(0) x
    assert sk.estimate_lambda_max(edgeless) == 1.0
    x = torch.randn(6, 3, dtype=torch.float64)
    y = sk.chebyshev_filter(x, edgeless, gain=sk.heat(1.0), order=12)
    torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-9)
    empty = sk.ParameterGraph.chain(0).laplacian()
    assert sk.chebyshev_filter(torch.zeros(0, 4), empty, [1.0, 0.5]).shape == (0, 4)


# ----------------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("cross_block", [False, True])
def test_gradcheck_x_and_coeffs(backend, seed, cross_block):
    L = ragged_laplacian([4, 1, 0, 6], cross_block=cross_block)
    x = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, c_: sk.chebyshev_filter(x_, L, c_, lambda_max=2.0), (x, coeffs),
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("needs", ["x", "coeffs", "both"])
def test_backward_matches_autograd_of_the_dense_recursion(backend, seed, needs):
    L = ragged_laplacian([6, 0, 1, 9])
    x = torch.randn(16, 21, dtype=torch.float64, requires_grad=needs in ("x", "both"))
    coeffs = torch.randn(6, dtype=torch.float64, requires_grad=needs in ("coeffs", "both"))
    grad_y = torch.randn(16, 21, dtype=torch.float64)
    inputs = [t for t in (x, coeffs) if t.requires_grad]
    ours = torch.autograd.grad(sk.chebyshev_filter(x, L, coeffs, lambda_max=2.0), inputs, grad_y)
    ref = torch.autograd.grad(dense_chebyshev(x, L, coeffs, 2.0), inputs, grad_y)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_opcheck(backend, seed):
    L = ragged_laplacian([3, 0, 5], dtype=torch.float32)
    crow, col, val, block_ptr, blocks = _prepared(L, 2.0, torch.float32, with_blocks=backend == "triton")
    x = torch.randn(8, 4, requires_grad=True)
    coeffs = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.spectralkern.chebyshev_filter.default,
                          (x, coeffs, crow, col, val, block_ptr, blocks, [], [], ""))


def test_torch_compile_fullgraph_with_backward(backend, seed):
    L = ragged_laplacian([4, 7], dtype=torch.float32)
    sk.estimate_lambda_max(L)  # cached before tracing, like any graph built ahead of the training loop
    x = torch.randn(11, 6, requires_grad=True)
    coeffs = torch.randn(4, requires_grad=True)
    # aot_eager traces the custom ops through their fake registrations exactly as inductor would, without
    # inductor's C++ compile time on the CPU.
    compiled = torch.compile(lambda x_, c_: sk.chebyshev_filter(x_, L, c_).square().sum(), fullgraph=True,
                             backend="aot_eager")
    compiled(x, coeffs).backward()
    grads = (x.grad.clone(), coeffs.grad.clone())
    x.grad = coeffs.grad = None
    sk.chebyshev_filter(x, L, coeffs).square().sum().backward()
    torch.testing.assert_close(grads, (x.grad, coeffs.grad), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- λ_max
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("cross_block", [False, True])
def test_estimate_lambda_max_bounds_the_spectrum(seed, normalized, cross_block):
    L = ragged_laplacian([40, 25, 60], normalized=normalized, cross_block=cross_block)
    true_max = float(torch.linalg.eigvalsh(L.to_dense())[-1])
    found = lambda_max_module.lanczos_lambda_max(L)
    assert found.ritz <= true_max * (1 + 1e-12)  # a Rayleigh quotient: never above λ_max
    estimate = sk.estimate_lambda_max(L)
    assert true_max <= estimate <= min(L.spectrum_bound(), 1.05 * true_max), (true_max, found)


def test_estimate_is_cached_on_the_laplacian(monkeypatch):
    L = ragged_laplacian([10, 12], normalized=False)
    runs = []
    real = lambda_max_module.lanczos_lambda_max
    monkeypatch.setattr(lambda_max_module, "lanczos_lambda_max", lambda L_: runs.append(1) or real(L_))
    first = sk.estimate_lambda_max(L)
    x = torch.randn(22, 2, dtype=torch.float64)
    for _ in range(3):
        sk.chebyshev_filter(x, L, gain=sk.heat(0.5), order=4)
    sk.chebyshev_filter(x, L, [1.0, 0.5], lambda_max=0.9 * L.spectrum_bound())  # a user λ_max is checked...
    assert sk.estimate_lambda_max(L) == first and len(runs) == 1  # ...against the same cached run
    other = ragged_laplacian([10, 12], normalized=False)
    sk.estimate_lambda_max(other)
    assert len(runs) == 2  # one run per Laplacian object


def test_lambda_max_below_the_spectrum_is_rejected(monkeypatch):
    L = ragged_laplacian([30, 20], normalized=False)
    true_max = float(torch.linalg.eigvalsh(L.to_dense())[-1])
    x = torch.randn(50, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lambda_max=[\d.]+ is below the Laplacian's largest eigenvalue: Lanczos "
                                         r"found an eigenvalue of at least [\d.]+ \(estimate_lambda_max\(L\) = "):
        sk.chebyshev_filter(x, L, [1.0, 0.5, 0.25], lambda_max=0.8 * true_max)
    sk.chebyshev_filter(x, L, [1.0, 0.5, 0.25], lambda_max=true_max)  # the exact value is accepted
    fresh = ragged_laplacian([30, 20], normalized=True)
    monkeypatch.setattr(lambda_max_module, "lanczos_lambda_max", lambda L_: pytest.fail("Lanczos ran"))
    sk.chebyshev_filter(torch.randn(50, 2, dtype=torch.float64), fresh, [1.0, 0.5], lambda_max=2.0)  # ≥ bound: free


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument(seed):
    L = ragged_laplacian([3, 4], dtype=torch.float32)
    x = torch.randn(7, 3)
    c = torch.randn(3)
    with pytest.raises(TypeError, match="L must be a GraphLaplacian"):
        sk.chebyshev_filter(x, L.matrix, c)
    with pytest.raises(ValueError, match=r"x must have 7 rows .* got shape \(6, 3\)"):
        sk.chebyshev_filter(torch.randn(6, 3), L, c)
    with pytest.raises(ValueError, match="x must be 1-D or 2-D, got shape"):
        sk.chebyshev_filter(torch.randn(7, 3, 1), L, c)
    with pytest.raises(TypeError, match="x must have dtype in"):
        sk.chebyshev_filter(torch.ones(7, 3, dtype=torch.int64), L, c)
    with pytest.raises(ValueError, match="x is on meta but L is on cpu"):
        sk.chebyshev_filter(x.to("meta"), L, c.to("meta"))
    with pytest.raises(ValueError, match="give exactly one of coeffs .* got both"):
        sk.chebyshev_filter(x, L, c, gain=sk.heat(1.0), order=2)
    with pytest.raises(ValueError, match="give exactly one of coeffs .* got neither"):
        sk.chebyshev_filter(x, L)
    with pytest.raises(ValueError, match="order is required with gain"):
        sk.chebyshev_filter(x, L, gain=sk.heat(1.0))
    with pytest.raises(ValueError, match="order must be non-negative, got -2"):
        sk.chebyshev_filter(x, L, gain=sk.heat(1.0), order=-2)
    with pytest.raises(TypeError, match="order must be an int, got float"):
        sk.chebyshev_filter(x, L, c, order=2.0)
    with pytest.raises(ValueError, match=r"coeffs must have order \+ 1 = 5 entries, got shape \(3,\)"):
        sk.chebyshev_filter(x, L, c, order=4)
    with pytest.raises(ValueError, match=r"coeffs must be 1-D, got shape \(3, 1\)"):
        sk.chebyshev_filter(x, L, c.unsqueeze(1))
    with pytest.raises(ValueError, match=r"coeffs must hold at least one coefficient"):
        sk.chebyshev_filter(x, L, torch.zeros(0))
    with pytest.raises(TypeError, match="coeffs must have dtype in"):
        sk.chebyshev_filter(x, L, torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="coeffs must be a 1-D float tensor or a sequence of numbers"):
        sk.chebyshev_filter(x, L, ["a", "b"])
    with pytest.raises(ValueError, match="coeffs is on meta but x is on cpu"):
        sk.chebyshev_filter(x, L, c.to("meta"))
    with pytest.raises(ValueError, match="lambda_max must be positive"):
        sk.chebyshev_filter(x, L, c, lambda_max=-1.0)
    with pytest.raises(TypeError, match="lambda_max must be a finite number, got nan"):
        sk.chebyshev_filter(x, L, c, lambda_max=float("nan"))
    with pytest.raises(TypeError, match="lambda_max must be a finite number, got True"):
        sk.chebyshev_filter(x, L, c, lambda_max=True)
    with pytest.raises(TypeError, match="L must be a GraphLaplacian"):
        sk.estimate_lambda_max(L.to_dense())


# -------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes, cross_block", [([128, 1, 0, 77, 200, 256], False), ([128, 64, 300], True)])
def test_gpu_matches_float64_reference(seed, dtype, sizes, cross_block):
    L = ragged_laplacian(sizes, cross_block=cross_block, dtype=torch.float32).to("cuda")
    x = torch.randn(L.num_nodes, 1000, device="cuda").to(dtype)
    coeffs = chebyshev_coefficients(sk.heat(2.0), 12, 2.0).float().cuda()
    expected = chebyshev_filter_reference(x.double(), L, coeffs.double(), 2.0)
    # fp32 runs tf32x3 on tensor cores: allow up to 4× the error of torch's own fp32 recursion (IEEE, TF32 off).
    eager = relative_error(chebyshev_filter_reference(x.float(), L, coeffs, 2.0), expected)
    tolerance = max(TOLERANCE[dtype], 4 * eager) if dtype == torch.float32 else TOLERANCE[dtype]
    outputs = [sk.chebyshev_filter(x, L, coeffs, lambda_max=2.0)]  # d = 1000 ≫ K·n: the materialised path
    if block_layout_fits(L):
        _, _, _, block_ptr, blocks = _prepared(L, 2.0, torch.float32, with_blocks=True)
        outputs.append(_launch_block(x, coeffs, blocks, block_ptr, materialize=False)[0])  # the recursion
    for y in outputs:
        assert relative_error(y, expected) <= tolerance
