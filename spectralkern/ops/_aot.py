"""Ahead-of-time compilation of every Triton kernel for real GPU targets, without a GPU, with its resources.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and cannot see what only lowering finds: layouts, shared
memory, dot shapes, register spills, 32-bit index arithmetic, fp32 scalars. Every kernel module lists the
specialisations its launcher produces in ``aot_variants()`` (label, signature, constexprs[, compile options]);
``KERNEL_MODULES`` is the registry (a test fails if a module defines a Triton kernel no entry covers).

Signatures are the ones Triton's launcher builds from real arguments (``launch_signature``): integers — sizes and
strides — are ``i32`` (Triton passes any int below 2³¹ as i32), float scalars are ``fp32`` unless the kernel
annotates them. Each compile reports, per target (sm_80, sm_90):

- ptxas's registers, spill bytes (stores + loads) and stack frame, and the shared memory per program, with the
  occupancy (resident warps per SM) they allow;
- ``i32_stride_products``: the 32-bit multiplications of a stride argument in the TTIR — an offset that wraps
  once the product reaches 2³¹ (every stride product must be 64-bit).

``python -m spectralkern.ops._aot [--json FILE] [--hot-only]`` prints one line per variant and writes the table;
``benchmarks/resources.json`` / ``.md`` hold the committed one. ``HOT`` lists the variants the benchmarks' headline
cases launch: those must not spill nor exceed the target's shared memory (``gate``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class SM:
    """Per-SM limits of a target (CUDA occupancy calculator figures)."""
    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_per_sm: int = 164 * 1024
    shared_per_block: int = 163 * 1024


SM_LIMITS = {80: SM(), 90: SM(shared_per_sm=228 * 1024, shared_per_block=227 * 1024)}

# Variants the benchmarks' headline cases launch (benchmarks/NOTES.md): (module suffix, label). They must not
# spill and must fit shared memory; KNOWN_SPILLS lists a hot variant that still does, with the reason.
HOT = (
    ("spectral_filter", "x fp32, U fp32, K_PAD=16"), ("spectral_filter", "x fp32, U fp32, K_PAD=32"),
    ("spectral_filter", "x fp32, U fp32, K_PAD=64"), ("spectral_filter", "x bf16, U fp32, K_PAD=16"),
    ("spectral_filter", "x bf16, U fp32, K_PAD=32"), ("spectral_filter", "x bf16, U fp32, K_PAD=64"),
    ("spectral_adamw", "p bf16, m/v fp32, K_PAD=16"), ("spectral_adamw", "p bf16, m/v fp32, K_PAD=32, passthrough"),
    ("smoa_fwd", "x bf16, R_PAD=16, base=True"), ("smoa_bwd", "x bf16, R_PAD=16"),
    ("chebyshev_block", "fp32 BLOCK_N=128 build tf32x3"), ("chebyshev_block", "fp32 BLOCK_N=128 fwd tf32x3"),
    ("chebyshev_block", "bf16 BLOCK_N=128 apply tf32"),
    ("chebyshev_step", "fp32 first write_t y"), ("chebyshev_step", "fp32 write_t y"),
    ("chebyshev_step", "bf16 first write_t y"), ("chebyshev_step", "bf16 y"),
    ("fourier_analysis", "x bf16, forward gated"), ("fourier_analysis", "x bf16, backward gated"),
    ("fourier_synthesis", "x bf16, forward gated"),
    ("coeff_attn_lse", "bf16 d=64 causal=True mask=False"), ("coeff_attn_lse", "bf16 d=128 causal=False mask=True"),
    ("coeff_attn_fwd", "bf16 d=64 heads/prog=8 causal=True mask=False"),
    ("coeff_attn_fwd", "bf16 d=128 heads/prog=4 causal=False mask=True"),
    ("coeff_attn_bwd_q", "phase 1 bf16 d=64 heads/prog=4 causal=True mask=False"),
    ("coeff_attn_bwd_q", "phase 2 bf16 d=64 heads/prog=4 causal=True mask=False"),
    ("coeff_attn_bwd_kv", "bf16 d=64 heads/prog=2 causal=True mask=False"),
)
# (module, label, target) -> why that hot variant still spills (the gate accepts exactly these).
_SM80_ONLY = "sm_80 only (the H100 build does not spill); A100 tuning is left for an A100"
_CHEBYSHEV_TILES = ("four live (BLOCK_N x BLOCK_D) fp32 tiles plus tf32x3 operand splits; BLOCK_D 16 and 16 warps "
                    "were tried (fp32 build still 368 / 900 B): smaller tiles re-read the block more often, so the "
                    "choice needs a GPU measurement")
KNOWN_SPILLS: dict[tuple[str, str, int], str] = {
    ("spectral_filter", "x fp32, U fp32, K_PAD=64", 80): _SM80_ONLY,
    ("spectral_filter", "x bf16, U fp32, K_PAD=16", 80): _SM80_ONLY,
    ("spectral_filter", "x bf16, U fp32, K_PAD=64", 80): _SM80_ONLY,
    ("fourier_synthesis", "x bf16, forward gated", 80): _SM80_ONLY,
    **{("chebyshev_block", label, target): _CHEBYSHEV_TILES
       for label in ("fp32 BLOCK_N=128 build tf32x3", "fp32 BLOCK_N=128 fwd tf32x3", "bf16 BLOCK_N=128 apply tf32")
       for target in (80, 90)},
    **{("coeff_attn_fwd", label, 90): ("48-160 B; 2 heads per program removes it at d = 128 but rebuilds every "
                                       "score tile twice as often: decide on the GPU")
       for label in ("bf16 d=64 heads/prog=8 causal=True mask=False",
                     "bf16 d=128 heads/prog=4 causal=False mask=True")},
    **{("coeff_attn_bwd_kv", "bf16 d=64 heads/prog=2 causal=True mask=False", target): (
        "2.5-3.4 KB; 1 head per program on 8 warps cuts it to 60 B at twice the recomputation: the first lever if "
        "the GPU run shows the key-side backward slow") for target in (80, 90)},
}


def launch_signature(kernel, pointer_types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """The signature Triton's launcher builds for ``kernel``: pointers as given, constexprs, float scalars as
    annotated (``name: tl.float64``) or fp32 (what Triton makes of a Python float), every other scalar (sizes,
    strides) i32 — what Triton passes for any integer below 2³¹."""
    import inspect

    fn = getattr(kernel, "fn", kernel)  # a JITFunction, or the interpreter's wrapper (both hold the function)
    signature = {}
    for name, param in inspect.signature(fn).parameters.items():
        annotation = str(param.annotation).removeprefix("tl.") if param.annotation is not param.empty else ""
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = f"*{pointer_types[name]}"
        elif annotation in _ANNOTATED:
            signature[name] = _ANNOTATED[annotation]
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return signature


_ANNOTATED = {"float64": "fp64", "float32": "fp32", "int64": "i64", "int32": "i32"}
# Scalar arguments that are Python floats at launch (all kernels); every other unannotated scalar is an int.
FLOAT_SCALARS = frozenset({"scale", "qk_scale", "passthrough", "one_minus_beta1", "beta2", "one_minus_beta2", "eps",
                           "decay", "step_size", "bias_correction2_sqrt"})

_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Resources:
    module: str
    target: int
    label: str
    num_warps: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    warps_per_sm: int
    i32_stride_products: int

    @property
    def occupancy(self) -> float:
        return self.warps_per_sm / SM_LIMITS[self.target].max_warps


def resident_warps(target: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Warps per SM that the registers, shared memory and block limits allow (0: does not launch)."""
    sm = SM_LIMITS[target]
    if shared_bytes > sm.shared_per_block:
        return 0
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    blocks_by_regs = (sm.registers // regs_per_warp) // num_warps
    blocks_by_shared = sm.shared_per_sm // shared_bytes if shared_bytes else sm.max_blocks
    blocks = min(blocks_by_regs, blocks_by_shared, sm.max_blocks, sm.max_warps // num_warps)
    return blocks * num_warps


def i32_stride_products(ttir: str) -> list[str]:
    """TTIR lines that multiply a stride argument (or a splat/broadcast of one) in 32 bits."""
    strides = set(re.findall(r"(%stride\w*): i32", ttir))
    derived = set(strides)
    hits = []
    for line in ttir.splitlines():
        match = re.match(r"\s*(%[\w#]+) = (tt\.splat|tt\.broadcast|tt\.expand_dims|arith\.muli) (.*)", line)
        if not match:
            continue
        result, op, rest = match.groups()
        operands = set(re.findall(r"%[\w#]+", rest.split(":")[0]))
        if not operands & derived:
            continue
        if op != "arith.muli":
            derived.add(result)
        elif re.search(r":\s*(tensor<[^>]*xi32>|i32)\s*(loc|$)", rest):
            hits.append(line.strip())
    return hits


def ttir(kernel, signature: dict[str, str], constexprs: dict[str, object], target: tuple[str, int, int],
         options: dict | None = None) -> str:
    """The kernel's optimised TTIR only (no LLVM, no ptxas: ~10x faster than a full compile)."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    gpu = GPUTarget(*target)
    backend = make_backend(gpu)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    parsed = backend.parse_options(dict(options or {}))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(gpu, parsed, backend.get_codegen_implementation(parsed), backend.get_module_map(), context)
    stages: dict = {}
    backend.add_stages(stages, parsed, src.language)
    return str(stages["ttir"](module, {}))


def _ptxas_resources(binary, target: int, log: str) -> tuple[int, int, int]:
    """(registers, spill bytes, stack bytes) from ptxas -v: the compile's own log, or — when Triton's cache
    answered and ptxas did not run — a ptxas run on the cached PTX (remembered next to Triton's cache)."""
    from triton import knobs

    cache = os.path.join(knobs.cache.dir, "spectralkern_ptxas.json")
    if not _PTXAS_LINE.search(log):
        try:
            with open(cache) as f:
                known = json.load(f)
        except (OSError, ValueError):
            known = {}
        if binary.hash in known:
            return tuple(known[binary.hash])
        import subprocess
        import tempfile

        from triton.backends.nvidia.compiler import get_ptxas

        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(binary.asm["ptx"])
            arch = f"sm_{target}a" if target == 90 else f"sm_{target}"
            log = subprocess.run([get_ptxas(target).path, "-v", f"--gpu-name={arch}", ptx, "-o",
                                  os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = _PTXAS_LINE.search(log)
    spill = _SPILL.search(log)
    stack, stores, loads = (int(g) for g in spill.groups()) if spill else (0, 0, 0)
    result = (int(regs.group(1)) if regs else -1, stores + loads, stack)
    try:
        with open(cache) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    known[binary.hash] = result
    with contextlib.suppress(OSError):
        with open(cache, "w") as f:
            json.dump(known, f)
    return result


def _compile(kernel, signature, constexprs, target, options):
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                target=GPUTarget(*target), options=options)
    return binary, log.getvalue()


def compile_variants(module_name: str, target: tuple[str, int, int],
                     labels: set[str] | None = None) -> list[Resources]:
    """Compile the variants of one kernel module (all, or those in ``labels``) for ``target``."""
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
    out = []
    for label, signature, constexprs, *rest in module.aot_variants():
        if labels is not None and label not in labels:
            continue
        options = dict(rest[0]) if rest else {}
        binary, log = _compile(kernel, signature, constexprs, target, options or None)
        registers, spills, stack = _ptxas_resources(binary, target[1], log)
        num_warps = binary.metadata.num_warps
        shared = binary.metadata.shared
        out.append(Resources(module_name.rsplit("._triton_", 1)[-1], target[1], label, num_warps, registers,
                             spills, stack, shared, resident_warps(target[1], registers, num_warps, shared),
                             len(i32_stride_products(binary.asm["ttir"]))))
    return out


def gate(rows: list[Resources], hot: tuple[tuple[str, str], ...] = HOT) -> list[str]:
    """Why each variant fails: any with 32-bit stride products; a hot one that spills (unless listed in
    KNOWN_SPILLS) or exceeds the target's shared memory. Empty: all pass."""
    hot = set(hot)
    failures = []
    for row in rows:
        key = (row.module, row.label)
        if row.i32_stride_products:
            failures.append(f"sm_{row.target} {row.module} [{row.label}]: {row.i32_stride_products} 32-bit stride "
                            "products (offsets wrap at 2^31)")
        if key not in hot:
            continue
        if row.spill_bytes and (*key, row.target) not in KNOWN_SPILLS:
            failures.append(f"sm_{row.target} {row.module} [{row.label}]: hot variant spills {row.spill_bytes} B")
        if row.shared_bytes > SM_LIMITS[row.target].shared_per_block:
            failures.append(f"sm_{row.target} {row.module} [{row.label}]: {row.shared_bytes} B of shared memory")
    return failures


def _compile_job(job: tuple[str, tuple[str, int, int], tuple[str, ...] | None]) -> list[dict] | str:
    module_name, target, labels = job
    try:
        return [asdict(row) for row in compile_variants(module_name, target, set(labels) if labels else None)]
    except Exception as exc:  # report every failing module/target, not just the first
        return f"FAIL sm_{target[1]} {module_name}: {exc}"


def compile_all(hot_only: bool = False, workers: int | None = None,
                targets: tuple[tuple[str, int, int], ...] = TARGETS) -> tuple[list[Resources], list[str]]:
    """Compile every registered variant (or only the hot ones) for the targets, one process per core."""
    jobs = []
    for module_name in KERNEL_MODULES:
        suffix = module_name.rsplit("._triton_", 1)[-1]
        labels = tuple(label for mod, label in HOT if mod == suffix) if hot_only else None
        if hot_only and not labels:
            continue
        jobs += [(module_name, target, labels) for target in targets]
    rows, errors = [], []
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers or min(len(jobs), os.cpu_count() or 1)) as pool:
        for result in pool.map(_compile_job, jobs):
            if isinstance(result, str):
                errors.append(result)
            else:
                rows += [Resources(**row) for row in result]
    return rows, errors


def stride_check(module_names: tuple[str, ...] = KERNEL_MODULES, target: tuple[str, int, int] = TARGETS[-1]
                 ) -> list[str]:
    """TTIR-only pass over every variant: 'module [label]: <line>' for each 32-bit stride product (seconds, no
    ptxas), 'FAIL ...' for a variant that does not lower."""
    from triton.runtime.jit import JITFunction

    out = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        kernel = next(value for value in vars(module).values() if isinstance(value, JITFunction))
        for label, signature, constexprs, *rest in module.aot_variants():
            try:
                hits = i32_stride_products(ttir(kernel, signature, constexprs, target, rest[0] if rest else None))
            except Exception as exc:  # report every variant
                out.append(f"FAIL {module_name} [{label}]: {exc}")
                continue
            out += [f"{module_name} [{label}]: {line}" for line in hits]
    return out


def markdown_table(rows: list[Resources]) -> str:
    """benchmarks/resources.md: a heading, how to regenerate, then one row per (variant, target)."""
    hot = set(HOT)
    from triton import __version__ as triton_version

    lines = ["# Compiled resources of every Triton kernel variant", "",
             f"Generated by `python -m spectralkern.ops._aot --json benchmarks/resources.json --markdown "
             f"benchmarks/resources.md` (triton {triton_version}, ptxas of its NVIDIA backend; no GPU involved). "
             "Spill B = ptxas's spill stores + loads per thread; warps/SM = resident warps the registers, shared "
             "memory and block limits allow (of 64). Hot = launched by a benchmark headline case: gated in CI "
             "(no spills unless listed in `_aot.KNOWN_SPILLS`, shared memory within the target's).", "",
             "| target | kernel | variant | hot | warps | registers | spill B | stack B | shared KiB | "
             "warps/SM | occupancy |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.module, r.label, r.target)):
        lines.append(f"| sm_{r.target} | {r.module} | {r.label} | {'yes' if (r.module, r.label) in hot else ''} | "
                     f"{r.num_warps} | {r.registers} | {r.spill_bytes} | {r.stack_bytes} | {r.shared_bytes / 1024:.1f} "
                     f"| {r.warps_per_sm} | {r.occupancy:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print one line per variant; with --json/--markdown write the table; non-zero on a failed compile or gate."""
    parser = argparse.ArgumentParser(prog="python -m spectralkern.ops._aot", description=__doc__.split("\n")[0])
    parser.add_argument("--hot-only", action="store_true", help="compile only the variants listed in HOT")
    parser.add_argument("--json", help="write the resource table as JSON here")
    parser.add_argument("--markdown", help="write the resource table as Markdown here")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--targets", type=int, nargs="+", default=[cc for _, cc, _ in TARGETS],
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--stride-check", action="store_true",
                        help="only lower every variant to TTIR and list 32-bit stride products (fast)")
    args = parser.parse_args(argv)
    if args.stride_check:
        problems = stride_check()
        print("\n".join(problems) or "no 32-bit stride products")
        return 1 if problems else 0
    rows, errors = compile_all(args.hot_only, args.workers, tuple(("cuda", cc, 32) for cc in args.targets))
    for r in rows:
        print(f"ok   sm_{r.target} {r.module} [{r.label}] warps={r.num_warps} regs={r.registers} "
              f"spill={r.spill_bytes} shared={r.shared_bytes} B i32_stride_products={r.i32_stride_products}")
    print("\n".join(errors))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in sorted(rows, key=lambda r: (r.module, r.label, r.target))], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(rows) + "\n")
    failures = gate(rows)
    print("\n".join(f"GATE {line}" for line in failures))
    return 1 if errors or failures else 0


if __name__ == "__main__":
    sys.exit(main())
