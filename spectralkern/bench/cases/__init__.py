"""Benchmark cases, one module per op. Each module defines ``OP`` (its name), ``PROVIDERS`` (every provider name
its cases can time or skip, known without preparing a case) and ``cases(device, quick) -> list[Case]``; the runner imports a module only when
its op is asked for."""
from __future__ import annotations

import importlib
from types import ModuleType

OPS: dict[str, str] = {
    "spectral_filter": "spectralkern.bench.cases.spectral_filter",
    "smoa": "spectralkern.bench.cases.smoa",
    "optimizer": "spectralkern.bench.cases.optimizer",
    "chebyshev_filter": "spectralkern.bench.cases.chebyshev",
    "fourier": "spectralkern.bench.cases.fourier",
    "eigensolver": "spectralkern.bench.cases.eigensolver",
    "eigensolver_seeds": "spectralkern.bench.cases.eigensolver_seeds",
    "coeff_attention": "spectralkern.bench.cases.coeff_attention",
}


def load(op: str) -> ModuleType:
    if op not in OPS:
        raise ValueError(f"no benchmark for op {op!r}; available: {', '.join(sorted(OPS))}")
    return importlib.import_module(OPS[op])
