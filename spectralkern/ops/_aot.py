"""Ahead-of-time compilation of every Triton kernel for real GPU targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and cannot see errors that only lowering to
PTX finds (layout, shared-memory, dot-shape and dtype rules). CI compiles each kernel variant here for
sm_80 and sm_90. Every kernel module lists its variants in ``aot_variants()``; ``KERNEL_MODULES`` is the
registry, and the test fails if a module defines a Triton kernel that no registry entry covers.
"""
from __future__ import annotations

import concurrent.futures
import importlib
import os
import sys

KERNEL_MODULES = ("spectralkern.ops._triton_spectral_filter",
                  "spectralkern.ops._triton_laplacian_quadratic",
                  "spectralkern.ops._triton_spectral_adamw",
                  "spectralkern.ops._triton_adamw",
                  "spectralkern.ops._triton_smoa_fwd",
                  "spectralkern.ops._triton_smoa_bwd",
                  "spectralkern.ops._triton_chebyshev_block",
                  "spectralkern.ops._triton_chebyshev_step",
                  "spectralkern.ops._triton_fourier_analysis",
                  "spectralkern.ops._triton_fourier_synthesis",
                  "spectralkern.ops._triton_coeff_attn_lse",
                  "spectralkern.ops._triton_coeff_attn_fwd",
                  "spectralkern.ops._triton_coeff_attn_bwd_q",
                  "spectralkern.ops._triton_coeff_attn_bwd_kv")
TARGETS = (("cuda", 80, 32), ("cuda", 90, 32))


def compile_variants(module_name: str, target: tuple[str, int, int]) -> list[tuple[str, int]]:
    """Compile every variant of one kernel module for ``target``; returns (label, shared-memory bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (the interpreter patches triton.language); "
                           "run `python -m spectralkern.ops._aot` in a clean environment")
    module = importlib.import_module(module_name)
    kernels = [value for value in vars(module).values() if isinstance(value, JITFunction)]
    if len(kernels) != 1:
        raise RuntimeError(f"{module_name} must define exactly one Triton kernel (one idea per file), "
                           f"found {len(kernels)}")
    kernel = kernels[0]
    compiled = []
    for label, signature, constexprs, *options in module.aot_variants():
        # An optional 4th element holds compile options the launcher passes too (num_warps, num_stages).
        binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                target=GPUTarget(*target), options=options[0] if options else None)
        compiled.append((label, binary.metadata.shared))
    return compiled


def _compile_job(job: tuple[str, tuple[str, int, int]]) -> list[str]:
    module_name, target = job
    try:
        return [f"ok   sm_{target[1]} {module_name} [{label}] shared={shared_bytes} B"
                for label, shared_bytes in compile_variants(module_name, target)]
    except Exception as exc:  # report every failing module/target, not just the first
        return [f"FAIL sm_{target[1]} {module_name}: {exc}"]


def main() -> int:
    """Compile every registered kernel for every target, one process per core (LLVM is single-threaded);
    print one line per variant; non-zero on failure."""
    jobs = [(module_name, target) for module_name in KERNEL_MODULES for target in TARGETS]
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        lines = [line for result in pool.map(_compile_job, jobs) for line in result]
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
