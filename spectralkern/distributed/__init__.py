"""Multi-GPU training with the spectral filter: FSDP2 row shards, block layouts aligned with them and the sharded
regulariser (see the README's "Distributed training"). Below ``optim/``: it never imports it; the resharding
torch.distributed.checkpoint of model, optimizer and filter is ``spectralkern.optim.checkpoint``."""
from .reduce import sharded_laplacian_quadratic, sum_over_shards
from .shards import (RowShard, StraddlingBlockError, aligned_block_ptr, check_block_alignment, is_dtensor,
                     local_block_ptr, local_tensor, row_shard, shard_bounds)

__all__ = ["RowShard", "StraddlingBlockError", "aligned_block_ptr", "check_block_alignment", "is_dtensor",
           "local_block_ptr", "local_tensor", "row_shard", "shard_bounds", "sharded_laplacian_quadratic",
           "sum_over_shards"]
