"""``spectralkern bench --plan``: the static roofline of every benchmark case, without a GPU.

Per case (the full-mode cases of each op: the headline shapes of ``benchmarks/NOTES.md``): the bytes the op must
move and the FLOPs it must do (``Case.bytes`` / ``Case.flops``, the same counts the timed records carry), and the
time each takes at the H100 figures NOTES uses — copy bandwidth 3.0 TB/s and 798 TFLOP/s bf16 as seen on this
workplace's H100 (device/KINDS.md, 2026-11-13), the other matmul rates nominal (tf32 494.7, tf32x3 = tf32 / 3,
fp32 SIMT 66.9, fp64 tensor 66.9). Predicted = the larger of the two floors. When records of a GPU run exist
(``<results>/<op>.jsonl``, provider ``spectralkern``, a device whose name holds the rates' device), the table adds
the measured median and measured / predicted. The backend column is the registry's choice on a GPU whose
runtimes are all live (``_backend.why_not`` on the table alone: the CUDA extension once the session built it).
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _backend
from . import cases as case_modules
from .case import Case
from .records import read_records

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roofline:
    """A device's two ceilings: copy bandwidth (bytes read + written per second) and matmul rate per kind."""

    device: str
    copy_tbps: float
    tflops: dict[str, float]

    def predict(self, case: Case) -> tuple[float, float, float]:
        """(bytes floor, FLOPs floor, predicted) in microseconds."""
        bytes_us = case.bytes / (self.copy_tbps * 1e12) * 1e6
        flops_us = case.flops / (self.tflops[case.compute_kind] * 1e12) * 1e6
        return bytes_us, flops_us, max(bytes_us, flops_us)


H100 = Roofline("H100", copy_tbps=3.0,
                tflops={"bf16": 798.0, "fp16": 798.0, "tf32": 494.7, "tf32x3": 494.7 / 3, "fp32": 66.9, "fp64": 66.9})


# Benchmark op -> (registry op, the facts its table entries test, read from a case's shape).
_REGISTRY = {
    "spectral_filter": ("spectral_filter", lambda s: {"k": s["k"]}),
    "smoa": ("smoa_linear", lambda s: {"rank": s["r"]}),
    "optimizer": ("adamw_update", lambda s: {"k": s["k"], "dense_state": True}),
    "chebyshev_filter": ("chebyshev_filter", lambda s: {}),
    "fourier": ("fourier_adapter", lambda s: {"dim": max(s["out"], s["in"])}),
    "coeff_attention": ("coeff_attention", lambda s: {"head_dim": s["D"]}),
}


def gpu_backend(op: str, case: Case) -> str:
    """The backend the registry picks for ``case`` on a GPU with every runtime live ('—': not a registry op)."""
    if op not in _REGISTRY:
        return "—"
    name, facts = _REGISTRY[op]
    for backend in _backend.OPS[name].backends:
        if _backend.why_not(name, backend.name, case.dtype, **facts(case.shape)) is None:
            return backend.name
    return "torch"


@dataclass(frozen=True)
class PlanRow:
    op: str
    case: str
    dtype: str
    backend: str
    compute_kind: str
    megabytes: float
    gflop: float
    bytes_us: float
    flops_us: float
    predicted_us: float
    measured_us: float | None

    @property
    def bound(self) -> str:
        return "bytes" if self.bytes_us >= self.flops_us else "flops"


def plan_rows(ops: list[str], roofline: Roofline = H100, results: Path | None = None) -> list[PlanRow]:
    """One row per full-mode case of each op, as a GPU run builds them (inputs are made lazily, in each case's
    ``prepare``: nothing is allocated here)."""
    rows = []
    for op in ops:
        measured = _measured(results / f"{op}.jsonl", roofline.device) if results else {}
        for case in case_modules.load(op).cases(torch.device("cuda"), False):
            bytes_us, flops_us, predicted = roofline.predict(case)
            rows.append(PlanRow(op, case.name, case.dtype_name, gpu_backend(op, case), case.compute_kind,
                                case.bytes / 1e6, case.flops / 1e9,
                                bytes_us, flops_us, predicted, measured.get((case.name, case.dtype_name))))
    return rows


def _measured(path: Path, device: str) -> dict[tuple[str, str], float]:
    """Latest median (µs) of provider spectralkern per (case, dtype) on a device whose name contains ``device``."""
    if not path.exists():
        return {}
    latest = {}
    for record in read_records(path):
        if record.provider == "spectralkern" and device in record.device and not record.quick:
            latest[(record.case, record.dtype)] = record.median_ms * 1e3
    return latest


def format_table(rows: list[PlanRow], roofline: Roofline = H100) -> str:
    lines = [f"static roofline at {roofline.device}: copy {roofline.copy_tbps} TB/s; matmul "
             + ", ".join(f"{k} {v:.1f}" for k, v in roofline.tflops.items()) + " TFLOP/s",
             f"{'op':<16} {'case':<44} {'dtype':<9} {'backend':<7} {'kind':<7} {'MB':>9} {'GFLOP':>9} {'bytes µs':>9} "
             f"{'FLOPs µs':>9} {'pred µs':>9} bound  {'meas µs':>9} {'meas/pred':>9}"]
    for r in rows:
        measured = (f"{r.measured_us:>9.1f} {r.measured_us / r.predicted_us:>9.2f}" if r.measured_us is not None
                    else f"{'—':>9} {'—':>9}")
        lines.append(f"{r.op:<16} {r.case:<44} {r.dtype:<9} {r.backend:<7} {r.compute_kind:<7} "
                     f"{r.megabytes:>9.1f} {r.gflop:>9.2f} "
                     f"{r.bytes_us:>9.1f} {r.flops_us:>9.1f} {r.predicted_us:>9.1f} {r.bound:<6} {measured}")
    return "\n".join(lines)


def main(ops: list[str], results: Path | None) -> int:
    """Print the plan of ``ops``; ``results``: a directory of GPU records to compare with (None: none)."""
    started = time.perf_counter()
    rows = plan_rows(ops, H100, results)
    print(format_table(rows))
    logger.info("bench --plan: %d cases in %.1f s", len(rows), time.perf_counter() - started)
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spectralkern.bench.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="+", choices=sorted(case_modules.OPS), default=sorted(case_modules.OPS))
    parser.add_argument("--results", type=Path, default=None, help="directory of <op>.jsonl records of a GPU run")
    args = parser.parse_args(argv)
    return main(args.ops, args.results)


if __name__ == "__main__":
    raise SystemExit(_standalone())
