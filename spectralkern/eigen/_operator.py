"""The flipped operator A = c·I − L on a padded batch of items, applied to (G, n_pad, p) blocks of vectors.

An *item* is a sorted set of nodes of one output block (the whole block, or the part of it that the Krylov
solver handles), padded to ``n_pad`` rows. Row i of item g is node ``node_map[g, i]`` (−1: padding). Padding
rows and columns of the operator are zero, so a vector that is zero on the padding stays zero there: the
Krylov vectors never leak out of their item.

Two storages, one ``apply``:
    dense   (G, n_pad, n_pad) blocks; A X is one ``baddbmm`` (fastest for small items on CPU and GPU);
    csr     one CSR matrix of size (G·n_pad)² with the items on its diagonal; A X is one ``sparse.addmm`` over
            the (G·n_pad, p) view of X (large items, and the single global item of a graph with cross-block
            edges). Items that follow L's node order (whole blocks) need no sort to build it.
"""
from __future__ import annotations

import warnings

import torch


def coo_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Row index of every stored entry of a CSR matrix, (nnz,)."""
    crow = matrix.crow_indices()
    rows = torch.arange(matrix.shape[0], device=crow.device)
    return torch.repeat_interleave(rows, crow[1:] - crow[:-1])


def node_positions(node_map: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of L's nodes sits in a (G, n_pad) node map: its item (−1: in none) and its row there, both
    (num_nodes,) int64 on the node map's device."""
    num_items, n_pad = node_map.shape
    device = node_map.device
    item_of = torch.full((num_nodes,), -1, dtype=torch.int64, device=device)
    local_of = torch.zeros(num_nodes, dtype=torch.int64, device=device)
    present = node_map >= 0
    nodes = node_map[present]
    item_of[nodes] = torch.arange(num_items, device=device).unsqueeze(1).expand(-1, n_pad)[present]
    local_of[nodes] = torch.arange(n_pad, device=device).unsqueeze(0).expand(num_items, -1)[present]
    return item_of, local_of


class PaddedOperator:
    """A = shift·I − L restricted to G padded items; see the module docstring.

    ``row``/``col`` are item-local coordinates of every stored entry that lies inside an item, ``item`` the
    item it belongs to; they are kept so that ``restrict`` can rebuild the operator for a subset of items.
    """

    def __init__(self, item: torch.Tensor, row: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                 num_items: int, n_pad: int, shift: float, kind: str):
        self.item, self.row, self.col, self.val = item, row, col, val
        self.num_items, self.n_pad, self.shift, self.kind = num_items, n_pad, shift, kind
        device, dtype = val.device, val.dtype
        if kind == "dense":
            self.blocks = torch.zeros(num_items, n_pad, n_pad, dtype=dtype, device=device)
            self.blocks[item, row, col] = val
        elif kind == "csr":
            size = num_items * n_pad
            flat_row = item * n_pad + row
            flat_col = item * n_pad + col
            if flat_row.numel() > 1 and not bool((flat_row[1:] >= flat_row[:-1]).all()):
                order = torch.sort(flat_row, stable=True).indices  # items that interleave in L's node order
                flat_row, flat_col, val = flat_row[order], flat_col[order], val[order]
            counts = torch.bincount(flat_row, minlength=size)
            crow = torch.zeros(size + 1, dtype=torch.int64, device=device)
            torch.cumsum(counts, 0, out=crow[1:])
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self.matrix = torch.sparse_csr_tensor(crow, flat_col, val, (size, size))
        else:
            raise ValueError(f"kind must be 'dense' or 'csr', got {kind!r}")

    @classmethod
    def build(cls, matrix: torch.Tensor, node_map: torch.Tensor, shift: float, kind: str) -> PaddedOperator:
        """From L (CSR, N × N) and the items' node map (G, n_pad) int64 on L's device (−1: padding).

        Entries of L whose row and column are not in the same item are dropped: items are unions of connected
        components (or whole blocks of a block-diagonal L), so no entry of L links two items.
        """
        num_items, n_pad = node_map.shape
        item_of, local_of = node_positions(node_map, matrix.shape[0])
        r, c, v = coo_rows(matrix), matrix.col_indices(), matrix.values()
        inside = (item_of[r] >= 0) & (item_of[r] == item_of[c])
        r, c, v = r[inside], c[inside], v[inside]
        return cls(item_of[r], local_of[r], local_of[c], v, num_items, n_pad, shift, kind)

    def restrict(self, keep: torch.Tensor, n_pad: int | None = None, kind: str | None = None) -> PaddedOperator:
        """The operator of items ``keep`` (sorted (G',) int64), renumbered 0..G'−1, padded to ``n_pad`` rows
        (default: unchanged; a smaller one must still hold every kept item, as ``Items.subset`` ensures) and
        stored as ``kind`` (default: unchanged)."""
        new_index = torch.full((self.num_items,), -1, dtype=torch.int64, device=self.val.device)
        new_index[keep.to(self.val.device)] = torch.arange(keep.numel(), device=self.val.device)
        mine = new_index[self.item]
        sel = mine >= 0
        return PaddedOperator(mine[sel], self.row[sel], self.col[sel], self.val[sel], keep.numel(),
                              self.n_pad if n_pad is None else n_pad, self.shift, self.kind if kind is None else kind)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A X = shift·X − L X for X of shape (G, n_pad, p)."""
        if self.kind == "dense":
            return torch.baddbmm(x, self.blocks, x, beta=self.shift, alpha=-1.0)
        flat = x.reshape(-1, x.shape[-1])
        return torch.sparse.addmm(flat, self.matrix, flat, beta=self.shift, alpha=-1.0).view_as(x)

    def apply_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A applied to vectors stored as rows: (G, q, n_pad) -> (G, q, n_pad); (A xᵀ)ᵀ = x A since A = Aᵀ."""
        if self.kind == "dense":
            return torch.baddbmm(x, x, self.blocks, beta=self.shift, alpha=-1.0)
        return self.apply(x.mT.contiguous()).mT.contiguous()
