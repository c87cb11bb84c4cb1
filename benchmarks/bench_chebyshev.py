"""Benchmark the Chebyshev filter: ``python benchmarks/bench_chebyshev.py [--quick] [--out DIR] ...``.

A thin wrapper over the harness in ``spectralkern.bench`` (same options as ``spectralkern bench``, with
``--ops chebyshev_filter``). Works from a checkout that is not pip-installed: the repository root is put on
sys.path when spectralkern is not importable.
"""
import sys
from pathlib import Path

try:
    import spectralkern  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectralkern.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "chebyshev_filter", *sys.argv[1:]]))
