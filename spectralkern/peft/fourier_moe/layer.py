"""FourierMoE / FourierFT layers: one adapter unit per adapter name around a Linear-like base layer.

* **Router (our choice).** A bias-free linear gate reads the token's hidden state x (``router="linear"``) or,
  with ``router="spectral"``, the log of the token's normalised energy in ``router_bands`` equal-width bands of
  rfft(x); top-k logits, softmax over the selected k (the others get weight 0), in fp32. ``router=None``: every
  expert always on with weight 1 (static, mergeable).
* **Load balancing (our choice: the Switch-Transformer loss).** aux = E · Σ_e f_e · P̄_e, f_e the fraction of
  routed slots that went to e, P̄_e the mean full-softmax probability of e (1.0 when perfectly balanced). Stored
  on the unit as ``aux_loss`` after each forward and summed by :func:`fourier_moe_aux_loss`; nothing is added to
  any loss behind your back.
* y = W x + b + Σ_e g_e(x) · ΔW_e x. ``impl="fused"`` runs ``spectralkern.ops.fourier_adapter`` (ΔW never
  built); ``impl="reference"`` materialises every ΔW_e with ``torch.fft.ifft2`` on each call, as peft does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...ops.fourier_adapter import fourier_adapter_backend, fourier_adapter_unchecked
from .._lifecycle import SpectralTunerLayer
from .._patching import is_linear_like, linear_features, linear_weight
from .frequencies import FrequencyLayout, band_energy_features


def fourier_delta_weights(rows: torch.Tensor, cols: torch.Tensor, coef_re: torch.Tensor, coef_im: torch.Tensor,
                          amplitude: torch.Tensor, expert_ptr: Sequence[int], out_features: int, in_features: int,
                          scale: float) -> torch.Tensor:
    """(E, out, in) ΔW_e = Re(IDFT2(F_e)), materialised with ``torch.fft.ifft2`` (what peers do).

    F_e gets (MN/2)·scale·amplitude_j·c_j at (u_j, v_j) and its conjugate at the mirror, so the IDFT of a
    conjugate-symmetric spectrum is real and each term equals scale·amplitude_j·Re(c_j e^{2πi(u_j p/M + v_j q/N)})
    for any positions (canonical or not). fp32 (complex64) unless the coefficients are fp64.
    """
    complex_dtype = torch.complex128 if coef_re.dtype == torch.float64 else torch.complex64
    m, n = out_features, in_features
    half = torch.complex(coef_re, coef_im).to(complex_dtype) * (amplitude * (scale * m * n / 2)).to(complex_dtype)
    rows64, cols64 = rows.long(), cols.long()
    deltas = []
    for e in range(len(expert_ptr) - 1):
        sl = slice(int(expert_ptr[e]), int(expert_ptr[e + 1]))
        spectrum = torch.zeros(m, n, dtype=complex_dtype, device=coef_re.device)
        spectrum = spectrum.index_put((rows64[sl], cols64[sl]), half[sl], accumulate=True)
        spectrum = spectrum.index_put(((-rows64[sl]) % m, (-cols64[sl]) % n), half[sl].conj(), accumulate=True)
        deltas.append(torch.fft.ifft2(spectrum).real)
    return torch.stack(deltas)


class FourierAdapter(nn.Module):
    """One FourierMoE / FourierFT adapter of one layer (out × in).

    Trainable: ``coef_re`` and ``coef_im`` (n,) (``coef_im`` is None for a real spectrum, as in peft's FourierFT),
    ``router.weight`` (E × in, or E × router_bands) when routed; fp32 (fp64 for fp64 bases). Buffers (saved):
    ``rows``/``cols`` (n,) int32, ``expert_ptr`` (E+1,) int32, ``amplitude`` (n,): ΔW[p, q] = scale ·
    Σ_j amplitude_j · Re(c_j e^{2πi(u_j p/M + v_j q/N)}). ``forward(x, base)``: base + the adapter's update.
    """

    def __init__(self, layout: FrequencyLayout, *, out_features: int, in_features: int, scale: float,
                 top_k: int = 1, router: str | None = None, router_bands: int = 16, complex_coefficients: bool = True,
                 init: str = "zeros", impl: str = "fused", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.scale = float(scale)
        self.top_k = top_k
        self.router_kind = router
        self.router_bands = router_bands
        self.impl = impl
        self.aux_loss: torch.Tensor | None = None
        n = layout.rows.numel()
        self.register_buffer("rows", layout.rows.to(device, torch.int32))
        self.register_buffer("cols", layout.cols.to(device, torch.int32))
        self.register_buffer("expert_ptr", layout.expert_ptr.to(device, torch.int32))
        self.register_buffer("amplitude", layout.amplitude.to(device, dtype))
        self.expert_sizes = layout.expert_ptr.diff().tolist()
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_sizes())

        def initial() -> torch.Tensor:
            # "normal" draws from torch's global RNG, like nn.Module initialisers (and peft's spectrum)
            if init == "zeros":
                return torch.zeros(n, dtype=dtype, device=device)
            return torch.randn(n, dtype=dtype, device=device)

        self.coef_re = nn.Parameter(initial())
        self.coef_im = nn.Parameter(initial()) if complex_coefficients else None
        if router is None:
            self.router = None
        else:
            features = in_features if router == "linear" else router_bands
            self.router = nn.Linear(features, len(self.expert_sizes), bias=False, device=device, dtype=dtype)

    def _refresh_sizes(self) -> None:
        self.expert_sizes = self.expert_ptr.diff().tolist()

    @property
    def num_experts(self) -> int:
        return len(self.expert_sizes)

    def effective_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C_re, C_im) (n,): scale · amplitude · c, what the op multiplies by (differentiable)."""
        factor = self.amplitude * self.scale
        coef_im = self.coef_im if self.coef_im is not None else torch.zeros_like(self.coef_re)
        return self.coef_re * factor, coef_im * factor

    def delta_weights(self) -> torch.Tensor:
        """(E, out, in) ΔW_e via torch.fft.ifft2 (fp32, fp64 for fp64 coefficients), differentiable."""
        coef_im = self.coef_im if self.coef_im is not None else torch.zeros_like(self.coef_re)
        return fourier_delta_weights(self.rows, self.cols, self.coef_re, coef_im, self.amplitude,
                                     self.expert_ptr.tolist(), self.out_features, self.in_features, self.scale)

    def static_delta(self) -> torch.Tensor:
        """Σ_e ΔW_e (out × in): the update of an unrouted adapter."""
        if self.router is not None:
            raise ValueError("a routed FourierMoE adapter cannot be merged: its expert weights depend on each token "
                             "(merge is exact only for FourierFT or router=None)")
        return self.delta_weights().sum(dim=0)

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gates (T, E) (top-k softmax weights, zeros elsewhere) and the load-balancing loss, or (None, None)."""
        if self.router is None:
            return None, None
        features = x2.to(self.router.weight.dtype)
        if self.router_kind == "spectral":
            features = band_energy_features(features, self.router_bands)
        logits = self.router(features)
        k = self.top_k
        top_logits, top_index = logits.topk(k, dim=-1)
        gates = torch.zeros_like(logits).scatter(1, top_index, torch.softmax(top_logits, dim=-1))
        num_experts, num_tokens = logits.shape[1], logits.shape[0]
        if num_tokens == 0:
            return gates, logits.sum() * 0.0
        routed = torch.zeros(num_experts, dtype=logits.dtype, device=logits.device)
        routed.index_add_(0, top_index.reshape(-1), torch.ones(top_index.numel(), dtype=logits.dtype,
                                                               device=logits.device))
        fraction = routed / (num_tokens * k)
        aux = num_experts * (fraction * torch.softmax(logits, dim=-1).mean(dim=0)).sum()
        return gates, aux

    def forward(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        gates, self.aux_loss = self.route(x2)
        if self.impl == "reference":
            deltas = self.delta_weights()
            x_acc = x2.to(deltas.dtype)
            if gates is None:
                update = x_acc @ deltas.sum(dim=0).T
            else:
                update = sum(gates[:, e:e + 1].to(deltas.dtype) * (x_acc @ deltas[e].T)
                             for e in range(self.num_experts))
            return base + update.to(base.dtype).reshape(base.shape)
        coef_re, coef_im = self.effective_coefficients()
        base2 = base.reshape(-1, self.out_features).to(x.dtype)
        order = self._expert_order(gates, x2)
        if order is not None:
            x2, gates, base2 = x2[order], gates[order], base2[order]
        y = fourier_adapter_unchecked(x2, self.rows, self.cols, coef_re, coef_im, self.expert_ptr, gates, base2,
                                      self.out_features)
        if order is not None:
            y = torch.empty_like(y).index_copy(0, order, y)  # back to the tokens' order (differentiable)
        return y.reshape(base.shape).to(base.dtype)

    def _expert_order(self, gates: torch.Tensor | None, x2: torch.Tensor) -> torch.Tensor | None:
        """A token permutation grouping tokens routed to the same experts, or None when it would not help.

        The Triton kernels skip an expert for a whole token tile when no token of the tile is routed to it; with
        tokens in arrival order that almost never happens (top-2 of 8 over 128 random tokens), so every token
        pays for all n coefficients. Sorted by their set of experts, most tiles hold one set and the kernels do
        ≈ k/E of the work, for one gather of x and base and one scatter of y. The torch backend's cost does not
        depend on n, so it is left alone.
        """
        if gates is None or self.top_k >= self.num_experts or self.num_experts > 62:
            return None
        if fourier_adapter_backend(x2, self.in_features, self.out_features) != "triton":
            return None
        weights = torch.pow(2, torch.arange(self.num_experts, device=gates.device, dtype=torch.int64))
        expert_set = ((gates != 0).to(torch.int64) * weights).sum(dim=1)
        return torch.argsort(expert_set, stable=True)

    def extra_repr(self) -> str:
        return (f"n={self.rows.numel()}, experts={self.expert_sizes}, top_k={self.top_k}, "
                f"router={self.router_kind}, scale={self.scale:g}, complex={self.coef_im is not None}, "
                f"impl={self.impl}")


def new_adapter(base_layer: nn.Module, layout: FrequencyLayout, **settings) -> FourierAdapter:
    """A fresh adapter for ``base_layer`` (nn.Linear or HF Conv1D); ``settings``: FourierAdapter's keywords."""
    if not is_linear_like(base_layer):
        raise TypeError(f"FourierMoE adapts nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
    in_features, out_features = linear_features(base_layer)
    weight = linear_weight(base_layer)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return FourierAdapter(layout, out_features=out_features, in_features=in_features, dtype=dtype,
                          device=weight.device, **settings)


class FourierMoELinear(SpectralTunerLayer):
    """A Linear-like layer (``nn.Linear`` or HF ``Conv1D``) with FourierMoE adapters ``fourier_moe_adapters[name]``.

    x (..., in) -> (..., out). The base layer is unmodified except by ``merge`` (unrouted adapters only).
    """
    adapter_attr = "fourier_moe_adapters"

    @classmethod
    def from_layout(cls, base_layer: nn.Module, layout: FrequencyLayout, *, adapter_name: str = "default",
                    **settings) -> FourierMoELinear:
        """One layer with one adapter, outside any model (benchmarks, tests)."""
        return cls.wrap(base_layer, adapter_name, new_adapter(base_layer, layout, **settings))

    # the active adapter's pieces, for single-adapter users (benchmarks, tests)
    @property
    def coef_re(self) -> nn.Parameter:
        return self.active_unit.coef_re

    @property
    def coef_im(self) -> nn.Parameter | None:
        return self.active_unit.coef_im

    @property
    def router(self) -> nn.Linear | None:
        return self.active_unit.router

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the active units' load-balancing losses of the last forward (None when none is routed)."""
        losses = [u.aux_loss for u in self.active_units() if u.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        units = self.active_units()
        for unit in self.units.values():
            unit.aux_loss = None
        if self.merged or not units:
            return result
        for unit in units:
            result = unit(x, result)
        return result

    def check_mergeable(self, name: str) -> None:
        routed = [a for a, u in self.units.items() if u.router is not None]
        if routed:
            raise ValueError(f"layer {name!r}: routed FourierMoE adapters {routed} cannot be merged: their expert "
                             "weights depend on each token (merge is exact only for FourierFT or router=None)")

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W ← W + Σ ΔW of the given (default: active) unrouted adapters."""
        names = self.adapters_to_merge(adapter_names)
        if not names:
            return
        weight = linear_weight(self.base_layer)
        delta = sum(self.units[name].static_delta() for name in names)
        value = weight + delta.to(weight.dtype)
        if safe_merge and not bool(torch.isfinite(value).all()):
            raise ValueError(f"merging adapters {names} would put NaN/Inf into the base weight; nothing was merged")
        weight.copy_(value)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (W ← W − ΔW); exact up to rounding in the weight's dtype."""
        if not self.merged_adapters:
            return
        weight = linear_weight(self.base_layer)
        weight.sub_(sum(self.units[name].static_delta() for name in self.merged_adapters).to(weight.dtype))
        self.merged_adapters = []

    def extra_repr(self) -> str:
        return f"merged={self.merged_adapters}"


class FourierFTLinear(FourierMoELinear):
    """The same layer for FourierFT adapters (``sk_fourierft_adapters[name]``)."""
    adapter_attr = "sk_fourierft_adapters"
