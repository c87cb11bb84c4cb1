"""Build script: the Python package, the compiled CPU module ``spectralkern._native``, and the compiled CUDA backend
``spectralkern._C`` when nvcc is found.

The CPU module (csrc/native: the ``native`` eigensolver backend) is a plain pybind11 extension built by setuptools
with the host C++ compiler in every install, development builds included (~15 s); it is optional: when it does not
build, the install goes on without it and ``auto`` keeps to dense + ARPACK on the CPU.

What is built
    csrc/*.cu with nvcc and csrc/bindings.cpp with the host C++ compiler, through ninja, into one pybind11
    module linked against the *static* CUDA runtime (``-cudart static``, symbols kept private with -Bsymbolic and
    --exclude-libs): no libtorch and no libcudart.so dependency, so the module builds against any torch (a CPU
    one included) and imports on machines without a GPU, a driver or a CUDA toolkit. The driver is loaded only at
    the first CUDA call. Next to the module goes ``_build_info.json`` (CUDA version, architectures, PTX target,
    git sha, build time), which ``spectralkern/_extensions.py`` checks against the binary and the machine at import.

Environment
    SPECTRALKERN_CUDA_ARCHS       SASS targets, e.g. "80;90" (also "8.0 9.0" or "sm_80,sm_90"). Default: 80, 86,
                                  89, 90, 100, 120, as far as ``nvcc --list-gpu-arch`` supports them. PTX of the
                                  newest target is always embedded, so newer GPUs can JIT-compile it.
    SPECTRALKERN_SKIP_CUDA_BUILD=1  pure-Python install even when nvcc is found.
    MAX_JOBS                      parallel compiler processes (default: the CPU count, capped by available memory
                                  at GIB_PER_JOB per process).
    CUDA_HOME / CUDA_PATH         the toolkit to use (else nvcc on PATH, else /usr/local/cuda).
    SPECTRALKERN_GIT_SHA          recorded in the build metadata when the source tree has no .git.
Without nvcc (or pybind11 / ninja) the build warns and installs the pure-Python package (Triton / torch backends).
nvcc older than 11.8 is refused the same way; an architecture below sm_80 is an error (the kernels use TF32
tensor cores).

Development builds (``pip install -e .``, ``python setup.py build_ext --inplace``) compile only when asked:
for SPECTRALKERN_CUDA_ARCHS when it is set, else for the GPUs that ``nvidia-smi`` lists; on a machine with neither
they skip the CUDA build with a message. Wheels and regular installs build the full default list.
Why: the README's test command is an editable install, and CI runs it on 2 CPU cores with nvcc present and no GPU.
Measured here (2 cores shared with other jobs, load average ≈ 8, nvcc 13.0), with the spectral filter only: the full
default list (6 SASS targets + PTX) took 175 s of compiler CPU time, 8.3 min wall on the loaded machine (an
estimated 1.5 min on two idle cores); sm_90 alone 52 s of CPU time. A compiler process peaked at 0.45 GB. The AdamW
kernels (adamw_*.cu) bring sm_90 to 94 s of CPU time (190 s wall at load ≈ 8, MAX_JOBS=2); the full list was not
re-timed (it scales with the device code: expect ≈ 1.8× the 175 s). In the editable install the full build would
add minutes to every CI run for a binary that cannot run there; the compile check in tests/test_cuda_ext.py puts
every filter kernel variant and a sample of the AdamW ones covering each of their code paths (csrc/adamw_check.cu)
through nvcc and ptxas for sm_90, which is what catches a broken kernel.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# Longest compiles first (after bindings.cpp, see write_ninja_file): ninja starts jobs in this order, so the short
# ones fill in at the end.
CUDA_SOURCES = ("adamw_bf16.cu", "spectral_filter_f32.cu", "spectral_filter_f16.cu", "spectral_filter_bf16.cu",
                "adamw_f32.cu", "adamw_f16.cu", "runtime_info.cu")
# CI's compile check (tests/test_cuda_ext.py): every filter kernel, but the spectral AdamW kernels through one
# translation unit holding a sample of their variants (why and which: csrc/adamw_check.cu). Never shipped.
COMPILE_CHECK_CUDA_SOURCES = ("spectral_filter_f32.cu", "spectral_filter_f16.cu", "spectral_filter_bf16.cu",
                              "adamw_check.cu", "runtime_info.cu")
CXX_SOURCES = ("bindings.cpp",)
HEADERS = ("spectral_filter.h", "spectral_filter_kernel.cuh", "adamw.h", "adamw_kernel.cuh")
EXT_NAME = "spectralkern._C"
NATIVE_EXT_NAME = "spectralkern._native"
NATIVE_SOURCES = ("native/module.cpp", "native/small_lanczos.cpp", "native/components.cpp", "native/csr_checks.cpp",
                  "native/spectral_filter.cpp")
NATIVE_HEADERS = ("native/native.h", "native/small_lanczos_impl.h", "native/spectral_filter_impl.h")
# -fopenmp-simd: the `omp simd` loops vectorise their reductions (no OpenMP runtime is linked); the AVX2 + FMA copy
# of the solver is chosen at run time (see small_lanczos.cpp), so no -march flag ties the binary to the build host.
NATIVE_CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp-simd", "-fvisibility=hidden", "-pthread"]
BUILD_INFO = "_build_info.json"

ENV_ARCHS = "SPECTRALKERN_CUDA_ARCHS"
ENV_SKIP = "SPECTRALKERN_SKIP_CUDA_BUILD"
DEFAULT_ARCHS = (80, 86, 89, 90, 100, 120)
MIN_ARCH = 80
MIN_NVCC = (11, 8)
# First nvcc release that knows each default arch: the fallback when `nvcc --list-gpu-arch` is unavailable.
ARCH_SINCE = {80: (11, 0), 86: (11, 1), 89: (11, 8), 90: (11, 8), 100: (12, 8), 120: (12, 8)}
GIB_PER_JOB = 1.0  # a compiler process peaked at 0.45 GB here; 2x headroom for other hosts and nvcc versions


# ------------------------------------------------------------------------------------------ configuration
def parse_nvcc_version(text: str) -> tuple[int, int]:
    """(major, minor) from ``nvcc --version`` output ("... release 13.0, V13.0.88")."""
    match = re.search(r"release (\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"cannot find 'release X.Y' in nvcc --version output: {text.strip()[-200:]!r}")
    return int(match.group(1)), int(match.group(2))


def parse_gpu_arch_list(text: str) -> set[int]:
    """Architectures from ``nvcc --list-gpu-arch`` ("compute_80" lines; arch-specific 90a/100f variants skipped)."""
    return {int(number) for number in re.findall(r"^compute_(\d+)$", text, flags=re.M)}


def supported_archs(version: tuple[int, int], listed: set[int] | None) -> set[int]:
    """What this nvcc can target: its own list when it prints one, else the release table for the defaults."""
    if listed:
        return set(listed)
    return {arch for arch, since in ARCH_SINCE.items() if version >= since}


def parse_arch_list(text: str) -> list[int]:
    """SPECTRALKERN_CUDA_ARCHS -> sorted unique ints: "80;90", "8.0 9.0", "sm_80,sm_90" all give [80, 90]."""
    archs = set()
    for token in re.split(r"[;,\s]+", text.strip()):
        if not token:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?", token)
        if match is None:
            raise ValueError(f"{ENV_ARCHS} entry {token!r} is not an architecture; expected e.g. '80;90', '8.0;9.0' "
                             "or 'sm_80,sm_90' (PTX of the newest is always added; arch-specific 'a'/'f' variants "
                             "are not needed: the kernels use no arch-specific instructions)")
        major, minor = match.groups()
        archs.add(int(major) * 10 + int(minor) if minor is not None else int(major))
    if not archs:
        raise ValueError(f"{ENV_ARCHS} is set but lists no architecture: {text!r}")
    too_old = sorted(a for a in archs if a < MIN_ARCH)
    if too_old:
        raise ValueError(f"{ENV_ARCHS} lists {', '.join(f'sm_{a}' for a in too_old)}; the kernels need sm_{MIN_ARCH} "
                         "or newer (TF32 tensor cores)")
    return sorted(archs)


def select_archs(requested: list[int] | None, supported: set[int]) -> list[int]:
    """The SASS targets to build: the requested ones (all must be supported) or the supported defaults."""
    if requested is not None:
        missing = [a for a in requested if a not in supported]
        if missing:
            raise ValueError(f"{ENV_ARCHS} asks for {', '.join(f'sm_{a}' for a in missing)}, which this nvcc cannot "
                             f"target; it supports {', '.join(f'sm_{a}' for a in sorted(supported))}")
        return sorted(requested)
    archs = sorted(a for a in DEFAULT_ARCHS if a in supported)
    if not archs:
        raise ValueError(f"this nvcc supports none of the default architectures "
                         f"{', '.join(f'sm_{a}' for a in DEFAULT_ARCHS)}; set {ENV_ARCHS}")
    return archs


def gencode_flags(archs: list[int]) -> list[str]:
    """SASS for every arch; the newest also as PTX (compute_XY), which newer GPUs JIT-compile."""
    flags = []
    for arch in archs[:-1]:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = archs[-1]
    flags += ["-gencode", f"arch=compute_{newest},code=[sm_{newest},compute_{newest}]"]
    return flags


def default_jobs(mem_available_bytes: int | None, cpus: int) -> int:
    """Compiler processes to run at once: the CPU count, capped by available memory at GIB_PER_JOB each."""
    jobs = max(1, cpus)
    if mem_available_bytes is not None:
        jobs = min(jobs, max(1, int(mem_available_bytes / (GIB_PER_JOB * 2**30))))
    return jobs


def split_jobs(jobs: int, files: int) -> tuple[int, int]:
    """(ninja -j, nvcc --threads): files in parallel first, then each nvcc compiles its archs in parallel."""
    ninja_jobs = max(1, min(jobs, files))
    return ninja_jobs, max(1, jobs // ninja_jobs)


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def max_jobs() -> int:
    value = os.environ.get("MAX_JOBS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"MAX_JOBS must be a positive integer, got {value!r}")
        return int(value)
    return default_jobs(mem_available(), os.cpu_count() or 1)


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.is_file() else None


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        return None
    candidate = Path(ninja.BIN_DIR) / "ninja"
    return str(candidate) if candidate.is_file() else None


def nvcc_facts(nvcc: str) -> tuple[tuple[int, int], str, set[int]]:
    """(release, full version string, supported archs) of an nvcc."""
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    version = parse_nvcc_version(text)
    full = re.search(r"V\d+\.\d+\.\d+", text)
    try:
        listed = parse_gpu_arch_list(subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                                                    check=True).stdout)
    except subprocess.CalledProcessError:  # older nvcc has no --list-gpu-arch
        listed = None
    return version, full.group(0) if full else f"{version[0]}.{version[1]}", supported_archs(version, listed)


def local_gpu_archs() -> list[int]:
    """Compute capabilities of the GPUs nvidia-smi lists (no CUDA runtime call); [] without GPU or nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return parse_arch_list(" ".join(line.strip() for line in out.splitlines() if line.strip())) if out.strip() else []


def git_sha(root: Path = ROOT) -> str:
    if os.environ.get("SPECTRALKERN_GIT_SHA"):
        return os.environ["SPECTRALKERN_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


# ------------------------------------------------------------------------------------------ metadata
def make_build_info(cuda_version: tuple[int, int], nvcc_version: str, archs: list[int], sha: str, jobs: int,
                    seconds: float) -> dict:
    return {"cuda_version": f"{cuda_version[0]}.{cuda_version[1]}", "nvcc": nvcc_version, "archs": list(archs),
            "ptx": archs[-1], "git_sha": sha,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "max_jobs": jobs, "build_seconds": round(seconds, 1)}


def write_build_info(path: Path, info: dict) -> None:
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------ compile
def _ninja_escape(value: str) -> str:
    return value.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def write_ninja_file(build_dir: Path, output: Path, nvcc: str, archs: list[int], jobs: int,
                     cuda_sources: tuple[str, ...] = CUDA_SOURCES) -> Path:
    """build.ninja compiling csrc (``cuda_sources`` + CXX_SOURCES) into ``output`` (the extension's full path)."""
    import pybind11  # imported here: a pure-Python install must not need it

    ninja_jobs, threads = split_jobs(jobs, len(cuda_sources) + len(CXX_SOURCES))
    include = [f"-I{CSRC}"]
    common = ["-O3", "-std=c++17", "-DNDEBUG"]
    nvcc_flags = common + include + ["-lineinfo", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                                     "--threads", str(threads)] + gencode_flags(archs)
    cxx_flags = common + include + ["-fPIC", "-fvisibility=hidden", f"-I{pybind11.get_include()}",
                                    f"-I{sysconfig.get_paths()['include']}"]
    link_flags = ["-shared", "-cudart", "static", "-Xlinker", "-Bsymbolic", "-Xlinker", "--exclude-libs=ALL"]
    quote = lambda flags: " ".join(_ninja_escape(f) for f in flags)  # noqa: E731
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {_ninja_escape(nvcc)}",
        f"cxx = {_ninja_escape(os.environ.get('CXX', 'c++'))}",
        f"nvcc_flags = {quote(nvcc_flags)}",
        f"cxx_flags = {quote(cxx_flags)}",
        f"link_flags = {quote(link_flags)}",
        "rule cuda",
        "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule cxx",
        "  command = $cxx $cxx_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = c++ $in",
        "rule link",
        "  command = $nvcc $link_flags $in -o $out",
        "  description = link $out",
    ]
    objects = []
    for source in CXX_SOURCES + cuda_sources:  # bindings.cpp (pybind11) is the longest single compile: start it first
        obj = build_dir / (source + ".o")
        objects.append(obj)
        rule = "cuda" if source.endswith(".cu") else "cxx"
        lines.append(f"build {_ninja_escape(str(obj))}: {rule} {_ninja_escape(str(CSRC / source))}")
    lines.append(f"build {_ninja_escape(str(output))}: link {' '.join(_ninja_escape(str(o)) for o in objects)}")
    lines.append(f"default {_ninja_escape(str(output))}")
    path = build_dir / "build.ninja"
    path.write_text("\n".join(lines) + "\n")
    return path


def compile_extension(output: Path, build_dir: Path, archs: list[int], *, nvcc: str, ninja: str,
                      jobs: int, cuda_sources: tuple[str, ...] = CUDA_SOURCES) -> float:
    """Compile and link the extension to ``output``; returns the seconds it took. Raises RuntimeError on failure.
    ``cuda_sources``: the .cu files (COMPILE_CHECK_CUDA_SOURCES for CI's compile check)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    ninja_file = write_ninja_file(build_dir, output, nvcc, archs, jobs, cuda_sources)
    ninja_jobs, _ = split_jobs(jobs, len(cuda_sources) + len(CXX_SOURCES))
    start = time.perf_counter()
    result = subprocess.run([ninja, "-f", str(ninja_file), "-j", str(ninja_jobs)], cwd=build_dir)
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA extension failed (ninja exit status {result.returncode}); the compiler "
                           f"output is above. Set {ENV_SKIP}=1 for a pure-Python install.")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ setuptools glue
def _note(message: str) -> None:
    print(f"spectralkern setup: {message}", file=sys.stderr, flush=True)


def cuda_build_wanted() -> tuple[bool, str]:
    """Whether to declare the extension at all (decides the wheel's tag): (yes, "") or (no, why)."""
    if os.environ.get(ENV_SKIP, "0") not in ("", "0"):
        return False, f"{ENV_SKIP}={os.environ[ENV_SKIP]}"
    nvcc = find_nvcc()
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    try:
        version, _, _ = nvcc_facts(nvcc)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        return False, f"{nvcc} does not run: {exc}"
    if version < MIN_NVCC:
        return False, f"{nvcc} is CUDA {version[0]}.{version[1]}; the kernels need nvcc >= {MIN_NVCC[0]}.{MIN_NVCC[1]}"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return False, "pybind11 is not installed in the build environment"
    if find_ninja() is None:
        return False, "ninja is not installed in the build environment"
    return True, ""


class CudaBuildExt(build_ext):
    """Builds spectralkern._C with nvcc + ninja and writes _build_info.json beside it."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != EXT_NAME:
            return super().build_extension(ext)
        nvcc = find_nvcc()
        version, full_version, supported = nvcc_facts(nvcc)
        requested = os.environ.get(ENV_ARCHS)
        if requested:
            archs = select_archs(parse_arch_list(requested), supported)
        elif self.editable_mode or self.inplace:
            local = [a for a in local_gpu_archs() if a in supported]
            if not local:
                _note(f"development build without {ENV_ARCHS} and no GPU seen by nvidia-smi: skipping the CUDA "
                      f"extension (set {ENV_ARCHS}=90, say, to build it)")
                return
            archs = sorted(set(local))
        else:
            archs = select_archs(None, supported)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        jobs = max_jobs()
        _note(f"building {EXT_NAME} with {nvcc} (CUDA {version[0]}.{version[1]}) for "
              f"{', '.join(f'sm_{a}' for a in archs)} + PTX compute_{archs[-1]}, {jobs} parallel jobs")
        seconds = compile_extension(output, Path(self.build_temp).resolve() / "spectralkern_cuda", archs, nvcc=nvcc,
                                    ninja=find_ninja(), jobs=jobs)
        write_build_info(output.parent / BUILD_INFO,
                         make_build_info(version, full_version, archs, git_sha(), jobs, seconds))
        _note(f"built {output.name} in {seconds:.0f} s")

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if ext.name == EXT_NAME:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                info = Path(regular_file).parent / BUILD_INFO
                if Path(regular_file).exists() and info.exists():
                    self.copy_file(str(info), str(Path(inplace_file).parent / BUILD_INFO), level=self.verbose)


def extensions() -> list[Extension]:
    wanted, why = cuda_build_wanted()
    if not wanted:
        _note(f"installing pure Python, without the CUDA extension: {why}. The Triton and torch backends work as "
              "usual.")
        return []
    # optional: a development build may skip it (see CudaBuildExt); compile errors still fail the build.
    return [Extension(EXT_NAME, sources=[f"csrc/{s}" for s in CUDA_SOURCES + CXX_SOURCES],
                      depends=[f"csrc/{h}" for h in HEADERS], optional=True)]


def native_extensions() -> list[Extension]:
    """The CPU module: always declared when pybind11 is importable (it is a build requirement)."""
    try:
        import pybind11
    except ImportError:
        _note(f"pybind11 is not installed in the build environment: skipping {NATIVE_EXT_NAME} (the native "
              "eigensolver backend)")
        return []
    return [Extension(NATIVE_EXT_NAME, sources=[f"csrc/{s}" for s in NATIVE_SOURCES],
                      depends=[f"csrc/{h}" for h in NATIVE_HEADERS],
                      include_dirs=[pybind11.get_include(), str(CSRC / "native")], language="c++",
                      extra_compile_args=NATIVE_CXX_FLAGS, extra_link_args=["-pthread"], optional=True)]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for the helpers above
    setup(ext_modules=extensions() + native_extensions(), cmdclass={"build_ext": CudaBuildExt})
