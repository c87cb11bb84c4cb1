"""Two more plain-torch forms of the Fourier adapter, beside the FFT form of ``fourier_adapter_reference``.

Same contract as ``fourier_adapter_reference`` / ``fourier_adapter_backward_reference`` (see ``fourier_adapter``
for the formula); which form runs is the registry's choice (``_fourier_cost`` holds the cost model).

* ``dense``: ΔW_e (E × out × in) built by one batched irfft2 of the folded spectrum, then GEMMs — peft's way;
  kept while the coefficient tensor lives, so a training step's backward reuses its forward's ΔW. Forward
  2·T·out·in·E FLOPs; the backward adds grad_x (the same again) and the Gram (G·gate)ᵀ x whose 2-D FFT, read at
  the n frequencies, is the coefficients' gradient.
* ``per_frequency``: the DFT at the n frequencies as real GEMMs against cos/sin twiddle matrices built per call
  (in × 2n and 2n × out): 4·T·n·(in + out) FLOPs forward, what the Triton kernels compute on chip; the reference's
  own token loop with these transforms in place of the FFTs.

Both compute in fp32 (fp64 for fp64 inputs) and return x's dtype, like the reference.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .fourier_adapter import _acc_dtype, expert_of_frequency, spectral_backward, spectral_forward


# ------------------------------------------------------------------------------------------ dense ΔW
class _Folding:
    """Where every term of ΔW_s = Σ_{j: slot_j = s} Re(C_j e^{2πi(u_j p/out + v_j q/in)}) lands on the half spectrum
    irfft2 reads (slots × out × (in/2 + 1), flattened): ``index`` (n,). A column above in/2 becomes the conjugate
    at (−u, in − v); interior columns get half the coefficient (irfft doubles them), columns 0 and in/2 all of it
    (their imaginary part is dropped). ``build`` (n, 2): the factors of (Re C, Im C) that put C there (weight, and
    the conjugation as a sign); ``gather`` (n, 2): the signs that read dL/dC back from rfft2 of the Gram at the same
    bins. Depends only on the frequencies and shapes, so it is built once per layer (``_folding``)."""

    def __init__(self, rows, cols, slot, out_features, in_features, acc):
        rows, cols = rows.long(), cols.long()
        upper = cols > in_features // 2
        half_cols = torch.where(upper, in_features - cols, cols)
        half_rows = torch.where(upper, (out_features - rows) % out_features, rows)
        self.index = (slot * out_features + half_rows) * (in_features // 2 + 1) + half_cols
        weight = torch.where((half_cols == 0) | (2 * half_cols == in_features), 1.0, 0.5).to(acc)
        sign = torch.where(upper, -1.0, 1.0).to(acc)
        self.build = torch.stack([weight, weight * sign], dim=-1)
        self.gather = torch.stack([torch.ones_like(sign), sign], dim=-1)


# Foldings, kept while the row-frequency tensor lives (a layer's buffer): validated on every use by the identity and
# version of the companion tensors and the shapes.
_FOLDINGS = WeakTensorKeyDictionary()


def _folding(rows, cols, expert_ptr, gated, num_slots, out_features, in_features, acc) -> _Folding:
    key = (gated, num_slots, out_features, in_features, acc, rows._version, cols._version, expert_ptr._version)
    entry = _FOLDINGS.get(rows)
    if entry is not None and entry[0] == key and entry[1]() is cols and entry[2]() is expert_ptr:
        return entry[3]
    slot = (expert_of_frequency(expert_ptr, rows.numel()) if gated
            else torch.zeros(rows.numel(), dtype=torch.int64, device=rows.device))
    folding = _Folding(rows, cols, slot, out_features, in_features, acc)
    _FOLDINGS[rows] = (key, weakref.ref(cols), weakref.ref(expert_ptr), folding)
    return folding


def dense_delta_weights(coef_re, coef_im, folding, num_slots, out_features, in_features) -> torch.Tensor:
    """(num_slots, out, in) real ΔW_s = Σ_{j: slot_j = s} Re(C_j e^{2πi(u_j p/out + v_j q/in)}), one batched irfft2."""
    width = in_features // 2 + 1
    values = torch.stack([coef_re, coef_im], dim=-1).to(folding.build.dtype).mul_(folding.build)
    spectrum = torch.zeros(num_slots * out_features * width, 2, dtype=values.dtype, device=values.device)
    spectrum.index_add_(0, folding.index, values)
    return torch.fft.irfft2(torch.view_as_complex(spectrum).view(num_slots, out_features, width),
                            s=(out_features, in_features), norm="forward")


# The dense form's ΔW, kept while the coefficient tensor it was built from lives: autograd keeps the (effective)
# coefficients from the forward to the backward, so the backward reuses the forward's ΔW instead of rebuilding it
# (peft's FourierFT keeps its ΔW the same way); the entry goes with the tensor. Validated on every use: the same
# companion tensors (by identity), unchanged versions and values, the same shape and dtype.
_DELTAS = WeakTensorKeyDictionary()


def _delta_stamp(rows, cols, coef_re, coef_im, expert_ptr, num_slots, out_features, in_features, acc):
    companions = (coef_im, rows, cols, expert_ptr)
    versions = tuple(t._version for t in (coef_re, *companions))
    return companions, (versions, num_slots, out_features, in_features, acc, coef_re.device)


def cached_delta(rows, cols, coef_re, coef_im, expert_ptr, num_slots, out_features, in_features, acc):
    """The ΔW (slots, out, in) a dense call built from these very tensors, or None."""
    entry = _DELTAS.get(coef_re)
    if entry is None:
        return None
    refs, stamp, values, delta = entry
    companions, now = _delta_stamp(rows, cols, coef_re, coef_im, expert_ptr, num_slots, out_features, in_features,
                                   acc)
    if stamp != now or any(ref() is not t for ref, t in zip(refs, companions)):
        return None
    # Writes through ``.data`` (gradcheck's perturbations, some optimizers) leave ``_version`` alone: compare the
    # coefficients' values too (2n numbers, next to the out × in ΔW they save rebuilding).
    if not (torch.equal(values[0], coef_re) and torch.equal(values[1], coef_im)):
        return None
    return delta


def _delta_for(rows, cols, coef_re, coef_im, expert_ptr, gates, out_features, in_features, acc):
    """(folding, slots, ΔW (slots, out, in)): without gates every expert has weight 1, so one ΔW serves them all."""
    num_slots = 1 if gates is None else gates.shape[1]
    folding = _folding(rows, cols, expert_ptr, gates is not None, num_slots, out_features, in_features, acc)
    delta = cached_delta(rows, cols, coef_re, coef_im, expert_ptr, num_slots, out_features, in_features, acc)
    if delta is None:
        delta = dense_delta_weights(coef_re, coef_im, folding, num_slots, out_features, in_features)
        companions, stamp = _delta_stamp(rows, cols, coef_re, coef_im, expert_ptr, num_slots, out_features,
                                         in_features, acc)
        _DELTAS[coef_re] = (tuple(weakref.ref(t) for t in companions), stamp,
                            (coef_re.detach().clone(), coef_im.detach().clone()), delta)
    return folding, num_slots, delta


def dense_forward(x, rows, cols, coef_re, coef_im, expert_ptr, out_features, gates=None, base=None):
    acc = _acc_dtype(x.dtype)
    num_tokens, in_features = x.shape
    _, num_slots, delta = _delta_for(rows, cols, coef_re, coef_im, expert_ptr, gates, out_features, in_features, acc)
    weight = delta.view(num_slots * out_features, in_features).T
    if gates is not None:
        per_slot = x.to(acc) @ weight
        y = torch.einsum("tso,ts->to", per_slot.view(num_tokens, num_slots, out_features), gates.to(acc))
        return (y if base is None else y.add_(base.to(acc))).to(x.dtype)
    if base is None:
        return (x.to(acc) @ weight).to(x.dtype)
    return torch.addmm(base.to(acc), x.to(acc), weight).to(x.dtype)


def dense_backward(grad_y, x, in_features, rows, cols, coef_re, coef_im, expert_ptr, gates, need_x, need_params):
    acc = _acc_dtype(grad_y.dtype)
    num_tokens, out_features = grad_y.shape
    folding, num_slots, delta = _delta_for(rows, cols, coef_re, coef_im, expert_ptr, gates, out_features,
                                           in_features, acc)
    delta = delta.view(num_slots * out_features, in_features)
    g = grad_y.to(acc)
    # (T, slots · out): grad_y weighted by each token's gate of each expert
    g_slots = g if gates is None else (g[:, None, :] * gates.to(acc)[:, :, None]).reshape(num_tokens, -1)
    grad_x = (g_slots @ delta).to(grad_y.dtype) if need_x else None
    if not need_params:
        return grad_x, None, None, None
    xa = x.to(acc)
    # dL/dC_j = Σ_{p,q} P[p, q] e^{+2πi(u_j p/out + v_j q/in)} with P = (G·gate)ᵀ x: the conjugate of rfft2(P)
    # at (u, v), so grad_re = Re F, grad_im = Im F; columns above in/2 read F's Hermitian mirror (the folding's bins).
    spectrum = torch.fft.rfft2((g_slots.T @ xa).view(num_slots, out_features, in_features))
    picked = torch.view_as_real(spectrum).view(-1, 2).index_select(0, folding.index).mul_(folding.gather)
    grad_gates = None
    if gates is not None:
        per_slot = (xa @ delta.T).view(num_tokens, num_slots, out_features)
        grad_gates = torch.einsum("tso,to->ts", per_slot, g)
        grad_gates = torch.where(gates != 0, grad_gates, 0.0).to(gates.dtype)
    return grad_x, picked[:, 0].to(coef_re.dtype), picked[:, 1].to(coef_im.dtype), grad_gates


# ------------------------------------------------------------------------------------------ per-frequency GEMMs
class TwiddleTransforms:
    """``analysis`` / ``synthesis`` for ``spectral_forward`` / ``spectral_backward`` (their contract), as real
    GEMMs against (size × 2n) [cos | sin] twiddle matrices; each matrix is built once per op call (the instance
    lives for one call) with the phase f·q reduced exactly in integers before the trigonometry."""

    def __init__(self, acc: torch.dtype) -> None:
        self.acc = acc
        self._basis: dict[tuple[int, int], torch.Tensor] = {}

    def _twiddles(self, freqs: torch.Tensor, size: int) -> torch.Tensor:
        key = (id(freqs), size)
        if key not in self._basis:
            q = torch.arange(size, device=freqs.device, dtype=torch.int64)
            angle = ((q[:, None] * freqs.long()[None, :]) % size).to(self.acc) * (2 * math.pi / size)
            self._basis[key] = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
        return self._basis[key]

    def analysis(self, signal: torch.Tensor, freqs: torch.Tensor, size: int) -> torch.Tensor:
        """z[t, j] = Σ_q signal[t, q] e^{+2πi f_j q / size}: (T, size) real -> (T, n) complex."""
        both = signal @ self._twiddles(freqs, size)
        n = freqs.numel()
        return torch.complex(both[:, :n], both[:, n:])

    def synthesis(self, coeffs: torch.Tensor, freqs: torch.Tensor, size: int) -> torch.Tensor:
        """y[t, p] = Re Σ_j coeffs[t, j] e^{+2πi f_j p / size} = Re·cos − Im·sin: (T, n) complex -> (T, size)."""
        basis, n = self._twiddles(freqs, size), freqs.numel()
        return torch.addmm(coeffs.real @ basis[:, :n].T, coeffs.imag, basis[:, n:].T, alpha=-1.0)


def per_frequency_forward(x, rows, cols, coef_re, coef_im, expert_ptr, out_features, gates=None, base=None):
    transforms = TwiddleTransforms(_acc_dtype(x.dtype))
    return spectral_forward(transforms.analysis, transforms.synthesis, x, rows, cols, coef_re, coef_im, expert_ptr,
                            out_features, gates, base)


def per_frequency_backward(grad_y, x, in_features, rows, cols, coef_re, coef_im, expert_ptr, gates, need_x,
                           need_params):
    transforms = TwiddleTransforms(_acc_dtype(grad_y.dtype))
    return spectral_backward(transforms.analysis, transforms.synthesis, grad_y, x, in_features, rows, cols, coef_re,
                             coef_im, expert_ptr, gates, need_x, need_params)
