"""The two compiled modules, loaded and judged by one loader into one status model.

    cuda    ``spectralkern._C`` (csrc/): the CUDA kernels, built when nvcc is found at install time.
    native  ``spectralkern._native`` (csrc/native/): the CPU kernels (the eigensolver, CSR scans), built with the
            host C++ compiler by every normal install.

``import spectralkern`` loads neither: the first dispatch (or ``spectralkern info``) calls ``status(name)``, once per
process and module. The outcomes, as an ``ExtensionStatus``:

    not built     no compiled module (a pure-Python install): quiet; the reason says how to build one.
    broken        the module (or, for _C, its ``_build_info.json``) is there but importing / reading it failed, or the
                  two disagree (a stale build): one RuntimeWarning, then the other backends.
    no device     (_C) built fine, but torch sees no CUDA device (CPU build of torch, or no GPU): quiet.
    mismatch      (_C) the driver is older than the CUDA major the module was built with, or a visible GPU is not
                  covered by the module's SASS targets or its PTX: one RuntimeWarning, then the other backends.
    live          usable here.

_C links the CUDA runtime statically and does not link libtorch, so torch's own CUDA version does not constrain it;
the driver does (a CUDA 13 runtime needs a driver for CUDA >= 13.0), and that is what is checked.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

MODULE_NAMES = {"cuda": "spectralkern._C", "native": "spectralkern._native"}
# what the Python side calls in _native (csrc/native/module.cpp)
NATIVE_ENTRY_POINTS = ("lowest_eigenpairs", "connected_components", "csr_summary", "spectral_filter")
INFO_PATH = Path(__file__).with_name("_build_info.json")
MIN_ARCH = 80  # the kernels use TF32 tensor cores
BUILD_HINT = "build it with e.g. `SPECTRALKERN_CUDA_ARCHS=90 pip install .` (needs nvcc), or install a CUDA wheel"


@dataclass(frozen=True)
class BuildInfo:
    """What setup.py recorded when it compiled the module (see setup.py ``make_build_info``)."""

    cuda_version: str          # nvcc release, "13.0"
    archs: tuple[int, ...]     # SASS targets, ascending, e.g. (80, 90)
    ptx: int | None            # the PTX target (the newest arch), JIT-compiled on newer GPUs
    git_sha: str
    built_at: str
    nvcc: str

    @property
    def cuda_major(self) -> int:
        return int(self.cuda_version.split(".")[0])

    def targets(self) -> str:
        """"sm_80 sm_90 + PTX compute_90"."""
        sass = " ".join(f"sm_{a}" for a in self.archs)
        return f"{sass} + PTX compute_{self.ptx}" if self.ptx is not None else sass

    def describe(self) -> str:
        sha = self.git_sha[:12] + ("-dirty" if self.git_sha.endswith("-dirty") else "")
        return f"CUDA {self.cuda_version}, {self.targets()}, git {sha}, built {self.built_at}"


def parse_build_info(data: object) -> BuildInfo:
    """BuildInfo from the JSON object setup.py wrote; ValueError naming the field when it is malformed."""
    if not isinstance(data, dict):
        raise ValueError(f"build info must be a JSON object, got {type(data).__name__}")
    try:
        archs = tuple(int(a) for a in data["archs"])
        ptx = data.get("ptx")
        info = BuildInfo(cuda_version=str(data["cuda_version"]), archs=archs,
                         ptx=int(ptx) if ptx is not None else None, git_sha=str(data.get("git_sha", "unknown")),
                         built_at=str(data.get("built_at", "unknown")), nvcc=str(data.get("nvcc", "unknown")))
    except KeyError as exc:
        raise ValueError(f"build info lacks the field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"build info has a malformed field: {exc}") from None
    if not archs or list(archs) != sorted(set(archs)):
        raise ValueError(f"build info archs must be a non-empty ascending list, got {list(archs)}")
    if not info.cuda_version.split(".")[0].isdigit():
        raise ValueError(f"build info cuda_version must look like '13.0', got {info.cuda_version!r}")
    return info


def read_build_info(path: Path = INFO_PATH) -> BuildInfo:
    """Raises OSError when the file is missing/unreadable, ValueError when it is malformed."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name} is not valid JSON: {exc}") from None
    return parse_build_info(data)


def runs_on(capability: tuple[int, int], archs: tuple[int, ...], ptx: int | None) -> bool:
    """Whether a GPU of this compute capability can run the module: SASS for the same major and a minor at or
    below the device's (cubins are forward compatible within a major), or PTX at or below it (JIT-compiled)."""
    major, minor = capability
    cc = 10 * major + minor
    if cc < MIN_ARCH:
        return False
    return any(a // 10 == major and a <= cc for a in archs) or (ptx is not None and ptx <= cc)


def check_compatibility(info: BuildInfo, compiled: dict, driver_version: int,
                        devices: list[tuple[int, str, tuple[int, int]]]) -> str | None:
    """Why the module cannot run here, or None. ``compiled`` is the binary's own ``build_info()``,
    ``driver_version`` the driver's CUDA version as 1000·major + 10·minor, ``devices`` (index, name, capability)."""
    compiled_archs = tuple(sorted(int(a) for a in compiled.get("archs", ())))
    if str(compiled.get("cuda_version")) != info.cuda_version or compiled_archs != info.archs:
        shown = " ".join(f"sm_{a}" for a in compiled_archs)
        return (f"the binary (CUDA {compiled.get('cuda_version')}, {shown}) and {INFO_PATH.name} (CUDA "
                f"{info.cuda_version}, {' '.join(f'sm_{a}' for a in info.archs)}) disagree: a stale or mixed build; "
                "rebuild the package")
    if driver_version < 1000 * info.cuda_major:
        have = f"{driver_version // 1000}.{driver_version % 1000 // 10}" if driver_version else "none found"
        return (f"the extension was built with CUDA {info.cuda_version}, whose runtime needs a driver for CUDA >= "
                f"{info.cuda_major}.0; this driver supports CUDA {have}: update the driver or rebuild with an nvcc "
                "of the driver's CUDA major")
    for index, name, capability in devices:
        if not runs_on(capability, info.archs, info.ptx):
            cc = f"sm_{capability[0]}{capability[1]}"
            if 10 * capability[0] + capability[1] < MIN_ARCH:
                return f"device {index} ({name}) is {cc}; the CUDA kernels need sm_{MIN_ARCH} or newer"
            return (f"device {index} ({name}) is {cc}, and the extension carries {info.targets()}: rebuild with "
                    f"SPECTRALKERN_CUDA_ARCHS={capability[0]}{capability[1]}")
    return None


@dataclass(frozen=True, eq=False)  # identity: the registry keys its cached decisions on the status objects
class ExtensionStatus:
    """One compiled module's state in this process: ``live`` (usable here) and, either way, ``reason`` (what it is,
    or why it cannot run); ``module`` when it loaded, ``info`` the build metadata (_C only)."""

    live: bool
    reason: str
    module: ModuleType | None = None
    info: BuildInfo | None = None
    warn: bool = False  # a broken or mismatched build (as opposed to "not built" / "no GPU")


def _cuda_devices() -> list[tuple[int, str, tuple[int, int]]] | None:
    """Visible CUDA devices, or None when torch cannot use CUDA here."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    return [(i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())]


def probe_cuda(*, find_spec: Callable = importlib.util.find_spec, import_module: Callable = importlib.import_module,
          info_path: Path = INFO_PATH, cuda_devices: Callable = _cuda_devices) -> ExtensionStatus:
    """Look for, load and check _C. Never raises; the arguments exist so tests can simulate machines."""
    try:
        spec = find_spec(MODULE_NAMES["cuda"])
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return ExtensionStatus(False, "the CUDA extension is not built (pure-Python install: no nvcc at install time, or "
                                f"SPECTRALKERN_SKIP_CUDA_BUILD=1); {BUILD_HINT}")
    try:
        module = import_module(MODULE_NAMES["cuda"])
    except Exception as exc:  # ImportError, OSError (a missing library), anything a broken binary raises
        return ExtensionStatus(False, f"the CUDA extension failed to load: {type(exc).__name__}: {exc}", warn=True)
    try:
        info = read_build_info(info_path)
    except (OSError, ValueError) as exc:
        return ExtensionStatus(False, f"the CUDA extension's build metadata ({info_path.name}) is unusable: {exc}; rebuild "
                                "the package", module=None, warn=True)
    built = f"spectralkern._C ({info.describe()})"
    devices = cuda_devices()
    if devices is None:
        why = (f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None
               else "no CUDA device is visible")
        return ExtensionStatus(False, f"{built} is installed, but {why}", module=module, info=info)
    try:
        reason = check_compatibility(info, module.build_info(), int(module.driver_cuda_version()), devices)
    except Exception as exc:  # a module without the expected functions is a broken build too
        reason = f"the CUDA extension does not answer its build queries: {type(exc).__name__}: {exc}"
    if reason is not None:
        return ExtensionStatus(False, reason, module=None, info=info, warn=True)
    names = ", ".join(f"{name} (sm_{cap[0]}{cap[1]})" for _, name, cap in devices)
    driver = int(module.driver_cuda_version())
    return ExtensionStatus(True, f"{built} on {names}; driver for CUDA {driver // 1000}.{driver % 1000 // 10}, torch built "
                           f"for CUDA {torch.version.cuda}", module=module, info=info)


def probe_native(*, find_spec: Callable = importlib.util.find_spec,
                 import_module: Callable = importlib.import_module) -> ExtensionStatus:
    """Look for and load _native (a CPU module: nothing to check past the import). Never raises."""
    name = MODULE_NAMES["native"]
    try:
        spec = find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return ExtensionStatus(False, f"{name} is not built (pure-Python install); reinstall with a C++ compiler "
                                      "present (`pip install -e .` builds it)")
    try:
        module = import_module(name)
    except Exception as exc:  # a broken binary must not break `import spectralkern`
        return ExtensionStatus(False, f"{name} failed to load: {type(exc).__name__}: {exc}", warn=True)
    missing = [entry for entry in NATIVE_ENTRY_POINTS if not hasattr(module, entry)]
    if missing:  # a build from an older checkout, left in place
        return ExtensionStatus(False, f"{name} at {getattr(module, '__file__', '?')} lacks {', '.join(missing)} (a "
                                      "stale build); rebuild it (`pip install -e .`, or `python setup.py build_ext "
                                      "--inplace`)", warn=True)
    return ExtensionStatus(True, f"{name} (C++) from {Path(module.__file__).name}", module=module)


_PROBES: dict[str, Callable[[], ExtensionStatus]] = {"cuda": lambda: probe_cuda(), "native": lambda: probe_native()}


@functools.cache
def status(name: str) -> ExtensionStatus:
    """The status of compiled module ``name`` ("cuda": _C, "native": _native) in this process, probed once. Warns
    once when a present build cannot be used."""
    if name not in _PROBES:
        raise ValueError(f"name must be one of {', '.join(_PROBES)}; got {name!r}")
    result = _PROBES[name]()
    if result.warn:
        warnings.warn(f"spectralkern: {result.reason}. Falling back to the other backends.", RuntimeWarning,
                      stacklevel=2)
    return result


def module(name: str) -> ModuleType:
    """The loaded module ``name``; RuntimeError with the reason when it cannot run here."""
    result = status(name)
    if not result.live or result.module is None:
        raise RuntimeError(f"the {name} backend is not available: {result.reason}")
    return result.module


def describe_build(name: str, *, find_spec: Callable = importlib.util.find_spec, info_path: Path = INFO_PATH) -> str:
    """One line for ``spectralkern info``: what the installed build of module ``name`` carries, without loading
    it."""
    if find_spec(MODULE_NAMES[name]) is None:
        return "not built (pure-Python install)"
    if name == "native":
        return f"built ({MODULE_NAMES[name]})"
    try:
        return read_build_info(info_path).describe()
    except (OSError, ValueError) as exc:
        return f"present, but its build metadata is unusable: {exc}"
