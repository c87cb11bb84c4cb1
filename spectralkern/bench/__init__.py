"""Benchmark harness: ceilings (copy GB/s, matmul TFLOP/s), timers, JSON-lines records, tables and plots.

Entry point: ``main(argv) -> exit status`` (``spectralkern bench``, ``python -m spectralkern.bench``).
Lives inside the package so it runs from an installed wheel; nothing here imports benchmarks/ or tests/.
"""
from .runner import main

__all__ = ["main"]
