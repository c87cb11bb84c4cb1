"""Benchmark records: one JSON line per (op, case, provider) measurement, with the environment it ran in.

Records are long-format (one flat object per measurement, keyed by op, case, provider, dtype, device and
versions), appended to ``<out>/<op>.jsonl`` so that runs on different machines and commits can be compared.

Peak memory (``peak_mem_bytes``) means different things per device, named in ``peak_mem_kind``:
    cuda_peak_over_resident   torch.cuda.max_memory_allocated during one untimed call, minus what was allocated
                              before it: the output plus any workspace the call needs (caching-allocator bytes).
    cpu_process_max_rss       the benchmark process's peak resident set size so far (getrusage ru_maxrss). torch
                              has no per-call CPU allocator statistics, so this is a monotone upper bound for the
                              whole run, not the call's own footprint.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

GIT_SHA_ENV = "SPECTRALKERN_GIT_SHA"  # set where the source tree travels without its .git (a GPU box, a wheel)


@dataclass(frozen=True)
class Environment:
    """Where a run happened; copied into every record of the run."""

    device: str
    device_type: str
    torch_version: str
    triton_version: str
    python_version: str
    git_sha: str
    git_dirty: bool
    float32_matmul_precision: str
    cpu_threads: int


@dataclass(frozen=True)
class Record(Environment):
    """One measurement, flat: the environment's fields plus these. Every field is required and never None
    (``REQUIRED_KEYS``)."""

    op: str
    case: str
    layout: str                       # "uniform" or "ragged" blocks
    shape: dict[str, int | float | str]
    dtype: str
    provider: str                     # "spectralkern", "torch_loop", ...
    backend: str                      # what actually ran it: "triton", "torch", "inductor", ...
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str
    bytes: int                        # the op's minimum traffic (each input read once, each output written once)
    gbps: float
    copy_gbps: float
    pct_copy: float                   # gbps / copy_gbps · 100
    flops: int
    tflops: float
    matmul_tflops: float
    matmul_peak: str                  # which measured rate matmul_tflops is
    pct_matmul: float
    ratios: dict[str, float]          # peer provider -> peer median / this median (> 1: this one is faster)
    rel_err: float                    # ‖out − ref‖ / ‖ref‖ against a float64 reference on the same inputs
    peak_mem_bytes: int
    peak_mem_kind: str
    quick: bool
    run_id: str
    timestamp: str                    # ISO 8601, UTC

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Record:
        data = json.loads(line)
        missing = [key for key in REQUIRED_KEYS if data.get(key) is None]
        if missing:
            raise ValueError(f"benchmark record is missing required field(s) {missing}: {line[:200]}")
        return cls(**{key: data[key] for key in REQUIRED_KEYS})


REQUIRED_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Record))


def append_records(path: Path, records: Iterable[Record]) -> int:
    """Append records to a JSON-lines file (created with its folder if needed); returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [record.to_json() + "\n" for record in records]
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(lines)
    return len(lines)


def read_records(path: Path) -> list[Record]:
    with path.open(encoding="utf-8") as handle:
        return [Record.from_json(line) for line in handle if line.strip()]


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state() -> tuple[str, bool]:
    """(commit sha, dirty) of the source tree this package was imported from; ("unknown", False) outside one.

    Only a checkout whose root holds both .git and pyproject.toml counts, so a wheel installed in some other
    project's virtualenv does not report that project's commit. ``SPECTRALKERN_GIT_SHA`` overrides the sha.
    """
    override = os.environ.get(GIT_SHA_ENV, "").strip()
    if override:
        return override, False
    root = Path(__file__).resolve().parents[2]
    if not ((root / ".git").exists() and (root / "pyproject.toml").exists()):
        return "unknown", False
    sha = _git(["rev-parse", "HEAD"], root)
    if not sha:
        return "unknown", False
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return sha, bool(status)


def environment(device: torch.device) -> Environment:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    sha, dirty = git_state()
    return Environment(
        device=_device_name(device), device_type=device.type, torch_version=torch.__version__,
        triton_version=triton_version, python_version=platform.python_version(), git_sha=sha, git_dirty=dirty,
        float32_matmul_precision=torch.get_float32_matmul_precision(), cpu_threads=torch.get_num_threads())


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """(bytes, kind) for one call of ``fn``; see the module docstring for what each kind measures."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return int(peak), "cuda_peak_over_resident"
    import resource  # POSIX only; imported here so the module still imports elsewhere

    fn()
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "cpu_process_max_rss"
