"""The device's ceilings, measured in the same run as the ops they judge.

* copy bandwidth: ``dst.copy_(src)`` of one large buffer into a preallocated one, counting bytes read plus bytes
  written (a clone would also time the allocation);
* matmul rate: a square ``torch.mm`` into a preallocated output, 2·n³ flops, for each precision the cases ask for.

Matmul precisions (the keys of ``Ceilings.matmul_tflops``):
    fp32    full-precision fp32 (``torch.set_float32_matmul_precision("highest")``)
    tf32    fp32 inputs on the tensor cores in TF32 (precision "high")
    bf16, fp16
A kernel's compute ceiling may be derived from these: ``tf32x3`` (three TF32 passes, ≈ fp32 accuracy) is taken as
a third of the measured TF32 rate; ``Ceilings.matmul_rate`` says which rate a kind maps to.
On the CPU there are no TF32 units, so ``tf32`` and ``tf32x3`` map to the measured fp32 rate, undivided.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .timers import TimerBudget, time_fn

_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DERIVED = {"tf32x3": ("tf32", 3.0)}  # kind -> (measured kind, slowdown factor)


@dataclass
class Ceilings:
    """Measured copy bandwidth (GB/s, read + write) and matmul rates (TFLOP/s) of one device."""

    device_type: str
    copy_gbps: float
    copy_bytes: int
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    matmul_n: dict[str, int] = field(default_factory=dict)

    def matmul_rate(self, kind: str) -> tuple[float, str]:
        """(TFLOP/s, description of where it comes from) for a compute kind such as "tf32x3" or "bf16"."""
        base, factor = _resolve(kind, self.device_type)
        if base not in self.matmul_tflops:
            raise KeyError(f"matmul rate for {kind!r} (measured as {base!r}) was not measured; "
                           f"have {sorted(self.matmul_tflops)}")
        what = f"{base} measured" if factor == 1.0 else f"{base} measured / {factor:g} ({kind})"
        return self.matmul_tflops[base] / factor, what


def _resolve(kind: str, device_type: str) -> tuple[str, float]:
    """(measured kind, slowdown factor) that stands for ``kind`` on this device type.

    Off CUDA there are no TF32 units: code asking for tf32 or tf32x3 runs plain fp32 there, at the fp32 rate.
    """
    base, factor = _DERIVED.get(kind, (kind, 1.0))
    if base not in _DTYPES:
        raise ValueError(f"unknown matmul kind {kind!r}; expected one of {sorted([*_DTYPES, *_DERIVED])}")
    if device_type != "cuda" and base == "tf32":
        return "fp32", 1.0
    return base, factor


def measure_copy(device: torch.device, nbytes: int, budget: TimerBudget) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written) of a ``nbytes`` buffer on ``device``."""
    src = torch.rand(nbytes // 4, device=device)  # random, never zeros: zero pages and compression can flatter
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, budget)
    return 2 * src.numel() * 4 / (timing.median_ms * 1e-3) / 1e9


def measure_matmul(device: torch.device, kind: str, n: int, budget: TimerBudget) -> float:
    """TFLOP/s of an (n × n) @ (n × n) product in precision ``kind`` (a key of the module docstring)."""
    dtype = _DTYPES[kind]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if kind == "tf32" else "highest")
    try:
        timing = time_fn(lambda: torch.mm(a, b, out=out), device, budget)
    finally:
        torch.set_float32_matmul_precision(previous)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12


def measure_ceilings(device: torch.device, kinds: set[str], *, quick: bool) -> Ceilings:
    """Measure copy bandwidth and the matmul rates that the compute kinds in ``kinds`` need.

    On CUDA fp32, tf32 and bf16 are always measured (about a second together), so every run's ceilings record
    holds the rates the torch peers run at too; on the CPU only what ``kinds`` needs.
    Sizes: on CUDA a 1 GiB copy (far past any L2) and n = 8192 products; on the CPU a 64 MiB copy (256 MiB in
    full mode) and n = 1024 products (512 for 16-bit types, which are slow on most CPUs).
    """
    on_gpu = device.type == "cuda"
    budget = TimerBudget(warmup_ms=25, rep_ms=200) if on_gpu else TimerBudget(warmup_ms=50, rep_ms=300, min_reps=3)
    copy_bytes = 2**30 if on_gpu else (64 if quick else 256) * 2**20
    ceilings = Ceilings(device.type, measure_copy(device, copy_bytes, budget), copy_bytes)
    bases = {_resolve(kind, device.type)[0] for kind in kinds} | ({"fp32", "tf32", "bf16"} if on_gpu else set())
    for base in sorted(bases):
        n = 8192 if on_gpu else (1024 if base == "fp32" else 512)
        ceilings.matmul_tflops[base] = measure_matmul(device, base, n, budget)
        ceilings.matmul_n[base] = n
    return ceilings
