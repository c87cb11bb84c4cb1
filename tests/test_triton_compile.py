"""Every Triton kernel lowered for real GPU targets without a GPU, and the gates on what the compiler reports.

The interpreter runs kernels as numpy and misses what only lowering finds (layouts, dot shapes, dtype rules,
shared memory, register spills, 32-bit index arithmetic). The interpreter also patches triton.language in this
process, so every compile runs in a subprocess with TRITON_INTERPRET unset. CI time: the TTIR pass over every
variant takes seconds; full compiles (LLVM + ptxas) run for the hot variants on sm_90 only, cached by Triton and
by ``_aot`` (ptxas's report); the full table for sm_80 and sm_90 is ``python -m spectralkern.ops._aot --json
benchmarks/resources.json --markdown benchmarks/resources.md`` and is checked here against the registry.
"""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import spectralkern.ops  # noqa: E402
from spectralkern.ops._aot import HOT, KERNEL_MODULES, KNOWN_SPILLS, TARGETS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "resources.json"


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _variants() -> set[tuple[str, str]]:
    import importlib

    return {(name.rsplit("._triton_", 1)[-1], variant[0]) for name in KERNEL_MODULES
            for variant in importlib.import_module(name).aot_variants()}


def test_every_kernel_module_is_registered_for_aot():
    with_kernels = {info.name for info in pkgutil.iter_modules(spectralkern.ops.__path__, "spectralkern.ops.")
                    if "@triton.jit" in (Path(spectralkern.ops.__path__[0]) / f"{info.name.rsplit('.', 1)[1]}.py")
                    .read_text()}
    assert with_kernels == set(KERNEL_MODULES)


def test_hot_variants_are_registered_variants():
    assert set(HOT) <= _variants()
    assert {(module, label) for module, label, _ in KNOWN_SPILLS} <= set(HOT)


@pytest.mark.triton
def test_every_variant_lowers_with_64_bit_stride_products():
    """Finding 2: `index · stride` in 32 bits wraps at 2³¹ (81,920 tokens × 28,672 in SMoA's backward). Lowers
    every variant with the i32 strides Triton really passes and finds no 32-bit product of a stride."""
    result = _run(["-m", "spectralkern.ops._aot", "--stride-check"])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@pytest.mark.triton
def test_hot_variants_compile_without_spills_within_shared_memory(tmp_path):
    out = tmp_path / "hot.json"
    result = _run(["-m", "spectralkern.ops._aot", "--hot-only", "--targets", "90", "--json", str(out)])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(row["module"], row["label"]) for row in rows} == set(HOT)
    assert all(row["registers"] > 0 for row in rows)


GATE_DEMO = """
import json
from spectralkern.ops import _aot
rows = _aot.compile_variants("_aot_fixtures", ("cuda", 90, 32), {"wide"})
print(json.dumps({"rows": [r.__dict__ for r in rows],
                  "gate": _aot.gate(rows, hot=(("_aot_fixtures", "wide"),)),
                  "strides": _aot.stride_check(("_aot_fixtures",))}))
"""


@pytest.mark.triton
def test_gate_fails_on_a_spilling_variant_and_a_32_bit_stride():
    """The gate itself, on a deliberately bad kernel (tests/_aot_fixtures.py)."""
    result = _run(["-c", GATE_DEMO])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    (row,) = report["rows"]
    assert row["spill_bytes"] > 0
    assert any("hot variant spills" in line for line in report["gate"])
    assert any("32-bit stride products" in line for line in report["gate"])
    assert len(report["strides"]) >= 2 and all("arith.muli" in line for line in report["strides"])


FMA_DEMO = """
from spectralkern.ops import _aot, _triton_adamw as m
label, signature, constexprs, options = m.aot_variants()[0]
for fusion in (False, True):
    binary, _ = _aot._compile(m.adamw_kernel, signature, constexprs, ("cuda", 90, 32),
                              {**options, "enable_fp_fusion": fusion})
    print(fusion, binary.asm["ptx"].count("fma.rn.f32"))
"""


@pytest.mark.triton
def test_adamw_kernels_compile_without_fma_contraction():
    """Finding 6: with Triton's default fusion the moments compiled to fma.rn.f32 (1 ulp from the CUDA kernel,
    torch and the interpreter, each of which rounds every operation); the launcher turns fusion off."""
    from spectralkern.ops import _triton_adamw, _triton_spectral_adamw

    for module in (_triton_adamw, _triton_spectral_adamw):
        assert all(variant[3]["enable_fp_fusion"] is False for variant in module.aot_variants())
    result = _run(["-c", FMA_DEMO])
    assert result.returncode == 0, result.stderr[-3000:]
    counts = dict(line.split() for line in result.stdout.split("\n") if line.startswith(("False", "True")))
    assert counts["False"] == "0" and int(counts["True"]) > 0


def test_committed_resource_table_covers_every_variant_and_passes_the_gate():
    """benchmarks/resources.json (regenerate: see the module docstring) lists every registered variant on every
    target; its hot rows neither spill (unless explained in KNOWN_SPILLS) nor exceed shared memory, and no row
    has a 32-bit stride product."""
    from spectralkern.ops._aot import Resources, gate

    rows = [Resources(**row) for row in json.loads(TABLE.read_text())]
    assert {(r.module, r.label, r.target) for r in rows} == {(m, label, cc) for m, label in _variants()
                                                             for _, cc, _ in TARGETS}
    assert gate(rows) == []
