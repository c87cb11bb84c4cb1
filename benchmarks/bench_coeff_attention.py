"""Benchmark Coeff-Tuning's head-mixed attention: ``python benchmarks/bench_coeff_attention.py [--quick] [--out DIR]``.

The fused op vs the eager formulation (all H maps materialised) vs plain ``scaled_dot_product_attention`` (the
cost floor without mixing), forward and forward+backward, sequence 512 / 2048 / 8192, H 12 / 32, head dim 64 / 128,
bf16, causal and not (see ``spectralkern/bench/cases/coeff_attention.py``). A thin wrapper over the harness
(``spectralkern bench --ops coeff_attention``); works from a checkout that is not pip-installed.
"""
import sys
from pathlib import Path

try:
    import spectralkern  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectralkern.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "coeff_attention", *sys.argv[1:]]))
