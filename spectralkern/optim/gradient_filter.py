"""SpectralGradientFilter: paper 001's spectral gradient filtering and Laplacian regulariser for nn.Linear weights.

For every targeted weight W (out × in) the N = out rows are the nodes of a block-diagonal graph (blocks of
``block_size`` rows). Its normalized Laplacian L gives, per block, the k lowest eigenpairs (U, λ) and gains
g(λ). After ``backward()``:

    filt.step()      grad ← h·grad + U diag(g(λ) − h) Uᵀ grad      per block (h = passthrough; h = 0: U g Uᵀ grad)

and the joint loss uses ``filt.regularization()`` = reg_weight · Σ_W tr(Δᵀ L Δ), Δ = W − W₀ (W₀: the weights when
the filter was built). Every ``refresh_every`` steps the graphs are rebuilt from the current state and the bases
recomputed by ``sk.lowest_eigenpairs``, warm-started from the previous basis (its check settles every block the
drift left within the tolerance, see ``eigen/_warm.py``).

Graphs (``graph=``):
    "knn"                    cosine kNN of the current rows (``ParameterGraph.knn``, ``knn`` neighbours), within
                             blocks. Rebuilt from the current weights at every refresh — so a zero-initialised
                             weight (a LoRA B matrix) starts edgeless (the filter leaves its gradient alone except
                             for the projection onto k basis vectors; see below) and gets a graph once it moves.
    "gradient_correlation"   an exponential moving average (``correlation_decay``) of |⟨g_i, g_j⟩| between the
                             gradient rows of each block, updated at every step from the raw gradient; at each
                             refresh every row keeps its ``knn`` largest entries (symmetrised by the larger value)
                             as the graph. Until the first refresh the kNN graph of the weights stands in.
                             Costs one (n_b × d)·(d × n_b) product per block per step and B·n_b² floats per weight.

Modes:
    explicit (default)  ``filt.step()`` after ``backward()`` filters ``.grad`` of every targeted weight in place.
    hook=True           a post-accumulate-grad hook filters each gradient as soon as backward has accumulated it
                        (same result, bit for bit); ``filt.step()`` then only counts the step and refreshes. Use
                        one backward per step: with gradient accumulation the hook would filter partial sums again.
    SpectralAdamW       pass ``spectral_filter=filt`` to the optimizer; it filters inside its fused update. Do not
                        call ``filt.step()`` then (it raises if you do), and do not use hook mode with it.

Distributed training (``spectralkern.distributed``): build the filter after ``fully_shard`` / DDP wrapping, so that
it holds the parameters the engine trains. Under FSDP2 each targeted weight is a DTensor sharded on dim 0; each
rank then builds the graphs and bases of its own rows only, in blocks cut at the shard boundaries (and at those of
``align_shards``), filters its local gradient shard with no communication, and ``regularization()`` adds one scalar
all-reduce. Under DDP (replicated gradients) every rank filters every block, redundantly and identically.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_positive_int
from ..basis import SpectralBasis
from ..distributed.reduce import sum_over_shards
from ..distributed.shards import RowShard, aligned_block_ptr, local_block_ptr, local_tensor, row_shard
from ..eigen import lowest_eigenpairs
from ..graph import GraphLaplacian, ParameterGraph, _symmetrize_max
from ..ops.laplacian_quadratic import laplacian_quadratic
from ..ops.spectral_filter import spectral_filter

GRAPHS = ("knn", "gradient_correlation")
_STATE_VERSION = 1


@dataclass
class _Target:
    """Everything the filter keeps for one targeted weight (N = out rows; under FSDP2 graph, basis, W₀ and the EMA
    cover this rank's rows only, N_r = shard.stop − shard.start)."""

    name: str
    param: nn.Parameter
    shard: RowShard | None                 # this rank's rows of a dim-0-sharded DTensor; None: all rows are here
    block_ptr: torch.Tensor | None         # (B+1,) layout of the local rows; None: blocks of block_size from row 0
    graph: ParameterGraph
    laplacian: GraphLaplacian
    basis: SpectralBasis
    gains: torch.Tensor                    # (B, k) fp32 on the parameter's device
    theta0: torch.Tensor | None            # W₀, kept only when reg_weight != 0
    correlation: torch.Tensor | None       # (B, n_max, n_max) EMA of |⟨g_i, g_j⟩| ("gradient_correlation")


# ---------------------------------------------------------------------------------------- target discovery
def _matches(module_name: str, pattern: str) -> bool:
    return module_name == pattern or module_name.endswith("." + pattern)


def _peft_adapters(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The adapter Linears of a peft LoRA layer (``lora_A`` / ``lora_B`` ModuleDicts), as (relative name, module)."""
    found = []
    for attr in ("lora_A", "lora_B"):
        container = getattr(module, attr, None)
        if isinstance(container, nn.ModuleDict):
            found += [(f"{attr}.{key}", sub) for key, sub in container.items() if isinstance(sub, nn.Linear)]
    return found


def find_targets(model: nn.Module, target_modules: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """(parameter name, weight) of every trainable nn.Linear weight that ``target_modules`` selects.

    A pattern matches a module whose name equals it or ends with "." + pattern (peft's rule). A matched nn.Linear
    contributes its weight; a matched peft LoRA layer contributes its adapters (lora_A / lora_B Linears) and its
    base layer if that is trainable; a matched ModuleDict / ModuleList of Linears (``lora_A``) contributes them
    all. Frozen weights (requires_grad=False) are skipped: they get no gradient.
    """
    if isinstance(target_modules, str) or not isinstance(target_modules, Sequence) or not target_modules:
        raise TypeError(f"target_modules must be a non-empty list of module-name suffixes, got {target_modules!r}")
    for pattern in target_modules:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"target_modules entries must be non-empty strings, got {pattern!r}")
    modules = dict(model.named_modules())
    selected: dict[str, nn.Linear] = {}
    for pattern in target_modules:
        for name, module in modules.items():
            if not _matches(name, pattern):
                continue
            prefix = f"{name}." if name else ""
            if isinstance(module, nn.Linear):
                selected[name] = module
            elif _peft_adapters(module):
                for rel, sub in _peft_adapters(module):
                    selected[prefix + rel] = sub
                base = getattr(module, "base_layer", None)
                if isinstance(base, nn.Linear):
                    selected[prefix + "base_layer"] = base
            elif isinstance(module, (nn.ModuleDict, nn.ModuleList)) and len(module) and all(
                    isinstance(sub, nn.Linear) for sub in module.children()):
                for rel, sub in module.named_children():
                    selected[prefix + rel] = sub
            else:
                raise TypeError(f"target_modules entry {pattern!r} matched module {name!r} of type "
                                f"{type(module).__name__}; only nn.Linear modules (or peft LoRA layers wrapping "
                                "one) can be targeted")
    if not selected:
        raise ValueError(f"target_modules {list(target_modules)} matched no module of the model; its nn.Linear "
                         f"modules are: {_describe_linears(modules)}")
    targets = [(f"{name}.weight", module.weight) for name, module in selected.items() if module.weight.requires_grad]
    if not targets:
        raise ValueError(f"target_modules {list(target_modules)} matched only frozen weights "
                         f"({', '.join(selected)}); nothing to filter")
    return targets


def _describe_linears(modules: dict[str, nn.Module], limit: int = 12) -> str:
    names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    if not names:
        return "(none)"
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"{shown}; distinct last components: {', '.join(suffixes)}"


# ---------------------------------------------------------------------------------------- the filter
class SpectralGradientFilter:
    """Spectral gradient filter and Laplacian regulariser over the targeted nn.Linear weights of ``model``.

    Args:
        model: the model (plain or peft-wrapped).
        target_modules: module-name suffixes, e.g. ``["query", "value"]`` (see ``find_targets``).
        graph: "knn" or "gradient_correlation" (module docstring).
        block_size: rows per block (the last block may be shorter).
        k: eigenpairs per block (a block of n_b rows keeps min(k, n_b)).
        gains: a gain function of the eigenvalues (``sk.heat(2.0)``, ``sk.low_pass(0.5)``, ...) evaluated at every
            refresh, or a fixed tensor: (k,) shared by every block, or (B, k) when every target has B blocks.
        passthrough: h, the gain of the frequencies outside the basis (0: pure low-pass projection U g Uᵀ).
        refresh_every: rebuild graphs and bases every this many steps (0 or None: never).
        reg_weight: λ of the joint loss; W₀ is kept (one copy of the targeted weights) only when it is non-zero.
        knn: neighbours per node in the graphs.
        hook: filter in a post-accumulate-grad hook instead of in ``step()``.
        normalized: use I − D^{-1/2} W D^{-1/2} (default) instead of D − W.
        correlation_decay: EMA decay of the gradient-correlation graph.
        align_shards: world sizes whose FSDP2 shard boundaries (torch.chunk along dim 0) also cut blocks, e.g.
            (2,) on one process to reproduce 2-rank FSDP2 training exactly, or (1, 2, 4) so that checkpoints
            reshard between those world sizes. Under FSDP2 the boundaries of the mesh in use are always cuts.
    Attributes:
        targets: list of (parameter name, parameter) actually targeted.
        steps: number of completed steps.
    """

    def __init__(self, model: nn.Module, target_modules: Sequence[str], *, graph: str = "knn",
                 block_size: int = 128, k: int = 16,
                 gains: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | None = None,
                 passthrough: float = 0.0, refresh_every: int | None = 200, reg_weight: float = 0.0, knn: int = 8,
                 hook: bool = False, normalized: bool = True, correlation_decay: float = 0.99,
                 align_shards: Sequence[int] = ()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
        self.block_size = check_positive_int("block_size", block_size)
        self.k = check_positive_int("k", k)
        self.knn = check_positive_int("knn", knn)
        self.passthrough = _finite("passthrough", passthrough)
        if refresh_every is not None and (isinstance(refresh_every, bool) or not isinstance(refresh_every, int)
                                          or refresh_every < 0):
            raise ValueError(f"refresh_every must be a non-negative int or None (0/None: never), got {refresh_every!r}")
        self.refresh_every = refresh_every or 0
        self._reg_weight = _finite("reg_weight", reg_weight)
        if not isinstance(hook, bool):
            raise TypeError(f"hook must be a bool, got {type(hook).__name__}")
        decay = _finite("correlation_decay", correlation_decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"correlation_decay must be in [0, 1), got {correlation_decay}")
        self.graph_kind, self.hook, self.normalized, self.correlation_decay = graph, hook, normalized, decay
        self.gains = _check_gains(gains)
        self.align_shards = tuple(check_positive_int("align_shards entry", w) for w in align_shards)
        self.steps = 0
        self._explicit_pending = False  # step() filtered grads that no optimizer step has consumed yet
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

        self._targets: list[_Target] = []
        edgeless = []
        for name, param in find_targets(model, target_modules):
            shard = row_shard(param, name)
            block_ptr = self._block_layout(param, shard, name)
            graph_ = self._knn_graph(param, block_ptr)
            laplacian = graph_.laplacian(normalized=self.normalized)
            basis = self._basis(laplacian, None)
            correlation = None
            if graph == "gradient_correlation":
                n_max = int(graph_.block_sizes.max()) if graph_.num_blocks else 0
                correlation = torch.zeros(graph_.num_blocks, n_max, n_max, dtype=torch.float32, device=param.device)
            theta0 = local_tensor(param).detach().clone() if self._reg_weight != 0 else None
            self._targets.append(_Target(name, param, shard, block_ptr, graph_, laplacian, basis,
                                         self._gains_for(name, basis), theta0, correlation))
            if graph_.num_edges == 0 and param.shape[0] > 1:
                edgeless.append(name)
        if edgeless:
            warnings.warn(f"the kNN graphs of {', '.join(edgeless)} have no edges (no two rows of a block with a "
                          "positive cosine similarity, e.g. the all-zero rows of a freshly initialised LoRA B): "
                          "until a refresh builds a graph from the trained weights, their gradients are projected "
                          "onto k arbitrary basis vectors per block", stacklevel=2)
        if hook and self._reg_weight != 0 and any(t.shard is not None for t in self._targets):
            raise ValueError("hook=True with a non-zero reg_weight under FSDP2 would filter the regulariser's "
                             "gradient twice: it reaches the sharded weight outside FSDP's reduce-scatter, and both "
                             "fire the hook. Use explicit filt.step() or SpectralAdamW with the regulariser")
        if hook:
            for target in self._targets:
                self._hooks.append(target.param.register_post_accumulate_grad_hook(self._make_hook(target)))

    # ------------------------------------------------------------------------------------ public API
    @property
    def targets(self) -> list[tuple[str, nn.Parameter]]:
        return [(t.name, t.param) for t in self._targets]

    @property
    def reg_weight(self) -> float:
        return self._reg_weight

    @reg_weight.setter
    def reg_weight(self, value: float) -> None:
        value = _finite("reg_weight", value)
        if value != 0 and any(t.theta0 is None for t in self._targets):
            raise ValueError("reg_weight was 0 when the filter was built, so W₀ was not kept; build the filter with "
                             "a non-zero reg_weight to use the regulariser")
        self._reg_weight = value

    def bases(self) -> dict[str, SpectralBasis]:
        """The current basis of every target, by parameter name."""
        return {t.name: t.basis for t in self._targets}

    def laplacians(self) -> dict[str, GraphLaplacian]:
        """The current graph Laplacian of every target, by parameter name."""
        return {t.name: t.laplacian for t in self._targets}

    def regularization(self) -> torch.Tensor:
        """reg_weight · Σ tr(Δᵀ L Δ) over the targets, Δ = W − W₀: a 0-dim fp32 tensor, differentiable w.r.t. the
        weights (gradient 2·reg_weight·L Δ). Zero (no graph) when reg_weight is 0. Under FSDP2 each rank sums its
        rows' terms and one scalar all-reduce per sharding group gives the total, the same on every rank."""
        device = local_tensor(self._targets[0].param).device
        if self._reg_weight == 0:
            return torch.zeros((), device=device)
        total = torch.zeros((), device=device)
        partials: dict[object, torch.Tensor] = {}  # per sharding process group: the sum of this rank's terms
        for t in self._targets:
            term = laplacian_quadratic(local_tensor(t.param) - t.theta0, t.laplacian).float()
            if t.shard is None:
                total = total + term
            else:
                partials[t.shard.group] = partials.get(t.shard.group, 0) + term
        for group, partial in partials.items():
            total = total + sum_over_shards(partial, group)
        return self._reg_weight * total

    def step(self) -> None:
        """Filter ``.grad`` of every targeted weight in place (unless hook mode already did), count the step and
        refresh the bases when due. Call after ``backward()`` and before ``optimizer.step()``."""
        if not self.hook:
            if all(t.param.grad is None for t in self._targets):
                warnings.warn("SpectralGradientFilter.step(): no targeted weight has a gradient, so nothing was "
                              "filtered. If the model was wrapped (fully_shard replaces its parameters) after the "
                              "filter was built, build the filter after wrapping", stacklevel=2)
            with torch.no_grad():
                for t in self._targets:
                    if t.param.grad is not None:
                        grad = self.local_grad(t, t.param.grad)
                        self._observe(t, grad)
                        self._filter_(t, grad)
            self._explicit_pending = True
        self._advance()

    def refresh(self) -> None:
        """Rebuild every graph (kNN of the current weights, or the gradient-correlation EMA) and its basis now."""
        with torch.no_grad():
            for t in self._targets:
                t.graph = (self._correlation_graph(t) if t.correlation is not None
                           else self._knn_graph(t.param, t.block_ptr))
                t.laplacian = t.graph.laplacian(normalized=self.normalized)
                t.basis = self._basis(t.laplacian, t.basis)
                t.gains = self._gains_for(t.name, t.basis)

    def remove_hooks(self) -> None:
        """Detach hook mode's gradient hooks (the filter then works in explicit mode)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.hook = False

    def state_dict(self) -> dict:
        """Step count, and per target its graph, basis, W₀ and correlation EMA (references, not copies: the filter
        never changes these tensors in place). With the model's and optimizer's state it resumes bit for bit."""
        targets = {}
        for t in self._targets:
            entry = {"block_ptr": t.graph.block_ptr, "row": t.graph.row, "col": t.graph.col,
                     "weight": t.graph.weight, "U": t.basis.U, "eigenvalues": t.basis.eigenvalues}
            if t.theta0 is not None:
                entry["theta0"] = t.theta0
            if t.correlation is not None:
                entry["correlation"] = t.correlation
            targets[t.name] = entry
        return {"version": _STATE_VERSION, "steps": self.steps, "graph": self.graph_kind,
                "normalized": self.normalized, "k": self.k, "targets": targets}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what ``state_dict()`` returned; the targets must have the same names and shapes."""
        if not isinstance(state_dict, dict) or state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"state_dict must come from SpectralGradientFilter.state_dict() (version "
                             f"{_STATE_VERSION}), got {type(state_dict).__name__} with version "
                             f"{state_dict.get('version') if isinstance(state_dict, dict) else None}")
        for key, mine in (("graph", self.graph_kind), ("normalized", self.normalized), ("k", self.k)):
            if state_dict[key] != mine:
                raise ValueError(f"state_dict has {key}={state_dict[key]!r} but this filter has {key}={mine!r}")
        saved = state_dict["targets"]
        names = [t.name for t in self._targets]
        if sorted(saved) != sorted(names):
            raise ValueError(f"state_dict targets {sorted(saved)} differ from this filter's targets {sorted(names)}")
        for t in self._targets:
            local = local_tensor(t.param)
            entry, device = saved[t.name], local.device
            if entry["U"].shape[0] != local.shape[0]:
                raise ValueError(f"state_dict basis of {t.name} has {entry['U'].shape[0]} rows, the weight has "
                                 f"{local.shape[0]} here (for another world size, use "
                                 "spectralkern.distributed.checkpoint)")
            if ("theta0" in entry) != (t.theta0 is not None):
                raise ValueError(f"state_dict {'has' if 'theta0' in entry else 'lacks'} W₀ for {t.name}; build the "
                                 "filter with the same reg_weight (zero or non-zero) as the saved one")
            block_ptr = entry["block_ptr"].to("cpu", torch.int64)
            t.block_ptr = block_ptr
            t.graph = ParameterGraph(local.shape[0], block_ptr, entry["row"].to(device), entry["col"].to(device),
                                     entry["weight"].to(device))
            t.laplacian = t.graph.laplacian(normalized=self.normalized)
            t.basis = SpectralBasis(entry["U"].to(device).clone(), entry["eigenvalues"].to(device).clone(), block_ptr)
            t.gains = self._gains_for(t.name, t.basis)
            if t.theta0 is not None:
                t.theta0 = entry["theta0"].to(device=device, dtype=local.dtype).clone()
            if t.correlation is not None:
                t.correlation = entry["correlation"].to(device).clone()
        self.steps = int(state_dict["steps"])
        self._explicit_pending = False

    def __repr__(self) -> str:
        return (f"SpectralGradientFilter(targets={len(self._targets)}, graph={self.graph_kind!r}, "
                f"block_size={self.block_size}, k={self.k}, passthrough={self.passthrough}, "
                f"refresh_every={self.refresh_every}, reg_weight={self._reg_weight}, hook={self.hook}, "
                f"steps={self.steps})")

    # ------------------------------------------------------------------------------------ internals
    def _target_of(self, param: torch.Tensor) -> _Target | None:
        for t in self._targets:
            if t.param is param:
                return t
        return None

    def _make_hook(self, target: _Target) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                grad = self.local_grad(target, param.grad)
                self._observe(target, grad)
                self._filter_(target, grad)
        return hook

    def local_grad(self, t: _Target, grad: torch.Tensor) -> torch.Tensor:
        """The rows of ``grad`` this filter's basis of ``t`` covers: the local shard of a DTensor gradient (same
        storage), the gradient itself otherwise. Raises when the gradient's layout is not the one the filter was
        built for (a filter built before fully_shard, or on another mesh)."""
        if t.shard is None:
            return local_tensor(grad)  # a plain tensor, or a DTensor replicated on every mesh dimension
        local = local_tensor(grad)
        placements = getattr(grad, "placements", None)
        mesh = getattr(grad, "device_mesh", None)
        if local.shape[0] != t.basis.num_nodes or placements != t.shard.placements or mesh != t.shard.mesh:
            raise ValueError(f"the gradient of {t.name} holds {local.shape[0]} rows with placements {placements} on "
                             f"mesh {mesh}, but the filter's graph and basis were built for rows "
                             f"{t.shard.start}:{t.shard.stop} of {t.shard.num_rows} ({t.shard.placements} on mesh "
                             f"{t.shard.mesh}, rank {t.shard.rank} of {t.shard.world_size}); build the filter on "
                             "the mesh that trains the model, after fully_shard")
        return local

    def _filter_(self, t: _Target, grad: torch.Tensor) -> None:
        grad.copy_(spectral_filter(grad, t.basis, t.gains, passthrough=self.passthrough))

    def _observe(self, t: _Target, grad: torch.Tensor) -> None:
        """Update the gradient-correlation EMA (out of place: state_dict hands out references)."""
        if t.correlation is None:
            return
        gram = _block_gram(grad.float(), t.graph.block_ptr, t.correlation.shape[-1])
        t.correlation = self.correlation_decay * t.correlation + (1 - self.correlation_decay) * gram.abs()

    def _advance(self) -> None:
        self.steps += 1
        if self.refresh_every and self.steps % self.refresh_every == 0:
            self.refresh()

    def _knn_graph(self, param: torch.Tensor, block_ptr: torch.Tensor | None) -> ParameterGraph:
        rows = local_tensor(param).detach()
        if block_ptr is None:
            return ParameterGraph.knn(rows, k=self.knn, block_size=self.block_size)
        return ParameterGraph.knn(rows, k=self.knn, block_ptr=block_ptr)

    def _block_layout(self, param: torch.Tensor, shard: RowShard | None, name: str) -> torch.Tensor | None:
        """Blocks of the local rows: cut at this mesh's shard boundaries and at those of ``align_shards``."""
        if shard is None and not self.align_shards:
            return None
        sizes = self.align_shards + ((shard.world_size,) if shard is not None else ())
        layout = aligned_block_ptr(param.shape[0], self.block_size, sizes)
        return layout if shard is None else local_block_ptr(layout, shard, name)

    def _correlation_graph(self, t: _Target) -> ParameterGraph:
        """Each row keeps its ``knn`` largest EMA entries inside its block; symmetrised with the larger weight."""
        corr = t.correlation
        block_ptr = t.graph.block_ptr
        n_max = corr.shape[-1]
        sizes = (block_ptr[1:] - block_ptr[:-1]).to(corr.device)
        local = torch.arange(n_max, device=corr.device)
        valid = local[None, :] < sizes[:, None]                                            # (B, n_max)
        scores = corr.masked_fill(~(valid[:, :, None] & valid[:, None, :]), -math.inf)
        scores = scores.masked_fill(torch.eye(n_max, dtype=torch.bool, device=corr.device), -math.inf)
        kk = min(self.knn, max(n_max - 1, 0))
        n = t.basis.num_nodes
        if kk == 0 or n == 0:
            empty = torch.empty(0, dtype=torch.int64, device=corr.device)
            return ParameterGraph(n, block_ptr, empty, empty.clone(), torch.empty(0, device=corr.device))
        top = torch.topk(scores, kk, dim=2)                                                # (B, n_max, kk)
        starts = block_ptr[:-1].to(corr.device)
        row = (starts[:, None, None] + local[None, :, None]).expand_as(top.indices)
        col = starts[:, None, None] + top.indices
        keep = valid[:, :, None] & torch.isfinite(top.values)
        r, c, w = _symmetrize_max(n, row[keep], col[keep], top.values[keep])
        return ParameterGraph(n, block_ptr, r, c, w)

    def _basis(self, laplacian: GraphLaplacian, previous: SpectralBasis | None) -> SpectralBasis:
        """The k lowest eigenpairs per block, warm-started from the previous basis when it has the same layout."""
        warm = (previous is not None and previous.k == self.k and previous.num_nodes == laplacian.num_nodes
                and torch.equal(previous.block_ptr, laplacian.block_ptr) and previous.dtype == laplacian.dtype
                and previous.device == laplacian.device and not laplacian.has_cross_block_edges)
        return lowest_eigenpairs(laplacian, self.k, v0=previous if warm else None)

    def _gains_for(self, name: str, basis: SpectralBasis) -> torch.Tensor:
        gains = self.gains
        if callable(gains):
            values = gains(basis.eigenvalues)
            if not isinstance(values, torch.Tensor) or values.shape != basis.eigenvalues.shape:
                got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                raise ValueError(f"gains(eigenvalues) must return a tensor of the eigenvalues' shape "
                                 f"{tuple(basis.eigenvalues.shape)}, got {got}")
        else:
            if gains.dim() == 1 and gains.shape[0] != basis.k:
                raise ValueError(f"gains of shape (k,) must have k = {basis.k} entries, got {tuple(gains.shape)}")
            if gains.dim() == 2 and tuple(gains.shape) != tuple(basis.eigenvalues.shape):
                raise ValueError(f"gains of shape (B, k) must be {tuple(basis.eigenvalues.shape)} for {name} "
                                 f"({basis.num_blocks} blocks), got {tuple(gains.shape)}")
            values = gains.expand(basis.num_blocks, basis.k)
        return values.detach().to(device=basis.device, dtype=torch.float32).contiguous()


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_gains(gains: object) -> Callable[[torch.Tensor], torch.Tensor] | torch.Tensor:
    if gains is None:
        from ..filters import heat
        return heat(2.0)
    if isinstance(gains, torch.Tensor):
        if gains.dim() not in (1, 2) or not gains.is_floating_point():
            raise ValueError(f"gains must be a float tensor of shape (k,) or (B, k), got {gains.dtype} of shape "
                             f"{tuple(gains.shape)}")
        return gains.detach()
    if callable(gains):
        return gains
    raise TypeError(f"gains must be a gain function of the eigenvalues (e.g. sk.heat(2.0)) or a tensor, "
                    f"got {type(gains).__name__}")


def _block_gram(grad: torch.Tensor, block_ptr: torch.Tensor, n_max: int) -> torch.Tensor:
    """(B, n_max, n_max) Gram matrices G_b G_bᵀ of the gradient rows of each block (zero-padded)."""
    sizes = block_ptr[1:] - block_ptr[:-1]
    num_blocks = sizes.numel()
    if num_blocks and bool((sizes == n_max).all()):
        rows = grad.reshape(num_blocks, n_max, -1)  # uniform blocks: a view
    else:
        rows = grad.new_zeros(num_blocks, n_max, grad.shape[1])
        node_block = torch.repeat_interleave(torch.arange(num_blocks), sizes)
        local = torch.arange(int(block_ptr[-1])) - block_ptr[:-1][node_block]
        rows[node_block.to(grad.device), local.to(grad.device)] = grad
    return torch.bmm(rows, rows.transpose(1, 2))


__all__ = ["GRAPHS", "SpectralGradientFilter", "find_targets"]
