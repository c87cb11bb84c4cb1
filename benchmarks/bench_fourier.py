"""Benchmark a FourierFT / FourierMoE layer: ``python benchmarks/bench_fourier.py [--quick] [--out DIR] ...``.

Fused op vs its torch.fft backend vs the eager reference (ΔW_e rebuilt with ifft2 each call) vs peft FourierFT vs
peft LoRA at the same trainable budget, forward and forward+backward, on 4096 × 4096 and 11008 × 4096 layers with
2048 / 8192 tokens, n ∈ {1000, 5000}, E ∈ {1, 4, 8} in bf16, with peak memory (see
``spectralkern/bench/cases/fourier.py``). A thin wrapper over the harness (``spectralkern bench --ops fourier``);
works from a checkout that is not pip-installed.
"""
import sys
from pathlib import Path

try:
    import spectralkern  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectralkern.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "fourier", *sys.argv[1:]]))
