"""The materialised form of chebyshev_filter on a block-diagonal Laplacian (the torch backend's "materialized").

Instead of K sparse products over all of x (the recursion), build P_b = p(Ã_b) = Σ_m c_m T_m(Ã_b) once per block
(dense n_b × n_b, Clenshaw's recurrence: K − 1 batched matrix products) and apply y_b = P_b x_b with one batched
product per group of blocks. It wins when d is large next to K·n_b and the blocks are small (see
``_chebyshev_cost`` for the measured model the registry uses).

Blocks are grouped by a padded size (``bucket``): a group is G blocks of ``n`` padded nodes, held as one
(G, n, n) Ã. Padding nodes have zero rows and columns in Ã, so p(Ã) keeps the real block exact (p of a
block-diagonal matrix is block-diagonal); their columns of P are zeroed so that whatever the padding rows of the
gathered x hold adds nothing, and their output rows go to scratch rows N, N + 1, ... that are dropped.
"""
from __future__ import annotations

import torch

# Ã of every group together may take at most this many bytes (P and Clenshaw's two buffers take 3× more while
# a call runs); a graph over it runs the recursion (the registry's ``dense_blocks`` fact).
DENSE_MAX_BYTES = 64 * 2**20


def bucket(size: int) -> int:
    """The padded size of a block of ``size`` nodes: the next power of two up to 32 (small products cost their
    call, not their FLOPs, so few groups matter more than padding), then rounded up to a multiple of an eighth of
    its power-of-two octave (≤ 25 % padding per side)."""
    if size <= 32:
        return 1 << max(size - 1, 0).bit_length()
    step = 1 << (size.bit_length() - 3)
    return -(-size // step) * step


def group_shapes(block_sizes: list[int]) -> tuple[tuple[int, int], ...]:
    """((G, n), ...) of the groups the blocks of these sizes fall into, by increasing n (empty blocks skipped)."""
    counts: dict[int, int] = {}
    for size in block_sizes:
        if size > 0:
            counts[bucket(size)] = counts.get(bucket(size), 0) + 1
    return tuple((counts[n], n) for n in sorted(counts))


def fits(shapes: tuple[tuple[int, int], ...], element_size: int) -> bool:
    """Whether the dense Ã of groups of these shapes stays within ``DENSE_MAX_BYTES``."""
    return sum(g * n * n for g, n in shapes) * element_size <= DENSE_MAX_BYTES


def dense_groups(block_ptr: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                 val: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Ã = L̂ − I per group, from the CSR of L̂ = 2L/λ_max (no cross-block edges). block_ptr (B+1,) on the CPU.

    Returns (blocks, rows): blocks[i] (G, n, n) in val's dtype; rows[i] the (G·n,) int64 node of each padded
    position (padding positions: N, N + 1, ..., distinct across groups), or an empty tensor when the group is
    every node in order (uniform blocks: x and y are used as views, no gather).
    """
    num_nodes = crow.numel() - 1
    device = val.device
    sizes = (block_ptr[1:] - block_ptr[:-1]).tolist()
    starts = block_ptr[:-1].tolist()
    shapes = group_shapes(sizes)
    # Per node: its group, its block's slot in the group, its local index (all on the CPU, then moved once).
    node_group = torch.empty(num_nodes, dtype=torch.int64)
    node_slot = torch.empty(num_nodes, dtype=torch.int64)
    node_local = torch.empty(num_nodes, dtype=torch.int64)
    group_of_size = {n: i for i, (_, n) in enumerate(shapes)}
    filled = [0] * len(shapes)
    rows = [torch.full((g * n,), -1, dtype=torch.int64) for g, n in shapes]
    for start, size in zip(starts, sizes):
        if size == 0:
            continue
        gi = group_of_size[bucket(size)]
        n = shapes[gi][1]
        slot = filled[gi]
        filled[gi] += 1
        node_group[start:start + size] = gi
        node_slot[start:start + size] = slot
        node_local[start:start + size] = torch.arange(size)
        rows[gi][slot * n:slot * n + size] = torch.arange(start, start + size)
    padding = num_nodes
    for index in rows:
        empty = index < 0
        index[empty] = torch.arange(padding, padding + int(empty.sum()))
        padding += int(empty.sum())
    node_group, node_slot, node_local = (t.to(device) for t in (node_group, node_slot, node_local))
    edge_row = torch.repeat_interleave(torch.arange(num_nodes, device=device), crow[1:] - crow[:-1])
    blocks = []
    for gi, (g, n) in enumerate(shapes):
        dense = torch.zeros(g, n, n, dtype=val.dtype, device=device)
        on_edge = node_group[edge_row] == gi
        r, c = edge_row[on_edge], col[on_edge]
        dense.index_put_((node_slot[r], node_local[r], node_local[c]), val[on_edge], accumulate=True)
        mine = (node_group == gi).nonzero().squeeze(1)
        dense[node_slot[mine], node_local[mine], node_local[mine]] -= 1.0
        blocks.append(dense)
    uniform = len(shapes) == 1 and shapes[0][0] * shapes[0][1] == num_nodes
    rows = [torch.empty(0, dtype=torch.int64, device=device)] if uniform else [r.to(device) for r in rows]
    return blocks, rows


def materialize(blocks: torch.Tensor, rows: torch.Tensor, coeffs: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """P = p(Ã) = Σ_m c_m T_m(Ã) for one group by Clenshaw's recurrence (K − 1 batched products):
    b_K = c_K, b_k = c_k + 2Ã b_{k+1} − b_{k+2}, P = c_0 + Ã b_1 − b_2. blocks (G, n, n), coeffs (K+1,) with
    K ≥ 1, both in the accumulation dtype; rows as from ``dense_groups``. Padding columns of P are zero."""
    order = coeffs.numel() - 1
    g, n, _ = blocks.shape
    if order == 1:
        poly = blocks * coeffs[1]
        poly.diagonal(dim1=1, dim2=2).add_(coeffs[0])
    else:
        b2 = torch.zeros_like(blocks)
        b2.diagonal(dim1=1, dim2=2).copy_(coeffs[order].expand(g, n))  # b_K
        b1 = blocks * (2.0 * coeffs[order])                              # b_{K−1} = 2Ã b_K + c_{K−1}
        b1.diagonal(dim1=1, dim2=2).add_(coeffs[order - 1])
        for k in range(order - 2, 0, -1):
            b2.baddbmm_(blocks, b1, beta=-1.0, alpha=2.0)  # b_k, in b_{k+2}'s buffer
            b2.diagonal(dim1=1, dim2=2).add_(coeffs[k])
            b1, b2 = b2, b1
        poly = b2.baddbmm_(blocks, b1, beta=-1.0)  # Ã b_1 − b_2
        poly.diagonal(dim1=1, dim2=2).add_(coeffs[0])
    if rows.numel():
        poly.mul_((rows < num_nodes).to(poly.dtype).view(g, 1, n))
    return poly


def apply(x: torch.Tensor, blocks: list[torch.Tensor], rows: list[torch.Tensor],
          coeffs: torch.Tensor) -> torch.Tensor:
    """y = P x for every group: x (N, d) any strides and dtype, coeffs (K+1,) with K ≥ 1; returns y (N, d) in
    coeffs' dtype (the accumulation dtype), contiguous."""
    acc = coeffs.dtype
    num_nodes, d = x.shape
    xs = x.to(acc)
    if len(rows) == 1 and rows[0].numel() == 0:  # every node in order: views, no gather
        g, n, _ = blocks[0].shape
        poly = materialize(blocks[0], rows[0], coeffs, num_nodes)
        return torch.bmm(poly, xs.reshape(g, n, d)).reshape(num_nodes, d)
    padded = sum(group.shape[0] * group.shape[1] for group in blocks)
    out = torch.empty(max(padded, num_nodes), d, dtype=acc, device=x.device)  # rows ≥ N: padding, dropped
    for group, index in zip(blocks, rows):
        g, n, _ = group.shape
        poly = materialize(group, index, coeffs, num_nodes)
        gathered = xs.index_select(0, index.clamp(max=num_nodes - 1)).view(g, n, d)
        out.index_copy_(0, index, torch.bmm(poly, gathered).view(g * n, d))
    return out[:num_nodes]
