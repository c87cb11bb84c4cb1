"""SpectralBasis: the k lowest graph frequencies of every block, packed for the kernels.

Layout (what every op reads):
    U            (N, k)   rows of block b are ``block_ptr[b]:block_ptr[b+1]``; block b uses its first
                          k_b = min(k, n_b) columns, the others are exactly zero.
    eigenvalues  (B, k)   ascending per block; entries j >= k_b are 0 (their U columns are zero, so any finite
                          gain there has no effect).
    block_ptr    (B+1,)   int64 on the CPU.
A graph with cross-block edges gets one global basis: B = 1, block_ptr = [0, N].
"""
from __future__ import annotations

import torch

from ._checks import (check_block_ptr, check_finite, check_has_data, check_positive_int, check_same_device,
                      check_tensor)
from .graph import GraphLaplacian

# Dense eigh of the whole graph is O(N^3); past this, use the Lanczos solver.
_MAX_DENSE_GLOBAL_NODES = 8192


class SpectralBasis:
    """See the module docstring. ``info`` holds the eigensolver's diagnostics (an ``EigenInfo`` from
    ``lowest_eigenpairs``: backend, products, residuals, convergence per pair), None when built otherwise."""

    def __init__(self, U: torch.Tensor, eigenvalues: torch.Tensor, block_ptr: torch.Tensor, *,
                 info: object | None = None):
        check_tensor("U", U, ndim=2)
        check_tensor("eigenvalues", eigenvalues, ndim=2)
        for name, value in (("U", U), ("eigenvalues", eigenvalues)):
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        check_same_device("eigenvalues", eigenvalues, "U", U)
        for name, value in (("U", U), ("eigenvalues", eigenvalues)):
            check_has_data(name, value)
            check_finite(name, value)   # a NaN frequency would reach every output of every op that reads it
        block_ptr = check_block_ptr(block_ptr, U.shape[0])  # int64 on the CPU; must end at U's row count
        if eigenvalues.shape != (block_ptr.numel() - 1, U.shape[1]):
            raise ValueError(f"eigenvalues must have shape (B, k) = ({block_ptr.numel() - 1}, {U.shape[1]}), "
                             f"got {tuple(eigenvalues.shape)}")
        self.U = U
        self.eigenvalues = eigenvalues
        self.block_ptr = block_ptr
        self.info = info
        self._device_ptr: dict[torch.device, torch.Tensor] = {}
        self._device_held: dict[torch.device, torch.Tensor] = {}
        self._every_column_held = self._columns_held()  # here, not on first use: op calls may be traced

    @classmethod
    def from_laplacian(cls, laplacian: GraphLaplacian, k: int) -> SpectralBasis:
        """Exact basis by batched dense ``torch.linalg.eigh`` of the diagonal blocks (or of the whole Laplacian
        when the graph has cross-block edges)."""
        if not isinstance(laplacian, GraphLaplacian):
            raise TypeError(f"laplacian must be a GraphLaplacian (from ParameterGraph.laplacian()), "
                            f"got {type(laplacian).__name__}")
        check_positive_int("k", k)
        n = laplacian.num_nodes
        if laplacian.has_cross_block_edges:
            if n > _MAX_DENSE_GLOBAL_NODES:
                raise ValueError(f"the graph has cross-block edges and {n} nodes; a dense global eigh is limited "
                                 f"to {_MAX_DENSE_GLOBAL_NODES} nodes")
            block_ptr = torch.tensor([0, n], dtype=torch.int64)
            blocks = laplacian.to_dense().unsqueeze(0)
        else:
            block_ptr = laplacian.block_ptr
            # Padding gets an eigenvalue above the spectrum, so it sorts after every real frequency. The margin
            # is relative: bound + 1 rounds to the bound in float32 once weights pass ~1e7, and an eigenvalue
            # equal to the bound (even cycles) then sorted after the padding, losing that eigenvector.
            blocks = laplacian.diagonal_blocks(pad_value=2.0 * laplacian.spectrum_bound() + 1.0)
        values, vectors = torch.linalg.eigh(blocks)  # (B, n_max), (B, n_max, n_max)
        return cls._pack(values, vectors, block_ptr, k)

    @classmethod
    def _pack(cls, values: torch.Tensor, vectors: torch.Tensor, block_ptr: torch.Tensor, k: int) -> SpectralBasis:
        num_blocks, n_max = values.shape[0], values.shape[-1]
        sizes = (block_ptr[1:] - block_ptr[:-1]).to(values.device)
        device, dtype = values.device, values.dtype
        eigenvalues = torch.zeros(num_blocks, k, dtype=dtype, device=device)
        take = min(k, n_max)
        valid = torch.arange(take, device=device).unsqueeze(0) < sizes.unsqueeze(1)  # (B, take)
        eigenvalues[:, :take] = torch.where(valid, values[:, :take], torch.zeros((), dtype=dtype, device=device))
        n = int(block_ptr[-1])
        U = torch.zeros(n, k, dtype=dtype, device=device)
        if n:
            node_block = torch.repeat_interleave(torch.arange(num_blocks, device=device), sizes)
            local = torch.arange(n, device=device) - block_ptr[:-1].to(device)[node_block]
            rows = vectors[node_block, local, :take] * valid[node_block].to(dtype)
            U[:, :take] = rows
        return cls(U, eigenvalues, block_ptr)

    # --------------------------------------------------------------------------------- properties
    @property
    def k(self) -> int:
        return self.U.shape[1]

    @property
    def num_nodes(self) -> int:
        return self.U.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.block_ptr.numel() - 1

    @property
    def block_sizes(self) -> torch.Tensor:
        return self.block_ptr[1:] - self.block_ptr[:-1]

    @property
    def block_k(self) -> torch.Tensor:
        """(B,) number of valid columns per block, min(k, n_b)."""
        return self.block_sizes.clamp(max=self.k)

    @property
    def device(self) -> torch.device:
        return self.U.device

    @property
    def dtype(self) -> torch.dtype:
        return self.U.dtype

    def block_ptr_on(self, device: torch.device) -> torch.Tensor:
        """block_ptr as an int64 tensor on ``device`` (cached: the kernels need it there every call)."""
        if device not in self._device_ptr:
            self._device_ptr[device] = self.block_ptr.to(device)
        return self._device_ptr[device]

    @property
    def holds_every_column(self) -> bool:
        """Every block has at least k nodes, so all k columns of every block are frequencies (no padding to mask)."""
        if self._every_column_held[0] != self.k:  # U was replaced by one of another width
            if torch.compiler.is_compiling():  # a data-dependent answer cannot be traced; masking is always right
                return False
            self._every_column_held = self._columns_held()
        return self._every_column_held[1]

    def _columns_held(self) -> tuple[int, bool]:
        return self.k, bool((self.block_sizes >= self.k).all())

    def held_on(self, device: torch.device) -> torch.Tensor:
        """(B, k) bool on ``device``: column j of block b is one of its k_b = min(k, n_b) frequencies (cached).
        Ops mask per-block values (gains) with it, so what sits in the padding columns never reaches the output,
        NaN included."""
        if device not in self._device_held:
            held = torch.arange(self.k).unsqueeze(0) < self.block_k.unsqueeze(1)
            self._device_held[device] = held.to(device)
        return self._device_held[device]

    def __repr__(self) -> str:
        return (f"SpectralBasis(nodes={self.num_nodes}, blocks={self.num_blocks}, k={self.k}, "
                f"dtype={self.dtype}, device={self.device})")

    # ----------------------------------------------------------------------------------- helpers
    def block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_b of shape (n_b, k_b), eigenvalues of shape (k_b,)) for block b."""
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"b must be an int block index, got {type(b).__name__}")
        if not 0 <= b < self.num_blocks:
            raise IndexError(f"b must be a block index in [0, {self.num_blocks}), got {b}")
        start, stop = int(self.block_ptr[b]), int(self.block_ptr[b + 1])
        kb = min(self.k, stop - start)
        return self.U[start:stop, :kb], self.eigenvalues[b, :kb]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Spectral coefficients U_bᵀ x_b of every block: x (N, d) -> (B, k, d)."""
        self._check_rows("x", x)
        out = x.new_zeros(self.num_blocks, self.k, x.shape[1])
        for b in range(self.num_blocks):
            U_b, _ = self.block(b)
            start, stop = int(self.block_ptr[b]), int(self.block_ptr[b + 1])
            out[b, :U_b.shape[1]] = U_b.to(x.dtype).T @ x[start:stop]
        return out

    def reconstruct(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Inverse of ``project``: (B, k, d) -> (N, d) = U_b c_b per block."""
        check_tensor("coefficients", coefficients, ndim=3)
        self._check_float_device("coefficients", coefficients)
        if coefficients.shape[:2] != (self.num_blocks, self.k):
            raise ValueError(f"coefficients must have shape (B, k, d) = ({self.num_blocks}, {self.k}, d), "
                             f"got {tuple(coefficients.shape)}")
        out = coefficients.new_zeros(self.num_nodes, coefficients.shape[2])
        for b in range(self.num_blocks):
            U_b, _ = self.block(b)
            start, stop = int(self.block_ptr[b]), int(self.block_ptr[b + 1])
            out[start:stop] = U_b.to(coefficients.dtype) @ coefficients[b, :U_b.shape[1]]
        return out

    def _check_rows(self, name: str, x: torch.Tensor) -> None:
        check_tensor(name, x, ndim=2)
        if x.shape[0] != self.num_nodes:
            raise ValueError(f"{name} must have {self.num_nodes} rows (the basis has {self.num_nodes} nodes), "
                             f"got shape {tuple(x.shape)}")
        self._check_float_device(name, x)

    def _check_float_device(self, name: str, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        check_same_device(name, x, "the basis (U)", self.U)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SpectralBasis:
        return SpectralBasis(self.U.to(device=device, dtype=dtype), self.eigenvalues.to(device=device, dtype=dtype),
                             self.block_ptr)
