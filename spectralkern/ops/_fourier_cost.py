"""The Fourier adapter's cost model: predicted seconds of each torch form for one call, from measured constants.

The registry (``_backend.OPS["fourier_adapter"]``) calls :func:`form_seconds` for each algorithm and runs the
cheapest; this module only predicts. Terms (T tokens, layer out × in, n frequencies, S = E experts when gated, else 1):

    fft            1-D real FFTs of every token's row: T·(in·log₂in + out·log₂out) points·log, plus the
                   gather / scale / scatter of T·n complex values and the zeroed T·(out/2+1) half spectrum (the
                   backward's transform of x is skipped when the forward kept it: ``spectrum_kept``)
    dense          one batched 2-D FFT of S out × in spectra (S·out·in·log₂(out·in)) and GEMMs:
                   2·T·out·in·S FLOPs per product (forward 1; backward grad_x, the Gram, and with gates the per-expert
                   outputs again)
    per_frequency  twiddle matrices n·(in + out) cos + sin, GEMMs 4·T·n·size per analysis or synthesis

Each constant is seconds per unit, measured by :func:`calibrate` on one thread (``torch.set_num_threads(1)``);
``MEASURED`` holds the values measured on the CPU this package was tuned on (benchmarks/NOTES.md, "Fourier
adapter on the CPU"), per accumulation dtype. A device or dtype without its own measurement uses the CPU fp32 row
scaled by nothing — the *ratios* between forms, which is all the choice needs, are assumed to carry over.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

FORMS = ("fft", "dense", "per_frequency")
# dense builds S ΔW of out × in in the accumulation dtype; above this it is not an option (memory, not time).
DENSE_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CostConstants:
    """Seconds per unit of each kind of work (see the module docstring)."""

    gemm_flop: float      # one FLOP of a large GEMM
    fft_point: float      # one point·log₂(length) of a batched 1-D real FFT (forward or inverse)
    fft2_point: float     # one point·log₂(points) of a batched 2-D real FFT
    elementwise: float    # one complex element of a gather / multiply / scatter pass
    trig: float           # one twiddle (cos + sin of one reduced phase)
    call: float           # fixed cost of one form's call (torch op dispatches)


# Measured with ``calibrate()`` on the 2-core dev machine (Xeon @ 2.8 GHz, AVX-512, torch 2.13 CPU), one thread.
MEASURED: dict[tuple[str, torch.dtype], CostConstants] = {
    ("cpu", torch.float32): CostConstants(gemm_flop=8.3e-12, fft_point=1.05e-10, fft2_point=2.5e-10,
                                          elementwise=3.8e-9, trig=1.0e-8, call=1.0e-4),
    ("cpu", torch.float64): CostConstants(gemm_flop=2.0e-11, fft_point=2.9e-10, fft2_point=4.6e-10,
                                          elementwise=7.7e-9, trig=1.5e-8, call=1.0e-4),
}


def constants_for(device_type: str, acc: torch.dtype) -> CostConstants:
    return MEASURED.get((device_type, acc), MEASURED[("cpu", torch.float32)])


def _log2(size: float) -> float:
    return math.log2(max(size, 2.0))


def form_seconds(form: str, facts: Mapping[str, object]) -> float:
    """Predicted seconds of ``form`` for one call described by ``facts``: tokens, in_features, out_features, n,
    slots (experts when gated, else 1), gated, backward (False: the forward), need_x, need_params, device_type,
    acc (the accumulation dtype), and optionally dense_cached (the dense ΔW of these coefficients exists) and
    spectrum_kept (the FFT form's forward kept x's gathered spectrum for this backward)."""
    t, i, o, n = (float(facts[k]) for k in ("tokens", "in_features", "out_features", "n"))
    slots = float(facts["slots"])
    backward, gated = bool(facts["backward"]), bool(facts["gated"])
    need_x, need_params = (bool(facts["need_x"]), bool(facts["need_params"])) if backward else (True, False)
    c = constants_for(str(facts["device_type"]), facts["acc"])
    fft_in, fft_out = c.fft_point * i * _log2(i), c.fft_point * o * _log2(o)
    if form == "fft":
        # Passes over the T × n complex values (gather, sign, factor, scatter; the backward's product and sum) and
        # over T × out / T × in (zeroed half spectra, the base add), in units of ``elementwise``: counts fitted to
        # the form's measured fwd + bwd at 10 shapes (benchmarks/NOTES.md, session "fft2"; within ≈ 15 %) — one
        # in-place pass costs ≈ 0.4 of the calibration's gather-and-multiply element.
        if not backward:
            work = t * (fft_in + fft_out) + c.elementwise * t * (1.5 * n + o / 2)
        else:
            work = t * fft_out + c.elementwise * t * n / 2
            work += need_x * (t * fft_in + c.elementwise * t * (n + 0.4 * i))
            # x's transform and gather: skipped when the forward kept them (``spectrum_kept``)
            work += need_params * ((0.0 if facts.get("spectrum_kept") else t * fft_in + c.elementwise * t * n / 2)
                                   + c.elementwise * t * n)
    elif form == "dense":
        product = c.gemm_flop * 2 * t * o * i * slots
        transform = c.fft2_point * slots * o * i * _log2(o * i)
        build = 0.0 if facts.get("dense_cached") else transform  # the forward's ΔW, kept for the backward
        if not backward:
            work = build + product + c.elementwise * t * o * (slots if gated else 0)
        else:
            work = build + need_x * product
            work += need_params * (product + transform + product * gated)
    elif form == "per_frequency":
        analysis_in, analysis_out = c.gemm_flop * 4 * t * n * i, c.gemm_flop * 4 * t * n * o
        twiddles_in, twiddles_out = c.trig * n * i, c.trig * n * o
        if not backward:
            work = twiddles_in + twiddles_out + analysis_in + analysis_out + c.elementwise * t * 2 * n
        else:
            work = twiddles_out + analysis_out + c.elementwise * t * n
            work += (need_x or need_params) * twiddles_in
            work += need_x * (analysis_in + c.elementwise * t * n)
            work += need_params * (analysis_in + c.elementwise * t * 3 * n)
    else:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return c.call + work


def dense_fits(out_features: int, in_features: int, slots: int, acc: torch.dtype) -> bool:
    """Whether the dense form's S ΔW (out × in each) stay within ``DENSE_MAX_BYTES``."""
    return slots * out_features * in_features * torch.empty(0, dtype=acc).element_size() <= DENSE_MAX_BYTES


# ------------------------------------------------------------------------------------------ measuring the constants
def _seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()  # CPU time of this thread: robust to other processes on a shared machine
        fn()
        times.append(time.thread_time() - start)
    return sorted(times)[len(times) // 4]  # the lower quartile: warm caches, no preemption


def calibrate(acc: torch.dtype = torch.float32, repeats: int = 20) -> CostConstants:
    """Measure the constants on this CPU, one thread (a few seconds). Only CPU timing is implemented."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(512, 1024, generator=gen, dtype=acc)
        b = torch.randn(1024, 768, generator=gen, dtype=acc)
        gemm = _seconds(lambda: a @ b, repeats) / (2 * 512 * 1024 * 768)
        rows = torch.randn(256, 2048, generator=gen, dtype=acc)
        half = torch.fft.rfft(rows)
        fft = (_seconds(lambda: torch.fft.rfft(rows), repeats)
               + _seconds(lambda: torch.fft.irfft(half, n=2048), repeats)) / (2 * 256 * 2048 * 11)
        plane = torch.randn(1024, 1024, generator=gen, dtype=acc)
        plane_half = torch.fft.rfft2(plane)
        fft2 = (_seconds(lambda: torch.fft.rfft2(plane), repeats)
                + _seconds(lambda: torch.fft.irfft2(plane_half, s=(1024, 1024)), repeats)) / (2 * 1024 * 1024 * 20)
        index = torch.randint(0, 1025, (1000,), generator=gen)
        values = torch.complex(torch.randn(256, 1000, dtype=acc), torch.randn(256, 1000, dtype=acc))
        elementwise = _seconds(lambda: half[:, index] * values, repeats) / (2 * 256 * 1000)
        freqs = torch.randint(0, 2048, (1000,), generator=gen)

        def twiddle() -> torch.Tensor:
            phase = (torch.arange(2048)[:, None] * freqs[None, :]) % 2048
            angle = phase.to(acc) * (2 * math.pi / 2048)
            return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
        trig = _seconds(twiddle, repeats) / (2048 * 1000)
        return CostConstants(gemm_flop=gemm, fft_point=fft, fft2_point=fft2, elementwise=elementwise, trig=trig,
                             call=MEASURED[("cpu", torch.float32)].call)
    finally:
        torch.set_num_threads(threads)
