"""bf16 and fp16 runs of every Triton kernel on the CPU, through the interpreter with the bf16 shim
(tests/_bf16_interpreter.py, installed by conftest): the same operand dtypes, casts and roundings a GPU runs,
against float64 references on the same (rounded) inputs, at the quality bar's 1e-2. Shapes are tiny (the
interpreter is ~1000× slower than torch) but ragged: empty, one-node and tail blocks/tiles."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import spectralkern as sk  # noqa: E402
from spectralkern._backend import triton_interpreter_on  # noqa: E402
from spectralkern.ops._interpreter import half_operands_ok  # noqa: E402

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not (triton_interpreter_on() and half_operands_ok()),
                                 reason="needs the interpreter with the bf16 shim (tests/conftest.py installs it)")]

HALF = [torch.bfloat16, torch.float16]
TOL = 1e-2


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().double()
    return (actual.detach().double() - expected).norm().item() / max(expected.norm().item(), 1e-30)


def test_shim_is_installed_and_the_launchers_use_half_operands():
    from spectralkern.ops import coeff_attention, smoa_linear

    x = torch.zeros(1, dtype=torch.bfloat16)
    assert half_operands_ok()
    assert smoa_linear._dtypes_for(x, x)[2] is not None and "bf16" in str(smoa_linear._dtypes_for(x, x)[2])
    assert "bf16" in str(coeff_attention._dtypes_for(x, x, x)[2])


@pytest.mark.parametrize("dtype", HALF)
def test_spectral_filter_forward_and_backward(seed, dtype):
    from test_spectral_filter import dense_reference, ragged_basis

    basis = ragged_basis([20, 1, 0, 9, 40], k=8, dtype=torch.float32)
    x = torch.randn(basis.num_nodes, 24).to(dtype).requires_grad_()
    gains = torch.rand(basis.num_blocks, 8, requires_grad=True)
    y = sk.spectral_filter(x, basis, gains, passthrough=0.25)
    x64, g64 = x.detach().double().requires_grad_(), gains.detach().double().requires_grad_()
    expected = dense_reference(x64, basis, g64, 0.25)
    assert y.dtype == dtype and rel(y, expected) <= TOL
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, gains), grad_y)
    expected_grads = torch.autograd.grad(expected, (x64, g64), grad_y.double())
    for got, want in zip(grads, expected_grads):
        assert rel(got, want) <= TOL


@pytest.mark.parametrize("dtype", HALF)
def test_laplacian_quadratic_value_and_gradient(seed, dtype):
    from test_laplacian_quadratic import pairwise_form, ragged_graph

    graph = ragged_graph([20, 1, 0, 9, 40], cross_block=True)
    L = graph.laplacian()
    delta = torch.randn(graph.num_nodes, 24).to(dtype).requires_grad_()
    value = sk.laplacian_quadratic(delta, L)
    value.backward()
    assert rel(value, pairwise_form(delta.detach(), graph, True)) <= TOL
    assert rel(delta.grad, 2 * L.to_dense().double() @ delta.detach().double()) <= TOL


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("filtered", [True, False])
def test_adamw_steps(seed, dtype, filtered):
    from test_spectral_filter import ragged_basis

    from spectralkern.ops.adamw_update import AdamWHyper, adamw_update_, adamw_update_reference_

    basis = ragged_basis([20, 1, 0, 9, 40], k=8, dtype=torch.float32)
    gains = torch.rand(basis.num_blocks, 8) if filtered else None
    param = torch.randn(basis.num_nodes, 24).to(dtype)
    grad = torch.randn(basis.num_nodes, 24).to(dtype)
    m, v = torch.randn(param.shape) * 0.1, torch.rand(param.shape) * 0.01
    hyper = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3)
    ref = [t.double().clone() for t in (param, grad, m, v)]
    adamw_update_reference_(ref[0], ref[1], ref[2], ref[3], hyper, basis if filtered else None,
                            gains.double() if filtered else None, 0.25 if filtered else 0.0)
    used = adamw_update_(param, grad, m, v, hyper, basis if filtered else None, gains, 0.25 if filtered else 0.0)
    assert used == "triton"
    assert rel(m, ref[2]) <= TOL and rel(v, ref[3]) <= TOL
    assert rel(param, ref[0]) <= TOL


@pytest.mark.parametrize("dtype", HALF)
def test_smoa_forward_and_backward(seed, dtype):
    from test_smoa import Problem

    from spectralkern.ops.smoa_linear import smoa_linear

    prob = Problem([1, 40, 0, 29], [20, 1, 0, 50], ranks=[2, 0, 1, 3], dtype=dtype)
    x = torch.randn(37, prob.inn, dtype=torch.float64).to(dtype).requires_grad_()
    b, a = prob.packed(requires_grad=True)
    y = smoa_linear(x, prob.weight, prob.bias, b, a, prob.layout, prob.scale)
    assert y.dtype == dtype and rel(y, prob.dense_forward(x.detach())) <= TOL
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, b, a), grad_y)
    x64, b64, a64 = (t.detach().double().requires_grad_() for t in (x, b, a))
    y64 = smoa_linear(x64, prob.weight.double(), prob.bias.double(), b64, a64, prob.layout, prob.scale)
    expected = torch.autograd.grad(y64, (x64, b64, a64), grad_y.double())
    for g, e in zip(got, expected):
        assert rel(g, e) <= TOL


@pytest.mark.parametrize("dtype", HALF)
def test_smoa_small_updates_reach_the_output(seed, dtype):
    """Finding 1: with |s·BA| ≈ 1e-3 the update is below half an ulp of most bf16 weights; rounding
    W ⊙ (1 + s·BA) before the GEMM dropped it (≈ 99% of effective weights equal W). The output's own rounding
    (2^-9 of y) is as large as the update, so the test projects y − x Wᵀ onto the true update over all elements:
    the coefficient is ~1 when the update is there and ~0 when it is lost."""
    from test_smoa import Problem

    from spectralkern.ops.smoa_linear import smoa_linear

    prob = Problem([64], [64], ranks=[4], dtype=dtype, scale=1.0)
    prob.Bs = [torch.randn(64, 4) * 0.016]
    prob.As = [torch.randn(4, 64) * 0.016]  # s·BA ≈ 4 · 0.016² ≈ 1e-3 relative
    x = torch.randn(64, prob.inn, dtype=torch.float64).to(dtype)
    b, a = prob.packed()
    y = smoa_linear(x, prob.weight, None, b, a, prob.layout, prob.scale)
    base = x.double() @ prob.weight.double().T
    update = prob.dense_forward(x) - prob.bias.double() - base
    seen = ((y.double() - base) * update).sum() / (update * update).sum()
    assert 0.8 <= seen.item() <= 1.2, seen.item()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("path", ["materialised", "recursion", "csr"])
def test_chebyshev_kernels(seed, dtype, path):
    from test_chebyshev import ragged_laplacian

    from spectralkern.filters import chebyshev_coefficients
    from spectralkern.ops.chebyshev_filter import (_launch_block, _launch_csr, _prepared, block_layout_fits,
                                                   chebyshev_filter_reference)

    L = ragged_laplacian([20, 1, 0, 9, 40], cross_block=path == "csr", dtype=torch.float32)
    x = torch.randn(L.num_nodes, 24).to(dtype)
    coeffs = chebyshev_coefficients(sk.heat(2.0), 6, 2.0).float()
    expected = chebyshev_filter_reference(x.double(), L, coeffs.double(), 2.0)
    if path == "csr":
        crow, col, val, _, _ = _prepared(L, 2.0, torch.float32, with_blocks=False)
        y = _launch_csr(x, coeffs, crow, col, val)[0]
    else:
        assert block_layout_fits(L)
        _, _, _, block_ptr, blocks = _prepared(L, 2.0, torch.float32, with_blocks=True)
        y = _launch_block(x, coeffs, blocks, block_ptr, materialize=path == "materialised")[0]
    assert y.dtype == dtype and rel(y, expected) <= TOL


@pytest.mark.parametrize("dtype", HALF)
def test_fourier_adapter_forward_and_backward(seed, dtype, monkeypatch):
    from test_fourier_moe import dense_adapter, random_problem

    from spectralkern.ops.fourier_adapter import fourier_adapter

    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens=13, dtype=dtype)
    y = fourier_adapter(x, rows, cols, coef_re, coef_im, 20, expert_ptr=ptr, gates=gates, base=base)
    assert y.dtype == dtype and rel(y, dense_adapter(x, rows, cols, coef_re, coef_im, ptr, 20, gates, base)) <= TOL
    # Gradients (analysis with the coefficient/gate partials, synthesis for grad_x) against the torch backend in
    # float64 on the same rounded inputs.
    leaves = [x, coef_re, coef_im, gates]
    grad_y = torch.randn(y.shape).to(dtype)
    ours = grads(lambda *t: fourier_adapter(t[0], rows, cols, t[1], t[2], 20, expert_ptr=ptr, gates=t[3], base=base),
                 leaves, grad_y)
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    want = grads(lambda *t: fourier_adapter(t[0], rows, cols, t[1], t[2], 20, expert_ptr=ptr, gates=t[3],
                                            base=base.double()), [t.double() for t in leaves], grad_y.double())
    for g, e in zip(ours[1:], want[1:]):
        assert rel(g, e) <= TOL


def grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize("dtype", HALF)
def test_coeff_attention_forward_and_backward(seed, dtype):
    from test_coeff_tuning import make_inputs

    from spectralkern.ops.coeff_attention import coeff_attention, coeff_attention_reference

    q, k, v, coeff, kv_mask = make_inputs(2, 4, 2, 19, 23, 16, lengths=[23, 7])
    grad_out = torch.randn(q.shape)
    expected = grads(lambda *t: coeff_attention_reference(*t, causal=True, kv_mask=kv_mask),
                     [t.to(dtype).double() for t in (q, k, v)] + [coeff.double()], grad_out.to(dtype).double())
    ours = grads(lambda *t: coeff_attention(*t, causal=True, kv_mask=kv_mask),
                 (q.to(dtype), k.to(dtype), v.to(dtype), coeff), grad_out.to(dtype))
    for a, b in zip(ours, expected):
        assert rel(a, b) <= TOL
