"""``spectralkern bench``: measure the device's ceilings, time every case of the chosen ops against their peers,
print a table, append JSON lines to ``<out>/<op>.jsonl`` and draw ``<out>/<op>.png``.

Every provider's output is checked against a float64 answer before it is timed; a provider that fails (error
or wrong answer) is reported, gets no record, and makes the run exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from .. import cli_args
from . import cases as case_modules
from .case import Case, Provider
from .ceilings import Ceilings, measure_ceilings
from .records import Environment, Record, append_records, environment, measure_peak_memory, utc_timestamp
from .plots import plot_op
from .table import format_table
from .timers import TimerBudget, Timing, time_cpu_interleaved, time_fn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectralkern bench",
        description="Time spectralkern's ops against torch peers; print a table, append JSON lines, plot.")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (fp32 only on the CPU); a smoke test that finishes in well under 3 min")
    parser.add_argument("--ops", nargs="+", choices=sorted(case_modules.OPS), default=sorted(case_modules.OPS),
                        metavar="OP", help=f"ops to run (default: all of {', '.join(sorted(case_modules.OPS))})")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results if it exists here, else ./bench-results)")
    parser.add_argument("--device", type=cli_args.device, default=None,
                        help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                        help="time only these providers (e.g. spectralkern torch_bmm)")
    parser.add_argument("--max-cases", type=int, default=None, metavar="N", help="only the first N cases of each op")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--plan", action="store_true",
                        help="print the static H100 roofline of every case (no GPU, nothing timed); with GPU records "
                             "in --out, measured / predicted too")
    return parser


def default_out_dir() -> Path:
    here = Path("benchmarks") / "results"
    return here if here.is_dir() else Path("bench-results")


def peer_ratios(medians: dict[str, float]) -> dict[str, dict[str, float]]:
    """For each provider p: {q: median_q / median_p} over the other providers q (> 1: p is faster than q)."""
    return {p: {q: mq / mp for q, mq in medians.items() if q != p} for p, mp in medians.items()}


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf when shapes differ, nan propagates)."""
    if out.shape != reference.shape:
        return float("inf")
    ref_norm = float(torch.linalg.vector_norm(reference))
    return float(torch.linalg.vector_norm(out.double() - reference)) / (ref_norm or 1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _budget(device: torch.device, quick: bool) -> TimerBudget:
    if device.type == "cuda":
        return TimerBudget(warmup_ms=25, rep_ms=100)
    return TimerBudget(warmup_ms=20, rep_ms=200) if quick else TimerBudget(warmup_ms=50, rep_ms=500)


def _check(provider: Provider, device: torch.device, reference: torch.Tensor, tolerance: float) -> float:
    """Check one provider's answer (its first call, which also absorbs compilation); its relative error."""
    out = provider.fn()
    _sync(device)
    err = relative_error(out, reference)
    del out
    if not err <= tolerance:  # also catches nan
        raise RuntimeError(f"wrong answer: relative error {err:.3e} > tolerance {tolerance:.0e}")
    return err


def _time_providers(case: Case, device: torch.device, budget: TimerBudget, only: set[str] | None
                    ) -> tuple[dict[str, tuple[str, Timing, float, tuple[int, str]]], list[str]]:
    """Prepare one case and time its providers: ({name: (backend, timing, rel err, memory)}, failure messages).

    Only plain results leave this function, so the case's tensors are freed when it returns."""
    title = f"{case.op} {case.name} {case.dtype_name}"
    print(title, flush=True)
    try:
        prepared = case.prepare(device)
    except Exception as exc:
        traceback.print_exc()
        return {}, [f"{title}: setup failed: {exc!r}"]
    for name, why in prepared.skipped.items():
        if only is None or name in only:
            print(f"  {name}: not run ({why})", flush=True)
    failures, checked = [], []
    for provider in prepared.providers:
        if only is not None and provider.name not in only:
            continue
        try:
            checked.append((provider, _check(provider, device, prepared.reference_for(provider.name),
                                             prepared.tolerance)))
        except Exception as exc:
            traceback.print_exc()
            failures.append(f"{title} {provider.label}: {exc!r}")
            print(f"  {provider.label}: FAILED ({exc!r})", flush=True)
    if device.type == "cpu":  # the peers in turn: their ratios hold on a shared, drifting machine
        timings = time_cpu_interleaved({provider.name: provider.fn for provider, _ in checked}, budget)
    else:
        timings = {provider.name: time_fn(provider.fn, device, budget) for provider, _ in checked}
    results = {}
    for provider, err in checked:
        timing = timings[provider.name]
        results[provider.name] = (provider.backend, timing, err, measure_peak_memory(provider.fn, device))
        print(f"  {provider.label:<22} {timing.median_ms:10.4g} ms  "
              f"{case.bytes / timing.median_ms / 1e6:8.1f} GB/s  rel err {err:.1e}", flush=True)
    return results, failures


def run_case(case: Case, device: torch.device, budget: TimerBudget, ceilings: Ceilings, env: Environment,
             run_id: str, quick: bool, only: set[str] | None) -> tuple[list[Record], list[str]]:
    """Time every provider of one case; returns (records, failure messages)."""
    results, failures = _time_providers(case, device, budget, only)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next case starts from a clean pool (peak-memory numbers, large shapes)
    ratios = peer_ratios({name: timing.median_ms for name, (_, timing, _, _) in results.items()})
    matmul_tflops, matmul_peak = ceilings.matmul_rate(case.compute_kind)
    records = []
    for name, (backend, timing, err, (mem_bytes, mem_kind)) in results.items():
        gbps = case.bytes / (timing.median_ms * 1e-3) / 1e9
        tflops = case.flops / (timing.median_ms * 1e-3) / 1e12
        records.append(Record(
            op=case.op, case=case.name, layout=case.layout, shape=dict(case.shape), dtype=case.dtype_name,
            provider=name, backend=backend,
            median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, timer=timing.method,
            bytes=case.bytes, gbps=gbps, copy_gbps=ceilings.copy_gbps, pct_copy=100 * gbps / ceilings.copy_gbps,
            flops=case.flops, tflops=tflops, matmul_tflops=matmul_tflops, matmul_peak=matmul_peak,
            pct_matmul=100 * tflops / matmul_tflops, ratios=ratios[name], rel_err=err,
            peak_mem_bytes=mem_bytes, peak_mem_kind=mem_kind, quick=quick, run_id=run_id,
            timestamp=utc_timestamp(), **asdict(env)))
    return records, failures


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns the process exit status (0: every provider ran and was right)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plan:
        from .plan import main as plan_main
        return plan_main(args.ops, args.out or default_out_dir())
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {device}: torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.max_cases is not None and args.max_cases < 1:
        print(f"--max-cases must be at least 1, got {args.max_cases}", file=sys.stderr)
        return 2
    out_dir = args.out or default_out_dir()
    only = set(args.providers) if args.providers else None
    if only:  # before any case is built or any ceiling measured
        known = {name for op in args.ops for name in case_modules.load(op).PROVIDERS}
        unknown = sorted(only - known)
        if unknown:
            parser.error(f"argument --providers: no case of {', '.join(args.ops)} has a provider called "
                         f"{', '.join(unknown)} (known: {', '.join(sorted(known))})")

    op_cases = {op: case_modules.load(op).cases(device, args.quick)[:args.max_cases] for op in args.ops}
    env = environment(device)
    run_id = f"{utc_timestamp()}-{os.getpid()}"
    print(f"spectralkern bench on {env.device} ({device}); quick={args.quick}; results -> {out_dir}", flush=True)

    kinds = {case.compute_kind for cases in op_cases.values() for case in cases}
    ceilings = measure_ceilings(device, kinds, quick=args.quick)
    print(f"ceilings: copy {ceilings.copy_gbps:.1f} GB/s (read + write of {ceilings.copy_bytes / 2**20:.0f} MiB); "
          + "; ".join(f"matmul {k} {v:.3g} TFLOP/s (n={ceilings.matmul_n[k]})"
                      for k, v in ceilings.matmul_tflops.items()), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "ceilings.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"run_id": run_id, "timestamp": utc_timestamp(), **asdict(ceilings),
                                 **asdict(env)}, sort_keys=True) + "\n")

    budget = _budget(device, args.quick)
    all_records: list[Record] = []
    failures: list[str] = []
    for op, cases in op_cases.items():
        op_records = []
        for case in cases:
            records, failed = run_case(case, device, budget, ceilings, env, run_id, args.quick, only)
            append_records(out_dir / f"{op}.jsonl", records)  # per case: a crash later keeps what was measured
            op_records += records
            failures += failed
        all_records += op_records
        if op_records and not args.no_plots:
            try:
                print(f"plot: {plot_op(op_records, out_dir / f'{op}.png')}")
            except ImportError:  # matplotlib is the optional `bench` extra
                print("plot: not drawn, matplotlib is not installed (pip install 'spectralkern[bench]')")

    print()
    if all_records:
        print(format_table(all_records))
    print(f"\n{len(all_records)} records appended under {out_dir} in {time.perf_counter() - started:.1f} s")
    if failures:
        print(f"{len(failures)} failure(s):\n  " + "\n  ".join(failures))
    if only and not all_records:
        print(f"--providers {' '.join(sorted(only))}: no case of {', '.join(args.ops)} has a provider of that name",
              file=sys.stderr)
        return 2
    return 1 if failures or not all_records else 0
