"""laplacian_quadratic: tr(Δᵀ L Δ) and its gradient 2LΔ, Triton kernel (interpreter on CPU) and torch backend,
against float64 dense formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectralkern as sk
from spectralkern.ops.laplacian_quadratic import (DENSE_MAX_BLOCK, _launch_triton, build_plan,
                                                  laplacian_quadratic_reference, tile_rows)

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("SPECTRALKERN_BACKEND", request.param)
    return request.param


def ragged_graph(sizes: list[int], cross_block: bool = False, dim: int = 5) -> sk.ParameterGraph:
    """kNN graph (float64) of random rows in blocks of the given sizes; with cross_block, a chain through all
    blocks is added (edges between consecutive blocks)."""
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    rows = torch.randn(ptr[-1], dim, dtype=torch.float64)
    graph = sk.ParameterGraph.knn(rows, k=3, block_ptr=ptr)
    if cross_block:
        chain = sk.ParameterGraph.chain(ptr[-1], block_ptr=ptr, link_blocks=True, dtype=torch.float64, weight=0.7)
        graph = sk.ParameterGraph.from_dense(graph.to_dense() + chain.to_dense(), block_ptr=ptr)
    return graph


def pairwise_form(delta: torch.Tensor, graph: sk.ParameterGraph, normalized: bool) -> torch.Tensor:
    """float64 ½ Σ_ij W_ij ‖Δ_i/s_i − Δ_j/s_j‖², s = 1 (combinatorial) or √deg (normalized, isolated nodes
    dropped, as scipy's laplacian does)."""
    W = graph.to_dense().double()
    x = delta.double().reshape(delta.shape[0], -1)
    if normalized:
        deg = W.sum(1)
        x = torch.where(deg[:, None] > 0, x / deg.clamp_min(1e-300).sqrt()[:, None], torch.zeros_like(x))
    diff = x[:, None, :] - x[None, :, :]
    return 0.5 * (W * diff.square().sum(-1)).sum()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected).norm().item() / max(expected.norm().item(), 1e-30)


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("normalized", [True, False])
def test_reference_equals_pairwise_formula(seed, normalized):
    graph = ragged_graph([4, 1, 0, 9], cross_block=True)
    delta = torch.randn(14, 3, dtype=torch.float64)
    value = laplacian_quadratic_reference(delta, graph.laplacian(normalized=normalized))
    torch.testing.assert_close(value, pairwise_form(delta, graph, normalized), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("cross_block", [False, True])
def test_matches_float64_formula_on_ragged_blocks(backend, seed, dtype, cross_block):
    sizes = [5, 1, 0, 23, 2, 40, 0]  # one-node, empty and multi-tile blocks
    graph = ragged_graph(sizes, cross_block=cross_block)
    L = graph.laplacian().to(dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    delta = torch.randn(sum(sizes), 19, dtype=torch.float64).to(dtype)
    value = sk.laplacian_quadratic(delta, L)
    assert value.shape == () and value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert relative_error(value, pairwise_form(delta, graph, True)) <= TOLERANCE[dtype]


def test_block_larger_than_the_dense_limit_goes_through_the_csr(backend, seed):
    sizes = [DENSE_MAX_BLOCK + 9, 7]
    graph = ragged_graph(sizes, cross_block=True, dim=3)
    delta = torch.randn(sum(sizes), 2, dtype=torch.float64)
    value = sk.laplacian_quadratic(delta, graph.laplacian(normalized=False))
    assert relative_error(value, pairwise_form(delta, graph, False)) <= 1e-12


@pytest.mark.parametrize("layout", ["transposed", "strided", "vector", "d=1"])
def test_non_contiguous_and_thin_inputs(backend, seed, layout):
    graph = ragged_graph([6, 1, 11])
    L = graph.laplacian()
    n = 18
    delta = {"transposed": torch.randn(7, n).T, "strided": torch.randn(n, 14)[:, ::2], "vector": torch.randn(n),
             "d=1": torch.randn(n, 1)}[layout]
    value = sk.laplacian_quadratic(delta, L)
    assert relative_error(value, pairwise_form(delta, graph, True)) <= 1e-5


def test_graph_without_nodes_or_edges(backend):
    empty = sk.ParameterGraph.chain(0).laplacian()
    assert float(sk.laplacian_quadratic(torch.zeros(0, 4), empty)) == 0.0
    edgeless = sk.ParameterGraph.knn(torch.zeros(5, 3), k=2, block_size=2).laplacian()  # all nodes isolated
    assert float(sk.laplacian_quadratic(torch.randn(5, 3), edgeless)) == 0.0


def test_plan_splits_dense_blocks_and_csr_exactly(seed):
    """Dense diagonal blocks + remainder CSR hold every entry of L exactly once."""
    graph = ragged_graph([3, 0, 8, 1, 5], cross_block=True)
    L = graph.laplacian()
    plan = build_plan(L, torch.device("cpu"), torch.float64, dense_max=6, rows_per_tile=4)
    rebuilt = torch.zeros(17, 17, dtype=torch.float64)
    for row in range(17):
        for idx in range(int(plan.crow[row]), int(plan.crow[row + 1])):
            rebuilt[row, int(plan.col[idx])] += plan.val[idx]
    seen = set()
    for row_start, row_stop, block_start, nb, off, longest in plan.tiles.tolist():
        assert row_stop - row_start <= 4
        assert longest == int((plan.crow[row_start + 1:row_stop + 1] - plan.crow[row_start:row_stop]).max())
        if nb and block_start not in seen:
            seen.add(block_start)
            window = slice(block_start, block_start + nb)
            rebuilt[window, window] += plan.dense[off:off + nb * nb].view(nb, nb)
    assert seen == {0, 11, 12}  # blocks of 3, 1 and 5 rows are dense; the 8-row block is over the limit
    torch.testing.assert_close(rebuilt, L.to_dense(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- backward
def test_gradient_is_2_L_delta_and_matches_autograd_of_the_reference(backend, seed):
    graph = ragged_graph([7, 0, 1, 12], cross_block=True)
    L = graph.laplacian()
    delta = torch.randn(20, 9, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(3.0 * sk.laplacian_quadratic(delta, L), delta)
    (ref,) = torch.autograd.grad(3.0 * laplacian_quadratic_reference(delta, L), delta)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, 6.0 * (L.to_dense().double() @ delta.detach()), rtol=1e-10, atol=1e-12)
    (pairwise_grad,) = torch.autograd.grad(3.0 * pairwise_form(delta, graph, True), delta)
    torch.testing.assert_close(grad, pairwise_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradient_dtype_follows_delta(backend, seed, dtype):
    graph = ragged_graph([5, 9])
    L = graph.laplacian()
    delta = torch.randn(14, 6).to(dtype).requires_grad_(True)
    sk.laplacian_quadratic(delta, L).backward()
    assert delta.grad.dtype == dtype
    expected = 2 * (L.to_dense().double() @ delta.detach().double())
    assert relative_error(delta.grad, expected) <= TOLERANCE[dtype]


def test_gradcheck_and_gradgradcheck(backend, seed):
    graph = ragged_graph([3, 1, 0, 4], cross_block=True)
    L = graph.laplacian(normalized=False).to(dtype=torch.float64)
    delta = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda d_: sk.laplacian_quadratic(d_, L)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (delta,), fast_mode=backend == "triton")
    assert torch.autograd.gradgradcheck(fn, (delta,), fast_mode=backend == "triton")


def test_opcheck(backend, seed):
    graph = ragged_graph([3, 0, 5], cross_block=True)
    L = graph.laplacian()
    # dense_max=4: the 3-row block is dense, the 5-row block and the cross-block edges go through the CSR.
    plan = build_plan(L, torch.device("cpu"), torch.float32, dense_max=4, rows_per_tile=32)
    delta = torch.randn(8, 4, requires_grad=True)
    args = (plan.crow, plan.col, plan.val, plan.dense, plan.tiles)
    torch.library.opcheck(torch.ops.spectralkern.laplacian_quadratic.default, (delta, *args))
    torch.library.opcheck(torch.ops.spectralkern.laplacian_matmul.default,
                          (delta, *args, torch.tensor(1.5, requires_grad=True)))


def test_torch_compile_fullgraph_with_backward(backend, seed):
    L = ragged_graph([4, 7]).laplacian()
    delta = torch.randn(11, 6, requires_grad=True)
    # aot_eager: traces forward and backward through the custom op without inductor's C++ warm-up.
    compiled = torch.compile(lambda d_: 0.5 * sk.laplacian_quadratic(d_, L), fullgraph=True, backend="aot_eager")
    compiled(delta).backward()
    grad = delta.grad.clone()
    delta.grad = None
    (0.5 * sk.laplacian_quadratic(delta, L)).backward()
    torch.testing.assert_close(grad, delta.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_triton_backward_writes_every_output_element(seed):
    """Poisoned output: every entry of s·LΔ is written, including one-node blocks, isolated nodes and rows of
    blocks over the dense limit."""
    graph = ragged_graph([1, 0, 6, 2, 11, 40], cross_block=True)
    L = graph.laplacian()
    plan = build_plan(L, torch.device("cpu"), torch.float32, dense_max=8, rows_per_tile=tile_rows(torch.float32))
    x = torch.randn(60, 70)  # 70 columns: a partial column tile
    out = torch.full((60, 70), float("nan"))
    y = _launch_triton(x, plan.crow, plan.col, plan.val, plan.dense, plan.tiles, torch.tensor(-2.0), out=out)
    assert y.data_ptr() == out.data_ptr() and bool(torch.isfinite(out).all())
    assert relative_error(out, -2.0 * (L.to_dense().double() @ x.double())) <= 1e-5


@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
       d=st.integers(1, 33), cross_block=st.booleans(), normalized=st.booleans(),
       data_seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes_triton(sizes, d, cross_block, normalized, data_seed):
    torch.manual_seed(data_seed)
    graph = ragged_graph(sizes, cross_block=cross_block)
    delta = torch.randn(sum(sizes), d, dtype=torch.float64).requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRALKERN_BACKEND", "triton")
        value = sk.laplacian_quadratic(delta, graph.laplacian(normalized=normalized).to(dtype=torch.float64))
        (grad,) = torch.autograd.grad(value, delta)
    expected = pairwise_form(delta.detach(), graph, normalized)
    assert abs(float(value.detach()) - float(expected)) <= 1e-12 * max(float(expected), 1.0)
    L = graph.laplacian(normalized=normalized).to_dense().double()
    torch.testing.assert_close(grad, 2 * L @ delta.detach(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument(seed):
    L = ragged_graph([3, 4]).laplacian()
    with pytest.raises(TypeError, match="L must be a GraphLaplacian"):
        sk.laplacian_quadratic(torch.randn(7, 2), L.to_dense())
    with pytest.raises(ValueError, match=r"delta must have 7 rows .* got shape \(6, 2\)"):
        sk.laplacian_quadratic(torch.randn(6, 2), L)
    with pytest.raises(ValueError, match="delta must be 1-D or 2-D"):
        sk.laplacian_quadratic(torch.randn(7, 2, 1), L)
    with pytest.raises(TypeError, match="delta must have dtype in"):
        sk.laplacian_quadratic(torch.ones(7, 2, dtype=torch.int64), L)
    with pytest.raises(TypeError, match="delta must be a torch.Tensor"):
        sk.laplacian_quadratic([[0.0]] * 7, L)
    with pytest.raises(ValueError, match="delta is on meta but L is on cpu"):
        sk.laplacian_quadratic(torch.randn(7, 2, device="meta"), L)


# -------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_float64(seed, dtype):
    graph = ragged_graph([128, 1, 0, 77, 300, 256], cross_block=True, dim=16)
    L = graph.laplacian().to("cuda")
    delta = torch.randn(graph.num_nodes, 1000, device="cuda").to(dtype).requires_grad_(True)
    value = sk.laplacian_quadratic(delta, L)
    value.backward()
    assert relative_error(value.cpu(), pairwise_form(delta.detach().cpu(), graph, True)) <= TOLERANCE[dtype]
    expected = 2 * (L.to("cpu").to_dense().double() @ delta.detach().cpu().double())
    assert relative_error(delta.grad.cpu(), expected) <= TOLERANCE[dtype]
