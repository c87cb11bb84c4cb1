"""FourierMoE's frequency positions: radial bands, conjugate pairs, sampling.

Per target layer W (out × in), with M = out, N = in:

* **Coefficients and conjugate symmetry.** Expert e holds n_e complex coefficients c_j at frequency positions
  (u_j, v_j) of the M × N DFT grid. Each position is the canonical member of a conjugate pair
  {(u, v), (−u mod M, −v mod N)} (the one with the smaller linear index u·N + v); the spectrum is
  F_e[u_j, v_j] = s·c_j, F_e[−u_j, −v_j] = s·conj(c_j) (s = ``scale``), so ΔW_e = IDFT2(F_e) is real with no
  truncation: ΔW_e[p, q] = (2 s / MN) Σ_j Re(c_j e^{2πi (u_j p / M + v_j q / N)}). The self-conjugate positions
  (u ∈ {0, M/2}, v ∈ {0, N/2}) are never sampled: there the imaginary part of c would vanish, and leaving them
  out keeps every stored real number meaningful — the map from the 2·n_e reals to ΔW_e is injective.
* **Frequency bands (our choice — the paper's banding is not public).** Radial frequency of a position:
  ρ² = (ũ/M)² + (ṽ/N)² with ũ, ṽ the signed frequencies. The grid is split into E bands of equal size by ρ
  (expert 1 lowest … expert E highest; edges at exact integer-key quantiles), and expert e samples its n_e
  positions uniformly, without replacement, from its band with a ``torch.Generator`` seeded by ``seed``.
  ``n_frequencies`` is the total over experts (n_e = n / E, the first n mod E experts get one more). Like peft's
  FourierFT, every layer of the same shape gets the same positions for one seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Grids up to this many positions are enumerated when sampling; larger ones use rejection sampling (unless more
# than a quarter of their pairs are wanted).
_ENUMERATE_LIMIT = 1 << 22


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


def band_energy_features(x: torch.Tensor, num_bands: int) -> torch.Tensor:
    """(T, in) -> (T, num_bands): log of each token's share of energy in equal-width bands of rfft(x)."""
    power = torch.fft.rfft(x, dim=-1).abs().square()
    bins = power.shape[-1]
    band = (torch.arange(bins, device=x.device) * num_bands) // bins
    energy = torch.zeros(x.shape[0], num_bands, dtype=power.dtype, device=x.device).index_add_(1, band, power)
    share = energy / energy.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(power.dtype).tiny)
    return torch.log(share + 1e-6)


