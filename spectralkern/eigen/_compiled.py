"""The compiled CPU module ``spectralkern._native`` (``csrc/native``): loading it, and its small helpers — the
union-find behind the plan's connected components and the one-pass summary behind ``prepare``'s input checks.
The Lanczos solver it also holds is driven from ``_native``.

setup.py builds the module with the host C++ compiler (no CUDA needed); a pure-Python install lacks it, and every
caller here then has a torch / scipy path.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import numpy as np
import torch

MODULE_NAME = "spectralkern._native"
PROBE_SEED = 20240613   # the symmetry probe's vectors: fixed, so a solve's checks repeat


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(MODULE_NAME), ""
    except ImportError as exc:
        return None, str(exc)


def native_available() -> bool:
    """Whether the compiled module is importable."""
    return _load()[0] is not None


def require_native(device: torch.device) -> ModuleType:
    """The compiled module, or a clear error: it is missing (pure-Python install) or L is not on the CPU."""
    module, why = _load()
    if module is None:
        raise RuntimeError(f"backend='native' needs the compiled module {MODULE_NAME}, which this install lacks "
                           f"({why}); reinstall with a C++ compiler present (`pip install -e .` builds it), or use "
                           "backend='auto', 'lanczos' or 'scipy'")
    if device.type != "cpu":
        raise ValueError(f"backend='native' runs on the CPU; L is on {device} (use backend='lanczos' or 'auto' there)")
    return module


def connected_components(matrix: torch.Tensor) -> np.ndarray | None:
    """Component labels (N,) int64 of a CSR matrix's pattern by the compiled union-find, or None without the module
    or off the CPU."""
    module = _load()[0]
    if module is None or matrix.device.type != "cpu":
        return None
    crow = matrix.crow_indices().to(torch.int64).contiguous()
    col = matrix.col_indices().to(torch.int64).contiguous()
    labels = np.empty(matrix.shape[0], dtype=np.int64)
    module.connected_components(matrix.shape[0], crow.data_ptr(), col.data_ptr(), labels.ctypes.data)
    return labels


def csr_summary(matrix: torch.Tensor, block_ptr: torch.Tensor | None) -> dict | None:
    """One compiled pass over a CPU CSR matrix (N × N, float32/float64): ``nonfinite`` (count), ``max_row_nnz``,
    ``max_abs_row_sum`` (max_r Σ_c |L_rc|), ``max_gershgorin_upper`` (max_r L_rr + Σ_{c≠r} |L_rc|),
    ``crosses_blocks`` (an entry joins two blocks of ``block_ptr`` (B+1,); False for None) and the symmetry probe
    ``ytLx``, ``xtLy`` (two pseudo-random unit vectors, PROBE_SEED). None without the module or off the CPU."""
    module = _load()[0]
    if module is None or matrix.device.type != "cpu":
        return None
    crow = matrix.crow_indices().to(torch.int64).contiguous()
    col = matrix.col_indices().to(torch.int64).contiguous()
    values = matrix.values().contiguous()
    ptr = (block_ptr.to(torch.int64).contiguous() if block_ptr is not None
           else torch.zeros(1, dtype=torch.int64))
    return module.csr_summary(str(values.dtype).removeprefix("torch."), matrix.shape[0], crow.data_ptr(),
                              col.data_ptr(), values.data_ptr(), ptr.numel() - 1, ptr.data_ptr(), PROBE_SEED)
