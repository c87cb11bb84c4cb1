"""The one place that decides which implementation runs an op: CUDA extension, Triton, or plain torch.

Order under ``auto``: the compiled CUDA extension (when built and the tensors are on a CUDA device),
then Triton (on CUDA, or on the CPU when ``TRITON_INTERPRET=1`` — the way CI runs every kernel), then
the plain-torch reference. ``SPECTRALKERN_BACKEND=cuda|triton|torch`` forces one and fails clearly
when it cannot run.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "SPECTRALKERN_BACKEND"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    live: bool
    reason: str


def triton_interpreter_on() -> bool:
    """True when Triton kernels run through the CPU interpreter (must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus("triton", False, "triton is not installed (it ships for Linux x86_64 only)")
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:  # a broken install must not break `import spectralkern`
        return BackendStatus("triton", False, f"import triton failed: {exc!r}")
    if triton_interpreter_on():
        return BackendStatus("triton", True, f"triton {triton.__version__} (interpreter, TRITON_INTERPRET=1)")
    if not torch.cuda.is_available():
        return BackendStatus("triton", False,
                             f"triton {triton.__version__} installed, but no CUDA device "
                             "(set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)")
    return BackendStatus("triton", True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")


@functools.cache
def cuda_ext_status() -> BackendStatus:
    """The compiled extension (spectralkern._C): built or not, the CUDA version and archs it carries, and why it
    is not live when it is not (see ``_cuda_ext``; a present but unusable build warns once)."""
    from . import _cuda_ext  # loads nothing at import of spectralkern: the first dispatch or `info` gets here

    status = _cuda_ext.status()
    return BackendStatus("cuda", status.live, status.reason)


def torch_status() -> BackendStatus:
    return BackendStatus("torch", True, f"torch {torch.__version__} reference implementation")


def all_status() -> list[BackendStatus]:
    return [cuda_ext_status(), triton_status(), torch_status()]


def requested_backend() -> str:
    """The value of SPECTRALKERN_BACKEND, validated ('auto' when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKENDS)}; got {value!r}")
    return value


def _can_run(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    status = cuda_ext_status() if name == "cuda" else triton_status()
    if not status.live:
        return False, status.reason
    if device.type == "cuda":
        return True, ""
    if name == "triton" and device.type == "cpu" and triton_interpreter_on():
        return True, ""
    return False, f"tensors are on {device}, and the {name} backend needs a CUDA device"


def backend_for(device: torch.device, implemented: tuple[str, ...] = BACKENDS) -> str:
    """Pick the backend for an op whose tensors live on ``device``.

    ``implemented`` lists the backends the op has; ``torch`` must be among them.
    """
    forced = requested_backend()
    if forced != "auto":
        if forced not in implemented:
            raise RuntimeError(f"{ENV_VAR}={forced}, but this op is implemented only for {', '.join(implemented)}")
        ok, why = _can_run(forced, device)
        if not ok:
            raise RuntimeError(f"{ENV_VAR}={forced} cannot run here: {why}")
        return forced
    for name in BACKENDS:
        if name in implemented and _can_run(name, device)[0]:
            return name
    raise RuntimeError(f"no backend among {implemented} can run on {device}")  # unreachable while torch is listed
