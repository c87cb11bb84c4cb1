"""One GPU call that returns the whole picture, inside a time budget (default 12 minutes).

    bash benchmarks/run_gpu.sh --budget 12m            # on a bare H100 with only the repository
    bash benchmarks/run_gpu.sh --budget 12m --dry-run  # rehearsal on a CPU machine: every step it can, and the plan

Steps, each under its own wall-clock limit (a step that overruns is killed and recorded; the rest still run):

    env        device name, driver, CUDA, torch / triton / nvcc versions, git sha          -> gpu-env.json
    build      csrc/ for sm_90 (setup.py build_ext --inplace, all cores)                   -> build.log
    info       `spectralkern info`: the backend registry's table and what it picks here    -> build.log
    tests      the GPU tests of every op: one representative shape each, fp32 and bf16     -> tests.log
    sanitizer  compute-sanitizer memcheck over the CUDA filter's and AdamW's GPU tests     -> sanitizer.log
    bench      each op's first headline cases against its peers (JSON records, ceilings)   -> bench.log, records.tar.gz
    plan       the static roofline with measured / predicted from those records            -> plan.txt
    (always)   per step: status, seconds, budget                                           -> steps.json

At most 8 files land in $OUT (the device tool brings back no more); without $OUT they go to benchmarks/results/gpu.
The dry run executes what a CPU can (env, the test selection's collection, the benchmark's plan and argument
parsing, the packing) and prints every step's budget; ``tests/test_gpu_session.py`` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One representative shape per op, fp32 and bf16: the tests marked `gpu` (each op's GPU test is one shape, both
# dtypes), without the suite's CPU/interpreter tests.
GPU_TESTS = ["tests/test_spectral_filter.py", "tests/test_laplacian_quadratic.py", "tests/test_smoa.py",
             "tests/test_chebyshev.py", "tests/test_fourier_moe.py", "tests/test_coeff_tuning.py",
             "tests/test_optim.py", "tests/test_cuda_ext.py", "tests/test_cuda_adamw.py"]
SANITIZED_TESTS = ["tests/test_cuda_ext.py", "tests/test_cuda_adamw.py"]
# Headline cases: the first BENCH_CASES of each op's full list (the shapes NOTES' floors are written for), every
# peer of each case timed in the same process (one CUDA start, one ceilings measurement).
BENCH_OPS = ("spectral_filter", "smoa", "optimizer", "chebyshev_filter", "fourier", "coeff_attention")
BENCH_CASES = 2
MAX_FILES = 8


@dataclass
class Step:
    name: str
    budget_s: int
    command: list[str]
    log: str | None
    dry_command: list[str] | None = None  # what the rehearsal runs instead (None: nothing)
    status: str = "pending"
    seconds: float = 0.0


def parse_budget(text: str) -> int:
    """'12m', '720s', '720' -> seconds."""
    text = text.strip().lower()
    if text.endswith("m"):
        return int(float(text[:-1]) * 60)
    return int(float(text.rstrip("s")))


def plan_steps(python: str, out: Path, scratch: Path) -> list[Step]:
    bench_args = ["--out", str(scratch), "--no-plots"]
    steps = [
        Step("build", 150, ["env", "SPECTRALKERN_CUDA_ARCHS=90", f"MAX_JOBS={os.cpu_count() or 4}", python,
                            "setup.py", "build_ext", "--inplace"], "build.log",
             dry_command=["nvcc", "--version"]),
        # The registry's table and what it picks on this machine (the CUDA extension live after the build).
        Step("info", 10, [python, "-m", "spectralkern", "info"], "build.log",
             dry_command=[python, "-m", "spectralkern", "info"]),
        Step("tests", 150, [python, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                            *GPU_TESTS], "tests.log",
             dry_command=[python, "-m", "pytest", "-q", "-m", "gpu", "--collect-only", "-p", "no:cacheprovider",
                          *GPU_TESTS]),
        Step("sanitizer", 120, ["env", "PYTORCH_NO_CUDA_MEMORY_CACHING=1", "compute-sanitizer", "--tool", "memcheck",
                                "--error-exitcode", "3", "--print-limit", "50", python, "-m", "pytest", "-q", "-m",
                                "gpu", "-k", "not opcheck_and_compile", "-p", "no:cacheprovider", *SANITIZED_TESTS],
             "sanitizer.log"),
    ]
    ops = list(BENCH_OPS)
    steps.append(Step("bench", 240, [python, "-m", "spectralkern.bench", "--ops", *ops, "--max-cases",
                                     str(BENCH_CASES), *bench_args], "bench.log",
                      dry_command=[python, "-m", "spectralkern.bench", "--plan", "--ops", *ops, "--max-cases",
                                   str(BENCH_CASES), *bench_args]))
    # The dry run has no records to compare with: its bench step already printed the static plan.
    steps.append(Step("plan", 20, [python, "-m", "spectralkern.bench", "--plan", "--out", str(scratch)], "plan.txt"))
    return steps


def environment(python: str) -> dict[str, object]:
    """Versions and the device, read-only."""
    probe = ("import json, torch; d = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if d else None, "
             "'capability': torch.cuda.get_device_capability() if d else None}))")
    info: dict[str, object] = {"python": platform.python_version(), "machine": platform.machine()}
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    info.update(json.loads(result.stdout) if result.returncode == 0 else {"torch_error": result.stderr[-500:]})
    for name, cmd in (("triton", [python, "-c", "import triton; print(triton.__version__)"]),
                      ("nvcc", ["nvcc", "--version"]),
                      ("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                      "--format=csv,noheader"]),
                      ("git_sha", ["git", "rev-parse", "HEAD"])):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30)
            info[name] = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info[name] = None
    info["git_sha"] = info.get("git_sha") or os.environ.get("SPECTRALKERN_GIT_SHA")
    return info


def run_step(step: Step, out: Path, dry_run: bool, remaining: float) -> None:
    command = step.dry_command if dry_run else step.command
    if command is None:
        step.status = "skipped (dry run: needs a GPU)"
        return
    limit = max(1.0, min(step.budget_s, remaining))
    started = time.monotonic()
    log = (out / step.log).open("a") if step.log else subprocess.DEVNULL
    try:
        if step.log:
            log.write(f"\n== {step.name} ({'dry run' if dry_run else 'run'}, budget {step.budget_s} s): "
                      f"{' '.join(command)}\n")
            log.flush()
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "PYTHONUNBUFFERED": "1"}
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=limit, env=env)
        step.status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
    except subprocess.TimeoutExpired:
        step.status = f"timed out after {limit:.0f} s"
    except OSError as exc:
        step.status = f"could not start: {exc}"
    finally:
        step.seconds = round(time.monotonic() - started, 1)
        if step.log:
            log.close()


def pack(out: Path, scratch: Path) -> None:
    with tarfile.open(out / "records.tar.gz", "w:gz") as tar:
        for path in sorted(scratch.glob("*")):
            tar.add(path, arcname=path.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_gpu.sh --budget", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="12m", help="wall-clock budget of the whole call, e.g. 12m (default)")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on a CPU: run what it can, print the plan")
    parser.add_argument("--only", nargs="+", default=None, metavar="STEP",
                        help="run only these steps (build info tests sanitizer bench plan): the device tool caps one "
                             "command at 10 minutes, so a 12-minute session is two calls on the same warm machine, "
                             "e.g. --only build info tests sanitizer, then --only bench plan")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    budget = parse_budget(args.budget)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results" / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}-records-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    steps = [step for step in plan_steps(args.python, out, scratch)
             if args.only is None or step.name.split(":")[0] in args.only]
    planned = sum(step.budget_s for step in steps) + 10  # + env and packing
    print(f"gpu session ({'dry run' if args.dry_run else 'run'}): budget {budget} s, steps plan {planned} s")
    for step in steps:
        print(f"  {step.name:<24} budget {step.budget_s:>4} s")
    if planned > budget:
        print(f"the steps' budgets ({planned} s) exceed --budget {budget} s", file=sys.stderr)
        return 2
    started = time.monotonic()
    if not args.dry_run:
        probe = subprocess.run([args.python, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() "
                                "else 1)"], cwd=ROOT)
        if probe.returncode != 0:
            print("torch sees no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
            return 1
    (out / "gpu-env.json").write_text(json.dumps(environment(args.python), indent=1) + "\n")
    for step in steps:
        remaining = budget - (time.monotonic() - started) - 5
        if remaining <= 1:
            step.status = "not run: budget spent"
            continue
        run_step(step, out, args.dry_run, remaining)
        print(f"  {step.name:<24} {step.status:<32} {step.seconds:>6.1f} s of {step.budget_s} s", flush=True)
    pack(out, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    total = round(time.monotonic() - started, 1)
    (out / "steps.json").write_text(json.dumps({"dry_run": args.dry_run, "budget_s": budget, "planned_s": planned,
                                                "total_s": total, "steps": [asdict(s) for s in steps]}, indent=1))
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"total {total} s; {len(files)} files in {out}: {', '.join(files)}")
    if len(files) > MAX_FILES:
        print(f"more than {MAX_FILES} files in {out}: the device tool brings back only {MAX_FILES}", file=sys.stderr)
        return 1
    return 0 if all(s.status == "ok" or s.status.startswith("skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
