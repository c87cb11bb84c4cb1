"""The Laplacian regulariser of row-sharded weights: a local tr(ΔᵀLΔ) per rank plus one scalar all-reduce.

With a block-diagonal graph aligned with the shards, R(Δ) = Σ_r tr(Δ_rᵀ L_r Δ_r): rank r holds the rows Δ_r and
the diagonal blocks L_r of its shard, so it computes its term alone, and one all-reduce of a scalar gives R on
every rank.

Autograd: ∂R/∂Δ_r = 2 L_r Δ_r involves rank r's rows only, so the backward of the all-reduce is the identity —
every rank backpropagates the same loss (the same incoming gradient), and each keeps the gradient of its own
term. (``torch.distributed.nn.all_reduce`` would sum the incoming gradients of the W ranks: W times too large.)
The sharded parameter receives this gradient directly, outside FSDP2's reduce-scatter (which averages the task
gradient over ranks), which is exactly the single-process gradient of L_task + λR.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..graph import GraphLaplacian
from ..ops.laplacian_quadratic import laplacian_quadratic as _local_quadratic
from .shards import local_tensor, row_shard


class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        total = partial.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sum_over_shards(partial: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Σ over the ranks of ``group`` of each rank's partial sum (any shape; one all-reduce), differentiable: the
    gradient w.r.t. each rank's ``partial`` is the incoming gradient (see the module docstring)."""
    return _SumOverShards.apply(partial, group)


def sharded_laplacian_quadratic(delta: torch.Tensor, L: GraphLaplacian) -> torch.Tensor:
    """tr(Δᵀ L Δ) of a row-sharded Δ: ``delta`` a DTensor (N, d) sharded on dim 0 (FSDP2) and ``L`` the Laplacian
    of this rank's rows only (N_r × N_r, blocks aligned with the shard); a plain tensor with the global L works
    as ``sk.laplacian_quadratic``. Returns a 0-dim fp32 tensor (fp64 for fp64 Δ), the same on every rank."""
    shard = row_shard(delta, "delta")
    if shard is None:
        return _local_quadratic(local_tensor(delta), L)  # plain, or replicated on every mesh dimension
    local = delta.to_local()
    if L.num_nodes != local.shape[0]:
        raise ValueError(f"L has {L.num_nodes} nodes but this rank holds rows {shard.start}:{shard.stop} "
                         f"({local.shape[0]} rows) of delta; pass the Laplacian of the local rows (a graph built "
                         "from delta.to_local() or with shards.local_block_ptr)")
    return sum_over_shards(_local_quadratic(local, L), shard.group)


__all__ = ["sharded_laplacian_quadratic", "sum_over_shards"]
