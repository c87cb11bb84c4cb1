"""Benchmark an SMoA layer: ``python benchmarks/bench_smoa.py [--quick] [--out DIR] ...``.

Fused SMoA vs the eager reference (ΔW materialised) vs peft LoRA at the same trainable-parameter budget, forward
and forward+backward, on a 4096 × 4096 and an 11008 × 4096 layer with 2048 / 8192 / 16384 tokens in bf16 (see
``spectralkern/bench/cases/smoa.py``). A thin wrapper over the harness (``spectralkern bench --ops smoa``); works
from a checkout that is not pip-installed.
"""
import sys
from pathlib import Path

try:
    import spectralkern  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectralkern.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "smoa", *sys.argv[1:]]))
