"""Every Triton kernel compiles for real GPU targets (sm_80, sm_90) without a GPU.

The interpreter runs kernels as numpy and misses errors that only lowering to PTX finds (layouts, dot shapes,
dtype rules, shared memory). The interpreter also patches triton.language in this process, so the compile
runs in a subprocess with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import spectralkern.ops  # noqa: E402
from spectralkern.ops._aot import KERNEL_MODULES, TARGETS  # noqa: E402

SM80_SHARED_LIMIT = 163 * 1024  # bytes per block on A100; the smallest of our targets


def test_every_kernel_module_is_registered_for_aot():
    with_kernels = {info.name for info in pkgutil.iter_modules(spectralkern.ops.__path__, "spectralkern.ops.")
                    if "@triton.jit" in (Path(spectralkern.ops.__path__[0]) / f"{info.name.rsplit('.', 1)[1]}.py")
                    .read_text()}
    assert with_kernels == set(KERNEL_MODULES)


@pytest.mark.triton
def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "spectralkern.ops._aot"], env=env, capture_output=True,
                            text=True, timeout=900)
    report = result.stdout + result.stderr[-4000:]
    assert result.returncode == 0, report
    lines = re.findall(r"^ok +sm_(\d+) (\S+) \[(.+)\] shared=(\d+) B$", result.stdout, flags=re.M)
    compiled = {(cc, module_name) for cc, module_name, _, _ in lines}
    assert compiled == {(str(cc), m) for _, cc, _ in TARGETS for m in KERNEL_MODULES}, report
    too_big = [line for line in lines if int(line[3]) > SM80_SHARED_LIMIT]
    assert not too_big, f"variants over sm_80's shared memory: {too_big}"
