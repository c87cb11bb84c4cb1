"""The registry (spectralkern._backend): its table agrees with what each op launches (launchers spied on), forced
backends that cannot run raise with the reason, and the CPU group update of AdamW is bit-compatible with torch's."""
from __future__ import annotations

import os

import pytest
import torch

import spectralkern as sk
from spectralkern import _backend, _extensions
from spectralkern._backend import (TRITON_MAX_DIM, TRITON_MAX_HEAD_DIM, TRITON_MAX_K, TRITON_MAX_RANK, Algorithm,
                                   Backend, BackendUnavailable, OpSpec, backend_of, why_not)
from spectralkern._checks import FLOAT_DTYPES
from spectralkern.bench.inputs import random_basis
from spectralkern.ops import adamw_update as adamw_ops
from spectralkern.ops import spectral_filter as filter_ops
from spectralkern.ops.adamw_update import (AdamWHyper, GroupHyper, SpectralTarget, adamw_update_,
                                           adamw_update_group_)
from spectralkern.ops.coeff_attention import coeff_attention_backend
from spectralkern.ops.fourier_adapter import fourier_adapter_backend
from spectralkern.ops.smoa_linear import smoa_linear_backend

CPU = torch.device("cpu")


def _basis(sizes: list[int], k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> sk.SpectralBasis:
    ptr = torch.tensor([0] + sizes).cumsum(0)
    return random_basis(ptr, k, dtype=dtype, device=CPU, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.delenv("SPECTRALKERN_BACKEND", raising=False)


def triton_runs_here() -> bool:
    return _backend.runtime_status("triton").live  # under the tests: the interpreter (conftest)


# ------------------------------------------------------------------------------------------ spectral_filter spies
@pytest.fixture
def filter_spies(monkeypatch) -> list[str]:
    """Replace the filter's three launchers by spies that record which one ran (and return zeros)."""
    launched: list[str] = []

    def spy(name):
        def launcher(x, U, block_ptr, gains, passthrough, *args, saved_x=None, write_y=True, out=None):
            launched.append(name)
            y = torch.zeros_like(x) if write_y else x.new_empty(0)
            return y, (torch.zeros(block_ptr.numel() - 1, U.shape[1]) if saved_x is not None else None)
        return launcher

    monkeypatch.setattr(filter_ops, "_launch_cuda", spy("cuda"))
    monkeypatch.setattr(filter_ops, "_launch_triton", spy("triton"))
    monkeypatch.setattr(filter_ops, "_launch_native", spy("native"))
    monkeypatch.setattr(filter_ops, "filter_torch", spy("torch"))
    return launched


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k", [1, TRITON_MAX_K, TRITON_MAX_K + 1])
def test_filter_launches_what_the_table_says(auto, filter_spies, dtype, k):
    basis = _basis([k + 2, 3], k)
    x = torch.randn(basis.num_nodes, 3, dtype=dtype, requires_grad=True)
    gains = torch.rand(basis.num_blocks, k, requires_grad=True)
    native = dtype in (torch.float32, torch.float64) and _backend.runtime_status("native").live  # ragged layout
    expected = "triton" if triton_runs_here() and k <= TRITON_MAX_K else "native" if native else "torch"
    assert filter_ops.spectral_filter_backend(x, k, basis.block_ptr) == expected
    y = sk.spectral_filter(x, basis, gains)          # through the custom op (autograd recorded)
    y.sum().backward()                               # the backward op asks the registry too
    with torch.no_grad():
        sk.spectral_filter(x, basis, gains)          # the eager fast path
    assert filter_spies == [expected] * 3


def test_filter_empty_input_and_empty_blocks(auto, filter_spies):
    basis = _basis([0, 0], 4)
    x = torch.zeros(0, 5)
    choice = filter_ops.spectral_filter_backend(x, 4, basis.block_ptr)
    sk.spectral_filter(x, basis, torch.rand(2, 4))
    assert filter_spies == [choice.backend]
    assert choice.backend == "torch" or triton_runs_here()


def test_forced_backend_that_cannot_run_names_the_reason(monkeypatch, filter_spies):
    basis = _basis([TRITON_MAX_K + 3], TRITON_MAX_K + 1)
    x = torch.randn(basis.num_nodes, 2)
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match=rf"spectral_filter: SPECTRALKERN_BACKEND=triton cannot run here: "
                                                 rf"k = {TRITON_MAX_K + 1} > {TRITON_MAX_K}"):
        sk.spectral_filter(x, basis, torch.rand(TRITON_MAX_K + 1))
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="SPECTRALKERN_BACKEND=cuda cannot run here"):
        sk.spectral_filter(x[:, :1].double(), basis.to(dtype=torch.float64), torch.rand(TRITON_MAX_K + 1))
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "native")
    with pytest.raises(BackendUnavailable, match="native cannot run here: needs ragged"):  # one block: uniform
        sk.spectral_filter(x, basis, torch.rand(TRITON_MAX_K + 1))
    with pytest.raises(BackendUnavailable, match="smoa_linear has no native implementation"):
        backend_of("smoa_linear", x, rank=2)
    assert filter_spies == []  # nothing ran: no silent fallback


@pytest.mark.parametrize("algorithm, sizes", [("batched", [8, 8, 8]), ("padded", [5, 0, 1, 9]),
                                              ("loop", [5, 0, 1, 9])])
def test_filter_algorithms_match_the_float64_reference(auto, algorithm, sizes):
    basis = _basis(sizes, 4, dtype=torch.float64)
    x = torch.randn(basis.num_nodes, 6, dtype=torch.float64)
    gains = torch.rand(basis.num_blocks, 4, dtype=torch.float64)
    for h in (0.0, 0.3):
        expected = sk.spectral_filter_reference(x, basis.U, basis.block_ptr, gains, h)
        y, grads = filter_ops.filter_torch(x, basis.U, basis.block_ptr, gains, h, algorithm, saved_x=2 * x)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads, filter_ops.spectral_filter_gains_grad_reference(
            x, 2 * x, basis.U, basis.block_ptr), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_kernel_matches_the_float64_reference(dtype):
    """The compiled CPU kernel on ragged, empty, one-node and k > n_b blocks, k not a multiple of its 8-vector
    chunks, d not a multiple of its 16-column tiles, with and without passthrough and the gains' gradient."""
    if not _backend.runtime_status("native").live:
        pytest.skip("spectralkern._native is not built")
    basis = _basis([5, 0, 1, 23, 17, 40], 11, dtype=torch.float64)
    x, saved = torch.randn(basis.num_nodes, 37, dtype=torch.float64), torch.randn(basis.num_nodes, 37,
                                                                                dtype=torch.float64)
    gains = torch.rand(basis.num_blocks, 11, dtype=torch.float64)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for h in (0.0, 0.3):
        y, grads = filter_ops._launch_native(x.to(dtype), basis.U, basis.block_ptr, gains, h, saved_x=saved.to(dtype))
        expected = sk.spectral_filter_reference(x, basis.U, basis.block_ptr, gains, h)
        expected_grads = filter_ops.spectral_filter_gains_grad_reference(x, saved, basis.U, basis.block_ptr)
        assert float((y.double() - expected).norm() / expected.norm()) <= tolerance
        assert float((grads.double() - expected_grads).norm() / expected_grads.norm()) <= tolerance


def test_filter_cost_model_picks_by_layout(auto):
    uniform, ragged, many_small = _basis([64] * 8, 8), _basis([1, 64, 3, 40, 17], 8), _basis([1, 2, 3, 4] * 200, 2)
    choose = lambda b, d: filter_ops.spectral_filter_backend(torch.zeros(b.num_nodes, d), b.k, b.block_ptr,
                                                             backend="torch").algorithm
    assert choose(uniform, 256) == "batched"
    assert choose(ragged, 256) == "loop"        # few blocks, 2.5x padding: the loop's overhead is cheaper
    assert choose(many_small, 256) == "padded"  # 800 tiny blocks: the loop's per-block overhead dominates
    with pytest.raises(BackendUnavailable, match="algorithm 'batched' cannot run here: needs uniform"):
        filter_ops.spectral_filter_backend(torch.zeros(ragged.num_nodes, 3), 8, ragged.block_ptr,
                                           backend="torch", algorithm="batched")


# ------------------------------------------------------------------------------------------ adamw_update spies
@pytest.fixture
def adamw_spies(monkeypatch) -> list[str]:
    launched: list[str] = []
    monkeypatch.setattr(adamw_ops, "adamw_update_cuda_", lambda *a, **k: launched.append("cuda"))
    monkeypatch.setattr(adamw_ops, "_launch_spectral", lambda *a, **k: launched.append("triton"))
    monkeypatch.setattr(adamw_ops, "_launch_plain", lambda *a, **k: launched.append("triton"))
    monkeypatch.setattr(adamw_ops, "adamw_update_reference_", lambda *a, **k: launched.append("torch"))
    return launched


HYPER = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k", [None, TRITON_MAX_K, TRITON_MAX_K + 1])
def test_adamw_launches_what_the_table_says(auto, adamw_spies, dtype, k):
    basis = _basis([k + 1], k) if k is not None else None
    rows = basis.num_nodes if basis is not None else 4
    p, g = torch.zeros(rows, 3, dtype=dtype), torch.zeros(rows, 3, dtype=dtype)
    m, v = (torch.zeros(rows, 3, dtype=adamw_ops.state_dtype(p)) for _ in range(2))
    gains = torch.rand(1, k) if k is not None else None
    triton_ok = triton_runs_here() and dtype != torch.float64 and (k is None or k <= TRITON_MAX_K)
    expected = "triton" if triton_ok else "torch"
    assert adamw_update_(p, g, m, v, HYPER, basis, gains) == expected
    assert adamw_spies == [expected]


def test_adamw_forced_backend_does_not_fall_back_silently(monkeypatch, adamw_spies):
    """Regression: with SPECTRALKERN_BACKEND=triton a parameter whose moments have other strides used to be updated
    by torch without a word; now the call raises with the reason."""
    p = torch.zeros(3, 4).T  # not contiguous
    m, v = torch.zeros(4, 3), torch.zeros(4, 3)
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match=r"adamw_update: SPECTRALKERN_BACKEND=triton cannot run here: "
                                                 r"(needs dense_state|triton)"):
        adamw_update_(p, torch.zeros(4, 3), m, v, HYPER)
    assert adamw_spies == []


# ------------------------------------------------------------------------------------------ the other ops
@pytest.mark.parametrize("selector, limit", [
    (lambda x, n: smoa_linear_backend(x, n), TRITON_MAX_RANK),
    (lambda x, n: coeff_attention_backend(x.new_zeros(1, 1, 2, n)), TRITON_MAX_HEAD_DIM),
    (lambda x, n: fourier_adapter_backend(x, n, 3), TRITON_MAX_DIM),
])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_selectors_follow_the_limits(auto, selector, limit, dtype):
    x = torch.zeros(2, 3, dtype=dtype)
    at_limit = "triton" if triton_runs_here() else "torch"
    assert selector(x, limit) == at_limit
    assert selector(x, limit + 1) == "torch"
    assert "> " + str(limit) in selector(x, limit + 1).rejected["triton"]


def test_table_rules_for_the_compiled_cuda_kernels():
    """What the cuda entry claims, independent of this machine's runtime (device=None: table only)."""
    ok = lambda op, dtype, **facts: why_not(op, "cuda", dtype, **facts) is None
    assert ok("spectral_filter", torch.bfloat16, k=128) and not ok("spectral_filter", torch.bfloat16, k=129)
    assert not ok("spectral_filter", torch.float64, k=8)
    assert ok("adamw_update", torch.bfloat16, state_dtype=torch.bfloat16, k=8, dense_state=True)
    assert not ok("adamw_update", torch.float16, state_dtype=torch.bfloat16, k=8, dense_state=True)
    assert not ok("adamw_update", torch.float32, state_dtype=torch.float32, dense_state=False)
    assert "no cuda implementation" in why_not("smoa_linear", "cuda", torch.float32)


# ------------------------------------------------------------------------------------------ the registry itself
def test_choice_names_every_other_backend_and_compares_to_its_name(auto):
    choice = backend_of("spectral_filter", torch.zeros(2, 2, dtype=torch.float64), k=4)
    assert choice == choice.backend and set(choice.rejected) == {"cuda", "triton", "native", "torch"} - {choice.backend}
    assert "dtype float64 not in (float32, float16, bfloat16)" in choice.rejected["cuda"]
    assert choice.describe().startswith(f"spectral_filter on {choice.backend}")


def test_backend_argument_and_env_var_are_validated(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton, native, torch; got 'gpu'"):
        backend_of("spectral_filter", torch.zeros(1), backend="gpu")
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="SPECTRALKERN_BACKEND must be one of auto, cuda, triton, native, torch"):
        backend_of("spectral_filter", torch.zeros(1))
    with pytest.raises(ValueError, match="op must be one of spectral_filter, adamw_update"):
        backend_of("nonexistent", torch.zeros(1), backend="torch")


@pytest.mark.parametrize("before", [None, "torch"])
def test_forced_sets_the_backend_for_its_block_and_restores_what_was_there(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_backend.ENV_VAR, before)
    with _backend.forced("triton"):
        assert _backend.requested_backend() == "triton"
    assert os.environ.get(_backend.ENV_VAR) == before
    with pytest.raises(ValueError, match="SPECTRALKERN_BACKEND must be one of"):
        with _backend.forced("gpu"):
            pass
    assert os.environ.get(_backend.ENV_VAR) == before


def test_triton_without_a_gpu_or_the_interpreter_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreter_on", lambda: False)
    _backend.triton_status.cache_clear()
    try:
        with pytest.raises(BackendUnavailable, match="triton cannot run here: .*(no CUDA device|not installed)"):
            backend_of("laplacian_quadratic", torch.zeros(3), backend="triton")
        assert backend_of("laplacian_quadratic", torch.zeros(3), backend="auto") == "torch"
    finally:
        _backend.triton_status.cache_clear()


def test_decisions_follow_a_changed_runtime(monkeypatch, auto):
    """The decision cache is keyed on the runtimes' statuses: a swapped status is seen at once."""
    before = backend_of("spectral_filter", torch.zeros(2, 2), k=2)
    off = _extensions.ExtensionStatus(False, "switched off by the test")
    real = _extensions.status
    monkeypatch.setattr(_extensions, "status", lambda name: off if name == "cuda" else real(name))
    after = backend_of("spectral_filter", torch.zeros(2, 2), k=2)
    assert after.rejected["cuda"] == "switched off by the test" and after.backend == before.backend


def test_a_stale_native_build_is_off_with_the_reason():
    """A _native compiled before an entry point existed (an old in-place build) must not be picked and then fail."""
    class OldBuild:
        __file__ = "/site-packages/spectralkern/_native.so"
        lowest_eigenpairs = connected_components = csr_summary = staticmethod(lambda *a: None)

    status = _extensions.probe_native(find_spec=lambda name: object(), import_module=lambda name: OldBuild())
    assert not status.live and status.warn
    assert "lacks spectral_filter (a stale build); rebuild it" in status.reason
    missing = _extensions.probe_native(find_spec=lambda name: None)
    assert not missing.live and not missing.warn and "is not built" in missing.reason


def test_op_specs_are_checked():
    with pytest.raises(ValueError, match="must list the torch backend"):
        OpSpec("x", (Backend("triton"),))
    with pytest.raises(ValueError, match="in auto's order"):
        OpSpec("x", (Backend("torch"), Backend("cuda")))
    with pytest.raises(ValueError, match="names backends the op lacks"):
        OpSpec("x", (Backend("torch"),), algorithms=(Algorithm("a", ("cuda",)),))


def test_every_op_is_in_the_table_and_info_prints_it():
    ops = {row["op"] for row in _backend.table()}
    assert ops == set(_backend.OPS) >= {"spectral_filter", "adamw_update", "chebyshev_filter",
                                        "laplacian_quadratic", "coeff_attention", "smoa_linear", "fourier_adapter"}
    from spectralkern import cli
    import contextlib, io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.info() == 0
    text = out.getvalue()
    for op in _backend.OPS:
        assert f"  {op} on cpu: " in text and f"\n  {op} " in text


# ------------------------------------------------------------------------------------------ the AdamW group update
def _group_run(seed: int, filtered: bool, torch_kwargs: dict | None, steps: int = 4):
    """Two parameters (one filtered when asked) for ``steps`` steps: ours (torch_kwargs None) or torch's AdamW
    on our filtered gradients. Returns the parameters and moments."""
    gen = torch.Generator().manual_seed(seed)
    basis = _basis([5, 7], 3, seed)
    gains = torch.rand(2, 3, generator=gen)
    params = [torch.randn(12, 4, generator=gen), torch.randn(6, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]
    targets = [SpectralTarget(basis, gains, 0.2) if filtered else None, None]
    hyper = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)
    if torch_kwargs is None:
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        counts = [torch.tensor(0.0) for _ in params]
        for step_grads in grads:
            for c in counts:
                c += 1
            adamw_update_group_(params, step_grads, m, v, counts, hyper, targets)
        return params + m + v
    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(leaves, lr=hyper.lr, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps,
                            weight_decay=hyper.weight_decay, **torch_kwargs)
    for step_grads in grads:
        for leaf, g, t in zip(leaves, step_grads, targets):
            leaf.grad = filter_ops.filter_gradient(g, t.basis, t.gains, t.passthrough) if t is not None else g
        opt.step()
    return ([leaf.detach() for leaf in leaves] + [opt.state[leaf]["exp_avg"] for leaf in leaves]
            + [opt.state[leaf]["exp_avg_sq"] for leaf in leaves])


@pytest.mark.parametrize("torch_kwargs", [{}, {"foreach": True}])
def test_group_update_of_unfiltered_parameters_is_torch_adamw_bit_for_bit(monkeypatch, seed, torch_kwargs):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    for ours, theirs in zip(_group_run(seed, False, None), _group_run(seed, False, torch_kwargs)):
        assert torch.equal(ours, theirs)


def test_group_update_of_filtered_parameters_is_fused_adamw_bit_for_bit(monkeypatch, seed):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    ours, fused = _group_run(seed, True, None), _group_run(seed, True, {"fused": True})
    assert torch.equal(ours[0], fused[0]) and torch.equal(ours[2], fused[2]) and torch.equal(ours[4], fused[4])


def test_group_update_reports_each_parameters_path(monkeypatch, seed):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    basis = _basis([4], 2, seed)
    params = [torch.zeros(4, 3), torch.zeros(3), torch.zeros(4, 3, dtype=torch.bfloat16)]
    grads = [torch.ones_like(p) for p in params]
    m = [torch.zeros(p.shape) for p in params]
    v = [torch.zeros(p.shape) for p in params]
    used = adamw_update_group_(params, grads, m, v, [torch.tensor(1.0)] * 3,
                               GroupHyper(1e-2, 0.9, 0.999, 1e-8, 0.0),
                               [SpectralTarget(basis, torch.ones(1, 2)), None, None])
    assert used == ["torch:fused", "torch:foreach", "torch:reference"]
    with pytest.raises(ValueError, match="must have one length each"):
        adamw_update_group_(params, grads[:2], m, v, [torch.tensor(1.0)] * 3,
                            GroupHyper(1e-2, 0.9, 0.999, 1e-8, 0.0), [None] * 3)
