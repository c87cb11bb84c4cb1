"""SMoA's aligned spectral blocks of one weight (computed once per layer, saved with the adapter).

Per target layer W (out × in), once, in fp32: SVD W = U S Vᵀ; row i scores its spectral centre of mass
score_i = Σ_j j·U_ij² S_j² / Σ_j U_ij² S_j² (j = 0, 1, ... over singular values, largest first); rows are ordered
by score, columns likewise with V; the ordered rows and columns are split into K aligned groups
(``torch.tensor_split`` sizes: the first groups get the remainder), indices ascending inside each group.
"""
from __future__ import annotations

import torch

from ...ops.smoa_linear import SMoALayout


def block_sizes(n: int, num_blocks: int) -> list[int]:
    """The sizes ``torch.tensor_split`` gives when n indices are split into ``num_blocks`` groups."""
    return [n // num_blocks + (1 if k < n % num_blocks else 0) for k in range(num_blocks)]


def layout_from_permutations(row_perm: torch.Tensor, col_perm: torch.Tensor, num_blocks: int) -> SMoALayout:
    """The layout whose blocks are consecutive ``block_sizes`` runs of the given row / column orders."""
    rows = torch.split(row_perm.long(), block_sizes(row_perm.numel(), num_blocks))
    cols = torch.split(col_perm.long(), block_sizes(col_perm.numel(), num_blocks))
    return SMoALayout.from_blocks(list(rows), list(cols))


def spectral_order(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row order, column order) of a (out × in) weight by spectral centre of mass (fp32 SVD), ascending.

    score_i = Σ_j j e_ij / Σ_j e_ij with e_ij = U_ij² S_j² (columns: V instead of U). Ties keep index order.
    """
    w = weight.detach().to(torch.float32)
    out_features, in_features = w.shape
    if min(out_features, in_features) == 0:
        return torch.arange(out_features, device=w.device), torch.arange(in_features, device=w.device)
    try:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    except RuntimeError:  # some GPU solvers fail on ill-conditioned input; the CPU one does not
        u, s, vh = (t.to(w.device) for t in torch.linalg.svd(w.cpu(), full_matrices=False))

    def order(vectors: torch.Tensor) -> torch.Tensor:
        energy = vectors.square() * s.square()
        positions = torch.arange(s.numel(), device=w.device, dtype=w.dtype)
        score = (energy * positions).sum(1) / energy.sum(1).clamp_min(torch.finfo(w.dtype).tiny)
        return torch.argsort(score, stable=True)

    return order(u), order(vh.T)


def spectral_layout(weight: torch.Tensor, num_blocks: int) -> SMoALayout:
    """The K aligned blocks of ``weight`` (see the module docstring), indices ascending inside each block."""
    rows, cols = spectral_order(weight)
    row_blocks = [torch.sort(b).values for b in torch.tensor_split(rows, num_blocks)]
    col_blocks = [torch.sort(b).values for b in torch.tensor_split(cols, num_blocks)]
    return SMoALayout.from_blocks(row_blocks, col_blocks)
