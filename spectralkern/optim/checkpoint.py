"""torch.distributed.checkpoint (DCP) state of a SpectralGradientFilter that reshards across world sizes.

Everything is stored per node (row), so it is split along dim 0 exactly like the parameter and DCP reshards it
like the weights (2 ranks → 1, 1 → 2, ...). Per target ``<name>`` (N rows, k pairs, w = block_size):

    <name>.blocks       (N, 2) int64   global [start, stop) of the node's block
    <name>.U            (N, k)         basis rows
    <name>.eigenvalues  (N, k)         the eigenvalues of the node's block (repeated per node: as many floats as U)
    <name>.adjacency    (N, w)         edge weights to the nodes of its block (column j: node start + j)
    <name>.theta0       (N, d)         W₀, when reg_weight != 0
    <name>.correlation  (N, w)         gradient-correlation EMA rows, for graph="gradient_correlation"

plus ``steps`` and ``config``. Under FSDP2 each tensor is a DTensor on the parameter's mesh with its placements;
on one process a plain tensor. Loading rebuilds every rank's graphs, Laplacians and bases from its rows (no
eigensolve) and raises ``StraddlingBlockError`` on every rank when a saved block holds rows of two ranks of the
new layout (save with ``align_shards`` covering the world sizes you will resume on).

    from spectralkern.optim.checkpoint import save_checkpoint, load_checkpoint
    save_checkpoint(path, model, optimizer, filt)     # model, optimizer (SpectralAdamW or any) and filter
    load_checkpoint(path, model, optimizer, filt)     # on any world size whose shard boundaries are block cuts
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from ..basis import SpectralBasis
from ..distributed.shards import StraddlingBlockError, local_tensor, straddle_message
from ..graph import ParameterGraph
from .gradient_filter import FilterTarget, SpectralGradientFilter, TargetState

_FORMAT = 1


def _config(filt: SpectralGradientFilter) -> dict:
    return {"format": _FORMAT, **filt.config(), "block_size": filt.block_size}


def _node_block(block_ptr: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N_r,) local block index of every local node."""
    sizes = block_ptr[1:] - block_ptr[:-1]
    return torch.repeat_interleave(torch.arange(sizes.numel()), sizes).to(device)


def _wrap(local: torch.Tensor, t: FilterTarget) -> torch.Tensor:
    """A per-node tensor of this rank's rows, as a DTensor laid out like the parameter (plain when unsharded)."""
    if t.shard is None:
        return local
    shape = (t.shard.num_rows,) + tuple(local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, t.shard.mesh, t.shard.placements, run_check=False, shape=shape, stride=stride)


def filter_state_dict(filt: SpectralGradientFilter) -> dict:
    """The filter's state in the per-node layout above (fresh tensors: DCP may load into them in place)."""
    state: dict = {"steps": filt.steps, "config": _config(filt)}
    for t in filt.filter_targets:
        ptr = t.graph.block_ptr
        device = t.basis.device
        offset = t.shard.start if t.shard is not None else 0
        node_block = _node_block(ptr, device)
        starts = ptr[:-1].to(device)
        n = t.basis.num_nodes
        blocks = torch.stack([starts[node_block], ptr[1:].to(device)[node_block]], dim=1) + offset
        adjacency = torch.zeros(n, filt.block_size, dtype=t.graph.dtype, device=device)
        if t.graph.row.numel():
            if t.graph.has_cross_block_edges:
                raise ValueError(f"the graph of {t.name} has edges between blocks; the per-node checkpoint "
                                 "layout stores edges inside blocks only")
            adjacency[t.graph.row, t.graph.col - starts[node_block[t.graph.row]]] = t.graph.weight
        entries = {"blocks": blocks, "U": t.basis.U.clone(), "eigenvalues": t.basis.eigenvalues[node_block],
                   "adjacency": adjacency}
        if t.theta0 is not None:
            entries["theta0"] = t.theta0.clone()
        if t.correlation is not None:
            local = torch.arange(n, device=device) - starts[node_block]
            rows = t.correlation[node_block, local]                                  # (N_r, n_max)
            entries["correlation"] = torch.nn.functional.pad(rows, (0, filt.block_size - rows.shape[1]))
        for key, value in entries.items():
            state[f"{t.name}.{key}"] = _wrap(value, t)
    return state


def _local_layout(t: FilterTarget, blocks: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """(local block_ptr, None) from the loaded (N_r, 2) global block bounds of this rank's rows, or (None, the
    error) when a saved block crosses one of this rank's shard boundaries."""
    start, stop = (t.shard.start, t.shard.stop) if t.shard is not None else (0, blocks.shape[0])
    if not blocks.shape[0]:
        return torch.tensor([0, 0], dtype=torch.int64), None
    outside = (blocks[:, 0] < start) | (blocks[:, 1] > stop)
    if bool(outside.any()):
        b_start, b_stop = (int(v) for v in blocks[int(outside.nonzero()[0, 0])])
        cut = start if b_start < start else stop
        return None, straddle_message(t.name, "the saved block", b_start, b_stop, cut, t.shard.bounds)
    offsets = torch.unique(blocks[:, 0].cpu()).tolist() + [stop]
    return torch.tensor([o - start for o in offsets], dtype=torch.int64), None


def load_filter_state_dict(filt: SpectralGradientFilter, state: dict) -> None:
    """Restore ``filt`` from a state laid out by ``filter_state_dict`` (after ``dcp.load`` filled it), on this
    rank's rows. Collective under FSDP2 (one all_gather_object, so that a bad layout raises on every rank)."""
    saved = state["config"]
    if saved != _config(filt):
        raise ValueError(f"the checkpoint's filter has config {saved}, this filter {_config(filt)}; build the filter "
                         "with the same graph, normalized, k and block_size")
    layouts, errors = [], []
    for t in filt.filter_targets:
        ptr, error = _local_layout(t, local_tensor(state[f"{t.name}.blocks"]))
        layouts.append(ptr)
        if error is not None:
            errors.append(error)
    if any(t.shard is not None for t in filt.filter_targets) and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, errors)
        errors = list(dict.fromkeys(e for rank_errors in gathered for e in rank_errors))  # both sides see a block
    if errors:
        raise StraddlingBlockError(errors[0] + (f" ({len(errors) - 1} more)" if len(errors) > 1 else ""))
    states = {}
    for t, ptr in zip(filt.filter_targets, layouts):
        entry = {key: local_tensor(state[f"{t.name}.{key}"]) for key in ("blocks", "U", "eigenvalues", "adjacency")}
        device = t.basis.device
        n = entry["U"].shape[0]
        node_block = _node_block(ptr, device)
        starts = ptr[:-1].to(device)
        row, j = entry["adjacency"].nonzero(as_tuple=True)         # sorted by (row, col): col grows with j
        col = starts[node_block[row]] + j
        graph = ParameterGraph(n, ptr, row, col, entry["adjacency"][row, j].clone())
        eigenvalues = torch.zeros(ptr.numel() - 1, filt.k, dtype=entry["eigenvalues"].dtype, device=device)
        nonempty = ptr[1:] > ptr[:-1]
        eigenvalues[nonempty.to(device)] = entry["eigenvalues"][starts[nonempty.to(device)]]
        theta0 = correlation = None
        if f"{t.name}.theta0" in state:
            theta0 = local_tensor(state[f"{t.name}.theta0"]).clone()
        if f"{t.name}.correlation" in state:
            rows = local_tensor(state[f"{t.name}.correlation"])
            sizes = ptr[1:] - ptr[:-1]
            n_max = int(sizes.max()) if sizes.numel() else 0
            correlation = torch.zeros(sizes.numel(), n_max, n_max, dtype=rows.dtype, device=device)
            local = torch.arange(n, device=device) - starts[node_block]
            correlation[node_block, local] = rows[:, :n_max]
        states[t.name] = TargetState(graph, SpectralBasis(entry["U"].clone(), eigenvalues, ptr), theta0, correlation)
    filt.restore(states, int(state["steps"]))


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    filt: SpectralGradientFilter) -> None:
    """``dcp.save`` of the model, the optimizer (torch's ``get_state_dict``: FQN keys, sharded states) and the
    filter. Collective: call on every rank."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "filter": filter_state_dict(filt)}, checkpoint_id=path)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    filt: SpectralGradientFilter) -> None:
    """Load what ``save_checkpoint`` wrote, on this world size (any whose shard boundaries cut no saved block).

    Build the model (fully_shard / DDP), the filter and the optimizer first, as for training. torch's
    ``get_state_dict`` initialises an empty optimizer state with one zero-lr step, which also advances the filter;
    the filter state is therefore loaded last."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "filter": filter_state_dict(filt)}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    load_filter_state_dict(filt, state["filter"])


__all__ = ["filter_state_dict", "load_checkpoint", "load_filter_state_dict", "save_checkpoint"]
