"""fourier_adapter: ΔW·x for a sparse-spectrum (Fourier) weight update, without ever building ΔW.

For a target layer of shape (out × in), n frequency positions (u_j, v_j) (row frequency u_j < out, column
frequency v_j < in), complex effective coefficients C_j (scale and normalisation folded in), experts owning
contiguous ranges of j (``expert_ptr``) and per-token gates G (tokens × experts):

    y[t, p] = base[t, p] + Σ_j G[t, e(j)] · Re(C_j · e^{2πi u_j p / out} · z[t, j]),
    z[t, j] = Σ_q x[t, q] · e^{2πi v_j q / in}

This is y = base + Σ_e G_e · ΔW_e x with ΔW_e[p, q] = Σ_{j∈e} Re(C_j e^{2πi (u_j p / out + v_j q / in)}), the
real inverse DFT of a conjugate-symmetric spectrum (see ``spectralkern.peft.fourier_moe`` for how C_j is built
from the trainable coefficients).

Backends (the registry decides, ``_backend.OPS``):
* ``triton``: two kernels per token chunk — analysis (z, scaled by C and G, written as a T × n complex
  workspace) then synthesis (y) — with twiddles generated on chip; the backward runs the same two kernels
  (analysis of grad_y at the row frequencies, fused with the coefficient/gate gradients; synthesis at the column
  frequencies for grad_x). Dims up to ``_backend.TRITON_MAX_DIM`` (the in-kernel phase reduction is int32).
* ``torch``: three forms, chosen per call by the registry's cost model (``_fourier_cost``, constants measured on
  the CPU): ``fft`` (the reference: rfft of x, gather at v, scale, scatter at u, irfft — O(in log in + out log out
  + n) per token), ``dense`` (ΔW built once, then GEMMs — peft's way; best for small layers) and
  ``per_frequency`` (twiddle GEMMs, 4·n·(in + out) per token; best for few frequencies), in ``_fourier_forms``.
  ``algorithm=`` forces one.

Tokens are processed in chunks so the workspace stays under ``WORKSPACE_BYTES`` whatever the batch.

Gate semantics: a gate entry equal to zero means "token not routed to that expert" (top-k). Its gradient is
returned as zero, which is what a top-k router needs (the entry is not a function of the logits) and lets the
kernels skip experts no token of a tile is routed to. Pass strictly non-zero gates to get the full gradient.

Exposed as the custom ops ``spectralkern::fourier_adapter`` / ``spectralkern::fourier_adapter_backward`` with
fake and autograd registrations (torch.compile-clean). Public entry point: :func:`fourier_adapter`.
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .._backend import Choice, backend_of, triton_interpreter_on
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._accumulation import accumulation_dtype as _acc_dtype
from ._eager import plain_eager_call
# The forms the registry chooses among (``_backend.OPS["fourier_adapter"]``; the Triton backend has per_frequency).
ALGORITHMS = ("fft", "dense", "per_frequency")
# Upper bound for the per-chunk workspace (the T × n complex spectrum, or the FFT buffers of the torch path).
WORKSPACE_BYTES = 32 * 2**20


def _chunks(num_tokens: int, bytes_per_token: int, multiple: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) whose workspace fits WORKSPACE_BYTES (at least ``multiple`` tokens each)."""
    size = max(multiple, (WORKSPACE_BYTES // max(bytes_per_token, 1)) // multiple * multiple)
    return [(a, min(a + size, num_tokens)) for a in range(0, num_tokens, size)]


def expert_of_frequency(expert_ptr: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """(n,) int64 expert index of every frequency, from the (E+1,) offsets (no host sync)."""
    positions = torch.arange(num_freqs, device=expert_ptr.device, dtype=expert_ptr.dtype)
    return torch.searchsorted(expert_ptr[1:].contiguous(), positions, right=True)


# ------------------------------------------------------------------------------------------ torch backend (FFT)
def _gather_columns(values: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """values[:, index] for a complex (T, F) tensor, into ``out`` (T, n) when given. complex64 moves as one 8-byte
    word through ``torch.gather`` (measured 2.5–3× faster than ``index_select`` on a complex tensor along dim 1,
    one thread)."""
    if values.dtype != torch.complex64:
        return torch.index_select(values, 1, index, out=out) if out is not None else values.index_select(1, index)
    words, index = values.view(torch.float64), index.expand(values.shape[0], -1)
    if out is None:
        return torch.gather(words, 1, index).view(torch.complex64)
    torch.gather(words, 1, index, out=out.view(torch.float64))
    return out


def _conj_where(values: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """values with the entries where ``flip`` conjugated (n-sized factors). Explicit: a lazily conjugated operand of
    ``torch.where`` loses its conjugation inside a compiled graph (measured, torch 2.13 aot_eager)."""
    return torch.complex(values.real, torch.where(flip, -values.imag, values.imag))


class _Folds:
    """The FFT form's bins and per-frequency factors for n frequencies on an (out × in) layer.

    rfft of x read at the column bins c_j (v_j, or in − v_j above in/2) gives X_j with z_j = conj^{¬cu_j}(X_j),
    cu_j = v_j > in/2; grad_y's at the row bins r_j gives Y_j with y_j = conj^{¬ru_j}(Y_j). The synthesis of a value
    s_j at frequency f is s_j times the irfft's bin weight (½ inside, 1 at bins 0 and size/2, whose imaginary part
    irfft drops) at bin f, conjugated at size − f above size/2. With conj^a(C·conj^b(w)) = conj^a(C)·conj^{a⊕b}(w),
    every conjugation and weight folds into signs (m = ru ⊕ cu) and one complex factor per frequency and direction:

        forward   row bins ← conj^{¬m}(X) · w_r·conj^{ru}(C)
        backward  Y' = conj^{m}(Y);  z·y = conj^{¬cu}(X · Y');  column bins ← conj(Y') · w_c·conj^{cu}(C)

    (a conjugation is a sign on the imaginary parts: one real pass over T × n).
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, out_features: int, in_features: int,
                 acc: torch.dtype) -> None:
        rows, cols = rows.long(), cols.long()
        self.row_upper, self.col_upper = rows > out_features // 2, cols > in_features // 2
        self.row_bins = torch.where(self.row_upper, out_features - rows, rows)
        self.col_bins = torch.where(self.col_upper, in_features - cols, cols)
        self.row_weight, self.col_weight = (torch.where((bins == 0) | (2 * bins == size), 1.0, 0.5).to(acc)
                                            for bins, size in ((self.row_bins, out_features),
                                                               (self.col_bins, in_features)))
        mixed = self.row_upper ^ self.col_upper
        ones = torch.ones(rows.shape, dtype=acc, device=rows.device)
        self.conj_unmixed = torch.stack([ones, torch.where(mixed, ones, -ones)], dim=-1)  # (n, 2) signs
        self.conj_mixed = torch.stack([ones, torch.where(mixed, -ones, ones)], dim=-1)
        self.conj_all = torch.tensor([1.0, -1.0], dtype=acc, device=rows.device)

    def forward_factor(self, coef: torch.Tensor) -> torch.Tensor:
        return _conj_where(coef, self.row_upper) * self.row_weight

    def backward_factor(self, coef: torch.Tensor) -> torch.Tensor:
        return _conj_where(coef, self.col_upper) * self.col_weight


# Folds, kept while the row-frequency tensor lives (a layer's buffer; building them is ≈ 0.4 ms of small ops, as much
# as a pass over the T × n spectrum): validated on every use by the identity and version of both frequency tensors.
_FOLDS = WeakTensorKeyDictionary()


def _folds(rows: torch.Tensor, cols: torch.Tensor, out_features: int, in_features: int, acc: torch.dtype) -> _Folds:
    key = (out_features, in_features, acc, rows._version, cols._version)
    entry = _FOLDS.get(rows)
    if entry is not None and entry[0] == key and entry[1]() is cols:
        return entry[2]
    folds = _Folds(rows, cols, out_features, in_features, acc)
    _FOLDS[rows] = (key, weakref.ref(cols), folds)
    return folds


def _synthesis(values: torch.Tensor, bins: torch.Tensor, size: int) -> torch.Tensor:
    """irfft (norm "forward", length ``size``) of the half spectrum holding the folded ``values`` (T, n) at ``bins``."""
    half = torch.zeros(values.shape[0], size // 2 + 1, dtype=values.dtype, device=values.device)
    half.index_add_(1, bins, values)
    return torch.fft.irfft(half, n=size, dim=-1, norm="forward")


def _token_gates(gates: torch.Tensor | None, expert_of: torch.Tensor, acc: torch.dtype) -> torch.Tensor | None:
    return None if gates is None else gates.to(acc).index_select(1, expert_of)


def fourier_adapter_reference(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, coef_re: torch.Tensor,
                              coef_im: torch.Tensor, expert_ptr: torch.Tensor, out_features: int,
                              gates: torch.Tensor | None = None, base: torch.Tensor | None = None, *,
                              x_spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch forward through torch.fft (the torch backend's "fft" form). x (T, in) -> y (T, out) in x's dtype.

    Computes in fp32 (fp64 for fp64 inputs), chunked over tokens; see the module docstring for the formula and
    ``_Folds`` for the bins. ``x_spectrum``: an empty (T, n) complex tensor (complex64, complex128 for fp64 x) to
    receive x's gathered spectrum, which :func:`fourier_adapter_backward_reference` then reuses instead of
    transforming x again.
    """
    acc, num_tokens, in_features = _acc_dtype(x.dtype), x.shape[0], x.shape[1]
    folds = _folds(rows, cols, out_features, in_features, acc)
    factor = folds.forward_factor(torch.complex(coef_re.to(acc), coef_im.to(acc)))
    token_gates = _token_gates(gates, expert_of_frequency(expert_ptr, rows.numel()), acc)
    per_token = 8 * (in_features + out_features + 4 * rows.numel()) * (2 if acc == torch.float64 else 1)
    chunks = _chunks(num_tokens, per_token, 1)
    y = None if len(chunks) == 1 else torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    for a, b in chunks:
        picked = _gather_columns(torch.fft.rfft(x[a:b].to(acc), dim=-1), folds.col_bins,
                                 None if x_spectrum is None else x_spectrum[a:b])
        # the signs into a fresh tensor (``picked`` may be kept), then every scaling in place
        values = torch.view_as_complex(torch.view_as_real(picked) * folds.conj_unmixed).mul_(factor)
        if token_gates is not None:
            values.mul_(token_gates[a:b])
        out = _synthesis(values, folds.row_bins, out_features)
        if base is not None:  # the sum in acc, rounded once; in place on the fresh irfft output (an add into a
            out.add_(base[a:b].to(acc))  # fresh y measured 2-5x slower than in place, one thread)
        if y is None:
            return out.to(x.dtype)
        y[a:b] = out
    return y


def fourier_adapter_backward_reference(grad_y: torch.Tensor, x: torch.Tensor | None, in_features: int,
                                       rows: torch.Tensor, cols: torch.Tensor, coef_re: torch.Tensor,
                                       coef_im: torch.Tensor, expert_ptr: torch.Tensor, gates: torch.Tensor | None,
                                       need_x: bool, need_params: bool, *,
                                       x_spectrum: torch.Tensor | None = None) -> tuple:
    """Plain-torch backward: (grad_x or None, grad_coef_re or None, grad_coef_im or None, grad_gates or None).

    With y = the analysis of grad_y at the row frequencies and z that of x at the column frequencies:
    grad_x = synthesis of G·C·y at the column frequencies; grad_C_re = Σ_t G Re(z y), grad_C_im = −Σ_t G Im(z y);
    grad_G[t, e] = Σ_{j∈e} Re(C z y), zero where G is zero. ``x`` (T, in) is read only when need_params and
    ``x_spectrum`` (the forward's, see :func:`fourier_adapter_reference`) is not given.
    """
    acc = _acc_dtype(grad_y.dtype)
    num_tokens, out_features = grad_y.shape
    n = rows.numel()
    folds = _folds(rows, cols, out_features, in_features, acc)
    coef = torch.complex(coef_re.to(acc), coef_im.to(acc))
    factor = folds.backward_factor(coef) if need_x else None
    expert_of = expert_of_frequency(expert_ptr, n)
    token_gates = _token_gates(gates, expert_of, acc)
    grad_x_chunks = []
    grad_sum = torch.zeros(n, dtype=coef.dtype, device=grad_y.device) if need_params else None
    grad_gates = (torch.zeros(num_tokens, gates.shape[1], dtype=acc, device=grad_y.device)
                  if need_params and gates is not None else None)
    gate_coef = _conj_where(coef, ~folds.col_upper) if grad_gates is not None else None
    per_token = 8 * (in_features + out_features + 6 * n) * (2 if acc == torch.float64 else 1)
    for a, b in _chunks(num_tokens, per_token, 1):
        spec_gy = torch.view_as_real(_gather_columns(torch.fft.rfft(grad_y[a:b].to(acc), dim=-1), folds.row_bins))
        if need_params:  # Y' = conj^m(Y): z·y = conj^{¬cu}(X·Y')
            picked = torch.view_as_complex(spec_gy.mul_(folds.conj_mixed))
            if x_spectrum is not None:
                product = x_spectrum[a:b] * picked
            else:
                product = _gather_columns(torch.fft.rfft(x[a:b].to(acc), dim=-1), folds.col_bins).mul_(picked)
            if grad_gates is not None:
                grad_gates[a:b].index_add_(1, expert_of, (gate_coef * product).real)
                product.mul_(token_gates[a:b])
            grad_sum += product.sum(dim=0)
        if need_x:  # conj(Y') = conj^{¬m}(Y)
            values = torch.view_as_complex(spec_gy.mul_(folds.conj_all if need_params else folds.conj_unmixed))
            values.mul_(factor)
            if token_gates is not None:
                values.mul_(token_gates[a:b])
            grad_x_chunks.append(_synthesis(values, folds.col_bins, in_features))
    grad_x = None
    if need_x:  # one chunk (the usual case): no copy
        grad_x = (grad_x_chunks[0] if len(grad_x_chunks) == 1 else torch.cat(grad_x_chunks)).to(grad_y.dtype)
    if grad_gates is not None:
        grad_gates = torch.where(gates != 0, grad_gates, 0.0).to(gates.dtype)
    if grad_sum is None:
        return grad_x, None, None, None
    # Σ_t G z y = conj^{¬cu}(grad_sum): grad_re is its real part, grad_im minus its imaginary part
    grad_im = torch.where(folds.col_upper, -grad_sum.imag, grad_sum.imag)
    return grad_x, grad_sum.real.to(coef_re.dtype), grad_im.to(coef_im.dtype), grad_gates


# ------------------------------------------------------------------------------------------ generic token loop
def spectral_forward(analysis, synthesis, x, rows, cols, coef_re, coef_im, expert_ptr, out_features, gates, base):
    """The forward with the given transforms ``analysis(signal, freqs, size)`` -> z (T, n) complex, a fresh tensor,
    and ``synthesis(coeffs, freqs, size)`` -> Re Σ_j coeffs e^{2πi f_j p / size} (T, size), which may overwrite
    ``coeffs`` (the per-frequency form's twiddle GEMMs, ``_fourier_forms``)."""
    acc, num_tokens, in_features = _acc_dtype(x.dtype), x.shape[0], x.shape[1]
    coef = torch.complex(coef_re.to(acc), coef_im.to(acc))
    token_gates = _token_gates(gates, expert_of_frequency(expert_ptr, rows.numel()), acc)
    y = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    per_token = 8 * (in_features + out_features + 4 * rows.numel()) * (2 if acc == torch.float64 else 1)
    for a, b in _chunks(num_tokens, per_token, 1):
        spec = analysis(x[a:b].to(acc), cols, in_features).mul_(coef)  # passes over T × n in place
        if token_gates is not None:
            spec.mul_(token_gates[a:b])
        out = synthesis(spec, rows, out_features)
        if base is None:
            y[a:b] = out
        else:  # the sum in acc, rounded once into y: one pass over T × out instead of an add and a copy
            torch.add(out, base[a:b].to(acc), out=y[a:b])
    return y


def spectral_backward(analysis, synthesis, grad_y, x, in_features, rows, cols, coef_re, coef_im, expert_ptr, gates,
                      need_x, need_params):
    """The backward with the given transforms (see ``spectral_forward``)."""
    acc = _acc_dtype(grad_y.dtype)
    num_tokens, out_features = grad_y.shape
    n = rows.numel()
    coef = torch.complex(coef_re.to(acc), coef_im.to(acc))
    expert_of = expert_of_frequency(expert_ptr, n)
    token_gates = _token_gates(gates, expert_of, acc)
    grad_x = grad_y.new_empty(num_tokens, in_features) if need_x else None
    grad_coef = torch.zeros(n, dtype=coef.dtype, device=grad_y.device) if need_params else None
    grad_gates = (torch.zeros(num_tokens, gates.shape[1], dtype=acc, device=grad_y.device)
                  if need_params and gates is not None else None)
    per_token = 8 * (in_features + out_features + 6 * n) * (2 if acc == torch.float64 else 1)
    for a, b in _chunks(num_tokens, per_token, 1):
        spec_gy = analysis(grad_y[a:b].to(acc), rows, out_features)
        if need_params:  # first: the grad_x branch below scales spec_gy in place
            product = analysis(x[a:b].to(acc), cols, in_features).mul_(spec_gy)
            if grad_gates is not None:
                grad_gates[a:b].index_add_(1, expert_of, (coef * product).real)
                product.mul_(token_gates[a:b])
            grad_coef += product.sum(dim=0)
        if need_x:
            spec_gy.mul_(coef)
            if token_gates is not None:
                spec_gy.mul_(token_gates[a:b])
            grad_x[a:b] = synthesis(spec_gy, cols, in_features).to(grad_x.dtype)
    if grad_gates is not None:
        grad_gates = torch.where(gates != 0, grad_gates, 0.0).to(gates.dtype)
    if grad_coef is None:
        return grad_x, None, None, None
    return grad_x, grad_coef.real.to(coef_re.dtype), (-grad_coef.imag).to(coef_im.dtype), grad_gates


# ------------------------------------------------------------------------------------------ triton launchers
def _fast_trig(acc: torch.dtype) -> bool:
    # MUFU cos/sin for fp32 on a GPU; the interpreter has no libdevice, fp64 needs the precise functions.
    return acc == torch.float32 and not triton_interpreter_on()


def _dot_precision(dtype: torch.dtype) -> str:
    # tf32x3 keeps fp32 inputs at ~fp32 accuracy on tensor cores; fp16/bf16 inputs take one tf32 pass, which rounds
    # the fp32 twiddles to tf32 (2^-11, under the half output's rounding; docs/gpu.md).
    return {torch.float64: "ieee", torch.float32: "tf32x3"}.get(dtype, "tf32")


def _or(tensor: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    return tensor if tensor is not None else stand_in


def _analysis_launch(sig, freq, size, sig2, freq2, size2, coef_re, coef_im, gates, expert_ptr, a, coef_grad,
                     gate_grad, *, dtype: torch.dtype) -> None:
    """Analysis kernel over all (token tile, frequency tile) programs. ``a`` (2, T, n) is written when given;
    ``coef_grad`` (token tiles, 2, n) and ``gate_grad`` (T, E) turn on the parameter backward (sig2 = x)."""
    import triton
    import triton.language as tl

    from ._triton_fourier_analysis import NUM_WARPS, fourier_analysis_kernel, tile_sizes

    acc = _acc_dtype(dtype)
    block_t, block_j, block_q = tile_sizes(fp64=acc == torch.float64)
    num_tokens, n, num_experts = sig.shape[0], freq.numel(), expert_ptr.numel() - 1
    # Tiles never straddle experts: at most cdiv(n, BLOCK_J) + E of them; the surplus programs do nothing.
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(n, block_j) + num_experts)
    # Pointers the flags leave unused get a stand-in (never dereferenced) and zero strides.
    a_strides = a.stride()[:2] if a is not None else (0, 0)
    coef_grad_strides = coef_grad.stride()[:2] if coef_grad is not None else (0, 0)
    gate_strides = gates.stride() if gates is not None else (0, 0)
    fourier_analysis_kernel[grid](
        sig, freq, sig2, freq2, coef_re, coef_im, _or(gates, coef_re), expert_ptr, _or(a, coef_re),
        _or(coef_grad, coef_re), _or(gate_grad, coef_re),
        num_tokens, size, size2, num_experts,
        sig.stride(0), sig.stride(1), sig2.stride(0), sig2.stride(1), *gate_strides, *a_strides,
        *coef_grad_strides,
        BLOCK_T=block_t, BLOCK_J=block_j, BLOCK_Q=block_q,
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32, DOT_PRECISION=_dot_precision(dtype),
        FAST_TRIG=_fast_trig(acc), HAS_GATE=gates is not None, WRITE_A=a is not None,
        PARAM_GRAD=coef_grad is not None, num_warps=NUM_WARPS if acc == torch.float32 else 4,
    )


def _synthesis_launch(a, freq, size, gates, expert_ptr, base, y, *, dtype: torch.dtype) -> None:
    """Synthesis kernel over all (token tile, output tile) programs: y = base + Re(A · twiddles) from the
    (2, T, n) spectrum ``a``; ``gates`` only serve to skip experts a whole token tile is not routed to."""
    import triton
    import triton.language as tl

    from ._triton_fourier_synthesis import NUM_WARPS, fourier_synthesis_kernel, tile_sizes

    acc = _acc_dtype(dtype)
    block_t, block_p, block_j = tile_sizes(fp64=acc == torch.float64)
    num_tokens = y.shape[0]
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(size, block_p))
    gate_strides = gates.stride() if gates is not None else (0, 0)
    base_strides = base.stride() if base is not None else (0, 0)
    fourier_synthesis_kernel[grid](
        a, freq, _or(gates, a), expert_ptr, _or(base, y), y,
        num_tokens, size, expert_ptr.numel() - 1,
        a.stride(0), a.stride(1), *gate_strides, *base_strides, y.stride(0), y.stride(1),
        BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_J=block_j,
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32, DOT_PRECISION=_dot_precision(dtype),
        FAST_TRIG=_fast_trig(acc), HAS_GATE=gates is not None, HAS_BASE=base is not None,
        num_warps=NUM_WARPS if acc == torch.float32 else 4,
    )


def _triton_forward(x, rows, cols, coef_re, coef_im, expert_ptr, gates, base, out_features) -> torch.Tensor:
    from ._triton_fourier_analysis import tile_sizes

    acc = _acc_dtype(x.dtype)
    num_tokens, in_features = x.shape
    n = rows.numel()
    coef_re, coef_im = coef_re.to(acc).contiguous(), coef_im.to(acc).contiguous()
    gates = gates.to(acc) if gates is not None else None
    y = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device)
    elem = torch.empty(0, dtype=acc).element_size()
    for a, b in _chunks(num_tokens, 2 * n * elem, tile_sizes(acc == torch.float64)[0]):
        spec = torch.empty(2, b - a, n, dtype=acc, device=x.device)
        g = gates[a:b] if gates is not None else None
        _analysis_launch(x[a:b], cols, in_features, x[a:b], cols, in_features, coef_re, coef_im, g, expert_ptr,
                         spec, None, None, dtype=x.dtype)
        _synthesis_launch(spec, rows, out_features, g, expert_ptr, base[a:b] if base is not None else None,
                          y[a:b], dtype=x.dtype)
    return y


def _triton_backward(grad_y, x, in_features, rows, cols, coef_re, coef_im, expert_ptr, gates, need_x,
                     need_params) -> tuple:
    from ._triton_fourier_analysis import tile_sizes

    acc = _acc_dtype(grad_y.dtype)
    num_tokens, out_features = grad_y.shape
    n = rows.numel()
    coef_re_a, coef_im_a = coef_re.to(acc).contiguous(), coef_im.to(acc).contiguous()
    gates_a = gates.to(acc) if gates is not None else None
    block_t = tile_sizes(acc == torch.float64)[0]
    grad_x = grad_y.new_empty(num_tokens, in_features) if need_x else None
    grad_coef = torch.zeros(2, n, dtype=acc, device=grad_y.device) if need_params else None
    grad_gates = (torch.zeros(num_tokens, gates.shape[1], dtype=acc, device=grad_y.device)
                  if need_params and gates is not None else None)
    elem = torch.empty(0, dtype=acc).element_size()
    for a, b in _chunks(num_tokens, 2 * n * elem, block_t):
        g = gates_a[a:b] if gates_a is not None else None
        spec = torch.empty(2, b - a, n, dtype=acc, device=grad_y.device) if need_x else None
        partial = (torch.empty(-(-(b - a) // block_t), 2, n, dtype=acc, device=grad_y.device) if need_params
                   else None)
        sig2 = x[a:b] if need_params else grad_y[a:b]  # x is only read for the parameter gradients
        _analysis_launch(grad_y[a:b], rows, out_features, sig2, cols, in_features, coef_re_a, coef_im_a, g,
                         expert_ptr, spec, partial, grad_gates[a:b] if grad_gates is not None else None,
                         dtype=grad_y.dtype)
        if need_x:
            _synthesis_launch(spec, cols, in_features, g, expert_ptr, None, grad_x[a:b], dtype=grad_y.dtype)
        if need_params:
            grad_coef += partial.sum(dim=0)
    if grad_gates is not None:
        grad_gates = grad_gates.to(gates.dtype)
    if grad_coef is None:
        return grad_x, None, None, None
    # copies: the two rows of one buffer must not leave the custom op as aliases of each other
    return grad_x, grad_coef[0].to(coef_re.dtype, copy=True), grad_coef[1].to(coef_im.dtype, copy=True), grad_gates


# ------------------------------------------------------------------------------------------ custom ops
def fourier_adapter_backend(x: torch.Tensor, in_features: int, out_features: int, backend: str | None = None, *,
                            algorithm: str | None = None, n: int | None = None, gates: torch.Tensor | None = None,
                            backward: bool = False, need_x: bool = True, need_params: bool = False,
                            dense_cached: bool = False, spectrum_kept: bool = False) -> Choice:
    """The registry's choice for an input like ``x`` (tokens × in) on a layer of this shape; with ``n`` (the number
    of frequencies) also the algorithm, by the measured cost model (``_fourier_cost``) for this call: the forward,
    or the backward with its ``need_x`` / ``need_params``; ``dense_cached``: the dense form's ΔW for these
    coefficients is already built (by the forward); ``spectrum_kept``: the FFT form's forward kept x's gathered
    spectrum for this backward. ``algorithm`` forces one (BackendUnavailable with the reason when it cannot
    run)."""
    facts: dict[str, object] = {"dim": max(in_features, out_features)}
    if n is not None:
        from ._fourier_cost import dense_fits

        acc = _acc_dtype(x.dtype)
        slots = gates.shape[1] if gates is not None else 1
        facts.update(tokens=x.shape[0], in_features=in_features, out_features=out_features, n=n, slots=slots,
                     gated=gates is not None, backward=backward, need_x=need_x, need_params=need_params,
                     device_type=x.device.type, acc=acc, dense_cached=dense_cached, spectrum_kept=spectrum_kept,
                     dense_fits=dense_fits(out_features, in_features, slots, acc))
    return backend_of("fourier_adapter", x, backend=backend, algorithm=algorithm, **facts)


def _dense_cached(x, rows, cols, coef_re, coef_im, expert_ptr, gates, out_features, in_features) -> bool:
    from ._fourier_forms import cached_delta

    slots = gates.shape[1] if gates is not None else 1
    return cached_delta(rows, cols, coef_re, coef_im, expert_ptr, slots, out_features, in_features,
                        _acc_dtype(x.dtype)) is not None


def _torch_form(algorithm: str):
    """(forward, backward) of a torch-backend algorithm."""
    if algorithm == "fft":
        return fourier_adapter_reference, fourier_adapter_backward_reference
    from . import _fourier_forms

    if algorithm == "dense":
        return _fourier_forms.dense_forward, _fourier_forms.dense_backward
    return _fourier_forms.per_frequency_forward, _fourier_forms.per_frequency_backward


def _run_forward(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, coef_re: torch.Tensor,
                 coef_im: torch.Tensor, expert_ptr: torch.Tensor, gates: Optional[torch.Tensor],
                 base: Optional[torch.Tensor], out_features: int, algorithm: Optional[str] = None,
                 keep_spectrum: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y, x's gathered spectrum or None): the spectrum when ``keep_spectrum`` and the FFT form runs."""
    if x.shape[0] == 0 or rows.numel() == 0:
        if base is not None:
            return base.clone(memory_format=torch.contiguous_format), None
        return x.new_zeros(x.shape[0], out_features), None
    cached = _dense_cached(x, rows, cols, coef_re, coef_im, expert_ptr, gates, out_features, x.shape[1])
    choice = fourier_adapter_backend(x, x.shape[1], out_features, algorithm=algorithm, n=rows.numel(), gates=gates,
                                     dense_cached=cached)
    if choice.backend == "triton":
        return _triton_forward(x, rows, cols, coef_re, coef_im, expert_ptr, gates, base, out_features), None
    forward, _ = _torch_form(choice.algorithm)
    if choice.algorithm == "fft" and keep_spectrum:
        spectrum = torch.empty(x.shape[0], rows.numel(), dtype=_acc_dtype(x.dtype).to_complex(), device=x.device)
        return forward(x, rows, cols, coef_re, coef_im, expert_ptr, out_features, gates, base,
                       x_spectrum=spectrum), spectrum
    return forward(x, rows, cols, coef_re, coef_im, expert_ptr, out_features, gates, base), None


def _forward(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, coef_re: torch.Tensor,
             coef_im: torch.Tensor, expert_ptr: torch.Tensor, gates: Optional[torch.Tensor],
             base: Optional[torch.Tensor], out_features: int, algorithm: Optional[str] = None) -> torch.Tensor:
    return _run_forward(x, rows, cols, coef_re, coef_im, expert_ptr, gates, base, out_features, algorithm)[0]


_fourier_adapter_op = torch.library.custom_op("spectralkern::fourier_adapter", _forward, mutates_args=())


@_fourier_adapter_op.register_fake
def _(x, rows, cols, coef_re, coef_im, expert_ptr, gates, base, out_features, algorithm=None):
    return x.new_empty(x.shape[0], out_features)


def _backward_outputs(grad_y: torch.Tensor, x: torch.Tensor, in_features: int, rows: torch.Tensor,
                                 cols: torch.Tensor, coef_re: torch.Tensor, coef_im: torch.Tensor,
                                 expert_ptr: torch.Tensor, gates: Optional[torch.Tensor], need_x: bool,
                                 need_params: bool, algorithm: Optional[str] = None,
                                 x_spectrum: Optional[torch.Tensor] = None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x (T, in) or empty, grad_coef_re (n,), grad_coef_im (n,), grad_gates (T, E)); the last three are
    empty unless need_params (grad_gates also when there are no gates). ``x`` (T, in) is read only when
    need_params; otherwise it may be an empty tensor. ``x_spectrum``: what the FFT form's forward kept (eager
    entry only), used when the FFT form runs the backward."""
    num_tokens, n = grad_y.shape[0], rows.numel()
    x_in = x if need_params else None
    if num_tokens == 0 or n == 0:
        results = (grad_y.new_zeros(num_tokens, in_features) if need_x else None,
                   torch.zeros_like(coef_re) if need_params else None,
                   torch.zeros_like(coef_im) if need_params else None,
                   torch.zeros_like(gates) if need_params and gates is not None else None)
    else:
        cached = _dense_cached(grad_y, rows, cols, coef_re, coef_im, expert_ptr, gates, grad_y.shape[1], in_features)
        kept = x_spectrum is not None and need_params
        choice = fourier_adapter_backend(grad_y, in_features, grad_y.shape[1], algorithm=algorithm, n=n, gates=gates,
                                         backward=True, need_x=need_x, need_params=need_params, dense_cached=cached,
                                         spectrum_kept=kept)
        run = _triton_backward if choice.backend == "triton" else _torch_form(choice.algorithm)[1]
        extra = {"x_spectrum": x_spectrum} if kept and choice.backend == "torch" and choice.algorithm == "fft" else {}
        results = run(grad_y, x_in, in_features, rows, cols, coef_re, coef_im, expert_ptr, gates, need_x,
                      need_params, **extra)
    # A fresh empty tensor per missing gradient: outputs of a custom op must not alias one another.
    return tuple(r.contiguous() if r is not None else grad_y.new_empty(0) for r in results)


_fourier_adapter_backward_op = torch.library.custom_op("spectralkern::fourier_adapter_backward", _backward_outputs,
                                                       mutates_args=())


@_fourier_adapter_backward_op.register_fake
def _(grad_y, x, in_features, rows, cols, coef_re, coef_im, expert_ptr, gates, need_x, need_params, algorithm=None):
    empty = grad_y.new_empty(0)
    return (grad_y.new_empty(grad_y.shape[0], in_features) if need_x else empty,
            coef_re.new_empty(coef_re.shape) if need_params else empty,
            coef_im.new_empty(coef_im.shape) if need_params else empty,
            gates.new_empty(gates.shape) if need_params and gates is not None else empty)


def _setup_context(ctx, inputs, output):
    x, rows, cols, coef_re, coef_im, expert_ptr, gates, base, out_features, *forced = inputs
    ctx.algorithm = forced[0] if forced else None
    ctx.need_x = ctx.needs_input_grad[0]
    ctx.need_params = any(ctx.needs_input_grad[i] for i in (3, 4, 6))
    ctx.need_base = ctx.needs_input_grad[7]
    ctx.in_features = x.shape[1]
    # x is read by the backward only for the coefficients' and gates' gradients.
    ctx.save_for_backward(x if ctx.need_params else None, rows, cols, coef_re, coef_im, expert_ptr, gates)


def _backward(ctx, grad_y, run_backward=torch.ops.spectralkern.fourier_adapter_backward):
    x, rows, cols, coef_re, coef_im, expert_ptr, gates = ctx.saved_tensors
    grad_base = grad_y if ctx.need_base else None
    if not (ctx.need_x or ctx.need_params):
        return None, None, None, None, None, None, None, grad_base, None, None
    grad_x, grad_re, grad_im, grad_gates = run_backward(
        grad_y.contiguous(), x if x is not None else grad_y.new_empty(0), ctx.in_features, rows, cols, coef_re,
        coef_im, expert_ptr, gates, ctx.need_x, ctx.need_params, ctx.algorithm)
    return (grad_x if ctx.need_x else None, None, None,
            grad_re if ctx.need_params else None, grad_im if ctx.need_params else None, None,
            grad_gates if ctx.need_params and gates is not None else None, grad_base, None, None)


_fourier_adapter_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFourierAdapter(torch.autograd.Function):
    """The eager entry (old-style, as ``_eager.eager_autograd`` builds them; under torch.compile the custom op runs,
    opaque to the compiler). One thing more than the custom op: when the coefficients or gates need gradients and
    the FFT form runs, the forward keeps x's gathered spectrum (T × n complex, besides x) on ctx, and the backward
    reuses it instead of a second rfft of x and its gather. The custom op, which can only keep its inputs and
    outputs, recomputes it (same values)."""

    @staticmethod
    def forward(ctx, *inputs):
        keep = any(ctx.needs_input_grad[i] for i in (3, 4, 6))
        y, ctx.x_spectrum = _run_forward(*inputs, keep_spectrum=keep)
        _setup_context(ctx, inputs, y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        # kept on ctx (freed with the graph): a second backward (retain_graph) must decide and compute as the first
        return _backward(ctx, grad_y, run_backward=functools.partial(_backward_outputs, x_spectrum=ctx.x_spectrum))


_eager_fourier_adapter = _EagerFourierAdapter.apply


def fourier_adapter_unchecked(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, coef_re: torch.Tensor,
                              coef_im: torch.Tensor, expert_ptr: torch.Tensor, gates: torch.Tensor | None,
                              base: torch.Tensor | None, out_features: int,
                              algorithm: str | None = None) -> torch.Tensor:
    """The op on inputs already in its canonical form (x (T, in); rows, cols int32 (n,); expert_ptr int32 (E+1,);
    gates (T, E) or None; base (T, out) in x's dtype or None), without :func:`fourier_adapter`'s checks: for
    modules that validated their frequencies once. The custom op under torch.compile, the same functions through
    an autograd.Function in eager mode (called directly when nothing needs a gradient)."""
    if torch.compiler.is_compiling():
        op = torch.ops.spectralkern.fourier_adapter
    elif plain_eager_call(*(t for t in (x, coef_re, coef_im, gates, base) if t is not None)):
        op = _forward  # nothing for autograd to record (inference): no Function, no kept spectrum
    else:
        op = _eager_fourier_adapter
    return op(x, rows, cols, coef_re, coef_im, expert_ptr, gates, base, out_features, algorithm)


# ------------------------------------------------------------------------------------------ public API
def _check_index_vector(name: str, value: object, n: int | None, bound: int) -> torch.Tensor:
    check_tensor(name, value, ndim=1)
    if value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {value.dtype}")
    if n is not None and value.numel() != n:
        raise ValueError(f"{name} must have {n} entries (one per frequency), got {value.numel()}")
    if value.numel() and (int(value.min()) < 0 or int(value.max()) >= bound):
        raise ValueError(f"{name} must hold frequencies in [0, {bound}), got values in "
                         f"[{int(value.min())}, {int(value.max())}]")
    return value.to(torch.int32).contiguous()


def fourier_adapter(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, coef_re: torch.Tensor,
                    coef_im: torch.Tensor, out_features: int, *, expert_ptr: torch.Tensor | None = None,
                    gates: torch.Tensor | None = None, base: torch.Tensor | None = None,
                    algorithm: str | None = None) -> torch.Tensor:
    """y = base + Σ_j G[t, e(j)] · Re(C_j e^{2πi u_j p/out} Σ_q x[t, q] e^{2πi v_j q/in}), ΔW never built.

    Args:
        x: (..., in) float16/bfloat16/float32/float64, the layer input.
        rows: (n,) int32/int64 row frequencies u_j in [0, out).
        cols: (n,) int32/int64 column frequencies v_j in [0, in).
        coef_re, coef_im: (n,) real and imaginary parts of the effective coefficients C_j (scale and
            normalisation included); differentiable.
        out_features: out, the number of output features (the row dimension of ΔW).
        expert_ptr: (E+1,) int offsets: expert e owns frequencies [expert_ptr[e], expert_ptr[e+1]).
            Default: one expert owning all n.
        gates: (..., E) per-token expert weights; zero means "not routed" (gradient returned as zero there,
            see the module docstring). Default: every expert with weight 1. Differentiable; on a GPU the gates'
            gradient is summed with fp32 atomics, so its last bits vary run to run (docs/gpu.md).
        base: (..., out) added to the result (e.g. the frozen layer's W x + b), fused into the output write.
        algorithm: None lets the registry's cost model choose per call; "fft", "dense" or "per_frequency" forces
            one (forward and backward; ``BackendUnavailable`` when it cannot run, e.g. "fft" on the Triton
            backend, which has only "per_frequency").
    Returns:
        (..., out) in x's dtype. Accumulation in fp32 (fp64 for fp64 inputs). This function validates the index
        ranges (one device sync); modules that validated them once call :func:`fourier_adapter_unchecked`.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (..., in), got a 0-D tensor")
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be None or one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features <= 0:
        raise ValueError(f"out_features must be a positive int, got {out_features!r}")
    in_features = x.shape[-1]
    rows = _check_index_vector("rows", rows, None, out_features)
    n = rows.numel()
    cols = _check_index_vector("cols", cols, n, max(in_features, 1))
    for name, value in (("coef_re", coef_re), ("coef_im", coef_im)):
        check_tensor(name, value, ndim=1, dtypes=(torch.float32, torch.float64))
        if value.numel() != n:
            raise ValueError(f"{name} must have n = {n} entries (one per frequency), got {value.numel()}")
        check_same_device(name, value, "x", x)
    for name, value in (("rows", rows), ("cols", cols)):
        check_same_device(name, value, "x", x)
    if expert_ptr is None:
        expert_ptr = torch.tensor([0, n], dtype=torch.int32, device=x.device)
    else:
        check_tensor("expert_ptr", expert_ptr, ndim=1)
        ptr = expert_ptr.tolist()
        if len(ptr) < 2 or ptr[0] != 0 or ptr[-1] != n or any(b < a for a, b in zip(ptr[:-1], ptr[1:])):
            raise ValueError(f"expert_ptr must be non-decreasing offsets from 0 to n = {n}, got {ptr}")
        expert_ptr = expert_ptr.to(device=x.device, dtype=torch.int32).contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    num_experts = expert_ptr.numel() - 1
    if gates is not None:
        check_tensor("gates", gates, dtypes=FLOAT_DTYPES)
        if tuple(gates.shape) != (*lead, num_experts):
            raise ValueError(f"gates must have shape {(*lead, num_experts)} (tokens × experts), "
                             f"got {tuple(gates.shape)}")
        check_same_device("gates", gates, "x", x)
        gates = gates.reshape(-1, num_experts)
    if base is not None:
        check_tensor("base", base, dtypes=FLOAT_DTYPES)
        if tuple(base.shape) != (*lead, out_features):
            raise ValueError(f"base must have shape {(*lead, out_features)}, got {tuple(base.shape)}")
        check_same_device("base", base, "x", x)
        base = base.reshape(-1, out_features).to(x.dtype)
    y = fourier_adapter_unchecked(x2, rows, cols, coef_re, coef_im, expert_ptr, gates, base, out_features,
                                  algorithm)
    return y.reshape(*lead, out_features)
