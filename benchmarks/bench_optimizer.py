"""Benchmark one optimizer step over a Llama-7B-shaped parameter set: SpectralAdamW (fused filter + AdamW) against
torch AdamW, filter-then-AdamW and a GaLore-style step —
``python benchmarks/bench_optimizer.py [--quick] [--out DIR] ...``.

A thin wrapper over the harness in ``spectralkern.bench`` (same options as ``spectralkern bench``, with
``--ops optimizer``). Works from a checkout that is not pip-installed: the repository root is put on sys.path
when spectralkern is not importable.
"""
import sys
from pathlib import Path

try:
    import spectralkern  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectralkern.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "optimizer", *sys.argv[1:]]))
