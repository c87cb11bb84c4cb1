"""The bf16 interpreter shim (tests/_bf16_interpreter.py) against torch's own bf16 arithmetic.

torch computes each bf16 element-wise op in fp32 and rounds the result to nearest even, as a GPU does: the shim
must match it bit for bit there; its reductions round per tree level (within a few ulps of torch's fp32-accumulated
sum); its dots accumulate in fp32 (within fp32 rounding of torch's fp32 product of the same values).
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from spectralkern._backend import triton_interpreter_on  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_interpreter_on(), reason="the shim patches the CPU interpreter only")

N = 256


@triton.jit
def _elementwise_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr, OP: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(a_ptr + offs)
    b = tl.load(b_ptr + offs)
    if OP == "mul_add":
        r = a * b + a
    elif OP == "sub_div":
        r = (a - b) / b
    elif OP == "neg_max":
        r = tl.maximum(-a, b)
    elif OP == "exp":  # Triton's math functions take fp32: the kernels upcast, then round back
        r = tl.exp(a.to(tl.float32)).to(tl.bfloat16)
    elif OP == "abs_mul":
        r = tl.abs(a) * b
    elif OP == "where_lt":
        r = tl.where(a < b, a, b * 2.0)
    else:  # fp32 -> bf16 rounding of an fp32 product
        r = (a.to(tl.float32) * b.to(tl.float32) * 1.0001).to(tl.bfloat16)
    tl.store(out_ptr + offs, r)


def _torch_elementwise(a: torch.Tensor, b: torch.Tensor, op: str) -> torch.Tensor:
    if op == "mul_add":
        return a * b + a
    if op == "sub_div":
        return (a - b) / b
    if op == "neg_max":
        return torch.maximum(-a, b)
    if op == "exp":
        return torch.exp(a.float()).to(torch.bfloat16)
    if op == "abs_mul":
        return torch.abs(a) * b
    if op == "where_lt":
        return torch.where(a < b, a, b * 2.0)
    return (a.float() * b.float() * 1.0001).to(torch.bfloat16)


@pytest.mark.parametrize("op", ["mul_add", "sub_div", "neg_max", "exp", "abs_mul", "where_lt", "round"])
def test_elementwise_matches_torch_bf16_bit_for_bit(seed, op):
    a = (torch.randn(N) * 3).to(torch.bfloat16)
    b = (torch.randn(N) * 3).to(torch.bfloat16)
    out = torch.empty(N, dtype=torch.bfloat16)
    _elementwise_kernel[(1,)](a, b, out, N=N, OP=op)
    expected = _torch_elementwise(a, b, op)
    ulps = (out.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
    # numpy's and torch's fp32 exp may differ by an fp32 ulp, which can move a bf16 rounding tie by one ulp.
    assert ulps.max() <= (1 if op == "exp" else 0), (out - expected).abs().max()


def test_raw_interpreter_is_wrong_without_the_shim(seed):
    """The reason for the shim: the raw interpreter multiplies bit patterns (restored afterwards)."""
    import _bf16_interpreter

    a = torch.randn(N).to(torch.bfloat16)
    b = torch.randn(N).to(torch.bfloat16)
    out = torch.empty(N, dtype=torch.bfloat16)
    _bf16_interpreter.uninstall()
    try:
        _elementwise_kernel[(1,)](a, b, out, N=N, OP="mul_add")
    finally:
        _bf16_interpreter.install()
    assert not torch.allclose(out.float(), (a * b + a).float(), rtol=1e-2, atol=1e-2)


@triton.jit
def _reduce_kernel(x_ptr, sum_ptr, max_ptr, M: tl.constexpr, N: tl.constexpr):
    rows = tl.arange(0, M)
    cols = tl.arange(0, N)
    x = tl.load(x_ptr + rows[:, None] * N + cols[None, :])
    tl.store(sum_ptr + rows, tl.sum(x, axis=1))
    tl.store(max_ptr + rows, tl.max(x, axis=1))


def test_reductions_match_torch_bf16(seed):
    m, n = 16, 64
    x = torch.randn(m, n).to(torch.bfloat16)
    sums, maxes = torch.empty(m, dtype=torch.bfloat16), torch.empty(m, dtype=torch.bfloat16)
    _reduce_kernel[(1,)](x, sums, maxes, M=m, N=n)
    assert torch.equal(maxes, x.max(dim=1).values)
    # torch sums in fp32 and rounds once; the tree rounds once per level (log2(64) = 6 levels): a few ulps of the
    # sum of magnitudes.
    bound = 6 * 2.0 ** -8 * x.float().abs().sum(dim=1)
    assert ((sums.float() - x.float().sum(dim=1)).abs() <= bound).all()


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                PRECISION: tl.constexpr, TO_FP32: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    if TO_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    c = tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dot_accumulates_in_fp32(seed, dtype):
    m, k, n = 16, 64, 32
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    c = torch.empty(m, n)
    _dot_kernel[(1,)](a, b, c, M=m, K=k, N=n, PRECISION="tf32", TO_FP32=False)
    expected = a.double() @ b.double()
    assert ((c.double() - expected).abs() <= 1e-6 * (a.double().abs() @ b.double().abs())).all()


def test_tf32_dot_rounds_fp32_operands(seed):
    """One tf32 pass on fp32 operands carries tf32's error (~2^-11 per operand); tf32x3 and ieee do not."""
    m, k, n = 16, 64, 32
    a, b = torch.randn(m, k), torch.randn(k, n)
    expected = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    errors = {}
    for precision in ("tf32", "tf32x3", "ieee"):
        c = torch.empty(m, n)
        _dot_kernel[(1,)](a, b, c, M=m, K=k, N=n, PRECISION=precision, TO_FP32=False)
        errors[precision] = ((c.double() - expected).abs() / scale).max().item()
    assert 1e-5 < errors["tf32"] <= 2 * 2.0 ** -11
    assert errors["tf32x3"] < 1e-6 and errors["ieee"] < 1e-6
    # bf16 values converted to fp32 are exact in tf32: no extra error on that side.
    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    c = torch.empty(m, n)
    _dot_kernel[(1,)](ab, bb, c, M=m, K=k, N=n, PRECISION="tf32", TO_FP32=True)
    exact = ab.double() @ bb.double()
    assert ((c.double() - exact).abs() <= 1e-6 * (ab.double().abs() @ bb.double().abs())).all()
