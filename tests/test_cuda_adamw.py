"""The compiled AdamW kernels (csrc/adamw_kernel.cuh, launched by spectralkern/ops/_cuda_adamw.py): dispatch, and — on
a GPU with the extension built — the spectral and plain updates against float64 and the torch reference.

Without a GPU: which updates the cuda backend claims, forcing SPECTRALKERN_BACKEND=cuda when it cannot run, a stale
build without the kernels. The kernels' C++ argument checks run in tests/test_cuda_ext.py's compile check (they need
the compiled module, which is built there). On a GPU: every element written exactly (an update whose result is
exact in any dtype), several steps against a float64 step from the kernel's own state, the fused kernel equal bit
for bit to the CUDA filter followed by the plain kernel, lockstep with the torch reference, aligned and unaligned
layouts, ragged / empty / one-node blocks, every compiled dtype pair.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectralkern as sk
from spectralkern import _backend, _extensions
from spectralkern.bench.inputs import random_basis
from spectralkern.ops import _cuda_adamw
from spectralkern.ops._cuda_adamw import adamw_update_cuda_
from spectralkern.ops.adamw_update import AdamWHyper, _scalars, adamw_update_, adamw_update_reference_
from spectralkern.ops.spectral_filter import _launch_cuda


def _basis(sizes: list[int], k: int, seed: int, device: str = "cpu") -> sk.SpectralBasis:
    ptr = torch.tensor([0] + sizes).cumsum(0)
    return random_basis(ptr, k, dtype=torch.float32, device=torch.device(device),
                        generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ dispatch (CPU)
@pytest.mark.parametrize("param, state, k, expected", [
    (torch.float32, torch.float32, 32, True),
    (torch.float16, torch.float32, 128, True),
    (torch.bfloat16, torch.float32, 8, True),
    (torch.bfloat16, torch.bfloat16, 64, True),
    (torch.float16, torch.bfloat16, 32, False),   # not compiled: Triton's
    (torch.float32, torch.float32, 129, False),   # past the widest compiled tier
    (torch.float64, torch.float64, 8, False),
    (torch.float32, torch.float32, None, True),   # the plain update
    (torch.float16, torch.bfloat16, None, False),
])
def test_what_the_cuda_backend_claims(seed, param, state, k, expected):
    basis = None if k is None else _basis([k + 3], k, seed)
    rows = basis.num_nodes if basis is not None else 4
    p = torch.zeros(rows, 5, dtype=param)
    m, v = (torch.zeros(rows, 5, dtype=state) for _ in range(2))
    # what the registry's table says about the cuda backend (no device: whatever this machine's runtime)
    why = _backend.why_not("adamw_update", "cuda", param, k=basis.k if basis else None, state_dtype=state,
                           dense_state=True)
    assert (why is None) == expected, why


@pytest.fixture
def cuda_not_built(monkeypatch):
    not_built = _extensions.ExtensionStatus(False, "the CUDA extension is not built (simulated)")
    real = _extensions.status
    monkeypatch.setattr(_extensions, "status", lambda name: not_built if name == "cuda" else real(name))
    yield


def _state(rows: int, cols: int, dtype=torch.float32, state=torch.float32):
    return (torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype),
            torch.zeros(rows, cols, dtype=state), torch.zeros(rows, cols, dtype=state))


HYPER = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1.0)


def test_forcing_cuda_when_not_built_fails_clearly(cuda_not_built, monkeypatch, seed):
    basis = _basis([3, 4], 2, seed)
    p, g, m, v = _state(7, 3)
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "cuda")
    for b, gains in ((basis, torch.rand(2, 2)), (None, None)):
        with pytest.raises(RuntimeError, match=r"SPECTRALKERN_BACKEND=cuda cannot run here: the CUDA extension is "
                                               r"not built \(simulated\)"):
            adamw_update_(p, g, m, v, HYPER, b, gains)
    p16, g16, m16, v16 = _state(7, 3, torch.float16, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"SPECTRALKERN_BACKEND=cuda cannot run here: moments of dtype bfloat16 "
                                           r"with float16 parameters"):
        adamw_update_(p16, g16, m16, v16, HYPER, basis, torch.rand(2, 2))
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    assert adamw_update_(p, g, m, v, HYPER, basis, torch.rand(2, 2)) == "torch"
    monkeypatch.delenv("SPECTRALKERN_BACKEND")
    assert adamw_update_(p, g, m, v, HYPER) != "cuda"  # auto never picks an unbuilt backend


def test_a_build_without_the_adamw_kernels_is_named(monkeypatch):
    class OldBuild:  # a spectralkern._C compiled before the AdamW kernels existed
        __file__ = "/site-packages/spectralkern/_C.so"

    monkeypatch.setattr(_extensions, "module", lambda name: OldBuild())
    with pytest.raises(RuntimeError, match=r"the CUDA extension at /site-packages/spectralkern/_C.so was built "
                                           r"without the AdamW kernels; rebuild it"):
        _cuda_adamw._extension()


# ------------------------------------------------------------------------------------------ GPU
def _require_cuda_ext():
    status = _extensions.status("cuda")
    if not status.live:
        pytest.skip(f"CUDA extension not live: {status.reason}")


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
         (torch.bfloat16, torch.bfloat16)]
SIZES = [128, 1, 0, 77, 300, 3, 512, 0]  # ragged, one-node and empty blocks, k >= n_b blocks
LAYOUTS = ["aligned", "offset-pointer", "odd-row-stride", "transposed"]


def _layout(kind: str, values: torch.Tensor) -> torch.Tensor:
    """A copy of the (n, d) ``values`` in a memory layout: aligned and dense, data pointer one element past a
    16-byte boundary, a row stride of d + 3, or column-major."""
    n, d = values.shape
    if kind == "aligned":
        return values.clone()
    if kind == "offset-pointer":
        out = torch.empty(n * d + 1, dtype=values.dtype, device=values.device)[1:].view(n, d)
    elif kind == "odd-row-stride":
        out = torch.empty(n, d + 3, dtype=values.dtype, device=values.device)[:, :d]
    else:
        out = torch.empty(d, n, dtype=values.dtype, device=values.device).T
    return out.copy_(values)


def _filtered64(g: torch.Tensor, basis: sk.SpectralBasis, gains: torch.Tensor, h: float) -> torch.Tensor:
    """float64 h·g + U_b diag(gains_b − h) U_bᵀ g per block, on the CPU."""
    U, ptr, gs, gains64 = basis.U.double().cpu(), basis.block_ptr.tolist(), g.double().cpu(), gains.double().cpu()
    out = h * gs
    for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
        U_b = U[start:stop]
        out[start:stop] += U_b @ ((gains64[b] - h)[:, None] * (U_b.T @ gs[start:stop]))
    return out


def _step64(p, g, m, v, hyper: AdamWHyper) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 AdamW step (the formula, not torch's code) from the given state; returns (p, m, v) on the CPU."""
    p, g, m, v = (t.double().cpu() for t in (p, g, m, v))
    p = p * (1 - hyper.lr * hyper.weight_decay)
    m = m + (1 - hyper.beta1) * (g - m)
    v = hyper.beta2 * v + (1 - hyper.beta2) * g * g
    p = p - (hyper.lr / hyper.bias_correction1) * m / (v.sqrt() / hyper.bias_correction2_sqrt + hyper.eps)
    return p, m, v


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double().cpu() - expected).norm().item() / max(expected.norm().item(), 1e-30)


def _within_one_rounding(actual: torch.Tensor, expected: torch.Tensor, before: torch.Tensor) -> bool:
    """Elementwise: one rounding to the storage dtype apart, plus the fp32 differences of another operation order,
    which scale with the operands of the final sum p·decay + increment (bounded by |before| + |expected|)."""
    a, e, b = (t.float() for t in (actual, expected, before))
    bound = torch.finfo(actual.dtype).eps * e.abs() + 4 * torch.finfo(torch.float32).eps * (b.abs() + e.abs())
    return bool(((a - e).abs() <= bound).all())


def _moments(n: int, d: int, state: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mid-training moments: m ~ 0.1·N(0, 1), v ~ 0.01·U(0.1, 1.1)."""
    m = 0.1 * torch.randn(n, d, device="cuda")
    v = 0.01 * (torch.rand(n, d, device="cuda") + 0.1)
    return m.to(state), v.to(state)


@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype, state_dtype", PAIRS)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("k", [8, 32, 64, 100])
def test_spectral_writes_every_element_exactly_once(seed, param_dtype, state_dtype, kind, k):
    """gains = h = 0 make the filtered gradient exactly 0 and β1 = β2 = ½ make m and v exactly half their old values
    in any dtype, so one element left unwritten, written twice or written to the wrong place shows up bit for
    bit; p (which decays and steps) must match the same update made by torch on the same values to one rounding."""
    _require_cuda_ext()
    ext = _extensions.module("cuda")
    basis = _basis(SIZES, k, seed, "cuda")
    n, d = basis.num_nodes, 200  # 3 full column tiles and a partial one
    m0, v0 = _moments(n, d, state_dtype)
    p0 = torch.randn(n, d, device="cuda").to(param_dtype)
    p, g, m, v = (_layout(kind, t) for t in (p0, torch.randn(n, d, device="cuda").to(param_dtype), m0, v0))
    codes = ext.DTYPES
    vec = ext.spectral_adamw_vector_path(codes[str(param_dtype)[6:]], codes[str(state_dtype)[6:]],
                                         *((t.data_ptr(), *t.shape, *t.stride()) for t in (g, p, m, v)))
    assert vec == (kind == "aligned")
    hyper = AdamWHyper(lr=0.05, beta1=0.5, beta2=0.5, eps=1e-8, weight_decay=0.1, step=3.0)
    adamw_update_cuda_(p, g, m, v, _scalars(hyper), basis, torch.zeros(basis.num_blocks, k, device="cuda"), 0.0)
    torch.cuda.synchronize()
    assert torch.equal(m, m0 * 0.5) and torch.equal(v, v0 * 0.5)
    expected_p = p0.clone()
    adamw_update_reference_(expected_p, torch.zeros_like(p0), m0.clone(), v0.clone(), hyper)
    assert _within_one_rounding(p, expected_p, p0)


@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype, state_dtype", PAIRS)
@pytest.mark.parametrize("kind", ["aligned", "offset-pointer", "transposed"])
@pytest.mark.parametrize("passthrough", [0.0, 0.3])
def test_spectral_steps_match_float64(seed, param_dtype, state_dtype, kind, passthrough):
    """Five steps; each is compared with a float64 step from the kernel's own state before it (no drift)."""
    _require_cuda_ext()
    k = 32
    basis = _basis(SIZES, k, seed, "cuda")
    n, d = basis.num_nodes, 136
    m0, v0 = _moments(n, d, state_dtype)
    p, m, v = (_layout(kind, t) for t in (torch.randn(n, d, device="cuda").to(param_dtype), m0, v0))
    gains = torch.rand(basis.num_blocks, k, device="cuda")
    tolerance = TOLERANCE[param_dtype if state_dtype == torch.float32 else torch.bfloat16]
    for step in range(1, 6):
        hyper = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=float(step + 10))
        g = _layout(kind, torch.randn(n, d, device="cuda").to(param_dtype))
        expected = _step64(p, _filtered64(g, basis, gains, passthrough), m, v, hyper)
        adamw_update_cuda_(p, g, m, v, _scalars(hyper), basis, gains, passthrough)
        for name, actual, want in zip("pmv", (p, m, v), expected):
            assert _relative_error(actual, want) <= tolerance, (step, name)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["aligned", "odd-row-stride"])
@pytest.mark.parametrize("passthrough", [0.0, -0.7])
def test_fused_equals_the_cuda_filter_then_the_plain_kernel_bit_for_bit(seed, kind, passthrough):
    """fp32: the fused kernel's filtered gradient is the CUDA filter's output (same products in the same order) and
    its update is the plain kernel's (the same function), so filter-then-update reproduces it exactly."""
    _require_cuda_ext()
    basis = _basis(SIZES, 48, seed, "cuda")
    n, d = basis.num_nodes, 130
    gains = torch.rand(basis.num_blocks, 48, device="cuda")
    g = _layout(kind, torch.randn(n, d, device="cuda"))
    fused = [_layout(kind, t) for t in (torch.randn(n, d, device="cuda"), *_moments(n, d, torch.float32))]
    unfused = [t.contiguous() for t in fused]
    hyper = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=5.0)
    adamw_update_cuda_(fused[0], g, fused[1], fused[2], _scalars(hyper), basis, gains, passthrough)
    filtered, _ = _launch_cuda(g, basis.U, basis.block_ptr_on(g.device), gains, passthrough)
    adamw_update_cuda_(unfused[0], filtered, unfused[1], unfused[2], _scalars(hyper))
    for a, b in zip(fused, unfused):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype, state_dtype", [(torch.float32, torch.float32),
                                                      (torch.bfloat16, torch.float32)])
def test_spectral_tracks_the_torch_reference_over_steps(seed, param_dtype, state_dtype):
    _require_cuda_ext()
    basis = _basis([40, 0, 1, 90, 7, 128], 16, seed, "cuda")
    n, d = basis.num_nodes, 96
    gains = torch.rand(basis.num_blocks, 16, device="cuda")
    ours = [torch.randn(n, d, device="cuda").to(param_dtype), *(torch.zeros(n, d, device="cuda",
                                                                            dtype=state_dtype) for _ in range(2))]
    theirs = [t.clone() for t in ours]
    for step in range(1, 9):
        hyper = AdamWHyper(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=float(step))
        g = torch.randn(n, d, device="cuda").to(param_dtype)
        adamw_update_cuda_(*ours[:1], g, *ours[1:], _scalars(hyper), basis, gains, 0.25)
        adamw_update_reference_(theirs[0], g, theirs[1], theirs[2], hyper, basis, gains, 0.25)
    for a, b in zip(ours, theirs):
        assert _relative_error(a, b.double().cpu()) <= TOLERANCE[param_dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype, state_dtype", PAIRS)
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("numel", [1, 7, 2048, 2048 * 3 + 5, 1 << 16])
def test_plain_update(seed, param_dtype, state_dtype, offset, numel):
    """offset: elements the data pointers sit past a 16-byte boundary (1, 3: the scalar path); numel covers a
    partial vector, a partial block and several blocks. Exactness as in the spectral test: g = 0 and β = ½."""
    _require_cuda_ext()
    ext = _extensions.module("cuda")

    def make(values: torch.Tensor) -> torch.Tensor:
        return torch.empty(numel + offset, dtype=values.dtype, device="cuda")[offset:].copy_(values)

    p0 = torch.randn(numel, device="cuda").to(param_dtype)
    m0, v0 = (t.flatten() for t in _moments(numel, 1, state_dtype))
    p, g, m, v = make(p0), make(torch.zeros(numel, device="cuda").to(param_dtype)), make(m0), make(v0)
    assert ext.adamw_vector_path(g.data_ptr(), p.data_ptr(), m.data_ptr(), v.data_ptr()) == (offset == 0)
    hyper = AdamWHyper(lr=0.05, beta1=0.5, beta2=0.5, eps=1e-8, weight_decay=0.1, step=2.0)
    adamw_update_cuda_(p, g, m, v, _scalars(hyper))
    torch.cuda.synchronize()
    assert torch.equal(m, m0 * 0.5) and torch.equal(v, v0 * 0.5)
    expected_p = p0.clone()
    adamw_update_reference_(expected_p, torch.zeros_like(p0), m0.clone(), v0.clone(), hyper)
    assert _within_one_rounding(p, expected_p, p0)
    # A real gradient, against float64.
    g = make(torch.randn(numel, device="cuda").to(param_dtype))
    before = [t.clone() for t in (p, m, v)]
    hyper = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=7.0)
    expected = _step64(before[0], g, before[1], before[2], hyper)
    adamw_update_cuda_(p, g, m, v, _scalars(hyper))
    tolerance = TOLERANCE[param_dtype if state_dtype == torch.float32 else torch.bfloat16]
    for actual, want in zip((p, m, v), expected):
        assert _relative_error(actual, want) <= tolerance


@pytest.mark.gpu
@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
       k=st.integers(1, 128), d=st.integers(1, 300), passthrough=st.sampled_from([0.0, 0.5]),
       data_seed=st.integers(0, 2**31 - 1))
def test_spectral_hypothesis_shapes(sizes, k, d, passthrough, data_seed):
    _require_cuda_ext()
    basis = _basis(sizes, k, data_seed, "cuda")
    gen = torch.Generator("cuda").manual_seed(data_seed)
    n = basis.num_nodes
    p, g = (torch.randn(n, d, device="cuda", generator=gen) for _ in range(2))
    m, v = 0.1 * torch.randn(n, d, device="cuda", generator=gen), 0.01 * torch.rand(n, d, device="cuda", generator=gen)
    gains = torch.rand(basis.num_blocks, k, device="cuda", generator=gen)
    hyper = AdamWHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=4.0)
    expected = _step64(p, _filtered64(g, basis, gains, passthrough), m, v, hyper)
    adamw_update_cuda_(p, g, m, v, _scalars(hyper), basis, gains, passthrough)
    for actual, want in zip((p, m, v), expected):
        assert _relative_error(actual, want) <= 1e-5


@pytest.mark.gpu
def test_dispatch_picks_cuda_and_spectral_adamw_matches_the_torch_backend(seed, monkeypatch):
    """auto picks the compiled kernels for the filtered weight and the plain bias; 10 SpectralAdamW steps equal the
    torch backend's to fp32 accuracy; fp16 parameters with bf16 moments stay on Triton."""
    _require_cuda_ext()
    monkeypatch.delenv("SPECTRALKERN_BACKEND", raising=False)
    p, g, m, v = (t.cuda() for t in _state(70, 33))
    basis = _basis([30, 40], 8, seed, "cuda")
    assert adamw_update_(p, g, m, v, HYPER, basis, torch.rand(2, 8, device="cuda")) == "cuda"
    assert adamw_update_(p, g, m, v, HYPER) == "cuda"
    p16, g16, m16, v16 = (t.cuda() for t in _state(70, 33, torch.float16, torch.bfloat16))
    assert adamw_update_(p16, g16, m16, v16, HYPER, basis, torch.rand(2, 8, device="cuda")) == "triton"

    runs = []
    for backend in ("cuda", "torch"):
        monkeypatch.setenv("SPECTRALKERN_BACKEND", backend)
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5)).cuda()
        filt = sk.SpectralGradientFilter(model, ["0"], block_size=16, k=4, knn=3, refresh_every=0, passthrough=0.2)
        opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, weight_decay=0.05, spectral_filter=filt)
        gen = torch.Generator(device="cuda").manual_seed(seed)
        for _ in range(10):
            x = torch.randn(32, 48, device="cuda", generator=gen)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        runs.append([t.detach().clone() for t in model.parameters()])
    for ours, theirs in zip(*runs):
        assert _relative_error(ours, theirs.double().cpu()) <= 1e-5


@pytest.mark.gpu
def test_runs_on_the_callers_stream_and_handles_empty_tensors(seed):
    _require_cuda_ext()
    basis = _basis([256, 256], 32, seed, "cuda")
    p, g = torch.randn(512, 4096, device="cuda"), torch.randn(512, 4096, device="cuda")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    gains = torch.rand(2, 32, device="cuda")
    expected = _step64(p, _filtered64(g, basis, gains, 0.0), m, v, HYPER)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        adamw_update_cuda_(p, g, m, v, _scalars(HYPER), basis, gains, 0.0)
    side.synchronize()
    for actual, want in zip((p, m, v), expected):
        assert _relative_error(actual, want) <= 1e-5
    one = _basis([1], 1, seed, "cuda")  # one node, k = 1
    p1, g1, m1, v1 = (torch.randn(1, 1, device="cuda") for _ in range(4))
    v1 = v1.abs()
    expected = _step64(p1, _filtered64(g1, one, torch.ones(1, 1), 0.5), m1, v1, HYPER)
    adamw_update_cuda_(p1, g1, m1, v1, _scalars(HYPER), one, torch.ones(1, 1, device="cuda"), 0.5)
    assert math.isclose(p1.item(), expected[0].item(), rel_tol=1e-5)
    empty = torch.empty(1, 0, device="cuda")  # d = 0: nothing to launch
    adamw_update_cuda_(empty, empty, empty.clone(), empty.clone(), _scalars(HYPER), one, torch.ones(1, 1,
                                                                                                     device="cuda"))
    nothing = torch.empty(0, device="cuda")
    adamw_update_cuda_(nothing, nothing, nothing.clone(), nothing.clone(), _scalars(HYPER))
    torch.cuda.synchronize()
