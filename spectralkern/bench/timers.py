"""Timers: ``triton.testing.do_bench`` on CUDA devices, a repeat-median wall-clock timer on the CPU (one function,
or several interleaved so their ratios survive a shared machine's drifting load).

Both return the median and the 20th / 80th percentiles of the per-call time in milliseconds, so records from
either device have the same fields.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Per-call time of one function, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    method: str  # which timer produced it, recorded with every result


@dataclass(frozen=True)
class TimerBudget:
    """How long to warm up and to measure.

    On CUDA ``warmup_ms`` and ``rep_ms`` are do_bench's arguments (time spent, not call counts). On the CPU the
    timer warms up for ``warmup_ms`` (at least one call), then repeats until both ``min_reps`` calls and
    ``rep_ms`` have passed, stopping at ``max_reps``.
    """

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 1000


def time_cpu(fn: Callable[[], object], budget: TimerBudget = TimerBudget()) -> Timing:
    """Median and 20/80 percentiles of ``fn()``'s wall-clock time on the CPU (CPU ops are synchronous)."""
    deadline = time.perf_counter() + budget.warmup_ms / 1e3
    fn()
    while time.perf_counter() < deadline:
        fn()
    samples: list[float] = []
    stop_after = time.perf_counter() + budget.rep_ms / 1e3
    while len(samples) < budget.max_reps and (len(samples) < budget.min_reps or time.perf_counter() < stop_after):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    median, p20, p80 = np.quantile(np.asarray(samples), QUANTILES)
    return Timing(float(median), float(p20), float(p80), f"cpu-perf_counter median of {len(samples)}")


def time_cpu_interleaved(fns: dict[str, Callable[[], object]],
                         budget: TimerBudget = TimerBudget()) -> dict[str, Timing]:
    """``time_cpu`` for several functions at once, called in turn (A B C A B C …) so that a shared machine's
    load drifts over all of them alike and their ratios stay fair. Warm-up and budget as ``time_cpu``, the
    measuring time (``rep_ms``) per function."""
    for fn in fns.values():
        deadline = time.perf_counter() + budget.warmup_ms / 1e3
        fn()
        while time.perf_counter() < deadline:
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    stop_after = time.perf_counter() + len(fns) * budget.rep_ms / 1e3
    rounds = 0
    while rounds < budget.max_reps and (rounds < budget.min_reps or time.perf_counter() < stop_after):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    out = {}
    for name, values in samples.items():
        median, p20, p80 = np.quantile(np.asarray(values), QUANTILES)
        out[name] = Timing(float(median), float(p20), float(p80),
                           f"cpu-perf_counter median of {rounds}, interleaved with {len(fns) - 1} other(s)")
    return out


def time_cuda(fn: Callable[[], object], budget: TimerBudget = TimerBudget()) -> Timing:
    """Median and 20/80 percentiles from ``triton.testing.do_bench`` (CUDA events; L2 flushed before each call)."""
    try:
        from triton.testing import do_bench
    except ImportError as exc:
        raise RuntimeError("timing on a CUDA device uses triton.testing.do_bench; install triton") from exc
    median, p20, p80 = do_bench(fn, warmup=budget.warmup_ms, rep=budget.rep_ms, quantiles=list(QUANTILES))
    return Timing(float(median), float(p20), float(p80), "triton.testing.do_bench")


def time_fn(fn: Callable[[], object], device: torch.device, budget: TimerBudget = TimerBudget()) -> Timing:
    """Time ``fn`` with the timer that fits ``device``."""
    if device.type == "cuda":
        return time_cuda(fn, budget)
    if device.type == "cpu":
        return time_cpu(fn, budget)
    raise ValueError(f"no timer for device type {device.type!r}; expected cuda or cpu")
