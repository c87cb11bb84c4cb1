"""The budgeted GPU session's CPU rehearsal (benchmarks/gpu_session.py --dry-run): every step a CPU can run
passes, every step prints its budget, the plan fits the budget, and at most 8 files land in $OUT."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_passes_and_fits_twelve_minutes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--budget", "12m", "--dry-run"],
                            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    steps = json.loads((out / "steps.json").read_text())
    assert steps["dry_run"] and steps["planned_s"] <= steps["budget_s"] == 720
    names = [step["name"] for step in steps["steps"]]
    assert names == ["build", "info", "tests", "sanitizer", "bench", "plan"]
    for step in steps["steps"]:
        assert f"{step['name']:<24} budget {step['budget_s']:>4} s" in result.stdout
        assert step["status"] == "ok" or step["status"].startswith("skipped")
    assert "static roofline at H100" in (out / "bench.log").read_text()
    selected = re.search(r"(\d+)/\d+ tests collected", (out / "tests.log").read_text())
    assert selected and int(selected.group(1)) >= 8  # the GPU tests of every op were found and import cleanly
    assert len([p for p in out.iterdir()]) <= 8
    assert json.loads((out / "gpu-env.json").read_text())["python"]


def test_budget_too_small_for_the_plan_is_refused(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_session.py"), "--budget", "5m",
                             "--dry-run"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "exceed --budget 300 s" in result.stderr
