"""Row shards of parameters under FSDP2 / DTensor, and block layouts whose blocks never straddle them.

FSDP2 (``fully_shard``) shards every parameter along dim 0 — the node dimension of our graphs — with
``torch.chunk`` semantics: with W ranks, c = ceil(N / W) rows per chunk, and rank r holds rows
[min(r·c, N), min((r+1)·c, N)). The last ranks may hold fewer rows, or none (N = 33, W = 2: 17 + 16;
N = 5, W = 4: 2, 2, 1, 0). A block-diagonal graph whose blocks are cut at those boundaries filters, solves and
regularises every block on the rank that owns its rows, with no communication.

``aligned_block_ptr`` builds such a layout: blocks of ``block_size`` rows laid from every boundary of the
shard layouts of one or more world sizes (cutting at the boundaries of 1, 2 and 4 ranks lets one checkpoint
resume on any of them). ``check_block_alignment`` / ``local_block_ptr`` reject a layout with a block that
straddles a boundary, naming the block, the boundary and the fix.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._checks import check_positive_int


class StraddlingBlockError(ValueError):
    """A graph block holds rows of two ranks: filtering or solving it would need communication."""


def shard_bounds(num_rows: int, world_size: int) -> list[int]:
    """Row offsets (W+1 entries) of FSDP2's dim-0 shards: rank r holds rows bounds[r]:bounds[r+1]."""
    check_positive_int("world_size", world_size)
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
    chunk = -(-num_rows // world_size)
    return [min(r * chunk, num_rows) for r in range(world_size + 1)]


def aligned_block_ptr(num_rows: int, block_size: int, world_sizes: Iterable[int] = (1,)) -> torch.Tensor:
    """Block offsets (B+1,) int64: blocks of ``block_size`` rows laid from each shard boundary of every world size
    in ``world_sizes`` (the last block before a boundary may be shorter). With world_sizes=(1,) this is the plain
    ``block_size`` layout; when N is a multiple of W·block_size the W-rank layout equals it too."""
    check_positive_int("block_size", block_size)
    sizes = [check_positive_int("world_sizes entry", w) for w in world_sizes] or [1]
    cuts = sorted({b for w in sizes for b in shard_bounds(num_rows, w)})
    ptr = [0]
    for start, stop in zip(cuts[:-1], cuts[1:]):
        ptr += list(range(start + block_size, stop, block_size)) + [stop]
    return torch.tensor(ptr if num_rows else [0, 0], dtype=torch.int64)


def straddle_message(name: str, block: str, start: int, stop: int, cut: int, bounds: list[int]) -> str:
    """The error for ``block`` (e.g. "block 2") of ``name`` holding rows start:stop across boundary ``cut``."""
    rank = next(r for r in range(len(bounds) - 1) if bounds[r] < cut <= bounds[r + 1])
    world = len(bounds) - 1
    return (f"{block} of {name} (rows {start}:{stop}) straddles the shard boundary at row {cut} between "
            f"rank {rank} (rows {bounds[rank]}:{bounds[rank + 1]}) and rank {rank + 1} (rows "
            f"{bounds[rank + 1]}:{bounds[rank + 2]}) of the {world}-rank FSDP2 layout (torch.chunk along dim 0); "
            f"filtering it would need rows of two ranks. Fix: build the filter (or graph) with blocks cut at the "
            f"{world}-rank boundaries — SpectralGradientFilter(..., align_shards=({world},)) or "
            f"aligned_block_ptr({bounds[-1]}, block_size, ({world},)) — or pick a block size that divides the "
            f"shard size ({bounds[1]} rows)")


def check_block_alignment(block_ptr: torch.Tensor, world_size: int, name: str = "the parameter") -> None:
    """Raise ``StraddlingBlockError`` if a block of ``block_ptr`` (over N = block_ptr[-1] rows) holds rows of two
    ranks of a ``world_size``-rank FSDP2 layout."""
    ptr = block_ptr.tolist()
    bounds = shard_bounds(ptr[-1], world_size)
    for cut in bounds[1:-1]:
        for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
            if start < cut < stop:
                raise StraddlingBlockError(straddle_message(name, f"block {b}", start, stop, cut, bounds))


@dataclass(frozen=True)
class RowShard:
    """The rows of a dim-0-sharded DTensor that this rank holds.

    Attributes:
        num_rows: N, the global row count.
        start, stop: this rank's rows [start, stop).
        world_size, rank: size of the sharding mesh dimension and this rank's coordinate on it.
        mesh, placements: the DTensor's device mesh and placements (Shard(0) on one mesh dimension, Replicate on
            the others: FSDP2, or HSDP's (Replicate(), Shard(0))).
        group: the process group of the sharding mesh dimension (where per-shard partial sums are reduced).
    """

    num_rows: int
    start: int
    stop: int
    world_size: int
    rank: int
    mesh: object
    placements: tuple
    group: dist.ProcessGroup

    @property
    def bounds(self) -> list[int]:
        return shard_bounds(self.num_rows, self.world_size)


def row_shard(tensor: torch.Tensor, name: str = "the parameter") -> RowShard | None:
    """The row shard of a DTensor (None for a plain tensor, or a DTensor replicated on every mesh dimension).

    Raises ValueError for placements that split rows (Shard(1), tensor parallelism's column split) or hold
    partial sums: a node's row must be whole and final on one rank."""
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(tensor.placements)
    sharded = [i for i, p in enumerate(placements) if not isinstance(p, Replicate)]
    if len(sharded) > 1 or any(not (isinstance(placements[i], Shard) and placements[i].dim == 0) for i in sharded):
        raise ValueError(f"{name} is a DTensor with placements {placements} on mesh {tensor.device_mesh}; the "
                         "spectral filter supports Shard(0) on one mesh dimension (FSDP2, HSDP) and Replicate "
                         "(DDP-like) placements: every row (graph node) must be whole on one rank")
    if not sharded:
        return None
    mesh_dim = sharded[0]
    mesh = tensor.device_mesh
    world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    bounds = shard_bounds(tensor.shape[0], world)
    local_rows = tensor.to_local().shape[0]
    if local_rows != bounds[rank + 1] - bounds[rank]:
        raise ValueError(f"{name} holds {local_rows} rows on rank {rank} of {world}, but FSDP2's torch.chunk layout "
                         f"gives it rows {bounds[rank]}:{bounds[rank + 1]}; uneven custom shardings are not supported")
    return RowShard(tensor.shape[0], bounds[rank], bounds[rank + 1], world, rank, mesh, placements,
                    mesh.get_group(mesh_dim))


def local_block_ptr(block_ptr: torch.Tensor, shard: RowShard, name: str = "the parameter") -> torch.Tensor:
    """The blocks of a global layout (B+1,) that fall in ``shard``'s rows, re-based to its first row: (B_r+1,)
    int64. Raises ``StraddlingBlockError`` if a block crosses one of the shard's two boundaries."""
    ptr = block_ptr.tolist()
    if ptr[-1] != shard.num_rows:
        raise ValueError(f"the block layout of {name} covers {ptr[-1]} rows, the parameter has {shard.num_rows}")
    for cut in (shard.start, shard.stop):
        for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
            if start < cut < stop:
                raise StraddlingBlockError(straddle_message(name, f"block {b}", start, stop, cut, shard.bounds))
    # Neither boundary is inside a block, so both are block offsets; a rank without rows gets the empty layout.
    inside = [p - shard.start for p in ptr if shard.start <= p <= shard.stop]
    return torch.tensor(inside if len(inside) > 1 else [0, 0], dtype=torch.int64)


def is_dtensor(tensor: object) -> bool:
    """isinstance(tensor, DTensor), without importing torch.distributed.tensor (≈ 1 s) when nothing has: then no
    DTensor can exist, and one-process users do not pay for the import."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the same storage: in-place updates reach the DTensor), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


__all__ = ["RowShard", "StraddlingBlockError", "aligned_block_ptr", "check_block_alignment", "is_dtensor",
           "local_block_ptr", "local_tensor", "row_shard", "shard_bounds", "straddle_message"]
