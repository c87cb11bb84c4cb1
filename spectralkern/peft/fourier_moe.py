"""FourierMoE (paper 003) and FourierFT: sparse-spectrum weight updates for the Linear layers of any torch model.

Per target layer W (out × in), with M = out, N = in:

* **Coefficients and conjugate symmetry.** Expert e holds n_e complex coefficients c_j at frequency positions
  (u_j, v_j) of the M × N DFT grid. Each position is the canonical member of a conjugate pair
  {(u, v), (−u mod M, −v mod N)} (the one with the smaller linear index u·N + v); the spectrum is
  F_e[u_j, v_j] = s·c_j, F_e[−u_j, −v_j] = s·conj(c_j) (s = ``scale``), so ΔW_e = IDFT2(F_e) is real with no
  truncation: ΔW_e[p, q] = (2 s / MN) Σ_j Re(c_j e^{2πi (u_j p / M + v_j q / N)}). The self-conjugate positions
  (u ∈ {0, M/2}, v ∈ {0, N/2}) are never sampled: there the imaginary part of c would vanish, and leaving them
  out keeps every stored real number meaningful — the map from the 2·n_e reals to ΔW_e is injective
  (fft2(ΔW_e) reads back s·c_j at (u_j, v_j)), which is what "lossless" means here.
* **Frequency bands (our choice — the paper's banding is not public).** Radial frequency of a position:
  ρ² = (ũ/M)² + (ṽ/N)² with ũ, ṽ the signed frequencies (u or u − M, whichever is nearer 0). The grid is split
  into E bands of equal size by ρ (expert 1 lowest … expert E highest; edges at exact integer-key quantiles),
  and expert e samples its n_e positions uniformly, without replacement, from its band with a
  ``torch.Generator`` seeded by ``seed`` — reproducible for a given (M, N, n, E, seed). ``n_frequencies`` is the
  total over experts (n_e = n / E, the first n mod E experts get one more), so the trainable budget does not
  grow with E. Like peft's FourierFT, every layer of the same shape gets the same positions for one seed.
* **Router (our choice).** A bias-free linear gate reads the token's hidden state x (``router="linear"``) or,
  with ``router="spectral"``, the log of the token's normalised energy in ``router_bands`` equal-width bands of
  rfft(x) (its frequency energy distribution); top-k logits, softmax over the selected k (the others get
  weight 0). The router runs in fp32. ``router=None``: every expert always on with weight 1 (static, mergeable).
* **Load balancing (our choice: the Switch-Transformer loss).** aux = E · Σ_e f_e · P̄_e, f_e the fraction of
  routed slots that went to e, P̄_e the mean full-softmax probability of e (1.0 when perfectly balanced). It is
  stored on the layer as ``aux_loss`` after each forward and returned by :func:`fourier_moe_aux_loss`; nothing
  is added to any loss behind your back.
* y = W x + b + Σ_e g_e(x) · ΔW_e x. E = 1 with no router is FourierFT (``FourierFTConfig``).

``impl="fused"`` runs ``spectralkern.ops.fourier_adapter`` (ΔW never built, O(n·(in + out)) per token on the
Triton path); ``impl="reference"`` materialises every ΔW_e with ``torch.fft.ifft2`` on each call, as peft does.
:func:`from_peft_fourierft` turns a peft ``FourierFTLinear`` (real spectrum at arbitrary positions,
ΔW = scaling · Re(ifft2(spectrum))) into a layer of this module with the same outputs.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._checks import check_int
from ..ops.fourier_adapter import fourier_adapter_backend
from ._patching import (combine_fingerprints, find_target_modules, fingerprint_tensors, freeze_all_except,
                        is_linear_like, linear_features, linear_weight, load_adapter_file, read_adapter_metadata,
                        replace_module, save_adapter_file)

METHOD = "fourier_moe"
IMPLS = ("fused", "reference")
ROUTERS = ("linear", "spectral", None)
INITS = ("zeros", "normal")
# Grids up to this many positions are enumerated when sampling; larger ones use rejection sampling (unless more
# than a quarter of their pairs are wanted).
_ENUMERATE_LIMIT = 1 << 22


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------ configs
@dataclass
class FourierMoEConfig:
    """FourierMoE hyper-parameters.

    Args:
        num_experts: E, experts per layer, one radial frequency band each.
        top_k: experts each token is routed to (1 ≤ top_k ≤ E); ignored when router is None.
        n_frequencies: complex coefficients per layer, summed over the experts (2 real parameters each).
        scale: multiplies the spectrum (peft's FourierFT ``scaling``; 150 is its default for n = 1000).
        router: "linear" (gate on x), "spectral" (gate on x's rfft band energies) or None (all experts, weight 1).
        router_bands: rfft bands the spectral router reads.
        seed: seeds the frequency positions (the "normal" init and the router use torch's global RNG).
        init: "zeros" (ΔW = 0 at start) or "normal" (coefficients ~ N(0, 1), like peft's default).
        target_modules: names matched by suffix (``["q_proj", "v_proj"]``) or one regex over the full name.
        impl: "fused" (custom op, ΔW never built) or "reference" (eager, ΔW_e via torch.fft.ifft2 each call).
    """
    num_experts: int = 4
    top_k: int = 2
    n_frequencies: int = 1000
    scale: float = 150.0
    router: str | None = "linear"
    router_bands: int = 16
    seed: int = 0
    init: str = "zeros"
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    impl: str = "fused"

    def __post_init__(self) -> None:
        check_int("num_experts", self.num_experts, 1)
        check_int("top_k", self.top_k, 1)
        check_int("n_frequencies", self.n_frequencies, 1)
        check_int("router_bands", self.router_bands, 1)
        check_int("seed", self.seed, 0)
        self.scale = _check_number("scale", self.scale)
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.router is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k = {self.top_k} is larger than num_experts = {self.num_experts}; "
                             "a token cannot be routed to more experts than exist")
        if self.n_frequencies < self.num_experts:
            raise ValueError(f"n_frequencies = {self.n_frequencies} is smaller than num_experts = "
                             f"{self.num_experts}; every expert needs at least one coefficient")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def routed(self) -> bool:
        return self.router is not None

    def to_dict(self) -> dict:
        return {"kind": "fourier_moe", **asdict(self)}


@dataclass
class FourierFTConfig:
    """FourierFT: one expert, no router — the same layer with E = 1 (see ``FourierMoEConfig`` for the fields).

    Unlike peft's FourierFT (a real spectrum at arbitrary positions, Re(ifft2) taken afterwards), the
    coefficients are complex and conjugate-symmetric; ``from_peft_fourierft`` converts peft's layers exactly.
    """
    n_frequencies: int = 1000
    scale: float = 150.0
    seed: int = 0
    init: str = "zeros"
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    impl: str = "fused"

    def __post_init__(self) -> None:
        self.moe_config()  # validates

    def moe_config(self) -> FourierMoEConfig:
        """The equivalent ``FourierMoEConfig`` (num_experts = 1, top_k = 1, router = None)."""
        return FourierMoEConfig(num_experts=1, top_k=1, n_frequencies=self.n_frequencies, scale=self.scale,
                                router=None, seed=self.seed, init=self.init,
                                target_modules=self.target_modules, impl=self.impl)

    def to_dict(self) -> dict:
        return {"kind": "fourierft", **asdict(self)}


def _config_from_dict(values: dict) -> FourierMoEConfig | FourierFTConfig:
    values = dict(values)
    kind = values.pop("kind", "fourier_moe")
    return FourierFTConfig(**values) if kind == "fourierft" else FourierMoEConfig(**values)


# ------------------------------------------------------------------------------------------ frequency bands
@dataclass(frozen=True)
class FrequencyLayout:
    """Frequency positions of one layer: rows (n,) int32 u_j, cols (n,) int32 v_j, expert_ptr (E+1,) int32
    (expert e owns j in [expert_ptr[e], expert_ptr[e+1])), amplitude (n,) float: the factor that turns a
    coefficient into its term, ΔW[p, q] = scale · Σ_j amplitude_j · Re(c_j e^{2πi(u_j p/M + v_j q/N)})."""
    rows: torch.Tensor
    cols: torch.Tensor
    expert_ptr: torch.Tensor
    amplitude: torch.Tensor


def _radial_key(u: torch.Tensor, v: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Exact integer ρ²·M²N² = ũ²N² + ṽ²M² (int64), ũ, ṽ the signed frequencies."""
    us = torch.where(2 * u > m, u - m, u)
    vs = torch.where(2 * v > n, v - n, v)
    return us * us * (n * n) + vs * vs * (m * m)


def _isqrt(values: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(values)) for a non-negative int64 tensor, exact (float estimate + integer correction)."""
    root = values.double().sqrt().floor().long()
    root = torch.where(root * root > values, root - 1, root)
    return torch.where((root + 1) * (root + 1) <= values, root + 1, root)


def _count_within(key: int, m: int, n: int) -> int:
    """Number of grid positions with radial key ≤ key (all of the M × N grid)."""
    us = torch.arange(m, dtype=torch.int64)
    us = torch.where(2 * us > m, us - m, us)
    rest = key - us * us * (n * n)
    ok = rest >= 0
    reach = _isqrt(torch.where(ok, rest, 0) // (m * m))  # largest |ṽ| with ṽ²M² ≤ rest
    per_row = torch.minimum(reach, torch.tensor(n // 2)) + torch.minimum(reach, torch.tensor((n - 1) // 2)) + 1
    return int(torch.where(ok, per_row, 0).sum())


def _band_edges(m: int, n: int, num_bands: int) -> torch.Tensor:
    """(E−1,) int64 keys: band e holds the positions with edges[e−1] < key ≤ edges[e] (equal counts ±ties)."""
    top = (m // 2) ** 2 * n * n + (n // 2) ** 2 * m * m
    edges = []
    for e in range(1, num_bands):
        target = math.ceil(e * m * n / num_bands)
        lo, hi = 0, top
        while lo < hi:  # smallest key whose count reaches the target
            mid = (lo + hi) // 2
            if _count_within(mid, m, n) >= target:
                hi = mid
            else:
                lo = mid + 1
        edges.append(lo)
    return torch.tensor(edges, dtype=torch.int64)


def _conjugate(index: torch.Tensor, m: int, n: int) -> torch.Tensor:
    u, v = index // n, index % n
    return ((-u) % m) * n + (-v) % n


def conjugate_pairs(out_features: int, in_features: int) -> int:
    """Independent conjugate pairs of an out × in grid (self-conjugate positions excluded): the most complex
    coefficients a layer can hold."""
    self_conjugate = (2 if out_features % 2 == 0 else 1) * (2 if in_features % 2 == 0 else 1)
    return (out_features * in_features - self_conjugate) // 2


def sample_frequencies(out_features: int, in_features: int, n_frequencies: int, num_experts: int,
                       seed: int) -> FrequencyLayout:
    """Positions for one layer: E radial bands of equal size, n_e canonical positions drawn from band e.

    Returns int32 rows/cols sorted by linear index within each expert, expert_ptr (E+1,), and
    amplitude 2/(MN) (each coefficient stands for itself and its mirror). Deterministic in the arguments.

    Raises:
        ValueError: n_frequencies exceeds the layer's conjugate pairs, or a band holds fewer pairs than its
            expert's share (tiny layers with many experts).
    """
    m, n, total = out_features, in_features, n_frequencies
    pairs = conjugate_pairs(m, n)
    if total > pairs:
        raise ValueError(f"n_frequencies = {total} exceeds what a {m} x {n} weight can hold: out·in = {m * n} "
                         f"positions form {pairs} independent conjugate pairs (each complex coefficient fills a "
                         "position and its mirror; self-conjugate positions are excluded)")
    quotas = [total // num_experts + (1 if e < total % num_experts else 0) for e in range(num_experts)]
    edges = _band_edges(m, n, num_experts)
    generator = torch.Generator().manual_seed(seed)
    # Enumerate small grids, and dense picks on any grid (rejection sampling would crawl near saturation).
    if m * n <= _ENUMERATE_LIMIT or total > pairs // 4:
        index = torch.arange(m * n, dtype=torch.int64)
        index = index[index < _conjugate(index, m, n)]  # canonical members; drops self-conjugate positions
        band = torch.searchsorted(edges, _radial_key(index // n, index % n, m, n))
        chosen = []
        for e, quota in enumerate(quotas):
            members = index[band == e]
            if members.numel() < quota:
                raise ValueError(f"expert {e}'s radial band of the {m} x {n} grid holds {members.numel()} conjugate "
                                 f"pairs, fewer than its {quota} coefficients; use fewer experts or frequencies")
            chosen.append(members[torch.randperm(members.numel(), generator=generator)[:quota]].sort().values)
    else:
        picked: list[set[int]] = [set() for _ in quotas]
        while any(len(s) < q for s, q in zip(picked, quotas)):
            draw = torch.randint(0, m * n, (4 * total + 1024,), generator=generator)
            draw = torch.minimum(draw, _conjugate(draw, m, n))
            draw = draw[draw != _conjugate(draw, m, n)]
            band = torch.searchsorted(edges, _radial_key(draw // n, draw % n, m, n))
            for position, e in zip(draw.tolist(), band.tolist()):
                if len(picked[e]) < quotas[e]:
                    picked[e].add(position)
        chosen = [torch.tensor(sorted(s), dtype=torch.int64) for s in picked]
    flat = torch.cat(chosen)
    ptr = torch.tensor([0] + quotas, dtype=torch.int64).cumsum(0).to(torch.int32)
    return FrequencyLayout(rows=(flat // n).to(torch.int32), cols=(flat % n).to(torch.int32), expert_ptr=ptr,
                           amplitude=torch.full((total,), 2.0 / (m * n), dtype=torch.float64))


def radial_band_of(rows: torch.Tensor, cols: torch.Tensor, out_features: int, in_features: int,
                   num_experts: int) -> torch.Tensor:
    """(n,) int64 radial band (0 = lowest) of each position, by the same edges ``sample_frequencies`` uses."""
    edges = _band_edges(out_features, in_features, num_experts)
    return torch.searchsorted(edges, _radial_key(rows.long(), cols.long(), out_features, in_features))


# ------------------------------------------------------------------------------------------ reference ΔW
def fourier_delta_weights(rows: torch.Tensor, cols: torch.Tensor, coef_re: torch.Tensor, coef_im: torch.Tensor,
                          amplitude: torch.Tensor, expert_ptr: Sequence[int], out_features: int, in_features: int,
                          scale: float) -> torch.Tensor:
    """(E, out, in) ΔW_e = IDFT2(F_e), materialised with ``torch.fft.ifft2`` (what peers do).

    F_e gets (MN/2)·scale·amplitude_j·c_j at (u_j, v_j) and its conjugate at the mirror, so it is
    conjugate-symmetric and the IDFT is real; the real part is returned (its imaginary part is round-off).
    fp32 (complex64) unless the coefficients are fp64.
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


def band_energy_features(x: torch.Tensor, num_bands: int) -> torch.Tensor:
    """(T, in) -> (T, num_bands): log of each token's share of energy in equal-width bands of rfft(x)."""
    power = torch.fft.rfft(x, dim=-1).abs().square()
    bins = power.shape[-1]
    band = (torch.arange(bins, device=x.device) * num_bands) // bins
    energy = torch.zeros(x.shape[0], num_bands, dtype=power.dtype, device=x.device).index_add_(1, band, power)
    share = energy / energy.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(power.dtype).tiny)
    return torch.log(share + 1e-6)


# ------------------------------------------------------------------------------------------ the layer
class FourierMoELinear(nn.Module):
    """A Linear-like layer (``nn.Linear`` or HF ``Conv1D``) with a FourierMoE / FourierFT adapter.

    Trainable: ``coef_re`` and ``coef_im`` (n,) (``coef_im`` is None for a real spectrum, as in peft's
    FourierFT), and ``router.weight`` (E × in, or E × router_bands) when routed; fp32 (fp64 for fp64 bases).
    Buffers: ``rows``/``cols`` (n,) int32, ``amplitude`` (n,), ``expert_ptr`` (E+1,) int32. After each forward of
    a routed layer, ``aux_loss`` holds the load-balancing loss (a scalar tensor with grad), else None.
    x (..., in) -> (..., out).
    """

    def __init__(self, base_layer: nn.Module, layout: FrequencyLayout, *, scale: float, top_k: int = 1,
                 router: str | None = None, router_bands: int = 16, complex_coefficients: bool = True,
                 init: str = "zeros", impl: str = "fused", name: str = "") -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"base_layer {name!r} must be nn.Linear or transformers Conv1D, "
                            f"got {type(base_layer).__name__}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        in_features, out_features = linear_features(base_layer)
        weight = linear_weight(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.scale = float(scale)
        self.top_k = top_k
        self.router_kind = router
        self.impl = impl
        self.merged = False
        self.aux_loss: torch.Tensor | None = None
        self.base_fingerprint = fingerprint_tensors({"weight": weight})

        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        device = weight.device
        n = layout.rows.numel()
        self.register_buffer("rows", layout.rows.to(device, torch.int32))
        self.register_buffer("cols", layout.cols.to(device, torch.int32))
        self.register_buffer("expert_ptr", layout.expert_ptr.to(device, torch.int32))
        self.register_buffer("amplitude", layout.amplitude.to(device, dtype))
        self.expert_sizes = layout.expert_ptr.diff().tolist()

        def initial() -> torch.Tensor:
            # "normal" draws from torch's global RNG, like nn.Module initialisers (and peft's spectrum).
            if init == "zeros":
                return torch.zeros(n, dtype=dtype, device=device)
            return torch.randn(n, dtype=dtype, device=device)

        self.coef_re = nn.Parameter(initial())
        self.coef_im = nn.Parameter(initial()) if complex_coefficients else None
        num_experts = len(self.expert_sizes)
        if router is None:
            self.router = None
        else:
            features = in_features if router == "linear" else router_bands
            self.router = nn.Linear(features, num_experts, bias=False, device=device, dtype=dtype)
        self.router_bands = router_bands

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.merged:
            self.aux_loss = None
            return base
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
        y = torch.ops.spectralkern.fourier_adapter(x2, self.rows, self.cols, coef_re, coef_im, self.expert_ptr,
                                                   gates, base2, self.out_features)
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

    def _static_delta(self) -> torch.Tensor:
        if self.router is not None:
            raise ValueError("a routed FourierMoE layer cannot be merged: its expert weights depend on each token "
                             "(merge is exact only for FourierFT or router=None)")
        return self.delta_weights().sum(dim=0)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + Σ_e ΔW_e (FourierFT / router=None only: routed gates depend on the token)."""
        if self.merged:
            warnings.warn("FourierMoE layer is already merged; nothing to do", stacklevel=2)
            return
        weight = linear_weight(self.base_layer)
        weight.add_(self._static_delta().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (W ← W − ΔW); exact up to rounding in the weight's dtype."""
        if not self.merged:
            warnings.warn("FourierMoE layer is not merged; nothing to do", stacklevel=2)
            return
        weight = linear_weight(self.base_layer)
        weight.sub_(self._static_delta().to(weight.dtype))
        self.merged = False

    def settings(self) -> dict:
        """What ``load_fourier_moe`` needs, besides the tensors, to rebuild this layer."""
        return {"scale": self.scale, "top_k": self.top_k, "router": self.router_kind,
                "router_bands": self.router_bands, "complex": self.coef_im is not None,
                "expert_sizes": list(self.expert_sizes), "fingerprint": self.base_fingerprint}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, n={self.rows.numel()}, experts="
                f"{self.expert_sizes}, top_k={self.top_k}, router={self.router_kind}, scale={self.scale:g}, "
                f"complex={self.coef_im is not None}, impl={self.impl}, merged={self.merged}")


# ------------------------------------------------------------------------------------------ peft migration
def _is_peft_fourierft(layer: nn.Module) -> bool:
    return all(hasattr(layer, attr) for attr in ("fourierft_spectrum", "indices", "fourierft_scaling",
                                                 "get_base_layer"))


def from_peft_fourierft(layer: nn.Module, adapter_name: str | None = None, *, impl: str = "fused"
                        ) -> FourierMoELinear:
    """Turn a peft ``FourierFTLinear`` into a ``FourierMoELinear`` with the same outputs and gradients.

    peft computes ΔW = scaling · Re(ifft2(S)) for a real spectrum S with entries s_j at ``indices``; that is
    ΔW[p, q] = scaling · Σ_j (1/MN) · s_j · cos(2π(u_j p/M + v_j q/N)), i.e. this module's layer with
    coefficients c_j = s_j (real, ``coef_im`` None), amplitude 1/(MN) and the same positions (any positions,
    self-conjugate or mirrored pairs included: the op sums whatever it is given). The base layer is shared, not
    copied; the spectrum is copied into a fresh trainable parameter.

    Raises:
        TypeError: ``layer`` is not a peft FourierFT layer.
        ValueError: the adapter is merged into the base weights, or ``adapter_name`` is not one of the layer's.
    """
    if not _is_peft_fourierft(layer):
        raise TypeError(f"layer must be a peft FourierFTLinear, got {type(layer).__name__}")
    names = list(layer.fourierft_spectrum.keys())
    name = adapter_name if adapter_name is not None else next(
        (a for a in layer.active_adapters if a in names), names[0] if names else None)
    if name not in names:
        raise ValueError(f"adapter_name must be one of the layer's adapters {names}, got {adapter_name!r}")
    if getattr(layer, "merged", False):
        raise ValueError("the peft FourierFT layer is merged into its base weights; call unmerge() first")
    spectrum = layer.fourierft_spectrum[name]
    indices = layer.indices[name].to(torch.int64).cpu()
    base = layer.get_base_layer()
    in_features, out_features = linear_features(base)
    layout = FrequencyLayout(rows=indices[0].to(torch.int32), cols=indices[1].to(torch.int32),
                             expert_ptr=torch.tensor([0, indices.shape[1]], dtype=torch.int32),
                             amplitude=torch.full((indices.shape[1],), 1.0 / (out_features * in_features),
                                                       dtype=torch.float64))
    converted = FourierMoELinear(base, layout, scale=float(layer.fourierft_scaling[name]),
                                 complex_coefficients=False, impl=impl)
    with torch.no_grad():
        converted.coef_re.copy_(spectrum.detach().to(converted.coef_re.dtype))
    converted.coef_re.requires_grad_(spectrum.requires_grad)
    return converted


def from_peft_fourierft_model(model: nn.Module, adapter_name: str | None = None, *, impl: str = "fused"
                              ) -> nn.Module:
    """Replace every peft FourierFT layer of ``model`` (a ``PeftModel`` or any module holding them) in place;
    returns the underlying torch model (``model.get_base_model()`` for a PeftModel)."""
    targets = [(name, module) for name, module in model.named_modules() if name and _is_peft_fourierft(module)]
    if not targets:
        raise ValueError(f"{type(model).__name__} holds no peft FourierFT layer to convert")
    for name, module in targets:
        replace_module(model, name, from_peft_fourierft(module, adapter_name, impl=impl))
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ------------------------------------------------------------------------------------------ model level
def fourier_moe_layers(model: nn.Module) -> dict[str, FourierMoELinear]:
    """{full module name: FourierMoELinear} of ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, FourierMoELinear)}


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    ids = set()
    for layer in fourier_moe_layers(model).values():
        params = [layer.coef_re, layer.coef_im] + ([layer.router.weight] if layer.router is not None else [])
        ids.update(id(p) for p in params if p is not None)
    return ids


def _as_moe(config: FourierMoEConfig | FourierFTConfig) -> FourierMoEConfig:
    if isinstance(config, FourierFTConfig):
        return config.moe_config()
    if isinstance(config, FourierMoEConfig):
        return config
    raise TypeError(f"config must be a FourierMoEConfig or FourierFTConfig, got {type(config).__name__}")


def apply_fourier_moe(model: nn.Module, config: FourierMoEConfig | FourierFTConfig, *,
                      layouts: dict[str, FrequencyLayout] | None = None) -> nn.Module:
    """Wrap the target layers of ``model`` (in place) with FourierMoE / FourierFT adapters; freeze the rest.

    Args:
        model: any torch model (HF transformers models included; GPT-2's Conv1D is handled).
        config: ``FourierMoEConfig`` or ``FourierFTConfig``.
        layouts: saved frequency layouts per module name (``load_fourier_moe`` passes them); others are sampled.
    Returns:
        ``model``; only the coefficients (and routers) require grad afterwards. Report with
        ``trainable_parameters(model)``.
    Raises:
        ValueError: n_frequencies exceeds a target layer's conjugate pairs (the message names the layer), no
            module matches, or the model already has FourierMoE layers.
    """
    moe = _as_moe(config)
    existing = fourier_moe_layers(model)
    if existing:
        raise ValueError(f"model already has FourierMoE layers at {sorted(existing)}; one adapter per model")
    targets = find_target_modules(model, moe.target_modules)
    wrapped = []
    for name, module in targets:
        in_features, out_features = linear_features(module)
        layout = None if layouts is None else layouts.get(name)
        if layout is None:
            try:
                layout = sample_frequencies(out_features, in_features, moe.n_frequencies, moe.num_experts, moe.seed)
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from None
        wrapped.append((name, FourierMoELinear(module, layout, scale=moe.scale, top_k=moe.top_k, router=moe.router,
                                               router_bands=moe.router_bands, init=moe.init, impl=moe.impl,
                                               name=name)))
    for name, layer in wrapped:  # replace only once every layer was built, so a bad layer leaves model intact
        replace_module(model, name, layer)
    keep = _adapter_parameter_ids(model)
    freeze_all_except(model, lambda _, p: id(p) in keep)
    model.fourier_moe_config = config  # read by save_fourier_moe
    return model


def fourier_moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing losses of the routed layers' last forward (0.0 when none): add
    ``weight · fourier_moe_aux_loss(model)`` to the task loss yourself."""
    losses = [layer.aux_loss for layer in fourier_moe_layers(model).values() if layer.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).sum()


def merge_fourier_moe(model: nn.Module) -> None:
    """Merge every FourierMoE layer of ``model`` into its base weight (FourierFT / router=None only)."""
    for layer in fourier_moe_layers(model).values():
        layer.merge()


def unmerge_fourier_moe(model: nn.Module) -> None:
    """Undo ``merge_fourier_moe``."""
    for layer in fourier_moe_layers(model).values():
        layer.unmerge()


def fourier_moe_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the base weights of the FourierMoE layers (taken when each layer was wrapped)."""
    return combine_fingerprints({name: layer.base_fingerprint for name, layer in fourier_moe_layers(model).items()})


_TENSORS = ("coef_re", "coef_im", "router.weight", "rows", "cols", "amplitude", "expert_ptr")


def _layer_tensor(layer: FourierMoELinear, key: str) -> torch.Tensor | None:
    """The layer's tensor saved under ``key`` (None for an absent coef_im or router)."""
    if key == "router.weight":
        return layer.router.weight if layer.router is not None else None
    return getattr(layer, key)


def save_fourier_moe(model: nn.Module, path: str | Path) -> Path:
    """Save coefficients, routers and frequency layouts (safetensors) with the config, per-layer settings and
    base-weight fingerprint as metadata. Works for converted peft layers too (their positions are saved)."""
    layers = fourier_moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no FourierMoE layers to save; call apply_fourier_moe first")
    config = getattr(model, "fourier_moe_config", None)
    tensors, layer_meta = {}, {}
    for name, layer in layers.items():
        for key in _TENSORS:
            value = _layer_tensor(layer, key)
            if value is not None:
                tensors[f"{name}.{key}"] = value
        layer_meta[name] = layer.settings()
    return save_adapter_file(path, tensors, method=METHOD, fingerprint=fourier_moe_fingerprint(model),
                             config={"config": config.to_dict() if config is not None else None,
                                     "layers": layer_meta})


def load_fourier_moe(model: nn.Module, path: str | Path, *, impl: str | None = None) -> nn.Module:
    """Load an adapter saved by ``save_fourier_moe`` into ``model`` (in place) and return it.

    If ``model`` has no FourierMoE layers yet, they are built from the saved settings and layouts (peft-converted
    adapters included); otherwise the saved tensors replace the current ones.

    Raises:
        BaseWeightMismatchError: the targeted base weights differ from those the adapter was trained on
            (checked before the model is modified).
        ValueError: the file is not a FourierMoE adapter, or its layers do not match the model's.
    """
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _, _, meta = read_adapter_metadata(path)
    layer_meta: dict = meta["layers"]
    layers = fourier_moe_layers(model)
    if layers:
        if set(layers) != set(layer_meta):
            raise ValueError(f"the adapter file has FourierMoE layers {sorted(layer_meta)}, the model has "
                             f"{sorted(layers)}")
        fingerprint = fourier_moe_fingerprint(model)
    else:
        modules = dict(model.named_modules())
        missing = [name for name in layer_meta if name not in modules or not is_linear_like(modules[name])]
        if missing:
            raise ValueError(f"the adapter file targets modules {missing} that {type(model).__name__} lacks "
                             "(or that are not Linear-like)")
        fingerprint = combine_fingerprints({name: fingerprint_tensors({"weight": linear_weight(modules[name])})
                                            for name in layer_meta})
    tensors, _ = load_adapter_file(path, method=METHOD, expected_fingerprint=fingerprint)
    if not layers:
        modules = dict(model.named_modules())
        for name, settings in layer_meta.items():
            layout = FrequencyLayout(rows=tensors[f"{name}.rows"], cols=tensors[f"{name}.cols"],
                                     expert_ptr=tensors[f"{name}.expert_ptr"], amplitude=tensors[f"{name}.amplitude"])
            layer = FourierMoELinear(modules[name], layout, scale=settings["scale"], top_k=settings["top_k"],
                                     router=settings["router"], router_bands=settings["router_bands"],
                                     complex_coefficients=settings["complex"], impl=impl or "fused", name=name)
            replace_module(model, name, layer)
        keep = _adapter_parameter_ids(model)
        freeze_all_except(model, lambda _, p: id(p) in keep)
        if meta.get("config") is not None:
            model.fourier_moe_config = _config_from_dict(meta["config"])
        layers = fourier_moe_layers(model)
    for name, layer in layers.items():
        if impl is not None:
            layer.impl = impl
        _copy_tensors(layer, name, tensors)
    return model


def _copy_tensors(layer: FourierMoELinear, name: str, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key in _TENSORS:
            target = _layer_tensor(layer, key)
            if target is None:
                continue
            stored = tensors.get(f"{name}.{key}")
            if stored is None:
                raise ValueError(f"the adapter file lacks {name}.{key}")
            if tuple(stored.shape) != tuple(target.shape):
                raise ValueError(f"{name}.{key} has shape {tuple(stored.shape)} in the file, the layer expects "
                                 f"{tuple(target.shape)}")
            target.copy_(stored)


def fourier_moe_parameter_count(config: FourierMoEConfig | FourierFTConfig, in_features: int) -> int:
    """Trainable parameters of one layer: 2·n (complex coefficients) + the router's E·features."""
    moe = _as_moe(config)
    if moe.router is None:
        return 2 * moe.n_frequencies
    features = in_features if moe.router == "linear" else moe.router_bands
    return 2 * moe.n_frequencies + moe.num_experts * features


__all__: Sequence[str] = [
    "FourierFTConfig", "FourierMoEConfig", "FourierMoELinear", "FrequencyLayout", "apply_fourier_moe",
    "band_energy_features", "conjugate_pairs", "fourier_delta_weights", "fourier_moe_aux_loss",
    "fourier_moe_fingerprint", "fourier_moe_layers", "fourier_moe_parameter_count", "from_peft_fourierft",
    "from_peft_fourierft_model", "load_fourier_moe", "merge_fourier_moe", "radial_band_of", "sample_frequencies",
    "save_fourier_moe", "unmerge_fourier_moe",
]
