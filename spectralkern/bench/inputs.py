"""Random benchmark inputs: block layouts and orthonormal spectral bases built without an eigensolver."""
from __future__ import annotations

import torch

from ..basis import SpectralBasis


def uniform_block_ptr(num_nodes: int, block_size: int) -> torch.Tensor:
    """(B+1,) int64 offsets of blocks of ``block_size`` rows (the last one shorter if it does not divide)."""
    starts = list(range(0, num_nodes, block_size)) + [num_nodes]
    return torch.tensor(starts, dtype=torch.int64)


def ragged_block_ptr(num_nodes: int, max_size: int, generator: torch.Generator) -> torch.Tensor:
    """(B+1,) int64 offsets of blocks with sizes drawn uniformly from 1..max_size, the last cut to end at N."""
    # Mean size is (max_size + 1) / 2; draw twice the expected count so one draw almost always covers N.
    sizes = torch.empty(0, dtype=torch.int64)
    while int(sizes.sum()) < num_nodes:
        more = torch.randint(1, max_size + 1, (4 * num_nodes // (max_size + 1) + 1,), generator=generator)
        sizes = torch.cat([sizes, more])
    ends = torch.cumsum(sizes, 0)
    count = int(torch.searchsorted(ends, torch.tensor(num_nodes))) + 1  # first block that reaches N
    ends = ends[:count].clone()
    ends[-1] = num_nodes
    return torch.cat([torch.zeros(1, dtype=torch.int64), ends])


def random_basis(block_ptr: torch.Tensor, k: int, *, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> SpectralBasis:
    """A SpectralBasis with random orthonormal U_b (n_b, k_b = min(k, n_b)) per block, packed as basis.py says.

    All blocks are factored in one batched QR: block b's Gaussian (n_b, k) matrix is zero-padded to (n_max, k);
    Householder QR keeps span(Q[:, :j]) = span(A[:, :j]), so the first k_b columns of Q are orthonormal and live
    in the block's own rows. Columns past k_b and padded rows are then zeroed. Eigenvalues are sorted uniform
    draws in [0, 2) (the normalized Laplacian's range), zero past k_b. U is made in fp32 on the CPU (reproducible
    across devices), then cast to ``dtype`` and moved.
    """
    block_ptr = block_ptr.to(torch.int64)
    sizes = block_ptr[1:] - block_ptr[:-1]
    num_blocks, num_nodes = sizes.numel(), int(block_ptr[-1])
    n_max = max(int(sizes.max()), 1) if num_blocks else 1
    local = torch.arange(n_max)
    row_ok = local[None, :] < sizes[:, None]                                  # (B, n_max)
    col_ok = torch.arange(k)[None, :] < sizes.clamp(max=k)[:, None]           # (B, k)
    a = torch.randn(num_blocks, n_max, k, generator=generator) * row_ok[:, :, None]
    q = torch.linalg.qr(a).Q                                                  # (B, n_max, min(n_max, k))
    q = torch.nn.functional.pad(q, (0, k - q.shape[-1])) * (row_ok[:, :, None] & col_ok[:, None, :])
    node_block = torch.repeat_interleave(torch.arange(num_blocks), sizes)     # (N,)
    node_local = torch.arange(num_nodes) - block_ptr[:-1][node_block]
    U = q[node_block, node_local]                                             # (N, k)
    eigenvalues = torch.sort(2 * torch.rand(num_blocks, k, generator=generator), dim=1).values * col_ok
    return SpectralBasis(U.to(device=device, dtype=dtype), eigenvalues.to(device), block_ptr)
