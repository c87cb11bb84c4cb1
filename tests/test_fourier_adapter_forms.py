"""The Fourier adapter's torch forms (fft, dense, per_frequency) against the float64 FFT reference, gradcheck, and
the registry's choice among them by the measured cost model."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralkern._backend import BackendUnavailable
from spectralkern.ops import _fourier_cost, _fourier_forms
from spectralkern.ops import fourier_adapter as op_module
from spectralkern.ops.fourier_adapter import (ALGORITHMS, fourier_adapter, fourier_adapter_backend,
                                              fourier_adapter_backward_reference, fourier_adapter_reference)
from _numerics import relative_error  # noqa: E402

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")


def problem(out_features, in_features, n, experts, tokens, gated, dtype, generator):
    """Random frequencies including the edge columns 0 and in/2 and the row 0; experts own contiguous ranges."""
    rows = torch.randint(0, out_features, (n,), generator=generator)
    cols = torch.randint(0, in_features, (n,), generator=generator)
    cols[: min(n, 2)] = torch.tensor([0, in_features // 2])[: min(n, 2)]
    rows[:1] = 0
    cuts = torch.randint(0, n + 1, (experts - 1,), generator=generator).sort().values
    expert_ptr = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    coef_re, coef_im = (torch.randn(n, generator=generator, dtype=torch.float64).to(dtype) for _ in range(2))
    x = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64).to(dtype)
    gates = None
    if gated:
        gates = torch.rand(tokens, experts, generator=generator, dtype=torch.float64).to(dtype) + 0.1
        gates[0, 0] = 0.0  # a token not routed to expert 0
    base = torch.randn(tokens, out_features, generator=generator, dtype=torch.float64).to(dtype)
    return x, rows, cols, coef_re, coef_im, expert_ptr, gates, base


SHAPES = [(12, 10, 7, 1, 6, False), (9, 8, 11, 3, 5, True), (1, 5, 3, 1, 4, False), (16, 1, 4, 2, 3, True),
          (15, 13, 20, 2, 1, True)]


@pytest.mark.parametrize("form", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_form_matches_float64_reference(form, dtype, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features, n, experts, tokens, gated = shape
    x, rows, cols, coef_re, coef_im, expert_ptr, gates, base = problem(out_features, in_features, n, experts,
                                                                      tokens, gated, dtype, gen)
    x.requires_grad_()
    params = [t.requires_grad_() for t in (coef_re, coef_im) + ((gates,) if gates is not None else ())]
    y = fourier_adapter(x, rows, cols, coef_re, coef_im, out_features, expert_ptr=expert_ptr, gates=gates, base=base,
                        algorithm=form)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(y, [x, *params], grad_y)

    d = [None if t is None else t.detach().double() for t in (x, coef_re, coef_im, gates, base)]
    expected_y = fourier_adapter_reference(d[0], rows, cols, d[1], d[2], expert_ptr, out_features, d[3], d[4])
    expected = fourier_adapter_backward_reference(grad_y.double(), d[0], in_features, rows, cols, d[1], d[2],
                                                  expert_ptr, d[3], True, True)
    assert y.dtype == dtype and relative_error(y, expected_y) <= TOLERANCE[dtype]
    for name, g, e in zip(("x", "coef_re", "coef_im", "gates"), got, expected):
        assert g.dtype == dtype, name
        assert relative_error(g, e) <= 10 * TOLERANCE[dtype], name


@pytest.mark.parametrize("form", ALGORITHMS)
def test_gradcheck_every_form(form, seed):
    gen = torch.Generator().manual_seed(seed)
    x, rows, cols, coef_re, coef_im, expert_ptr, gates, base = problem(7, 6, 5, 2, 3, True, torch.float64, gen)
    gates[0, 0] = 0.5  # gradcheck needs every gate non-zero (a zero gate's gradient is defined as zero)

    def f(x, coef_re, coef_im, gates, base):
        return fourier_adapter(x, rows, cols, coef_re, coef_im, 7, expert_ptr=expert_ptr, gates=gates, base=base,
                               algorithm=form)
    inputs = tuple(t.requires_grad_() for t in (x, coef_re, coef_im, gates, base))
    assert torch.autograd.gradcheck(f, inputs)


@settings(max_examples=15, deadline=None)
@given(out_features=st.integers(1, 20), in_features=st.integers(1, 20), n=st.integers(1, 12),
       experts=st.integers(1, 3), tokens=st.integers(1, 6), gated=st.booleans(), data_seed=st.integers(0, 2**31))
def test_hypothesis_shapes_every_form_agrees(out_features, in_features, n, experts, tokens, gated, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    x, rows, cols, coef_re, coef_im, expert_ptr, gates, base = problem(out_features, in_features, n, experts,
                                                                      tokens, gated, torch.float64, gen)
    expected = fourier_adapter_reference(x, rows, cols, coef_re, coef_im, expert_ptr, out_features, gates, base)
    for form in ALGORITHMS:
        y = fourier_adapter(x, rows, cols, coef_re, coef_im, out_features, expert_ptr=expert_ptr, gates=gates,
                            base=base, algorithm=form)
        assert relative_error(y, expected) <= 1e-12, form


@pytest.mark.parametrize("form", ["dense", "fft"])
def test_opcheck_with_a_forced_algorithm(form, seed):
    gen = torch.Generator().manual_seed(seed)
    x, rows, cols, coef_re, coef_im, expert_ptr, gates, base = problem(6, 8, 5, 2, 4, True, torch.float32, gen)
    args = (x.requires_grad_(), rows.int(), cols.int(), coef_re.requires_grad_(), coef_im.requires_grad_(),
            expert_ptr.int(), gates.requires_grad_(), base, 6, form)
    torch.library.opcheck(torch.ops.spectralkern.fourier_adapter.default, args)


@pytest.mark.parametrize("form", ALGORITHMS)
def test_eager_entry_equals_the_custom_op_and_compile_uses_the_op(form, seed, monkeypatch):
    """Eager calls skip the dispatcher (``_eager.eager_autograd``); they must compute exactly what the custom op
    computes, gradients included, and torch.compile must still see the op."""
    gen = torch.Generator().manual_seed(seed)
    x, rows, cols, coef_re, coef_im, expert_ptr, gates, base = problem(9, 8, 11, 3, 5, True, torch.float64, gen)
    rows, cols, expert_ptr = rows.int(), cols.int(), expert_ptr.int()
    grad_y = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    results = []
    for call in (op_module.fourier_adapter_unchecked, torch.ops.spectralkern.fourier_adapter):
        leaves = [t.clone().requires_grad_() for t in (x, coef_re, coef_im, gates, base)]
        y = call(leaves[0], rows, cols, leaves[1], leaves[2], expert_ptr, leaves[3], leaves[4], 9, form)
        results.append((y, *torch.autograd.grad(y, leaves, grad_y)))
    for eager, dispatched in zip(*results):
        assert torch.equal(eager, dispatched)
    monkeypatch.setattr(op_module, "_eager_fourier_adapter", lambda *a: pytest.fail("eager entry under compile"))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def compiled(x):
        return op_module.fourier_adapter_unchecked(x, rows, cols, coef_re, coef_im, expert_ptr, gates, base, 9, form)
    assert relative_error(compiled(x), results[0][0]) <= 1e-12


# ------------------------------------------------------------------------------------------ the choice
def facts(tokens, size_out, size_in, n, **extra):
    return {**dict(tokens=tokens, in_features=size_in, out_features=size_out, n=n, slots=1, gated=False,
                   backward=False, need_x=True, need_params=False, device_type="cpu", acc=torch.float32), **extra}


@pytest.mark.parametrize("tokens, out_features, in_features, n, fastest", [
    (1024, 384, 384, 1000, "dense"),          # small layer, many tokens: one ΔW and a small GEMM
    (256, 2048, 2048, 1000, "fft"),           # large layer: O(in log in) per token
    (256, 1024, 1024, 4, "per_frequency"),    # a handful of frequencies: 4·n·(in + out) per token is least
])
def test_registry_picks_the_cheapest_form_and_the_op_runs_it(tokens, out_features, in_features, n, fastest,
                                                             monkeypatch):
    x = torch.randn(tokens, in_features)
    choice = fourier_adapter_backend(x, in_features, out_features, n=n)
    costs = {form: _fourier_cost.form_seconds(form, facts(tokens, out_features, in_features, n))
             for form in ALGORITHMS}
    assert choice.backend == "torch" and choice.algorithm == min(costs, key=costs.get) == fastest

    ran = []
    for form, name in (("dense", "dense_forward"), ("per_frequency", "per_frequency_forward")):
        original = getattr(_fourier_forms, name)
        monkeypatch.setattr(_fourier_forms, name, lambda *a, _f=original, _n=form, **k: ran.append(_n) or _f(*a, **k))
    original_fft = op_module.fourier_adapter_reference
    monkeypatch.setattr(op_module, "fourier_adapter_reference",
                        lambda *a, **k: ran.append("fft") or original_fft(*a, **k))
    rows, cols = torch.randint(0, out_features, (n,)), torch.randint(0, in_features, (n,))
    with torch.no_grad():
        fourier_adapter(x[:2], rows, cols, torch.randn(n), torch.randn(n), out_features)  # 2 tokens: re-decided
    expected = fourier_adapter_backend(x[:2], in_features, out_features, n=n).algorithm
    assert ran == [expected]


def test_the_backward_is_decided_by_its_own_needs():
    x = torch.randn(1024, 768)
    forward = fourier_adapter_backend(x, 768, 768, n=1000)
    grad_x_only = fourier_adapter_backend(x, 768, 768, n=1000, backward=True, need_x=True, need_params=False)
    for choice in (forward, grad_x_only):
        costs = {form: _fourier_cost.form_seconds(form, facts(1024, 768, 768, 1000, **(
            {} if choice is forward else {"backward": True}))) for form in ALGORITHMS}
        assert choice.algorithm == min(costs, key=costs.get)


def test_forced_algorithm_that_cannot_run_raises_with_the_reason(monkeypatch):
    x, rows, cols = torch.randn(4, 8), torch.randint(0, 6, (3,)), torch.randint(0, 8, (3,))
    coef = torch.randn(3)
    monkeypatch.setattr(_fourier_cost, "DENSE_MAX_BYTES", 0)
    with pytest.raises(BackendUnavailable, match="dense_fits"):
        fourier_adapter(x, rows, cols, coef, coef, 6, algorithm="dense")
    # with dense out of reach, auto never picks it
    assert fourier_adapter_backend(torch.randn(1024, 384), 384, 384, n=1000).algorithm != "dense"
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")  # the interpreter (conftest): per_frequency only
    with pytest.raises(BackendUnavailable, match="no algorithm 'fft' on the triton backend"):
        fourier_adapter(x, rows, cols, coef, coef, 6, algorithm="fft")
    with pytest.raises(ValueError, match="algorithm must be None or one of"):
        fourier_adapter(x, rows, cols, coef, coef, 6, algorithm="fast")


def test_calibration_measures_every_constant():
    measured = _fourier_cost.calibrate(repeats=2)
    for name, value in vars(measured).items():
        assert math.isfinite(value) and value > 0, name
    # the GEMM constant is a FLOP's time: between 1 TFLOP/s and 1 GFLOP/s on any CPU this runs on
    assert 1e-12 < measured.gemm_flop < 1e-9


def test_dense_backward_reuses_the_forwards_delta_and_never_a_stale_one(monkeypatch, seed):
    gen = torch.Generator().manual_seed(seed)
    x, rows, cols, coef_re, coef_im, expert_ptr, _, _ = problem(9, 8, 6, 1, 5, False, torch.float64, gen)
    builds = []
    original = _fourier_forms.dense_delta_weights
    monkeypatch.setattr(_fourier_forms, "dense_delta_weights", lambda *a: builds.append(1) or original(*a))
    leaf_re, leaf_im = coef_re.clone().requires_grad_(), coef_im.clone().requires_grad_()
    for step in range(2):
        y = fourier_adapter(x, rows, cols, leaf_re * 2, leaf_im * 2, 9, algorithm="dense")
        grads = torch.autograd.grad(y.square().sum(), [leaf_re, leaf_im])
        assert len(builds) == step + 1  # one ΔW per step: built by the forward, reused by the backward
    assert len(_fourier_forms._DELTAS) == 0  # gone with the step's coefficient tensors
    expected = fourier_adapter_backward_reference(2 * y.detach(), x, 8, rows, cols, 2 * coef_re, 2 * coef_im,
                                                  expert_ptr, None, False, True)
    assert relative_error(grads[0], 2 * expected[1]) <= 1e-12
    # a coefficient tensor changed in place after the forward is not served its old ΔW
    with torch.no_grad():
        first = fourier_adapter(x, rows, cols, coef_re, coef_im, 9, algorithm="dense")
        coef_re.mul_(3.0)
        second = fourier_adapter(x, rows, cols, coef_re, coef_im, 9, algorithm="dense")
    expected = fourier_adapter_reference(x, rows, cols, coef_re, coef_im, expert_ptr, 9)
    assert relative_error(second, expected) <= 1e-12 and not torch.allclose(first, second)


def test_bench_case_forced_forms_agree_with_the_float64_answer(seed):
    """The benchmark's forced-form providers run the layer's own calls (they broke silently once when the layer's
    attributes moved into its adapter unit)."""
    from spectralkern.bench.cases import fourier as fourier_case

    case = next(c for c in fourier_case.cases(torch.device("cpu"), quick=True) if c.name.endswith("E4-top2-fwd_bwd"))
    prepared = case.prepare(torch.device("cpu"))
    forms = [p for p in prepared.providers if p.name in {f"fourier_{form}" for form in ALGORITHMS}]
    assert len(forms) == len(ALGORITHMS)
    for provider in forms:
        assert relative_error(provider.fn(), prepared.reference_for(provider.name)) <= prepared.tolerance, \
            provider.name


# ------------------------------------------------------------------------------------------ the FFT form's reuse
def test_fft_eager_backward_reuses_the_forwards_spectrum_in_chunks(seed, monkeypatch):
    """The eager entry keeps x's gathered spectrum for the coefficients' gradient: one rfft of x per step (the custom
    op, which cannot keep it, transforms x again), the same gradients, also when the tokens run in chunks."""
    gen = torch.Generator().manual_seed(seed)
    x, rows, cols, coef_re, coef_im, expert_ptr, gates, base = problem(9, 8, 11, 3, 5, True, torch.float64, gen)
    rows, cols, expert_ptr = rows.int(), cols.int(), expert_ptr.int()
    grad_y = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    calls = []
    real_rfft = torch.fft.rfft
    monkeypatch.setattr(torch.fft, "rfft", lambda *a, **k: calls.append(a[0].shape[0]) or real_rfft(*a, **k))
    results = {}
    for name, call, workspace in (("eager", op_module.fourier_adapter_unchecked, op_module.WORKSPACE_BYTES),
                                  ("op", torch.ops.spectralkern.fourier_adapter, op_module.WORKSPACE_BYTES),
                                  ("eager, 1-token chunks", op_module.fourier_adapter_unchecked, 1)):
        monkeypatch.setattr(op_module, "WORKSPACE_BYTES", workspace)
        calls.clear()
        leaves = [t.clone().requires_grad_() for t in (x, coef_re, coef_im, gates)]
        y = call(leaves[0], rows, cols, leaves[1], leaves[2], expert_ptr, leaves[3], base, 9, "fft")
        results[name] = (y, *torch.autograd.grad(y, leaves, grad_y))
        assert sum(calls) == (2 if name.startswith("eager") else 3) * 5, name  # token rows transformed
    for got, want in zip(results["eager"], results["op"]):
        assert torch.equal(got, want)
    for got, want in zip(results["eager, 1-token chunks"], results["eager"]):
        assert relative_error(got, want) <= 1e-12


def test_fft_folds_follow_frequencies_changed_in_place(seed):
    """The FFT form's bins are cached per frequency tensor; writing new frequencies into it rebuilds them."""
    gen = torch.Generator().manual_seed(seed)
    x, rows, cols, coef_re, coef_im, expert_ptr, _, _ = problem(12, 10, 7, 1, 6, False, torch.float64, gen)
    rows, cols = rows.int(), cols.int()
    fourier_adapter(x, rows, cols, coef_re, coef_im, 12, algorithm="fft")
    rows.copy_(torch.randint(0, 12, (7,), generator=gen))
    cols.copy_(torch.randint(0, 10, (7,), generator=gen))
    got = fourier_adapter(x, rows, cols, coef_re, coef_im, 12, algorithm="fft")
    expected = fourier_adapter(x, rows, cols, coef_re, coef_im, 12, algorithm="per_frequency")
    assert relative_error(got, expected) <= 1e-12


def test_inference_runs_the_forward_directly(seed, monkeypatch):
    """Without gradients to record, the eager entry calls the forward itself: no autograd.Function, and so no
    spectrum kept for a backward that never comes."""
    gen = torch.Generator().manual_seed(seed)
    x, rows, cols, coef_re, coef_im, expert_ptr, gates, base = problem(9, 8, 11, 3, 5, True, torch.float32, gen)
    args = (rows.int(), cols.int(), coef_re.requires_grad_(), coef_im.requires_grad_(), expert_ptr.int(), gates,
            base, 9, "fft")
    expected = op_module.fourier_adapter_unchecked(x, *args).detach()
    monkeypatch.setattr(op_module, "_eager_fourier_adapter", lambda *a: pytest.fail("Function under no_grad"))
    with torch.no_grad():
        assert torch.equal(op_module.fourier_adapter_unchecked(x, *args), expected)
