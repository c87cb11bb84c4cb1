"""The Fourier adapter's CPU shape sweep (issue 19): `spectralkern bench --ops fourier --device cpu` (full mode: the
sweep's cases) timed by the CPU time of the calling thread instead of the wall clock.

On the shared 2-core dev machine (8 busy processes, load average 10–12) a wall-clock median measures the
scheduler, not the code: the same call varies 3–5× between runs. One torch thread does all the work of a call in
the calling thread, so ``time.thread_time()`` counts exactly the call's own CPU time. Records are the bench's own
(``benchmarks/results/cpu/fourier.jsonl``), with ``timer`` saying which clock.

    OMP_NUM_THREADS=1 python benchmarks/fourier_cpu_sweep.py [--providers spectralkern fourier_fft ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spectralkern.bench import runner  # noqa: E402
from spectralkern.bench.cases import fourier  # noqa: E402
from spectralkern.bench.ceilings import measure_ceilings  # noqa: E402
from spectralkern.bench.records import append_records, environment, utc_timestamp  # noqa: E402
from spectralkern.bench.timers import QUANTILES, Timing  # noqa: E402


def time_thread_cpu(fn, budget) -> Timing:
    """Median and 20/80 percentiles of ``fn()``'s CPU time in this thread, after one warm-up call."""
    fn()
    samples = []
    for _ in range(budget.min_reps):
        start = time.thread_time()
        fn()
        samples.append((time.thread_time() - start) * 1e3)
    median, p20, p80 = np.quantile(np.asarray(samples), QUANTILES)
    return Timing(float(median), float(p20), float(p80), f"cpu-thread_time median of {len(samples)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", nargs="+", default=None, help="only the cases with these names")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu")
    args = parser.parse_args()
    if torch.get_num_threads() != 1:
        print("run with OMP_NUM_THREADS=1: the thread clock counts only the calling thread", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    env = environment(device)
    run_id = f"{utc_timestamp()}-{os.getpid()}"
    ceilings = measure_ceilings(device, {"tf32x3"}, quick=True)
    budget = runner.TimerBudget(min_reps=args.repeats)
    runner.time_fn = lambda fn, _device, budget: time_thread_cpu(fn, budget)  # this script's clock
    failures = []
    for case in fourier.cases(device, quick=False):
        if args.cases and case.name not in args.cases:
            continue
        records, failed = runner.run_case(case, device, budget, ceilings, env, run_id, False,
                                          set(args.providers) if args.providers else None)
        append_records(args.out / "fourier.jsonl", records)
        failures += failed
        for record in records:
            print(f"  {record.provider:<24} {record.backend:<12} {record.median_ms:9.2f} ms", flush=True)
    print(f"run {run_id}, environment {asdict(env)['git_sha'][:10]}; failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
