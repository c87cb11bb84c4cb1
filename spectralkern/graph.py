"""Parameter graphs: N nodes (rows of a parameter) in B ragged blocks, with symmetric non-negative edge weights.

Storage is a symmetric edge list (both directions, no self-loops, strictly positive weights) plus the block
offsets ``block_ptr`` (length B+1). Most edges live inside blocks; edges between blocks are allowed and make the
graph block-sparse instead of block-diagonal (``has_cross_block_edges``). Self-loops given to a builder are
ignored, as ``scipy.sparse.csgraph.laplacian`` ignores them.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse
import torch

from ._checks import (block_ptr_from_size, check_block_ptr, check_finite, check_has_data, check_positive_int,
                      check_tensor)

_FLOAT = (torch.float32, torch.float64)


def _resolve_blocks(num_nodes: int, block_size: int | None,
                    block_ptr: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    if block_size is not None and block_ptr is not None:
        raise ValueError("give block_size or block_ptr, not both")
    if block_ptr is not None:
        return check_block_ptr(block_ptr, num_nodes)
    if block_size is not None:
        return block_ptr_from_size(num_nodes, block_size)
    return torch.tensor([0, num_nodes], dtype=torch.int64)


def _node_block(block_ptr: torch.Tensor, num_nodes: int, device: torch.device) -> torch.Tensor:
    """Block index of every node, shape (N,)."""
    nodes = torch.arange(num_nodes, dtype=torch.int64)
    return (torch.searchsorted(block_ptr, nodes, right=True) - 1).to(device)


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row divided by its norm (zero rows stay zero), for any scale the dtype holds: a row is first divided
    by its largest |entry|, so the sum of squares can neither overflow (rows of 1e20 in float32) nor underflow to
    zero (rows of 1e-23), which would turn the row into an isolated node."""
    big = rows.abs().amax(dim=1, keepdim=True) if rows.shape[1] else rows.new_zeros(rows.shape[0], 1)
    scaled = torch.where(big > 0, rows / torch.where(big > 0, big, 1), torch.zeros_like(rows))
    norms = scaled.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, scaled / torch.where(norms > 0, norms, 1), torch.zeros_like(rows))


def symmetrize_max(num_nodes: int, row: torch.Tensor, col: torch.Tensor,
                   weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Union of (i, j) and (j, i) with the larger weight; drops self-loops and zero weights; sorted by (row, col)."""
    keep = (row != col) & (weight > 0)
    row, col, weight = row[keep], col[keep], weight[keep]
    both_row = torch.cat([row, col])
    both_col = torch.cat([col, row])
    key = both_row * num_nodes + both_col
    unique_key, inverse = torch.unique(key, sorted=True, return_inverse=True)
    merged = torch.zeros(unique_key.numel(), dtype=weight.dtype, device=weight.device)
    merged.scatter_reduce_(0, inverse, torch.cat([weight, weight]), reduce="amax", include_self=False)
    return unique_key // num_nodes, unique_key % num_nodes, merged


class ParameterGraph:
    """A weighted undirected graph over the N rows of a parameter, grouped into B ragged blocks.

    Attributes:
        num_nodes: N.
        block_ptr: (B+1,) int64 on the CPU; block b holds nodes ``block_ptr[b]:block_ptr[b+1]`` (may be empty).
        row, col, weight: (E,) symmetric edge list, both directions stored, sorted by (row, col).
    Build one with ``knn``, ``chain``, ``from_dense`` or ``from_scipy``.

    Graphs are constants of the optimisation, not functions of it: every builder detaches its input (a weight or
    adjacency with ``requires_grad`` gives a graph without autograd history), so a Laplacian and everything
    computed from it — ``laplacian_quadratic`` included — can be used in any number of backward passes.
    Tensors on the ``meta`` device are refused (a ValueError naming the argument).
    """

    def __init__(self, num_nodes: int, block_ptr: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                 weight: torch.Tensor):
        check_has_data("weight", weight)
        self.num_nodes = num_nodes
        self.block_ptr = block_ptr
        # A graph is data, not part of an autograd graph: a weight that requires grad would make every Laplacian
        # built from it (and laplacian_quadratic's output) hold a graph that one backward frees.
        self.row, self.col, self.weight = row, col, weight.detach()

    # ----------------------------------------------------------------------------------------- builders
    @classmethod
    def knn(cls, weight: torch.Tensor, k: int = 8, *, block_size: int | None = None,
            block_ptr: torch.Tensor | Sequence[int] | None = None) -> ParameterGraph:
        """Cosine k-nearest-neighbour graph of the rows of ``weight`` (out × in), inside each block.

        Each node links to its k most cosine-similar rows of the same block (ties broken by lower index, so the
        result is deterministic), edge weight max(cos, 0) ∈ [0, 1]; the graph is symmetrised with the larger
        weight of (i, j) and (j, i). All-zero rows become isolated nodes. Weights are float64 when ``weight``
        is float64, float32 otherwise.
        """
        check_tensor("weight", weight, ndim=2, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
        check_has_data("weight", weight)
        check_positive_int("k", k)
        check_finite("weight", weight)
        num_nodes = weight.shape[0]
        ptr = _resolve_blocks(num_nodes, block_size, block_ptr)
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        unit = _unit_rows(weight.detach().to(dtype))
        rows_out, cols_out, weights_out = [], [], []
        for start, stop in zip(ptr[:-1].tolist(), ptr[1:].tolist()):
            n = stop - start
            kk = min(k, n - 1)
            if kk <= 0:
                continue
            block = unit[start:stop]
            sim = block @ block.T
            sim.fill_diagonal_(-torch.inf)
            order = torch.sort(-sim, dim=1, stable=True).indices[:, :kk]
            rows_out.append(torch.arange(n, device=sim.device).repeat_interleave(kk) + start)
            cols_out.append(order.reshape(-1) + start)
            weights_out.append(sim.gather(1, order).reshape(-1).clamp(0.0, 1.0))
        device = weight.device
        if not rows_out:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return cls(num_nodes, ptr, empty, empty.clone(), torch.empty(0, dtype=dtype, device=device))
        row, col, w = symmetrize_max(num_nodes, torch.cat(rows_out), torch.cat(cols_out), torch.cat(weights_out))
        return cls(num_nodes, ptr, row, col, w)

    @classmethod
    def chain(cls, num_nodes: int, *, block_size: int | None = None,
              block_ptr: torch.Tensor | Sequence[int] | None = None, weight: float = 1.0,
              link_blocks: bool = False, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> ParameterGraph:
        """Path graph i — i+1 inside each block (adjacent units); ``link_blocks`` also joins the last node of
        each block to the first node of the next non-empty block (cross-block edges)."""
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 0:
            raise ValueError(f"num_nodes must be a non-negative int, got {num_nodes!r}")
        if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        if dtype not in _FLOAT:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        ptr = _resolve_blocks(num_nodes, block_size, block_ptr)
        left = torch.arange(max(num_nodes - 1, 0), dtype=torch.int64)
        node_block = _node_block(ptr, num_nodes, torch.device("cpu"))
        if not link_blocks:
            left = left[node_block[left] == node_block[left + 1]]
        device = torch.device(device) if device is not None else torch.device("cpu")
        row, col, w = symmetrize_max(num_nodes, left, left + 1, torch.full(left.shape, float(weight), dtype=dtype))
        return cls(num_nodes, ptr, row.to(device), col.to(device), w.to(device))

    @classmethod
    def from_dense(cls, adjacency: torch.Tensor, *,
                   block_ptr: torch.Tensor | Sequence[int] | None = None) -> ParameterGraph:
        """Graph from a dense symmetric non-negative (N × N) adjacency; the diagonal is ignored. The graph holds
        a detached copy of the weights (graphs are never differentiated through; see ``ParameterGraph``)."""
        check_tensor("adjacency", adjacency, ndim=2, dtypes=_FLOAT)
        check_has_data("adjacency", adjacency)
        adjacency = adjacency.detach()
        n = adjacency.shape[0]
        if adjacency.shape[1] != n:
            raise ValueError(f"adjacency must be square, got shape {tuple(adjacency.shape)}")
        _check_weights("adjacency", adjacency)
        asym = (adjacency - adjacency.T).abs()
        scale = float(adjacency.abs().max()) if adjacency.numel() else 0.0
        if adjacency.numel() and float(asym.max()) > 1e-6 * max(scale, 1e-30):
            i, j = divmod(int(asym.argmax()), n)
            raise ValueError(f"adjacency must be symmetric; adjacency[{i}, {j}] = {float(adjacency[i, j])} but "
                             f"adjacency[{j}, {i}] = {float(adjacency[j, i])}")
        ptr = _resolve_blocks(n, None, block_ptr)
        row, col = torch.nonzero(adjacency, as_tuple=True)
        w = adjacency[row, col]
        row, col, w = symmetrize_max(n, row, col, w)
        return cls(n, ptr, row, col, w)

    @classmethod
    def from_scipy(cls, matrix: scipy.sparse.sparray | scipy.sparse.spmatrix | np.ndarray, *,
                   block_ptr: torch.Tensor | Sequence[int] | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> ParameterGraph:
        """Graph from a scipy sparse (or numpy dense) symmetric non-negative N × N adjacency; diagonal ignored."""
        if isinstance(matrix, np.ndarray):
            matrix = scipy.sparse.coo_array(matrix)
        if not scipy.sparse.issparse(matrix):
            raise TypeError(f"matrix must be a scipy sparse matrix/array or numpy array, got {type(matrix).__name__}")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {matrix.shape}")
        if matrix.dtype.kind not in "biuf":
            raise TypeError(f"matrix must have a real (bool, int or float) dtype, got {matrix.dtype}")
        coo = scipy.sparse.coo_array(matrix)
        coo.sum_duplicates()
        if dtype is None:
            dtype = torch.float64 if coo.dtype == np.float64 else torch.float32
        if dtype not in _FLOAT:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        n = coo.shape[0]
        data = torch.as_tensor(np.asarray(coo.data, dtype=np.float64))
        _check_weights("matrix", data)
        # checked again in the dtype the graph stores: 1e300 is finite in float64 but inf in float32
        if not bool(torch.isfinite(data.to(dtype)).all()):
            raise ValueError(f"matrix has entries up to {float(data.abs().max()):.3g}, beyond the range of "
                             f"dtype={dtype} (largest {torch.finfo(dtype).max:.3g}); pass dtype=torch.float64 or "
                             f"rescale the weights")
        data = data.to(dtype)
        transposed = scipy.sparse.coo_array((coo.data, (coo.col, coo.row)), shape=coo.shape)
        diff = abs(coo.tocsr() - transposed.tocsr())
        scale = float(np.abs(coo.data).max()) if coo.nnz else 0.0
        if diff.nnz and float(diff.max()) > 1e-6 * max(scale, 1e-30):
            bad = scipy.sparse.coo_array(diff)
            at = int(np.argmax(bad.data))
            i, j = int(bad.row[at]), int(bad.col[at])
            raise ValueError(f"matrix must be symmetric; matrix[{i}, {j}] = {matrix.tocsr()[i, j]} but "
                             f"matrix[{j}, {i}] = {matrix.tocsr()[j, i]}")
        ptr = _resolve_blocks(n, None, block_ptr)
        row = torch.as_tensor(coo.row.astype(np.int64))
        col = torch.as_tensor(coo.col.astype(np.int64))
        row, col, w = symmetrize_max(n, row, col, data)
        device = torch.device(device) if device is not None else torch.device("cpu")
        return cls(n, ptr, row.to(device), col.to(device), w.to(device))

    # ------------------------------------------------------------------------------------- properties
    @property
    def num_blocks(self) -> int:
        return self.block_ptr.numel() - 1

    @property
    def block_sizes(self) -> torch.Tensor:
        """(B,) int64 on the CPU."""
        return self.block_ptr[1:] - self.block_ptr[:-1]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def num_edges(self) -> int:
        """Undirected edges (each stored twice)."""
        return self.row.numel() // 2

    @property
    def node_block(self) -> torch.Tensor:
        """(N,) block index of each node, on the graph's device."""
        return _node_block(self.block_ptr, self.num_nodes, self.device)

    @property
    def has_cross_block_edges(self) -> bool:
        node_block = self.node_block
        return bool((node_block[self.row] != node_block[self.col]).any())

    def degrees(self) -> torch.Tensor:
        """(N,) weighted degrees."""
        deg = torch.zeros(self.num_nodes, dtype=self.dtype, device=self.device)
        return deg.index_add_(0, self.row, self.weight)

    def __repr__(self) -> str:
        sizes = self.block_sizes
        span = f"{int(sizes.min())}..{int(sizes.max())}" if sizes.numel() else "-"
        return (f"ParameterGraph(nodes={self.num_nodes}, blocks={self.num_blocks} (sizes {span}), "
                f"edges={self.num_edges}, cross_block={self.has_cross_block_edges}, dtype={self.dtype}, "
                f"device={self.device})")

    # ---------------------------------------------------------------------------------- conversions
    def laplacian(self, normalized: bool = True) -> GraphLaplacian:
        """L = D − W, or (normalized, the default) I − D^{-1/2} W D^{-1/2}, exactly as
        ``scipy.sparse.csgraph.laplacian(W, normed=normalized)``: isolated nodes get a zero row and column."""
        deg = self.degrees()
        n = self.num_nodes
        nodes = torch.arange(n, device=self.device)
        if normalized:
            isolated = deg == 0
            inv_sqrt = torch.where(isolated, torch.zeros_like(deg), deg.clamp_min(torch.finfo(deg.dtype).tiny).rsqrt())
            off = -self.weight * inv_sqrt[self.row] * inv_sqrt[self.col]
            diag = (~isolated).to(deg.dtype)
        else:
            off = -self.weight
            diag = deg
        keep = diag != 0
        row = torch.cat([self.row, nodes[keep]])
        col = torch.cat([self.col, nodes[keep]])
        val = torch.cat([off, diag[keep]])
        coo = torch.sparse_coo_tensor(torch.stack([row, col]), val, (n, n), check_invariants=False)
        with warnings.catch_warnings():  # "sparse CSR support is in beta" on every conversion
            warnings.simplefilter("ignore", UserWarning)
            matrix = coo.coalesce().to_sparse_csr()
        return GraphLaplacian(matrix, self.block_ptr, normalized, self.has_cross_block_edges)

    def to_scipy(self) -> scipy.sparse.csr_array:
        """The adjacency W as a scipy CSR array (float64)."""
        return scipy.sparse.csr_array(
            (self.weight.double().cpu().numpy(), (self.row.cpu().numpy(), self.col.cpu().numpy())),
            shape=(self.num_nodes, self.num_nodes))

    def to_dense(self) -> torch.Tensor:
        """The adjacency W as a dense (N × N) tensor."""
        dense = torch.zeros(self.num_nodes, self.num_nodes, dtype=self.dtype, device=self.device)
        dense[self.row, self.col] = self.weight
        return dense

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ParameterGraph:
        if dtype is not None and dtype not in _FLOAT:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        return ParameterGraph(self.num_nodes, self.block_ptr, self.row.to(device), self.col.to(device),
                              self.weight.to(device=device, dtype=dtype))


def _check_weights(name: str, values: torch.Tensor) -> None:
    check_finite(name, values)
    if values.numel() and float(values.min()) < 0:
        raise ValueError(f"{name} must be non-negative (edge weights); its smallest entry is {float(values.min())}")


class GraphLaplacian:
    """A graph Laplacian in CSR form, with the block layout of the graph it came from.

    ``L @ X`` multiplies an (N,) or (N, d) tensor (any float dtype; computed in L's dtype, returned in X's).
    """

    def __init__(self, matrix: torch.Tensor, block_ptr: torch.Tensor, normalized: bool, cross_block: bool):
        check_has_data("matrix", matrix)
        self.matrix = matrix.detach()
        self.block_ptr = block_ptr
        self.normalized = normalized
        self.has_cross_block_edges = cross_block

    @property
    def num_nodes(self) -> int:
        return self.matrix.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.block_ptr.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    def __repr__(self) -> str:
        kind = "normalized" if self.normalized else "combinatorial"
        return (f"GraphLaplacian({kind}, nodes={self.num_nodes}, blocks={self.num_blocks}, "
                f"nnz={self.matrix.values().numel()}, dtype={self.dtype}, device={self.device})")

    def spectrum_bound(self) -> float:
        """An upper bound on the largest eigenvalue: 2 when normalized, Gershgorin's max_i 2·L_ii otherwise."""
        if self.normalized:
            return 2.0
        diag = self.diagonal()
        return 2.0 * float(diag.max()) if diag.numel() else 0.0

    def diagonal(self) -> torch.Tensor:
        crow, col, val = self.matrix.crow_indices(), self.matrix.col_indices(), self.matrix.values()
        row = torch.repeat_interleave(torch.arange(self.num_nodes, device=self.device), crow[1:] - crow[:-1])
        diag = torch.zeros(self.num_nodes, dtype=self.dtype, device=self.device)
        on_diag = row == col
        return diag.index_add_(0, row[on_diag], val[on_diag])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=(1, 2))
        if x.shape[0] != self.num_nodes:
            raise ValueError(f"x must have {self.num_nodes} rows (the Laplacian has {self.num_nodes} nodes), "
                             f"got shape {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the Laplacian is on {self.device}; use L.to(x.device)")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        vector = x.dim() == 1
        dense = (x.unsqueeze(1) if vector else x).to(self.dtype)
        out = torch.sparse.mm(self.matrix, dense).to(x.dtype)
        return out.squeeze(1) if vector else out

    __matmul__ = matmul

    def to_dense(self) -> torch.Tensor:
        return self.matrix.to_dense()

    def to_scipy(self) -> scipy.sparse.csr_array:
        return scipy.sparse.csr_array(
            (self.matrix.values().double().cpu().numpy(), self.matrix.col_indices().cpu().numpy(),
             self.matrix.crow_indices().cpu().numpy()), shape=(self.num_nodes, self.num_nodes))

    def diagonal_blocks(self, pad_value: float = 0.0) -> torch.Tensor:
        """The B diagonal blocks as one padded (B, n_max, n_max) tensor; padding rows/columns are zero with
        ``pad_value`` on their diagonal (so padded eigenvalues can be pushed above the spectrum)."""
        sizes = self.block_ptr[1:] - self.block_ptr[:-1]
        n_max = int(sizes.max()) if sizes.numel() else 0
        num_blocks = self.num_blocks
        coo = self.matrix.to_sparse_coo().coalesce()
        row, col = coo.indices()
        val = coo.values()
        node_block = _node_block(self.block_ptr, self.num_nodes, self.device)
        starts = self.block_ptr[:-1].to(self.device)
        inside = node_block[row] == node_block[col]
        block = node_block[row[inside]]
        local_r = row[inside] - starts[block]
        local_c = col[inside] - starts[block]
        out = torch.zeros(num_blocks, n_max, n_max, dtype=self.dtype, device=self.device)
        local = torch.arange(n_max, device=self.device)
        padding = local.unsqueeze(0) >= sizes.to(self.device).unsqueeze(1)  # (B, n_max)
        out.diagonal(dim1=1, dim2=2).copy_(padding.to(self.dtype) * pad_value)
        out[block, local_r, local_c] = val[inside]
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GraphLaplacian:
        if dtype is not None and dtype not in _FLOAT:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        return GraphLaplacian(self.matrix.to(device=device, dtype=dtype), self.block_ptr, self.normalized,
                              self.has_cross_block_edges)
