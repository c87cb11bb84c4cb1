"""Who solves what: blocks (or parts of blocks) become padded *items* for a dense or a Krylov solver, and the
solvers' eigenpairs are merged back into one block-packed basis.

Connected components of L's sparsity graph are invariant subspaces, so a block splits exactly into independent
problems. That is how repeated eigenvalues *across* components are handled — the zero eigenvalue of a graph
Laplacian has one eigenvector per component, and identical components share their whole spectrum — without
hoping that rounding reveals the multiplicity:
  - blocks that ``dense`` (the registry's choice per item size, see _choice) marks are solved whole by dense eigh
    (exact, multiplicities included);
  - in another block, its components, largest first, are grouped ``max_components`` at a time into Krylov
    items (a block Lanczos with block size ≥ the number of its components sees each repeated eigenvalue across
    them in exact arithmetic) as long as ``dense`` rejects a group, or each component ``dense`` rejects is its own
    item (``max_components=None``: the per-component scipy/cupy/native loops); no component ``dense`` rejects is
    ever solved densely;
  - every other component of that block (isolated nodes, small islands) is solved densely on its own.
Each output block then takes its k lowest pairs among all its items' pairs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch

from .._backend import backend_of
from ._native_csr import connected_components
from ._problem import Problem


@dataclass
class Items:
    """G padded items: row i of item g is node ``node_map[g, i]`` of L (−1: padding); nodes ascending."""

    node_map: torch.Tensor   # (G, n_pad) int64 on the problem's device
    owner: torch.Tensor      # (G,) int64, CPU: the output block of each item
    sizes: torch.Tensor      # (G,) int64, CPU: nodes per item

    @property
    def num_items(self) -> int:
        return self.owner.numel()

    def subset(self, index: torch.Tensor) -> Items:
        sizes = self.sizes[index]
        n_pad = max(int(sizes.max()), 1) if sizes.numel() else 1
        return Items(self.node_map[index.to(self.node_map.device), :n_pad], self.owner[index], sizes)

    def valid(self) -> torch.Tensor:
        """(G, n_pad) bool, True on real rows."""
        return self.node_map >= 0


def items_from_assignment(item_of_node: torch.Tensor, owner: torch.Tensor, device: torch.device) -> Items:
    """Items from a node → item map (N,) int64 CPU (−1: in no item); ``owner`` (G,) gives each item's block."""
    num_items = owner.numel()
    nodes = torch.nonzero(item_of_node >= 0).flatten()
    item = item_of_node[nodes]
    order = torch.sort(item, stable=True).indices
    nodes, item = nodes[order], item[order]
    sizes = torch.bincount(item, minlength=num_items)
    starts = torch.cumsum(sizes, 0) - sizes
    local = torch.arange(nodes.numel()) - starts[item]
    n_pad = max(int(sizes.max()), 1) if num_items else 1
    node_map = torch.full((num_items, n_pad), -1, dtype=torch.int64)
    node_map[item, local] = nodes
    return Items(node_map.to(device), owner, sizes)


@dataclass
class Plan:
    dense: Items | None
    krylov: Items | None


def _components(problem: Problem) -> np.ndarray:
    """Connected-component label of every node (isolated nodes are their own component): the compiled module's
    union-find where the registry picks it (4× faster here than scipy, which first adds the pattern's transpose),
    else scipy's."""
    m = problem.matrix
    n = problem.num_nodes
    if backend_of("connected_components", m.values()) == "native":
        return connected_components(m)
    structure = scipy.sparse.csr_array(
        (np.ones(m.col_indices().numel(), dtype=np.int8), m.col_indices().cpu().numpy(),
         m.crow_indices().cpu().numpy()), shape=(n, n))
    return scipy.sparse.csgraph.connected_components(structure, directed=False)[1]


def make_plan(problem: Problem, dense: Callable[[torch.Tensor], torch.Tensor], max_components: int | None) -> Plan:
    """Route blocks and components to the dense or the Krylov solver (see the module docstring); ``dense`` maps item
    sizes (G,) int64 to (G,) bool: solved densely."""
    sizes = problem.sizes
    device = problem.device
    node_block = problem.node_block()
    n = problem.num_nodes
    big_block = ~dense(sizes)
    dense_of = torch.full((n,), -1, dtype=torch.int64)
    krylov_of = torch.full((n,), -1, dtype=torch.int64)
    dense_owner: list[torch.Tensor] = []
    krylov_owner: list[torch.Tensor] = []

    # small blocks: one dense item each
    small = torch.nonzero((~big_block) & (sizes > 0)).flatten()
    if small.numel():
        index = torch.full((problem.num_blocks,), -1, dtype=torch.int64)
        index[small] = torch.arange(small.numel())
        dense_of = index[node_block]
        dense_owner.append(small)

    if bool(big_block.any()):
        label = torch.as_tensor(_components(problem).astype(np.int64))
        in_big = big_block[node_block]
        # components of the big blocks, renumbered 0..C−1; a component never spans two blocks
        comp_ids, comp_of_node = torch.unique(label[in_big], return_inverse=True)
        comp_size = torch.bincount(comp_of_node, minlength=comp_ids.numel())
        first_node = torch.full((comp_ids.numel(),), n, dtype=torch.int64).scatter_reduce(
            0, comp_of_node, torch.nonzero(in_big).flatten(), reduce="amin")
        comp_block = node_block[first_node]
        # rank of each component inside its block, largest first
        order = torch.sort(comp_size, descending=True, stable=True).indices
        order = order[torch.sort(comp_block[order], stable=True).indices]
        per_block = torch.bincount(comp_block[order], minlength=problem.num_blocks)
        starts = torch.cumsum(per_block, 0) - per_block
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel()) - starts[comp_block[order]]
        if max_components is None:   # one Krylov item per component that is too big for dense
            to_krylov = ~dense(comp_size)
            krylov_item = torch.cumsum(to_krylov.to(torch.int64), 0) - 1
        else:   # Krylov items of up to max_components components (a block's largest first), while too big
            group = rank // max_components      # for dense; the rest of the block's components go dense one by one
            key = comp_block * (int(group.max()) + 1) + group
            _, group_of_comp = torch.unique(key, return_inverse=True)
            group_nodes = torch.zeros(int(group_of_comp.max()) + 1, dtype=torch.int64).index_add_(
                0, group_of_comp, comp_size)
            to_krylov = ~dense(group_nodes)[group_of_comp]
            groups_used = torch.unique(group_of_comp[to_krylov])
            group_item = torch.full((group_nodes.numel(),), -1, dtype=torch.int64)
            group_item[groups_used] = torch.arange(groups_used.numel())
            krylov_item = group_item[group_of_comp]
        krylov_comps = torch.nonzero(to_krylov).flatten()
        if krylov_comps.numel():
            item_of_comp = torch.where(to_krylov, krylov_item, torch.full_like(krylov_item, -1))
            big_nodes = torch.nonzero(in_big).flatten()
            krylov_of[big_nodes] = item_of_comp[comp_of_node]
            owners = torch.zeros(int(krylov_item[to_krylov].max()) + 1, dtype=torch.int64)
            owners[krylov_item[to_krylov]] = comp_block[to_krylov]
            krylov_owner.append(owners)
        dense_comps = torch.nonzero(~to_krylov).flatten()
        if dense_comps.numel():
            offset = sum(o.numel() for o in dense_owner)
            item_of_comp = torch.full((comp_ids.numel(),), -1, dtype=torch.int64)
            item_of_comp[dense_comps] = torch.arange(dense_comps.numel()) + offset
            big_nodes = torch.nonzero(in_big).flatten()
            mapped = item_of_comp[comp_of_node]
            dense_of[big_nodes[mapped >= 0]] = mapped[mapped >= 0]
            dense_owner.append(comp_block[dense_comps])

    dense = items_from_assignment(dense_of, torch.cat(dense_owner), device) if dense_owner else None
    krylov = items_from_assignment(krylov_of, torch.cat(krylov_owner), device) if krylov_owner else None
    return Plan(dense, krylov)


@dataclass
class Candidates:
    """Eigenpairs found for a set of items: item g offers its first ``count[g]`` columns."""

    items: Items
    values: torch.Tensor       # (G, q)
    vectors: torch.Tensor      # (G, n_pad, q)
    count: torch.Tensor        # (G,) int64, CPU
    converged: torch.Tensor    # (G, q) bool
    iterations: torch.Tensor   # (G,) int64, CPU
    matvecs: torch.Tensor      # (G,) int64, CPU


@dataclass
class Merged:
    U: torch.Tensor            # (N, k)
    eigenvalues: torch.Tensor  # (B, k)
    converged: torch.Tensor    # (B, k) bool, CPU
    iterations: torch.Tensor   # (B,) int64, CPU
    matvecs: torch.Tensor      # (B,) int64, CPU


def merge(problem: Problem, k: int, parts: list[Candidates]) -> Merged:
    """Each block's k lowest pairs among its items' pairs, packed as SpectralBasis expects."""
    device, dtype = problem.device, problem.dtype
    num_blocks = problem.num_blocks
    eigenvalues = torch.zeros(num_blocks, k, dtype=dtype, device=device)
    converged = torch.zeros(num_blocks, k, dtype=torch.bool)
    iterations = torch.zeros(num_blocks, dtype=torch.int64)
    matvecs = torch.zeros(num_blocks, dtype=torch.int64)
    entries = []  # (part, item, column, owner, value) of every offered pair
    for index, part in enumerate(parts):
        num_items, q = part.values.shape
        if num_items == 0 or q == 0:
            continue
        col = torch.arange(q).unsqueeze(0).expand(num_items, q)
        item = torch.arange(num_items).unsqueeze(1).expand(num_items, q)
        offered = col < part.count.unsqueeze(1)
        item, col = item[offered], col[offered]
        entries.append((torch.full_like(item, index), item, col, part.items.owner[item],
                        part.values.detach().cpu().double()[item, col]))
        iterations.scatter_reduce_(0, part.items.owner, part.iterations, reduce="amax")
        matvecs.index_add_(0, part.items.owner, part.matvecs)
    if not entries:
        return Merged(torch.zeros(problem.num_nodes, k, dtype=dtype, device=device), eigenvalues, converged,
                      iterations, matvecs)
    which, item, col, owner, value = (torch.cat(t) for t in zip(*entries))
    order = torch.sort(value, stable=True).indices
    order = order[torch.sort(owner[order], stable=True).indices]
    which, item, col, owner = which[order], item[order], col[order], owner[order]
    per_block = torch.bincount(owner, minlength=num_blocks)
    rank = torch.arange(owner.numel()) - (torch.cumsum(per_block, 0) - per_block)[owner]
    take = rank < k
    which, item, col, owner, rank = which[take], item[take], col[take], owner[take], rank[take]
    # Every part's vectors are scattered in one pass: the entry (item g, row i, column c) goes to U[node, rank]
    # when pair (g, c) was taken and row i is a node; everything else goes to one spare slot past the end
    # (boolean-mask indexing of the (G, n_pad, q) block cost ~1 s for 1024 blocks × 128 nodes × 64 pairs).
    flat_U = torch.zeros(problem.num_nodes * k + 1, dtype=dtype, device=device)
    spare = problem.num_nodes * k
    for index, part in enumerate(parts):
        mine = which == index
        if not bool(mine.any()):
            continue
        it, c, b, r = item[mine], col[mine], owner[mine], rank[mine]
        it_d, c_d = it.to(device), c.to(device)
        eigenvalues[b.to(device), r.to(device)] = part.values[it_d, c_d]
        converged[b, r] = part.converged[it_d, c_d].cpu()
        dest = torch.full(part.values.shape, -1, dtype=torch.int64, device=device)   # (G, q) rank or −1
        dest[it_d, c_d] = r.to(device)
        nodes = part.items.node_map.unsqueeze(-1)                                     # (G, n_pad, 1)
        target = torch.where((nodes >= 0) & (dest.unsqueeze(1) >= 0), nodes * k + dest.unsqueeze(1), spare)
        flat_U.scatter_(0, target.reshape(-1), part.vectors.reshape(-1))
    U = flat_U[:spare].view(problem.num_nodes, k)
    return Merged(U, eigenvalues, converged, iterations, matvecs)
