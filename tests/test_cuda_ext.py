"""The compiled CUDA backend (csrc/ → spectralkern._C): build configuration, metadata, loader, dispatch, a real
nvcc compile, and — on a GPU with the extension built — the kernels against float64 references.

Without a GPU: setup.py's helpers (arch lists, nvcc version gating, jobs), the build-metadata round trip, the
loader on simulated machines (module missing, failing to load, stale, old driver, uncovered GPU), forcing
SPECTRALKERN_BACKEND=cuda when it cannot run, and one compile of csrc for sm_90 whose module is then imported
and queried in a fresh process (argument checks run before any CUDA call, so they are tested here too, the AdamW
kernels' included; their GPU tests are in tests/test_cuda_adamw.py).
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectralkern as sk
from spectralkern import _backend, _extensions
from spectralkern.bench.inputs import random_basis
from spectralkern.ops.spectral_filter import (_launch_cuda, spectral_filter_backend,
                                              spectral_filter_gains_grad_reference, spectral_filter_reference)

ROOT = Path(__file__).resolve().parents[1]


def _load_setup():
    spec = importlib.util.spec_from_file_location("spectralkern_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": setup() does not run
    return module


setup_py = _load_setup()


# ------------------------------------------------------------------------------------------ build configuration
@pytest.mark.parametrize("text", ["80;90", "8.0 9.0", "sm_80,sm_90", " 90 ; 80;90 ", "compute_90,sm_80"])
def test_arch_list_forms(text):
    assert setup_py.parse_arch_list(text) == [80, 90]


@pytest.mark.parametrize("text, message", [
    ("75;90", "sm_75; the kernels need sm_80 or newer"),
    ("90a", "entry '90a' is not an architecture"),
    ("8.0+PTX", "entry '8.0\\+PTX' is not an architecture"),
    (" ; ", "lists no architecture"),
])
def test_arch_list_rejects_bad_entries(text, message):
    with pytest.raises(ValueError, match=message):
        setup_py.parse_arch_list(text)


def test_nvcc_version_and_arch_list_parsing():
    text = ("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\n"
            "Build cuda_12.4.r12.4/compiler.34097967_0\n")
    assert setup_py.parse_nvcc_version(text) == (12, 4)
    with pytest.raises(ValueError, match="cannot find 'release X.Y'"):
        setup_py.parse_nvcc_version("command not found")
    listed = "compute_75\ncompute_80\ncompute_90\ncompute_90a\ncompute_100f\ncompute_120\n"
    assert setup_py.parse_gpu_arch_list(listed) == {75, 80, 90, 120}


def test_nvcc_version_gates_the_default_archs():
    supported = setup_py.supported_archs
    assert supported((11, 0), None) == {80}
    assert supported((11, 8), None) == {80, 86, 89, 90}
    assert supported((12, 8), None) == {80, 86, 89, 90, 100, 120}
    assert supported((13, 0), {75, 80, 90}) == {75, 80, 90}  # nvcc's own list wins when it prints one
    nvcc13 = {75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121}
    assert setup_py.select_archs(None, nvcc13) == [80, 86, 89, 90, 100, 120]
    assert setup_py.select_archs(None, supported((12, 0), None)) == [80, 86, 89, 90]
    assert setup_py.select_archs([90, 80], nvcc13) == [80, 90]
    with pytest.raises(ValueError, match=r"asks for sm_120, which this nvcc cannot target; it supports sm_80, sm_86"):
        setup_py.select_archs([120], supported((12, 0), None))
    with pytest.raises(ValueError, match="supports none of the default architectures"):
        setup_py.select_archs(None, {70, 75})


def test_gencode_embeds_ptx_of_the_newest_arch_only():
    assert setup_py.gencode_flags([80, 90]) == ["-gencode", "arch=compute_80,code=sm_80",
                                                "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]


def test_jobs_from_memory_and_cpus(monkeypatch):
    gib = 2**30
    assert setup_py.default_jobs(64 * gib, 16) == 16
    assert setup_py.default_jobs(int(3.5 * gib), 16) == 3
    assert setup_py.default_jobs(gib // 4, 8) == 1
    assert setup_py.default_jobs(None, 2) == 2
    assert setup_py.split_jobs(2, 5) == (2, 1)
    assert setup_py.split_jobs(16, 5) == (5, 3)
    monkeypatch.setenv("MAX_JOBS", "3")
    assert setup_py.max_jobs() == 3
    monkeypatch.setenv("MAX_JOBS", "many")
    with pytest.raises(ValueError, match="MAX_JOBS must be a positive integer, got 'many'"):
        setup_py.max_jobs()


def test_every_csrc_file_is_built_and_the_check_samples_the_adamw_kernels():
    on_disk = {p.name for p in (ROOT / "csrc").iterdir() if p.is_file()}
    cu = {name for name in on_disk if name.endswith(".cu")}
    assert set(setup_py.CUDA_SOURCES) == cu - {"adamw_check.cu"}
    assert set(setup_py.COMPILE_CHECK_CUDA_SOURCES) == (
        set(setup_py.CUDA_SOURCES) - {"adamw_f32.cu", "adamw_f16.cu", "adamw_bf16.cu"}) | {"adamw_check.cu"}
    assert set(setup_py.HEADERS) | set(setup_py.CXX_SOURCES) == on_disk - cu
    # the CPU module (csrc/native) is its own extension
    native = {f"native/{p.name}" for p in (ROOT / "csrc" / "native").iterdir()}
    assert set(setup_py.NATIVE_SOURCES) | set(setup_py.NATIVE_HEADERS) == native
    assert {p.name for p in (ROOT / "csrc").iterdir() if p.is_dir()} == {"native"}


def test_build_is_skipped_without_nvcc_or_when_asked(monkeypatch):
    monkeypatch.setenv(setup_py.ENV_SKIP, "1")
    assert setup_py.cuda_build_wanted() == (False, f"{setup_py.ENV_SKIP}=1")
    monkeypatch.delenv(setup_py.ENV_SKIP)
    monkeypatch.setattr(setup_py, "find_nvcc", lambda: None)
    wanted, why = setup_py.cuda_build_wanted()
    assert not wanted and "nvcc not found" in why
    monkeypatch.setattr(setup_py, "find_nvcc", lambda: "/opt/old/nvcc")
    monkeypatch.setattr(setup_py, "nvcc_facts", lambda nvcc: ((11, 4), "V11.4.48", {80, 86}))
    wanted, why = setup_py.cuda_build_wanted()
    assert not wanted and "CUDA 11.4; the kernels need nvcc >= 11.8" in why


def test_local_gpu_archs_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(setup_py.shutil, "which", lambda name: None)
    assert setup_py.local_gpu_archs() == []


def test_build_metadata_round_trip(tmp_path):
    info = setup_py.make_build_info((13, 0), "V13.0.88", [80, 90], "0123456789abcdef", jobs=2, seconds=12.34)
    path = tmp_path / "_build_info.json"
    setup_py.write_build_info(path, info)
    read = _extensions.read_build_info(path)
    assert (read.cuda_version, read.archs, read.ptx, read.git_sha, read.nvcc) == ("13.0", (80, 90), 90,
                                                                                  "0123456789abcdef", "V13.0.88")
    assert read.built_at == info["built_at"] and read.cuda_major == 13
    assert read.targets() == "sm_80 sm_90 + PTX compute_90"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        _extensions.read_build_info(path)
    path.write_text(json.dumps({"archs": [80]}))
    with pytest.raises(ValueError, match="lacks the field 'cuda_version'"):
        _extensions.read_build_info(path)
    path.write_text(json.dumps({"archs": [90, 80], "cuda_version": "13.0"}))
    with pytest.raises(ValueError, match="non-empty ascending list"):
        _extensions.read_build_info(path)


# ------------------------------------------------------------------------------------------ loader
def _info(archs=(80, 90), ptx=90, cuda="13.0") -> dict:
    return {"cuda_version": cuda, "archs": list(archs), "ptx": ptx, "git_sha": "abc", "built_at": "now",
            "nvcc": f"V{cuda}.1"}


class _FakeModule:
    """Stands in for a loaded spectralkern._C."""

    def __init__(self, archs=(80, 90), cuda="13.0", driver=13000):
        self._archs, self._cuda, self._driver = list(archs), cuda, driver

    def build_info(self):
        return {"cuda_version": self._cuda, "archs": self._archs, "tile_d": 64, "max_k": 128}

    def driver_cuda_version(self):
        return self._driver


def _probe(tmp_path, *, module=None, info=None, devices=(), import_error=None, spec_found=True):
    path = tmp_path / "_build_info.json"
    if info is not None:
        path.write_text(json.dumps(info))

    def import_module(name):
        if import_error is not None:
            raise import_error
        return module

    return _extensions.probe_cuda(find_spec=lambda name: object() if spec_found else None, import_module=import_module,
                           info_path=path, cuda_devices=lambda: None if devices is None else list(devices))


H100 = (0, "NVIDIA H100 80GB HBM3", (9, 0))


def test_loader_not_built_is_quiet(tmp_path):
    status = _probe(tmp_path, spec_found=False)
    assert not status.live and not status.warn
    assert "not built" in status.reason and "SPECTRALKERN_CUDA_ARCHS=90" in status.reason


def test_loader_failed_import_is_one_clear_reason(tmp_path):
    error = ImportError("libcudart.so.13: cannot open shared object file: No such file or directory")
    status = _probe(tmp_path, import_error=error)
    assert not status.live and status.warn
    assert status.reason == ("the CUDA extension failed to load: ImportError: libcudart.so.13: cannot open shared "
                             "object file: No such file or directory")


def test_loader_missing_or_stale_metadata(tmp_path):
    status = _probe(tmp_path, module=_FakeModule(), info=None, devices=[H100])
    assert status.warn and "build metadata (_build_info.json) is unusable" in status.reason
    status = _probe(tmp_path, module=_FakeModule(archs=(90,)), info=_info(archs=(80, 90)), devices=[H100])
    assert status.warn and "disagree: a stale or mixed build" in status.reason
    assert "(CUDA 13.0, sm_90)" in status.reason and "(CUDA 13.0, sm_80 sm_90)" in status.reason


def test_loader_without_a_cuda_device_is_quiet_and_names_the_archs(tmp_path):
    status = _probe(tmp_path, module=_FakeModule(), info=_info(), devices=None)
    assert not status.live and not status.warn
    assert "sm_80 sm_90 + PTX compute_90" in status.reason
    assert ("is a CPU build" in status.reason) == (torch.version.cuda is None)


def test_loader_rejects_an_old_driver(tmp_path):
    status = _probe(tmp_path, module=_FakeModule(driver=12040), info=_info(), devices=[H100])
    assert status.warn and not status.live
    assert "built with CUDA 13.0, whose runtime needs a driver for CUDA >= 13.0; this driver supports CUDA 12.4" \
        in status.reason


@pytest.mark.parametrize("capability, archs, ptx, live", [
    ((9, 0), (80, 90), 90, True),
    ((8, 6), (80,), 80, True),        # sm_80 SASS runs on 8.6 (same major, higher minor)
    ((8, 9), (90,), 90, False),       # SASS of a newer major and PTX above the device: nothing runs
    ((12, 0), (80, 90), 90, True),    # PTX compute_90 JIT-compiles on sm_120
    ((10, 0), (120,), 120, False),
    ((7, 5), (80, 90), 90, False),    # below what the kernels need
])
def test_loader_checks_every_device(tmp_path, capability, archs, ptx, live):
    device = (0, "GPU", capability)
    status = _probe(tmp_path, module=_FakeModule(archs=archs), info=_info(archs=archs, ptx=ptx), devices=[device])
    assert status.live == live and status.warn == (not live)
    assert _extensions.runs_on(capability, archs, ptx) == live
    if live:
        assert status.reason.startswith("spectralkern._C (CUDA 13.0,") and "(sm_" in status.reason
    elif capability < (8, 0):
        assert "is sm_75; the CUDA kernels need sm_80 or newer" in status.reason
    else:
        cc = f"{capability[0]}{capability[1]}"
        assert f"device 0 (GPU) is sm_{cc}" in status.reason and f"SPECTRALKERN_CUDA_ARCHS={cc}" in status.reason


def test_a_broken_build_warns_once_and_falls_back(monkeypatch):
    broken = _extensions.ExtensionStatus(False, "the CUDA extension failed to load: OSError: bad ELF", warn=True)
    monkeypatch.setitem(_extensions._PROBES, "cuda", lambda: broken)
    _extensions.status.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert not _backend.runtime_status("cuda").live
                _extensions.status("cuda")
        assert len(caught) == 1 and caught[0].category is RuntimeWarning
        assert str(caught[0].message) == ("spectralkern: the CUDA extension failed to load: OSError: bad ELF. "
                                          "Falling back to the other backends.")
        with pytest.raises(RuntimeError, match="the cuda backend is not available: the CUDA extension failed"):
            _extensions.module("cuda")
    finally:
        _extensions.status.cache_clear()


@pytest.fixture
def cuda_not_built(monkeypatch):
    not_built = _extensions.ExtensionStatus(False, "the CUDA extension is not built (simulated)")
    real = _extensions.status
    monkeypatch.setattr(_extensions, "status", lambda name: not_built if name == "cuda" else real(name))
    yield


def test_forcing_cuda_when_not_built_fails_clearly(cuda_not_built, monkeypatch, seed):
    basis = random_basis(torch.tensor([0, 3, 7]), 2, dtype=torch.float32, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(seed))
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"SPECTRALKERN_BACKEND=cuda cannot run here: the CUDA extension is not "
                                           r"built \(simulated\)"):
        sk.spectral_filter(torch.randn(7, 3), basis, torch.rand(2))
    with pytest.raises(RuntimeError, match=r"SPECTRALKERN_BACKEND=cuda cannot run here: dtype float64 not in "
                                           r"\(float32, float16, bfloat16\)"):
        sk.spectral_filter(torch.randn(7, 3, dtype=torch.float64), basis.to(dtype=torch.float64), torch.rand(2))
    monkeypatch.delenv("SPECTRALKERN_BACKEND")
    assert spectral_filter_backend(torch.randn(7, 3), 2) != "cuda"


def test_info_shows_what_the_build_carries(tmp_path):
    path = tmp_path / "_build_info.json"
    path.write_text(json.dumps(_info(archs=(80, 86, 90), ptx=90)))
    found = lambda name: object()  # noqa: E731
    assert _extensions.describe_build("cuda", find_spec=found, info_path=path) == (
        "CUDA 13.0, sm_80 sm_86 sm_90 + PTX compute_90, git abc, built now")
    assert _extensions.describe_build("cuda", find_spec=lambda name: None, info_path=path) == "not built (pure-Python install)"
    assert _extensions.describe_build("cuda", find_spec=found, info_path=tmp_path / "missing.json").startswith(
        "present, but its build metadata is unusable")


# ------------------------------------------------------------------------------------------ CI compile check
_IMPORT_CHECK = r"""
import importlib.util, json, sys
from pathlib import Path

so, info_path = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("spectralkern._C", so)
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)  # must not touch CUDA: this machine has no GPU and no driver

def call(**changes):
    args = dict(x=(16, 4096, 70, 70, 1), U=(32, 4096, 32, 32, 1), gains=(64, 2, 32, 32, 1), block_ptr=(128, 3),
                y=(256, 4096, 70, 70, 1), saved_x=None, gain_grad=None, dtype=0, passthrough=0.5, device=0,
                stream=0)
    args.update(changes)
    try:
        ext.spectral_filter(**args)
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"

errors = {
    "rows": call(x=(16, 4095, 70, 70, 1)),
    "k": call(U=(32, 4096, 200, 200, 1), gains=(64, 2, 200, 200, 1)),
    "gains": call(gains=(64, 2, 31, 31, 1)),
    "dtype": call(dtype=7),
    "stride": call(x=(16, 4096, 70, -70, 1)),
    "null": call(x=(0, 4096, 70, 70, 1)),
    "gain_grad": call(saved_x=(512, 4096, 70, 70, 1), gain_grad=(1024, 5)),
    "pairing": call(gain_grad=(1024, 128)),
    "passthrough": call(passthrough=float("nan")),
}
if ext.driver_cuda_version() == 0:  # passes every check, then meets no driver: a RuntimeError, not a crash
    errors["valid"] = call()
HYPER = (0.1, 0.999, 0.001, 1e-8, 0.9999, 0.01, 0.0316)

def adamw_call(**changes):
    args = dict(grad=(16, 4096, 70, 70, 1), param=(48, 4096, 70, 70, 1), exp_avg=(80, 4096, 70, 70, 1),
                exp_avg_sq=(112, 4096, 70, 70, 1), U=(32, 4096, 32, 32, 1), gains=(64, 2, 32, 32, 1),
                block_ptr=(128, 3), dtype=2, state_dtype=0, passthrough=0.0, hyper=HYPER, device=0, stream=0)
    args.update(changes)
    try:
        ext.spectral_adamw(**args)
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"

def plain_call(**changes):
    args = dict(grad=(16, 100), param=(48, 100), exp_avg=(80, 100), exp_avg_sq=(112, 100), dtype=0, state_dtype=0,
                hyper=HYPER, device=0, stream=0)
    args.update(changes)
    try:
        ext.adamw(**args)
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"

adamw_errors = {
    "rows": adamw_call(grad=(16, 4095, 70, 70, 1)),
    "param": adamw_call(param=(48, 4096, 69, 69, 1)),
    "stride": adamw_call(exp_avg_sq=(112, 4096, 70, 70, -1)),
    "null": adamw_call(exp_avg=(0, 4096, 70, 70, 1)),
    "k": adamw_call(U=(32, 4096, 200, 200, 1), gains=(64, 2, 200, 200, 1)),
    "state_dtype": adamw_call(state_dtype=1),
    "pair": adamw_call(dtype=1, state_dtype=2),
    "eps": adamw_call(hyper=HYPER[:3] + (float("nan"),) + HYPER[4:]),
    "bias_correction": adamw_call(hyper=HYPER[:6] + (0.0,)),
    "valid": adamw_call(),  # the check build's spectral launchers refuse to run
    "plain_numel": plain_call(param=(48, 99)),
    "plain_null": plain_call(exp_avg=(0, 100)),
    "plain_pair": plain_call(dtype=0, state_dtype=2),
}
if ext.driver_cuda_version() == 0:
    adamw_errors["plain_valid"] = plain_call()
adamw_vec = [ext.spectral_adamw_vector_path(2, 0, (4096, 8, 64, 64, 1), (8192, 8, 64, 64, 1), (12288, 8, 64, 64, 1),
                                            (16384, 8, 64, 64, 1)),
             ext.spectral_adamw_vector_path(2, 0, (4096, 8, 64, 64, 1), (8192, 8, 64, 64, 1), (12288, 8, 66, 66, 1),
                                            (16384, 8, 64, 64, 1)),
             ext.spectral_adamw_vector_path(2, 2, (4098, 8, 64, 64, 1), (8192, 8, 64, 64, 1), (12288, 8, 64, 64, 1),
                                            (16384, 8, 64, 64, 1)),
             ext.adamw_vector_path(4096, 8192, 12288, 16384), ext.adamw_vector_path(4096, 8194, 12288, 16384)]
vec = [ext.vector_path(0, (4096, 8, 64, 64, 1)), ext.vector_path(0, (4100, 8, 64, 64, 1)),
       ext.vector_path(2, (4096, 8, 60, 60, 1)), ext.vector_path(2, (4096, 8, 64, 64, 2)),
       ext.vector_path(1, (4096, 8, 64, 64, 1), y=(4098, 8, 64, 64, 1)),
       ext.vector_path(1, (4096, 8, 64, 64, 1), y=(8192, 8, 64, 64, 1), saved_x=(4096, 8, 64, 65, 1))]
from spectralkern import _backend, _extensions
status = _extensions.probe_cuda(find_spec=lambda name: spec, import_module=lambda name: ext, info_path=info_path,
                         cuda_devices=lambda: [(0, "simulated H100", (9, 0))])
print(json.dumps({"build_info": ext.build_info(), "tile_d": ext.TILE_D, "max_k": ext.MAX_K, "dtypes": ext.DTYPES,
                  "driver": ext.driver_cuda_version(), "errors": errors, "vector_path": vec,
                  "adamw_errors": adamw_errors, "adamw_vector_path": adamw_vec,
                  "probe": [status.live, status.reason]}))
"""


def _needed_libraries(path: Path) -> list[str] | None:
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def test_csrc_compiles_for_sm90_and_imports_without_a_gpu(tmp_path):
    """CI's compile check: every filter kernel variant and a sample of the spectral AdamW ones covering each of their
    code paths (csrc/adamw_check.cu says why not all 32) through nvcc + ptxas for one real target, then a fresh
    process imports the module on this GPU-less machine and exercises everything that needs no device."""
    nvcc = setup_py.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH); the compile check needs a CUDA toolkit")
    if importlib.util.find_spec("pybind11") is None or setup_py.find_ninja() is None:
        pytest.skip("pybind11 and ninja are needed to build the extension (pip install -e '.[test]')")
    version, _, supported = setup_py.nvcc_facts(nvcc)
    if version < setup_py.MIN_NVCC or 90 not in supported:
        pytest.skip(f"nvcc {version} cannot build the kernels for sm_90")
    output = tmp_path / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    start = time.perf_counter()
    setup_py.compile_extension(output, tmp_path / "obj", [90], nvcc=nvcc, ninja=setup_py.find_ninja(),
                               jobs=setup_py.max_jobs(), cuda_sources=setup_py.COMPILE_CHECK_CUDA_SOURCES)
    seconds = time.perf_counter() - start
    info_path = tmp_path / "_build_info.json"
    setup_py.write_build_info(info_path, setup_py.make_build_info(version, "V", [90], "test", 1, seconds))

    needed = _needed_libraries(output)
    if needed is not None:  # static CUDA runtime: nothing CUDA to find at import time
        assert not [lib for lib in needed if "cuda" in lib or "torch" in lib], needed

    result = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, str(output), str(info_path)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["build_info"] == {"cuda_version": f"{version[0]}.{version[1]}", "archs": [90], "tile_d": 64,
                                    "max_k": 128}
    assert report["dtypes"] == {"float32": 0, "float16": 1, "bfloat16": 2} and report["max_k"] == 128
    errors = report["errors"]
    assert errors["rows"] == "ValueError: x must have 4096 rows (basis has 4096), got 4095"
    assert errors["k"] == "ValueError: U must have between 1 and 128 columns (k) for the CUDA backend, got 200"
    assert errors["gains"] == "ValueError: gains must have shape (B, k) = (2, 32), got (2, 31)"
    assert errors["dtype"] == "ValueError: dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got 7"
    assert errors["stride"] == "ValueError: x must have non-negative strides, got (-70, 1)"
    assert errors["null"] == "ValueError: x has 286720 elements but a null data pointer"
    assert errors["gain_grad"] == ("ValueError: gain_grad must hold B * ceil(d / 64) * k = 2 * 2 * 32 = 128 floats, "
                                   "got 5")
    assert errors["pairing"].startswith("ValueError: gain_grad and saved_x go together")
    assert errors["passthrough"] == "ValueError: passthrough must be finite, got nan"
    # aligned fp32 / misaligned pointer / bf16 row of 120 bytes / column stride 2 / misaligned y / bad saved stride
    assert report["vector_path"] == [True, False, False, False, False, False]
    adamw = report["adamw_errors"]
    assert adamw["rows"] == "ValueError: grad must have 4096 rows (basis has 4096), got 4095"
    assert adamw["param"] == "ValueError: param must have grad's shape (4096, 70), got (4096, 69)"
    assert adamw["stride"] == "ValueError: exp_avg_sq must have non-negative strides, got (70, -1)"
    assert adamw["null"] == "ValueError: exp_avg has 286720 elements but a null data pointer"
    assert adamw["k"] == "ValueError: U must have between 1 and 128 columns (k) for the CUDA backend, got 200"
    assert adamw["state_dtype"] == "ValueError: state_dtype must be 0 (float32) or 2 (bfloat16), got 1"
    assert adamw["pair"] == ("ValueError: state_dtype bfloat16 is compiled for bfloat16 parameters only (float16 "
                             "ones go to the Triton kernel), got dtype float16")
    assert adamw["eps"] == "ValueError: hyper[3] (eps) must be finite, got nan"
    assert adamw["bias_correction"] == ("ValueError: hyper[6] (sqrt(1 - beta2^t)) must be > 0 in float32 (step >= 1 "
                                        "and beta2 < 1), got 0")
    assert adamw["valid"].startswith("RuntimeError: spectral_adamw: this spectralkern._C is the CI compile check's")
    assert adamw["plain_numel"] == "ValueError: param must have grad's 100 elements, got 99"
    assert adamw["plain_null"] == "ValueError: exp_avg has 100 elements but a null data pointer"
    assert adamw["plain_pair"].startswith("ValueError: state_dtype bfloat16 is compiled for bfloat16 parameters only")
    # aligned bf16 p/g with fp32 m/v / an fp32 row of 264 bytes / a bf16 pointer 2 bytes off; plain: aligned / not
    assert report["adamw_vector_path"] == [True, False, False, True, False]
    live, reason = report["probe"]
    if report["driver"] == 0:  # this machine: no driver, so the loader says so and stays off
        assert errors["valid"].startswith("RuntimeError: spectral_filter CUDA launch failed on device 0: cuda")
        assert adamw["plain_valid"].startswith("RuntimeError: adamw CUDA launch failed on device 0: cuda")
        assert not live
        assert f"needs a driver for CUDA >= {version[0]}.0; this driver supports CUDA none found" in reason
    print(f"compiled csrc for sm_90 in {seconds:.0f} s")


# ------------------------------------------------------------------------------------------ GPU
def _require_cuda_ext():
    status = _extensions.status("cuda")
    if not status.live:
        pytest.skip(f"CUDA extension not live: {status.reason}")


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _dense_reference(x: torch.Tensor, basis: sk.SpectralBasis, gains: torch.Tensor, h: float) -> torch.Tensor:
    """float64 y per block on the CPU, from the same (already rounded) inputs."""
    U, ptr, xs, g = basis.U.double().cpu(), basis.block_ptr.tolist(), x.double().cpu(), gains.double().cpu()
    y = h * xs
    for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
        U_b = U[start:stop]
        y[start:stop] += U_b @ ((g[b] - h)[:, None] * (U_b.T @ xs[start:stop]))
    return y


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double().cpu() - expected).norm().item() / max(expected.norm().item(), 1e-30)


def _gpu_basis(sizes: list[int], k: int, seed: int) -> sk.SpectralBasis:
    ptr = torch.tensor([0] + sizes).cumsum(0)
    return random_basis(ptr, k, dtype=torch.float32, device=torch.device("cuda"),
                        generator=torch.Generator().manual_seed(seed))


def _layout(kind: str, n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """x of shape (n, d) in a given memory layout, and whether the 16-byte path applies to it."""
    make = lambda *shape: torch.randn(*shape, device="cuda").to(dtype)  # noqa: E731
    if kind == "aligned":
        return make(n, d)
    if kind == "offset-pointer":  # data_ptr 1 element past a 16-byte boundary
        return make(n * d + 1)[1:].view(n, d)
    if kind == "odd-row-stride":
        return make(n, d + 3)[:, :d]
    return make(d, n).T  # "transposed": column stride n


SIZES = [128, 1, 0, 77, 300, 3, 512, 0]  # ragged, one-node and empty blocks, k >= n_b blocks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["aligned", "offset-pointer", "odd-row-stride", "transposed"])
@pytest.mark.parametrize("k", [8, 32, 64, 100])
def test_cuda_matches_float64_reference(seed, dtype, kind, k):
    _require_cuda_ext()
    basis = _gpu_basis(SIZES, k, seed)
    d = 200  # 3 full column tiles and a partial one; rows of 200 elements are 16-byte multiples in every dtype
    x = _layout(kind, basis.num_nodes, d, dtype)
    ext = _extensions.module("cuda")
    desc = (x.data_ptr(), *x.shape, *x.stride())
    out = torch.full((basis.num_nodes, d), float("nan"), dtype=dtype, device="cuda")  # poisoned
    assert ext.vector_path(ext.DTYPES[str(dtype)[6:]], desc, (out.data_ptr(), *out.shape, *out.stride())) == (
        kind == "aligned")
    gains = torch.rand(basis.num_blocks, k, device="cuda")
    for h in (0.0, 0.25):
        y, _ = _launch_cuda(x, basis.U, basis.block_ptr_on(x.device), gains, h, out=out)
        torch.cuda.synchronize()
        assert bool(torch.isfinite(out).all()), "some output element was not written"
        assert _relative_error(y, _dense_reference(x, basis, gains, h)) <= TOLERANCE[dtype]
        out.fill_(float("nan"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_is_what_auto_picks_and_matches_torch(seed, dtype, monkeypatch):
    _require_cuda_ext()
    monkeypatch.delenv("SPECTRALKERN_BACKEND", raising=False)
    basis = _gpu_basis([64, 64, 5], 16, seed)
    x = torch.randn(basis.num_nodes, 96, device="cuda").to(dtype)
    assert spectral_filter_backend(x, basis.k) == "cuda"
    assert spectral_filter_backend(x, 129) != "cuda"  # past the compiled kernels' k
    gains = torch.rand(16, device="cuda")
    y = sk.spectral_filter(x, basis, gains, passthrough=0.5)
    assert y.is_contiguous() and y.dtype == dtype
    assert _relative_error(y, _dense_reference(x, basis, gains.expand(3, 16), 0.5)) <= TOLERANCE[dtype]


@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
       k=st.integers(1, 128), d=st.integers(1, 300), passthrough=st.sampled_from([0.0, 0.5, -1.0]),
       data_seed=st.integers(0, 2**31 - 1))
def test_cuda_hypothesis_shapes(sizes, k, d, passthrough, data_seed):
    _require_cuda_ext()
    basis = _gpu_basis(sizes, k, data_seed)
    x = torch.randn(basis.num_nodes, d, device="cuda", generator=torch.Generator("cuda").manual_seed(data_seed))
    gains = torch.rand(basis.num_blocks, k, device="cuda")
    y, _ = _launch_cuda(x, basis.U, basis.block_ptr_on(x.device), gains, passthrough)
    assert _relative_error(y, _dense_reference(x, basis, gains, passthrough)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("needs", ["x", "gains", "both"])
def test_cuda_backward_matches_float64_autograd(seed, needs, monkeypatch):
    """The CUDA kernels have no float64 path, so gradcheck (which needs float64) cannot run on them: the fp32
    vector-Jacobian products are compared with float64 autograd through the torch reference instead."""
    _require_cuda_ext()
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "cuda")
    basis = _gpu_basis([40, 0, 1, 90, 7], 12, seed)
    x = torch.randn(basis.num_nodes, 70, device="cuda", requires_grad=needs in ("x", "both"))
    gains = torch.rand(basis.num_blocks, 12, device="cuda", requires_grad=needs in ("gains", "both"))
    grad_y = torch.randn(basis.num_nodes, 70, device="cuda")
    inputs = [t for t in (x, gains) if t.requires_grad]
    ours = torch.autograd.grad(sk.spectral_filter(x, basis, gains, 0.3), inputs, grad_y)
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, gains)]
    ref_y = spectral_filter_reference(ref_inputs[0], basis.U.double(), basis.block_ptr, ref_inputs[1], 0.3)
    ref = torch.autograd.grad(ref_y, [t for t in ref_inputs if t.requires_grad], grad_y.double())
    for a, b in zip(ours, ref):
        assert _relative_error(a, b.cpu()) <= 1e-5


@pytest.mark.gpu
def test_cuda_gains_gradient_partials(seed):
    _require_cuda_ext()
    basis = _gpu_basis([33, 0, 1, 130], 20, seed)
    grad_y, x = (torch.randn(basis.num_nodes, 150, device="cuda") for _ in range(2))
    gains = torch.rand(basis.num_blocks, 20, device="cuda")
    _, grads = _launch_cuda(grad_y, basis.U, basis.block_ptr_on(x.device), gains, 0.0, saved_x=x, write_y=False)
    expected = spectral_filter_gains_grad_reference(grad_y.double().cpu(), x.double().cpu(), basis.U.double().cpu(),
                                                    basis.block_ptr)
    assert grads.shape == (4, 20)
    assert _relative_error(grads, expected) <= 1e-5


@pytest.mark.gpu
def test_cuda_opcheck_and_compile(seed, monkeypatch):
    _require_cuda_ext()
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "cuda")
    basis = _gpu_basis([5, 0, 17], 4, seed)
    x = torch.randn(22, 9, device="cuda", requires_grad=True)
    gains = torch.rand(3, 4, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.spectralkern.spectral_filter.default,
                          (x, basis.U, basis.block_ptr_on(x.device), gains, 0.25))
    compiled = torch.compile(lambda x_, g_: sk.spectral_filter(x_, basis, g_, 0.1).square().sum(), fullgraph=True)
    compiled(x, gains).backward()
    grads = (x.grad.clone(), gains.grad.clone())
    x.grad = gains.grad = None
    sk.spectral_filter(x, basis, gains, 0.1).square().sum().backward()
    torch.testing.assert_close(grads, (x.grad, gains.grad), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_runs_on_the_callers_stream(seed):
    _require_cuda_ext()
    basis = _gpu_basis([256, 256], 32, seed)
    x = torch.randn(512, 4096, device="cuda")
    gains = torch.rand(2, 32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y, _ = _launch_cuda(x, basis.U, basis.block_ptr_on(x.device), gains, 0.0)
    side.synchronize()
    assert _relative_error(y, _dense_reference(x, basis, gains, 0.0)) <= 1e-5


@pytest.mark.gpu
def test_cuda_empty_and_degenerate_shapes(seed):
    _require_cuda_ext()
    basis = _gpu_basis([1], 1, seed)  # one node, k = 1
    x = torch.randn(1, 1, device="cuda")
    gains = torch.rand(1, 1, device="cuda")
    y, grads = _launch_cuda(x, basis.U, basis.block_ptr_on(x.device), gains, 0.5, saved_x=x)
    assert math.isclose(y.item(), _dense_reference(x, basis, gains, 0.5).item(), rel_tol=1e-5)
    assert grads.shape == (1, 1)
    x0 = torch.randn(1, 0, device="cuda")  # d = 0: nothing to launch
    y0, grads0 = _launch_cuda(x0, basis.U, basis.block_ptr_on(x.device), gains, 0.5, saved_x=x0)
    assert y0.shape == (1, 0) and grads0.abs().sum().item() == 0
