"""The compiled CPU module's (``spectralkern._native``, ``csrc/native``) scans of a CSR matrix — the union-find behind
the plan's connected components and the one-pass summary behind ``prepare``'s input checks — and the eigen
solvers' gate on the module (``require_native``). The module is loaded by ``spectralkern._extensions``; the Lanczos
solver it also holds is driven from ``_native_lanczos``.

setup.py builds the module with the host C++ compiler (no CUDA needed); a pure-Python install lacks it. Whether a
scan runs here or on its torch / scipy path is the registry's answer (ops ``connected_components``, ``csr_summary``).
"""
from __future__ import annotations

from types import ModuleType

import numpy as np
import torch

from .. import _extensions

PROBE_SEED = 20240613   # the symmetry probe's vectors: fixed, so a solve's checks repeat


def require_native(device: torch.device) -> ModuleType:
    """The compiled module, or a clear error: it is missing (pure-Python install) or L is not on the CPU."""
    status = _extensions.status("native")
    if status.module is None:
        raise RuntimeError(f"backend='native' needs the compiled module {_extensions.MODULE_NAMES['native']}, which "
                           f"this install lacks ({status.reason}); reinstall with a C++ compiler present (`pip install -e .` builds it), or use "
                           "backend='auto', 'lanczos' or 'scipy'")
    if device.type != "cpu":
        raise ValueError(f"backend='native' runs on the CPU; L is on {device} (use backend='lanczos' or 'auto' there)")
    return status.module


def connected_components(matrix: torch.Tensor) -> np.ndarray:
    """Component labels (N,) int64 of a CPU CSR matrix's pattern by the compiled union-find."""
    module = require_native(matrix.device)
    crow = matrix.crow_indices().to(torch.int64).contiguous()
    col = matrix.col_indices().to(torch.int64).contiguous()
    labels = np.empty(matrix.shape[0], dtype=np.int64)
    module.connected_components(matrix.shape[0], crow.data_ptr(), col.data_ptr(), labels.ctypes.data)
    return labels


def csr_summary(matrix: torch.Tensor, block_ptr: torch.Tensor | None) -> dict | None:
    """One compiled pass over a CPU CSR matrix (N × N, float32/float64): ``nonfinite`` (count), ``max_row_nnz``,
    ``max_abs_row_sum`` (max_r Σ_c |L_rc|), ``max_gershgorin_upper`` (max_r L_rr + Σ_{c≠r} |L_rc|),
    ``crosses_blocks`` (an entry joins two blocks of ``block_ptr`` (B+1,); False for None) and the symmetry probe
    ``ytLx``, ``xtLy`` (two pseudo-random unit vectors, PROBE_SEED)."""
    module = require_native(matrix.device)
    crow = matrix.crow_indices().to(torch.int64).contiguous()
    col = matrix.col_indices().to(torch.int64).contiguous()
    values = matrix.values().contiguous()
    ptr = (block_ptr.to(torch.int64).contiguous() if block_ptr is not None
           else torch.zeros(1, dtype=torch.int64))
    return module.csr_summary(str(values.dtype).removeprefix("torch."), matrix.shape[0], crow.data_ptr(),
                              col.data_ptr(), values.data_ptr(), ptr.numel() - 1, ptr.data_ptr(), PROBE_SEED)
