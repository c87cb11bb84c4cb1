"""What the launchers hand a compiled kernel, checked without a GPU: the types Triton gives the scalar arguments
(a Python float compiles to fp32), the launch grid at production sizes (axes 1 and 2 hold at most 65,535 programs)
and the workspace a launcher allocates. Launches are recorded under the interpreter (tests/_launch_recorder.py);
the geometry tests record them on ``meta`` tensors without running anything."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _launch_recorder import GRID_LIMITS, record_launches  # noqa: E402

import spectralkern as sk  # noqa: E402
from spectralkern._backend import triton_interpreter_on  # noqa: E402

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not triton_interpreter_on(), reason="records launches through the interpreter")]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")


def _fp64_launches() -> list:
    """One small fp64 forward + backward of every op whose kernels take float scalars."""
    from test_coeff_tuning import make_inputs
    from test_smoa import Problem
    from test_spectral_filter import ragged_basis

    from spectralkern.ops.coeff_attention import coeff_attention
    from spectralkern.ops.smoa_linear import smoa_linear

    with record_launches() as launches:
        basis = ragged_basis([9, 1, 5], k=4)
        x = torch.randn(basis.num_nodes, 3, dtype=torch.float64, requires_grad=True)
        sk.spectral_filter(x, basis, torch.rand(4, dtype=torch.float64), passthrough=0.1).sum().backward()
        prob = Problem([5, 4], [3, 6], ranks=[1, 2], dtype=torch.float64, scale=0.3)
        b, a = prob.packed(requires_grad=True)
        xs = torch.randn(4, prob.inn, dtype=torch.float64, requires_grad=True)
        smoa_linear(xs, prob.weight, prob.bias, b, a, prob.layout, prob.scale).sum().backward()
        q, k, v, coeff, _ = make_inputs(1, 2, 1, 3, 4, 5, dtype=torch.float64)
        q.requires_grad_()
        coeff_attention(q, k, v, coeff, causal=True).sum().backward()
    return launches


def test_float_scalars_of_fp64_runs_compile_as_fp64(seed):
    """Finding 3: Triton types an unannotated Python float fp32 (the interpreter keeps it a double), so scale,
    qk_scale and passthrough moved fp64 results by ~1e-8 on a GPU. The kernels annotate them tl.float64."""
    launches = _fp64_launches()
    kernels = {launch.kernel for launch in launches}
    assert {"spectral_filter_kernel", "smoa_modulated_gemm_kernel", "smoa_factor_grad_kernel",
            "coeff_attn_lse_kernel", "coeff_attn_fwd_kernel", "coeff_attn_bwd_q_kernel",
            "coeff_attn_bwd_kv_kernel"} <= kernels
    fp64 = [launch for launch in launches if any(t.dtype == torch.float64 for t in launch.tensors().values())]
    wrong = {(launch.kernel, name) for launch in fp64 for name, ty in launch.scalar_types().items() if ty != "fp64"}
    assert not wrong, f"float scalars that compile to fp32 in fp64 launches: {sorted(wrong)}"


def _check_grids(launches) -> None:
    assert launches
    for launch in launches:
        over = [(axis, size, limit) for axis, (size, limit) in enumerate(zip(launch.grid, GRID_LIMITS))
                if size > limit]
        assert not over, f"{launch.kernel}: grid {launch.grid} over the CUDA limits {GRID_LIMITS}"


@pytest.mark.parametrize("batch, heads, dim", [(4096, 16, 64), (1, 40, 128)])
def test_coeff_attention_grids_fit_cuda_limits(monkeypatch, batch, heads, dim):
    """Finding 4: batch · heads sat on grid axis 1 (max 65,535): batch 4096 × 16 heads failed to launch."""
    from spectralkern.ops import coeff_attention as ca

    monkeypatch.setattr(ca, "triton_interpreter_on", lambda: False)  # the GPU's tile sizes
    q = torch.empty(batch, heads, 128, dim, device="meta", dtype=torch.bfloat16)
    coeff = torch.empty(heads, heads, device="meta")
    with record_launches(execute=False) as launches:
        out, lse = ca._forward_triton(q, q, q, coeff, None, True, dim ** -0.5)
        ca._backward_triton(out, q, q, q, coeff, None, lse, True, dim ** -0.5)
    assert len(launches) == 5
    _check_grids(launches)


def test_chebyshev_scratch_is_x_sized_for_ragged_blocks():
    """Finding 8: the recursion's scratch was num_blocks × n_pad × d — 10,000 blocks of 16 nodes plus one of 256
    at d = 4096 asked for ~42 GB fp32. Now one row per node."""
    from spectralkern.ops.chebyshev_filter import _run_block_kernel

    nodes = 10_000 * 16 + 256
    d = 4096
    blocks = torch.empty(nodes, 256, device="meta")
    block_ptr = torch.empty(10_002, dtype=torch.int64, device="meta")
    x = torch.empty(nodes, d, device="meta")
    coeffs = torch.empty(9, device="meta")
    with record_launches(execute=False) as launches:
        _run_block_kernel(x, blocks, coeffs, block_ptr, torch.empty_like(x), d, "tf32x3")
    (launch,) = launches
    scratch = launch.args["scratch_ptr"]
    block_d = launch.args["BLOCK_D"]
    assert scratch.numel() == nodes * -(-d // block_d) * block_d  # x-sized (columns padded to the tile)
    assert scratch.numel() * 4 < 3e9
    _check_grids(launches)


def test_large_launches_of_the_other_ops_fit_cuda_limits():
    """The other grids at production sizes: axis 1/2 stay column tiles, row tiles and blocks."""
    from spectralkern.ops.spectral_filter import _launch_triton

    nodes, d = 1 << 20, 8192
    x = torch.empty(nodes, d, device="meta", dtype=torch.bfloat16)
    U = torch.empty(nodes, 64, device="meta")
    block_ptr = torch.empty(nodes // 128 + 1, dtype=torch.int64, device="meta")
    gains = torch.empty(nodes // 128, 64, device="meta")
    with record_launches(execute=False) as launches:
        _launch_triton(x, U, block_ptr, gains, 0.5)
    _check_grids(launches)
