"""Validate the matrix given to ``lowest_eigenpairs`` and turn it into one CSR operator with a block layout.

Accepted: a ``GraphLaplacian`` (its blocks, or one global block when entries cross blocks), a torch tensor
(dense, COO or CSR) or a scipy sparse matrix / numpy array (one global block). Checks: square, real float,
finite, symmetric (a cheap probe, see ``_check_symmetric``); one compiled pass over the entries gathers what they
need (``_native_csr.csr_summary``) where the registry picks it (the CPU, the module built), elsewhere torch ops do.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from .._backend import backend_of
from .._checks import check_has_data
from ..graph import GraphLaplacian
from ._native_csr import PROBE_SEED, csr_summary
from ._operator import coo_rows

_FLOAT = (torch.float32, torch.float64)


@dataclass
class Problem:
    """L as a CSR matrix (N × N) on its device, and the layout of the basis to return.

    ``shift`` is c ≥ λ_max(L) for the flip A = c·I − L; ``norm`` ≥ ‖L‖₂ is what tolerances are relative to.
    """

    matrix: torch.Tensor
    block_ptr: torch.Tensor   # (B+1,) int64, CPU
    shift: float
    norm: float
    max_row_nnz: int
    psd: bool                 # known positive semi-definite (a graph Laplacian): then λ ≥ 0 and θ = c − λ ≤ c

    @property
    def num_nodes(self) -> int:
        return self.matrix.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.block_ptr.numel() - 1

    @property
    def sizes(self) -> torch.Tensor:
        return self.block_ptr[1:] - self.block_ptr[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def node_block(self) -> torch.Tensor:
        """(N,) block index of every node, CPU."""
        return torch.repeat_interleave(torch.arange(self.num_blocks), self.sizes)


def _to_csr(name: str, value: object) -> torch.Tensor:
    """Any accepted matrix as a coalesced torch CSR tensor (float32/float64)."""
    if isinstance(value, np.ndarray) or scipy.sparse.issparse(value):
        if value.ndim != 2:
            raise ValueError(f"{name} must be a 2-D matrix, got shape {value.shape}")
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must have a real dtype, got {value.dtype}")
        csr = scipy.sparse.csr_array(value)
        csr.sum_duplicates()
        csr.sort_indices()
        dtype = np.float32 if csr.dtype == np.float32 else np.float64
        crow = torch.as_tensor(csr.indptr.astype(np.int64))
        col = torch.as_tensor(csr.indices.astype(np.int64))
        val = torch.as_tensor(csr.data.astype(dtype))
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, val, csr.shape)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a GraphLaplacian, a torch tensor or a scipy sparse matrix, "
                        f"got {type(value).__name__}")
    check_has_data(name, value)
    if value.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(value.shape)}")
    if value.dtype not in _FLOAT:
        raise TypeError(f"{name} must have dtype float32 or float64, got {str(value.dtype).removeprefix('torch.')}")
    if value.layout == torch.sparse_csr:
        return value
    if value.layout == torch.sparse_coo:
        return value.coalesce().to_sparse_csr()
    return value.to_sparse_csr()


def _summary_torch(matrix: torch.Tensor, block_ptr: torch.Tensor | None) -> dict:
    """What ``_native_csr.csr_summary`` computes in one compiled pass, as torch ops (a CUDA matrix, or no compiled
    module). Its symmetry probe draws its two vectors from torch's generator (seeded)."""
    n = matrix.shape[0]
    values = matrix.values()
    crow, cols, rows = matrix.crow_indices(), matrix.col_indices(), coo_rows(matrix)
    abs_sum = torch.zeros(n, dtype=torch.float64, device=matrix.device).index_add_(0, rows, values.abs().double())
    diag = torch.zeros(n, dtype=torch.float64, device=matrix.device)
    on_diag = rows == cols
    diag.index_add_(0, rows[on_diag], values[on_diag].double())
    crosses = False
    if block_ptr is not None:
        node_block = torch.repeat_interleave(torch.arange(block_ptr.numel() - 1), block_ptr.diff()).to(matrix.device)
        crosses = bool((node_block[rows] != node_block[cols]).any())
    ytLx = xtLy = 0.0
    if n:
        gen = torch.Generator(device=matrix.device).manual_seed(PROBE_SEED)
        probe = torch.randn(n, 2, dtype=matrix.dtype, device=matrix.device, generator=gen)
        probe /= torch.linalg.vector_norm(probe, dim=0, keepdim=True)
        image = torch.sparse.mm(matrix, probe).double()
        probe = probe.double()
        ytLx, xtLy = float(probe[:, 1] @ image[:, 0]), float(probe[:, 0] @ image[:, 1])
    return {"nonfinite": int((~torch.isfinite(values)).sum()),
            "max_row_nnz": int((crow[1:] - crow[:-1]).max()) if n else 0,
            "max_abs_row_sum": float(abs_sum.max()) if n else 0.0,
            "max_gershgorin_upper": float((diag + (abs_sum - diag.abs())).max()) if n else 0.0,
            "crosses_blocks": crosses, "ytLx": ytLx, "xtLy": xtLy}


def _check_symmetric(name: str, summary: dict, dtype: torch.dtype) -> None:
    """Cheap symmetry probe: yᵀ(L x) must equal xᵀ(L y) for two random unit vectors, up to the worst-case rounding
    of the two sparse products ((max row nnz + 2)·eps·‖x‖‖y‖·max_i Σ_j |L_ij|). Catches any matrix that is not
    symmetric by more than rounding in a way x and y see; a single tiny asymmetric entry in a huge float32 matrix
    can slip through — this is a guard against passing the wrong matrix, not a proof."""
    ytLx, xtLy = summary["ytLx"], summary["xtLy"]
    allowed = 4 * (summary["max_row_nnz"] + 2) * torch.finfo(dtype).eps * summary["max_abs_row_sum"]
    if abs(ytLx - xtLy) > allowed:
        raise ValueError(f"{name} must be symmetric: for random unit vectors x, y, yᵀ({name} x) = {ytLx:.6g} but "
                         f"xᵀ({name} y) = {xtLy:.6g} (rounding allows a difference of {allowed:.2g})")


def prepare(name: str, L: object) -> Problem:
    """Validate L and build the Problem (see the module docstring)."""
    graph_laplacian = isinstance(L, GraphLaplacian)
    if graph_laplacian:
        if not isinstance(L.matrix, torch.Tensor):
            raise TypeError(f"{name}.matrix must be a torch tensor, got {type(L.matrix).__name__}")
        matrix = _to_csr(f"{name}.matrix", L.matrix)
    else:
        matrix = _to_csr(name, L)
    n_rows, n_cols = matrix.shape
    if n_rows != n_cols:
        raise ValueError(f"{name} must be square, got shape ({n_rows}, {n_cols})")
    n = n_rows
    given_ptr = None
    if graph_laplacian:
        if L.block_ptr.numel() < 2 or int(L.block_ptr[-1]) != n:
            raise ValueError(f"{name}.block_ptr must end at the number of nodes ({n}), got "
                             f"{L.block_ptr.tolist()[-1:] or L.block_ptr.tolist()}")
        given_ptr = L.block_ptr.to("cpu", torch.int64)
    if backend_of("csr_summary", matrix.values()) == "native":
        summary = csr_summary(matrix, given_ptr)
    else:
        summary = _summary_torch(matrix, given_ptr)
    if summary["nonfinite"]:
        raise ValueError(f"{name} contains {summary['nonfinite']} NaN/Inf value(s); expected finite numbers")
    if n:
        _check_symmetric(name, summary, matrix.dtype)

    global_ptr = torch.tensor([0, n], dtype=torch.int64)
    if graph_laplacian:
        # The layout follows the entries, not the flag: any entry across blocks makes the basis global.
        block_ptr = global_ptr if summary["crosses_blocks"] else given_ptr
        shift = norm = float(L.spectrum_bound())
    else:
        block_ptr = global_ptr
        shift, norm = summary["max_gershgorin_upper"], summary["max_abs_row_sum"]
    # ‖L‖ = 0 (no edges): any pair is exact; keep the relative tolerance meaningful
    norm = max(norm, torch.finfo(matrix.dtype).tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(matrix.crow_indices(), matrix.col_indices(), matrix.values(), (n, n))
    return Problem(matrix=matrix, block_ptr=block_ptr, shift=shift, norm=norm, max_row_nnz=summary["max_row_nnz"],
                   psd=graph_laplacian)


def rounding_floor(problem: Problem) -> float:
    """Relative residual a float pair cannot beat reliably: the rounding of one product L u (about
    (max row nnz)·eps·‖L‖) plus that of the Rayleigh–Ritz combination; see NOTES ("tol = 0")."""
    eps = torch.finfo(problem.dtype).eps
    return 8 * eps * math.sqrt(max(problem.max_row_nnz, 1) + 1)
