"""SpectralGradientFilter: paper 001's spectral gradient filtering and Laplacian regulariser for nn.Linear weights.

For every targeted weight W (out × in) the N = out rows are the nodes of a block-diagonal graph (blocks of
``block_size`` rows). Its Laplacian L (normalized by default) gives, per block, the k lowest eigenpairs (U, λ) and
gains g(λ). The joint loss is L_task + ``filt.regularization()`` with regularization() = λ·Σ_W tr(Δᵀ L_reg Δ),
Δ = W − W₀ (W₀: the weights when the filter was built). The update direction of a targeted weight is

    ∇ = F(∇L_task) + 2λ L_reg Δ          F(x) = h·x + U diag(g(λ) − h) Uᵀ x  per block   (filter_method="basis")
                                         F(x) = g(L) x by a Chebyshev polynomial of L     (filter_method="chebyshev")

Only the task gradient is filtered; the regulariser's gradient 2λ L_reg Δ is added after the filter, unfiltered,
exactly once (see "How the regulariser reaches the update" below). h = ``passthrough`` (h = 0: U g Uᵀ, paper 001's
form; the frequencies above the k-th are dropped). "chebyshev" applies g to the whole spectrum of each block (the
paper's U g(Λ) Uᵀ with the full U) without an eigendecomposition. Every ``refresh_every`` steps the graphs are rebuilt
from the current state and the bases recomputed by ``sk.lowest_eigenpairs``, warm-started from the previous basis.

Graphs (``graph=``):
    "knn"                    cosine kNN of the current rows (``ParameterGraph.knn``, ``knn`` neighbours), within
                             blocks. Rebuilt from the current weights at every refresh — so a zero-initialised
                             weight (a LoRA B matrix) starts edgeless (the filter leaves its gradient alone except
                             for the projection onto k basis vectors; see below) and gets a graph once it moves.
    "gradient_correlation"   an exponential moving average (``correlation_decay``) of |⟨g_i, g_j⟩| between the
                             task-gradient rows of each block, updated at every step; at each refresh every row
                             keeps its ``knn`` largest entries (symmetrised by the larger value) as the graph. Until
                             the first refresh the kNN graph of the weights stands in.

Modes (which code applies F and adds the regulariser's gradient):
    explicit (default)  ``filt.step()`` after ``backward()``: ``.grad`` ← F(.grad) + 2λ L_reg Δ for every target.
    hook=True           a post-accumulate-grad hook applies F to each gradient as soon as backward has accumulated
                        it (bit for bit the explicit result); ``filt.step()`` then adds the regulariser's gradient,
                        counts the step and refreshes. One backward per step: a second backward accumulating into
                        a gradient the hook already filtered raises (it would filter the first share twice).
    optimizers          ``SpectralAdamW`` / ``SpectralSGD`` with ``spectral_filter=filt`` do both inside their update
                        (``.grad`` stays the raw task gradient); do not call ``filt.step()`` then.

How the regulariser reaches the update: ``regularization()`` returns its value through an autograd function whose
backward puts nothing into any weight's ``.grad``: it records the gradient it receives (1 for a plain
``loss.backward()``, 1/n per micro-batch when the loss is divided for gradient accumulation, S under a loss scale S)
and sums it over the calls since the last step. The step then adds scale·2λ L_reg Δ, computed once from the current
Δ. So the regulariser enters the update exactly as often and as scaled as the loss that contained it, with no second
backward. The recorded scale includes a loss scale, so the filter must see ``.grad`` in the scale the backward left
it: with ``torch.amp.GradScaler`` (fp16) call ``filt.step()`` before ``scaler.unscale_(optimizer)``, or call
``filt.unscale_regularizer_(1 / scaler.get_scale())`` right after it. SpectralAdamW and SpectralSGD take
``scaler.step(opt)`` themselves (``optim/amp.py``): they divide gradients and the recorded scale by S together, and
skip inf/nan steps without counting them.

Safety: a gradient is never filtered twice — ``step()`` and the optimizers raise, changing nothing, while a targeted
``.grad`` is still the tensor the filter wrote and unchanged since (its ``_version``); any backward into it, a new
tensor or any write makes it new. Gradients with inf/NaN never enter the persistent state (the correlation EMA):
they are skipped, counted (``nonfinite_observations``) and warned about once. Every random number comes from the
filter's own generator (``seed=``), saved in ``state_dict()``, so a resume is bit-identical without the global RNG.

The per-target protocol (``filt.targets_for_update()`` → ``FilterTarget``s, then ``filt.end_step()``) is what the
optimizers, the checkpoint code and any other update rule use; nothing outside this module touches the filter's
private state.

Distributed training (``spectralkern.distributed``): build the filter after ``fully_shard`` / DDP wrapping, so that
it holds the parameters the engine trains. Under FSDP2 each targeted weight is a DTensor sharded on dim 0; each
rank then builds the graphs and bases of its own rows only, in blocks cut at the shard boundaries (and at those of
``align_shards``), filters its local gradient shard with no communication, and ``regularization()`` adds one scalar
all-reduce; each rank adds the regulariser's gradient of its own rows. Under DDP (replicated gradients) every rank
filters every block, redundantly and identically.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_block_ptr, check_positive_int
from .._targets import TargetModules, find_modules
from ..basis import SpectralBasis
from ..distributed.reduce import sum_over_shards
from ..distributed.shards import RowShard, aligned_block_ptr, local_block_ptr, local_tensor, row_shard
from ..eigen import lowest_eigenpairs
from ..filters import chebyshev_coefficients
from ..graph import GraphLaplacian, ParameterGraph, symmetrize_max
from ..ops.chebyshev_filter import chebyshev_filter
from ..ops.laplacian_quadratic import laplacian_matmul, laplacian_quadratic
from ..ops.spectral_filter import spectral_filter

logger = logging.getLogger(__name__)

GRAPHS = ("knn", "gradient_correlation")
FILTER_METHODS = ("basis", "chebyshev")
# filter_method="chebyshev" materialises g(L_b) of blocks up to this size at each refresh and applies it as one
# batched GEMM per step: at 384 x 384 / blocks of 128 that is ~30x cheaper on one CPU thread than the K sparse
# products of the Chebyshev recursion per step (benchmarks/NOTES.md, "Full-spectrum filter per step"). Memory:
# N_r x n_max floats per weight.
MATERIALIZE_MAX_BLOCK = 512
_STATE_VERSION = 3  # 3: the filter's generator state ("generator")


@dataclass(frozen=True)
class TargetState:
    """What one target's filter state is made of, for saving and restoring (``SpectralGradientFilter.restore``).

    Attributes (N_r = the rows of the weight on this rank, B blocks):
        graph: the block-diagonal graph of the rows (its ``block_ptr`` is the block layout).
        basis: the k lowest eigenpairs of its Laplacian per block, U (N_r, k), eigenvalues (B, k).
        theta0: W₀ (N_r, d), present exactly when the filter keeps one (reg_weight != 0 at construction).
        correlation: (B, n_max, n_max) gradient-correlation EMA, present exactly for graph="gradient_correlation".
    """

    graph: ParameterGraph
    basis: SpectralBasis
    theta0: torch.Tensor | None = None
    correlation: torch.Tensor | None = None


class FilterTarget:
    """One targeted weight: its graph, Laplacians, basis and gains (read them; never assign them — use
    ``SpectralGradientFilter.restore``) and the operations an update rule applies to its gradient.

    Attributes:
        name, param: the parameter's name and the parameter (a DTensor under FSDP2).
        shard: this rank's rows of a dim-0-sharded DTensor (None: all rows are here).
        graph, laplacian: the graph of the (local) rows and the filter's Laplacian of it.
        reg_laplacian: the regulariser's Laplacian (the same object when both kinds agree).
        basis: the k lowest eigenpairs of ``laplacian`` per block; gains: (B, k) fp32 g(λ) of the basis.
        theta0: W₀ of the local rows (None without a regulariser); correlation: the gradient-correlation EMA.
        filter_method, passthrough: as the filter's.
    A typical update rule, per target with a gradient::

        grad = target.local_grad(param.grad)     # this rank's rows, a view
        target.observe(grad)                     # gradient-correlation statistics (no-op for "knn")
        direction = target.filter(grad)          # F(grad), out of place (filter_: in place)
        reg = target.regularizer_grad()          # scale·2λ L_reg Δ of the local rows, or None
    and ``filt.end_step()`` once after all targets.
    """

    def __init__(self, owner: SpectralGradientFilter, name: str, param: nn.Parameter, shard: RowShard | None,
                 block_ptr: torch.Tensor | None):
        # weak: a strong reference back would put every target in a cycle with its filter, keeping a dropped filter
        # (its weights' copy, graphs, bases, block operators) alive until the cycle collector runs
        self._owner_ref = weakref.ref(owner)
        self.name = name
        self.param = param
        self.shard = shard
        self.block_ptr = block_ptr          # None: blocks of block_size from row 0 (rebuilding graphs uses it)
        self.graph: ParameterGraph
        self.laplacian: GraphLaplacian
        self.reg_laplacian: GraphLaplacian
        self.basis: SpectralBasis
        self.gains: torch.Tensor
        self.chebyshev_coeffs: torch.Tensor | None = None
        self.block_operator: torch.Tensor | None = None  # (B, n_max, n_max) g(L_b) for filter_method="chebyshev"
        self.lambda_max: float = 2.0
        self.theta0: torch.Tensor | None = None
        self.correlation: torch.Tensor | None = None
        # (the parameter's .grad object, the _version of its local rows) right after the filter last wrote it in
        # place: a gradient still equal to that (same tensor, no write since) must not be filtered again
        self._written: tuple[weakref.ref, int] | None = None
        self._stepped = False  # hook mode: step() already ran on the gradient the hook last filtered

    @property
    def _owner(self) -> SpectralGradientFilter:
        owner = self._owner_ref()
        if owner is None:
            raise RuntimeError(f"the SpectralGradientFilter of target {self.name!r} no longer exists; keep the filter "
                               "alive while its targets are used")
        return owner

    @property
    def filter_method(self) -> str:
        return self._owner.filter_method

    @property
    def passthrough(self) -> float:
        return self._owner.passthrough

    def local_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The rows of ``grad`` this target's basis covers: the local shard of a DTensor gradient (same storage),
        the gradient itself otherwise. Raises when the gradient's layout is not the one the filter was built for
        (a filter built before fully_shard, or on another mesh)."""
        if self.shard is None:
            return local_tensor(grad)  # a plain tensor, or a DTensor replicated on every mesh dimension
        shard = self.shard
        local = local_tensor(grad)
        placements = getattr(grad, "placements", None)
        mesh = getattr(grad, "device_mesh", None)
        if local.shape[0] != self.basis.num_nodes or placements != shard.placements or mesh != shard.mesh:
            raise ValueError(f"the gradient of {self.name} holds {local.shape[0]} rows with placements {placements} "
                             f"on mesh {mesh}, but the filter's graph and basis were built for rows "
                             f"{shard.start}:{shard.stop} of {shard.num_rows} ({shard.placements} on mesh "
                             f"{shard.mesh}, rank {shard.rank} of {shard.world_size}); build the filter on "
                             "the mesh that trains the model, after fully_shard")
        return local

    def observe(self, grad: torch.Tensor) -> None:
        """Feed the task gradient (local rows) to the gradient-correlation EMA; a no-op for kNN graphs. Out of
        place: ``state_dict`` hands out references. A gradient with inf/NaN entries (an overflowing fp16 step that
        a GradScaler will skip) is left out of the EMA and counted in the filter's ``nonfinite_observations``
        (one host sync per target and step, for this graph kind only)."""
        if self.correlation is None:
            return
        decay = self._owner.correlation_decay
        gram = _block_gram(grad.float(), self.graph.block_ptr, self.correlation.shape[-1])
        if not bool(torch.isfinite(gram).all()):
            self._owner._skipped_nonfinite(self.name)
            return
        self.correlation = decay * self.correlation + (1 - decay) * gram.abs()

    def filter(self, grad: torch.Tensor) -> torch.Tensor:
        """F(grad) for (N_r, d) local rows, a new tensor in grad's dtype (see the module docstring)."""
        if self.filter_method == "chebyshev":
            if self.block_operator is not None:
                return _apply_block_operator(self.block_operator, self.graph.block_ptr, grad)
            return chebyshev_filter(grad, self.laplacian, self.chebyshev_coeffs, lambda_max=self.lambda_max)
        return spectral_filter(grad, self.basis, self.gains, passthrough=self.passthrough)

    def filter_(self, grad: torch.Tensor) -> None:
        """grad ← F(grad), in place."""
        grad.copy_(self.filter(grad))

    def holds_written_grad(self) -> bool:
        """True when ``param.grad`` is the tensor the filter last wrote in place and nothing changed it since (no
        backward accumulated into it, it was not replaced): filtering it again would filter twice."""
        grad = self.param.grad
        if grad is None or self._written is None:
            return False
        ref, version = self._written
        return ref() is grad and local_tensor(grad)._version == version

    def mark_written(self) -> None:
        """Record ``param.grad`` as written by the filter (call right after writing it)."""
        grad = self.param.grad
        self._written = (weakref.ref(grad), local_tensor(grad)._version)

    def regularizer_grad(self) -> torch.Tensor | None:
        """scale·2λ L_reg Δ of the local rows, fp32 (fp64 for fp64 weights) — the regulariser's share of the
        gradient since the last step (scale: the sum of the gradients its backward received) — or None when no
        backward went through ``regularization()`` since then."""
        scale = self._owner._recorded_scale
        if scale is None or self.theta0 is None:
            return None
        weight = local_tensor(self.param).detach()
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        delta = weight.to(acc) - self.theta0.to(acc)
        return laplacian_matmul(delta, self.reg_laplacian, (2 * scale).to(device=delta.device, dtype=acc))

    def band_energy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖x − U Uᵀ x‖², ‖x‖²) over the local rows of x (N_r, d), fp32 0-dim tensors (fp64 for fp64 x): how much
        of an update's energy lies outside span(U), the band the basis filter keeps."""
        inside = spectral_filter(x, self.basis, torch.ones_like(self.gains), passthrough=0.0)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.to(acc) - inside.to(acc)).square().sum(), x.to(acc).square().sum()

    def state(self) -> TargetState:
        """References to the current state (the filter never changes these tensors in place)."""
        return TargetState(self.graph, self.basis, self.theta0, self.correlation)

    def __repr__(self) -> str:
        return f"FilterTarget({self.name!r}, rows={self.basis.num_nodes}, blocks={self.basis.num_blocks})"


class _RecordedRegularizer(torch.autograd.Function):
    """Identity on the regulariser's value whose backward routes no gradient to the weights but hands the
    incoming gradient to ``record`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, anchor: torch.Tensor, record: Callable[[torch.Tensor], None]):
        ctx.record = record
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.record(grad.detach())
        return None, None, None


# ---------------------------------------------------------------------------------------- target discovery
def _peft_adapters(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The adapter Linears of a peft LoRA layer (``lora_A`` / ``lora_B`` ModuleDicts), as (relative name, module)."""
    found = []
    for attr in ("lora_A", "lora_B"):
        container = getattr(module, attr, None)
        if isinstance(container, nn.ModuleDict):
            found += [(f"{attr}.{key}", sub) for key, sub in container.items() if isinstance(sub, nn.Linear)]
    return found


def _linear_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleDict, nn.ModuleList)) and len(module) > 0 and all(
        isinstance(sub, nn.Linear) for sub in module.children())


def _filterable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or bool(_peft_adapters(module)) or _linear_container(module)


def find_targets(model: nn.Module, target_modules: TargetModules) -> list[tuple[str, nn.Parameter]]:
    """(parameter name, weight) of every trainable nn.Linear weight that ``target_modules`` selects.

    Modules are selected by the package's one rule (``spectralkern._targets``, peft's): a list of names matches a
    module whose name equals an entry or ends with "." + entry; one string is a regex over the full name. A
    selected nn.Linear contributes its weight; a selected peft LoRA layer contributes its adapters (lora_A /
    lora_B Linears) and its base layer if that is trainable; a selected ModuleDict / ModuleList of Linears
    (``lora_A``) contributes them all. Frozen weights (requires_grad=False) are skipped: they get no gradient.
    """
    selected: dict[str, nn.Linear] = {}
    for name, module in find_modules(model, target_modules, accept=_filterable,
                                     what="an nn.Linear (or a peft LoRA layer wrapping one, or a container of "
                                          "Linears)"):
        if isinstance(module, nn.Linear):
            selected[name] = module
        elif _peft_adapters(module):
            for rel, sub in _peft_adapters(module):
                selected[f"{name}.{rel}"] = sub
            base = getattr(module, "base_layer", None)
            if isinstance(base, nn.Linear):
                selected[f"{name}.base_layer"] = base
        else:
            for rel, sub in module.named_children():
                selected[f"{name}.{rel}"] = sub
    targets = [(f"{name}.weight", module.weight) for name, module in selected.items() if module.weight.requires_grad]
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} matched only frozen weights "
                         f"({', '.join(selected)}); nothing to filter")
    return targets


# ---------------------------------------------------------------------------------------- the filter
class SpectralGradientFilter:
    """Spectral gradient filter and Laplacian regulariser over the targeted nn.Linear weights of ``model``.

    Args:
        model: the model (plain or peft-wrapped).
        target_modules: module-name suffixes, e.g. ``["query", "value"]``, or one regex over full module names
            (peft's rule, ``spectralkern._targets``; see ``find_targets``).
        graph: "knn" or "gradient_correlation" (module docstring).
        block_size: rows per block (the last block may be shorter).
        k: eigenpairs per block (a block of n_b rows keeps min(k, n_b)).
        gains: a gain function of the eigenvalues (``sk.heat(2.0)``, ``sk.low_pass(0.5)``, ...) evaluated at every
            refresh, or a fixed tensor: (k,) shared by every block, or (B, k) when every target has B blocks.
            filter_method="chebyshev" needs a function (it is applied to the whole spectrum).
        passthrough: h, the gain of the frequencies outside the basis (0: pure low-pass projection U g Uᵀ).
            Must be 0 with filter_method="chebyshev" (every frequency gets g(λ) there).
        filter_method: "basis" (U diag(g) Uᵀ + h·(I − U Uᵀ) on the k computed eigenpairs per block; the fused
            SpectralAdamW kernel) or "chebyshev" (g(L) on the whole spectrum of every block through
            ``sk.chebyshev_filter``, a degree-``chebyshev_order`` polynomial on [0, λ_max]; paper 001's
            U g(Λ) Uᵀ with the full U, no eigendecomposition needed for it). Blocks up to
            ``MATERIALIZE_MAX_BLOCK`` rows get g(L_b) materialised at each refresh and applied by one batched GEMM
            per step; larger ones run the recursion every step.
        chebyshev_order: the polynomial degree K for filter_method="chebyshev".
        refresh_every: rebuild graphs and bases every this many steps (0 or None: never).
        reg_weight: λ of the joint loss; W₀ is kept (one copy of the targeted weights) only when it is non-zero.
        knn: neighbours per node in the graphs.
        hook: filter in a post-accumulate-grad hook instead of in ``step()``.
        normalized: the filter's Laplacian: I − D^{-1/2} W D^{-1/2} (True, default) or D − W (False).
        reg_normalized: the regulariser's Laplacian, likewise; None (default): the same as ``normalized``. Paper
            001's L_spec uses D − W: ``reg_normalized=False``. tr(ΔᵀLΔ) is ½ Σ_ij W_ij ‖Δ_i − Δ_j‖² for D − W and
            ½ Σ_ij W_ij ‖Δ_i/√d_i − Δ_j/√d_j‖² for the normalized L.
        correlation_decay: EMA decay of the gradient-correlation graph.
        align_shards: world sizes whose FSDP2 shard boundaries (torch.chunk along dim 0) also cut blocks, e.g.
            (2,) on one process to reproduce 2-rank FSDP2 training exactly, or (1, 2, 4) so that checkpoints
            reshard between those world sizes. Under FSDP2 the boundaries of the mesh in use are always cuts.
        progress: a tqdm bar over the targets while building (None: tqdm's auto-disable when not a TTY).
        seed: seeds the filter's own ``torch.Generator``, the source of every random number it draws (the
            eigensolver's start vectors). None (default): drawn once from torch's global RNG here, so
            ``torch.manual_seed`` before construction makes the filter repeatable. The generator's state is part of
            ``state_dict()``: a resume reproduces the bases bit for bit whatever the global RNG does meanwhile.
    Attributes:
        targets: list of (parameter name, parameter) actually targeted.
        steps: number of completed steps.
        nonfinite_observations: gradients (per target and step) left out of the gradient-correlation EMA because
            they held inf/NaN (a warning is given the first time).
    """

    def __init__(self, model: nn.Module, target_modules: TargetModules, *, graph: str = "knn",
                 block_size: int = 128, k: int = 16,
                 gains: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | None = None,
                 passthrough: float = 0.0, filter_method: str = "basis", chebyshev_order: int = 16,
                 refresh_every: int | None = 200, reg_weight: float = 0.0, knn: int = 8,
                 hook: bool = False, normalized: bool = True, reg_normalized: bool | None = None,
                 correlation_decay: float = 0.99, align_shards: Sequence[int] = (), progress: bool | None = None,
                 seed: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
        if filter_method not in FILTER_METHODS:
            raise ValueError(f"filter_method must be one of {', '.join(FILTER_METHODS)}, got {filter_method!r}")
        self.block_size = check_positive_int("block_size", block_size)
        self.k = check_positive_int("k", k)
        self.knn = check_positive_int("knn", knn)
        self.passthrough = _finite("passthrough", passthrough)
        if isinstance(chebyshev_order, bool) or not isinstance(chebyshev_order, int) or chebyshev_order < 0:
            raise ValueError(f"chebyshev_order must be a non-negative int, got {chebyshev_order!r}")
        self.filter_method, self.chebyshev_order = filter_method, chebyshev_order
        if refresh_every is not None and (isinstance(refresh_every, bool) or not isinstance(refresh_every, int)
                                          or refresh_every < 0):
            raise ValueError(f"refresh_every must be a non-negative int or None (0/None: never), got {refresh_every!r}")
        self.refresh_every = refresh_every or 0
        self._reg_weight = _check_reg_weight(reg_weight)
        for flag, value in (("hook", hook), ("normalized", normalized)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
        if reg_normalized is not None and not isinstance(reg_normalized, bool):
            raise TypeError(f"reg_normalized must be a bool or None, got {type(reg_normalized).__name__}")
        decay = _finite("correlation_decay", correlation_decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"correlation_decay must be in [0, 1), got {correlation_decay}")
        self.graph_kind, self.hook, self.normalized, self.correlation_decay = graph, hook, normalized, decay
        self.reg_normalized = normalized if reg_normalized is None else reg_normalized
        self.gains = _check_gains(gains)
        if filter_method == "chebyshev":
            if not callable(self.gains):
                raise ValueError("filter_method='chebyshev' applies g(λ) to the whole spectrum, so gains must be a "
                                 "function of the eigenvalues (e.g. sk.heat(2.0)), got a tensor of per-frequency "
                                 "gains")
            if self.passthrough != 0:
                raise ValueError(f"passthrough must be 0 with filter_method='chebyshev' (every frequency gets "
                                 f"g(λ)), got {self.passthrough}")
        self.align_shards = tuple(check_positive_int("align_shards entry", w) for w in align_shards)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64) or None, got {seed!r}")
        self._generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.nonfinite_observations = 0
        self._recorded_scale: torch.Tensor | None = None  # Σ of the gradients regularization()'s backward received
        self._recorded_unscaled = False                    # unscale_regularizer_() ran since the last step
        self._anchor: torch.Tensor | None = None
        self._keeps_theta0 = self._reg_weight != 0  # W₀ is kept for the filter's lifetime, or never
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

        self._targets: list[FilterTarget] = []
        edgeless = []
        found = find_targets(model, target_modules)
        from tqdm.auto import tqdm

        for name, param in tqdm(found, desc="spectral bases", disable=None if progress is None else not progress,
                                leave=False, dynamic_ncols=True):
            start = time.perf_counter()
            shard = row_shard(param, name)
            target = FilterTarget(self, name, param, shard, self._block_layout(param, shard, name))
            graph_ = self._knn_graph(param, target.block_ptr)
            correlation = None
            if graph == "gradient_correlation":
                n_max = int(graph_.block_sizes.max()) if graph_.num_blocks else 0
                correlation = torch.zeros(graph_.num_blocks, n_max, n_max, dtype=torch.float32, device=param.device)
            theta0 = local_tensor(param).detach().clone() if self._reg_weight != 0 else None
            laplacian = graph_.laplacian(normalized=self.normalized)
            self._assign(target, self._staged(target, TargetState(graph_, self._basis(laplacian, None), theta0,
                                                                  correlation), laplacian))
            self._targets.append(target)
            info = target.basis.info
            logger.info("spectral basis of %s: %d rows in %d blocks, k=%d, eigensolver %s, %.3f s", name,
                        target.basis.num_nodes, target.basis.num_blocks, self.k,
                        getattr(info, "backend", "?"), time.perf_counter() - start)
            if graph_.num_edges == 0 and param.shape[0] > 1:
                edgeless.append(name)
        if edgeless:
            warnings.warn(f"the kNN graphs of {', '.join(edgeless)} have no edges (no two rows of a block with a "
                          "positive cosine similarity, e.g. the all-zero rows of a freshly initialised LoRA B): "
                          "until a refresh builds a graph from the trained weights, their gradients are projected "
                          "onto k arbitrary basis vectors per block", stacklevel=2)
        if hook:
            for target in self._targets:
                self._hooks.append(target.param.register_post_accumulate_grad_hook(self._make_hook(target)))

    # ------------------------------------------------------------------------------------ public API
    @property
    def targets(self) -> list[tuple[str, nn.Parameter]]:
        return [(t.name, t.param) for t in self._targets]

    @property
    def filter_targets(self) -> tuple[FilterTarget, ...]:
        """Every target's ``FilterTarget`` (for inspection and checkpoints; update rules use
        ``targets_for_update``)."""
        return tuple(self._targets)

    @property
    def reg_weight(self) -> float:
        return self._reg_weight

    @reg_weight.setter
    def reg_weight(self, value: float) -> None:
        value = _check_reg_weight(value)
        if value != 0 and not self._keeps_theta0:
            raise ValueError("reg_weight was 0 when the filter was built, so W₀ was not kept; build the filter with "
                             "a non-zero reg_weight to use the regulariser")
        self._reg_weight = value

    def bases(self) -> dict[str, SpectralBasis]:
        """The current basis of every target, by parameter name."""
        return {t.name: t.basis for t in self._targets}

    def laplacians(self) -> dict[str, GraphLaplacian]:
        """The current graph Laplacian of every target (the filter's), by parameter name."""
        return {t.name: t.laplacian for t in self._targets}

    def regularization(self) -> torch.Tensor:
        """reg_weight · Σ tr(Δᵀ L_reg Δ) over the targets, Δ = W − W₀: a 0-dim fp32 tensor. Zero (no graph) when
        reg_weight is 0. Under FSDP2 each rank sums its rows' terms and one scalar all-reduce per sharding group
        gives the total, the same on every rank.

        Its backward routes nothing into the weights' ``.grad``: it records the gradient it receives, and the next
        ``filt.step()`` / optimizer step adds scale·2λ L_reg Δ after filtering the task gradient (module
        docstring). ``torch.autograd.grad(loss, weights)`` therefore does not see the regulariser."""
        device = local_tensor(self._targets[0].param).device
        if self._reg_weight == 0:
            return torch.zeros((), device=device)
        with torch.no_grad():
            total = torch.zeros((), device=device)
            partials: dict[object, torch.Tensor] = {}  # per sharding process group: the sum of this rank's terms
            for t in self._targets:
                term = laplacian_quadratic(local_tensor(t.param) - t.theta0, t.reg_laplacian).float()
                if t.shard is None:
                    total = total + term
                else:
                    partials[t.shard.group] = partials.get(t.shard.group, 0) + term
            for group, partial in partials.items():
                total = total + sum_over_shards(partial, group)
            total = self._reg_weight * total
        if self._anchor is None or self._anchor.device != device:
            self._anchor = torch.zeros((), device=device, requires_grad=True)
        weight = self._reg_weight
        return _RecordedRegularizer.apply(total, self._anchor, lambda grad: self._record(weight * grad.float()))

    def step(self) -> None:
        """``.grad`` ← F(.grad) + 2λ L_reg Δ for every targeted weight (F skipped in hook mode, which applied it
        already; the second term only when a backward went through ``regularization()``), then count the step and
        refresh the bases when due. Call after ``backward()`` and before ``optimizer.step()``.

        Raises RuntimeError, changing nothing, when a targeted gradient is still the one the last ``step()`` left
        (no backward since): it would be filtered twice. A backward that accumulates into ``.grad``, a new
        ``.grad`` tensor or any in-place change of it counts as new."""
        stale = [t.name for t in self._targets if t.param.grad is not None
                 and t.holds_written_grad() and (not self.hook or t._stepped)]
        if stale:
            raise RuntimeError(f"SpectralGradientFilter.step() was already called on the current gradients of "
                               f"{', '.join(stale)} (no backward since): filtering them again would filter them "
                               "twice. Call it once per backward, between backward() and optimizer.step()")
        if all(t.param.grad is None for t in self._targets) and self._recorded_scale is None:
            warnings.warn("SpectralGradientFilter.step(): no targeted weight has a gradient, so nothing was "
                          "filtered. If the model was wrapped (fully_shard replaces its parameters) after the "
                          "filter was built, build the filter after wrapping", stacklevel=2)
        with torch.no_grad():
            for t in self._targets:
                if t.param.grad is not None and not self.hook:
                    grad = t.local_grad(t.param.grad)
                    t.observe(grad)
                    t.filter_(grad)
                reg = t.regularizer_grad()
                if reg is not None:
                    if t.param.grad is None:
                        t.param.grad = torch.zeros_like(t.param)
                    grad = t.local_grad(t.param.grad)
                    grad.add_(reg.to(grad.dtype))
                if t.param.grad is not None:
                    t.mark_written()
                    t._stepped = True
        self.end_step()

    def targets_for_update(self) -> tuple[FilterTarget, ...]:
        """The targets, for an update rule that filters inside its step (SpectralAdamW, SpectralSGD). Call
        ``end_step()`` once after updating them. Raises if ``step()`` already filtered these gradients (and no
        backward came since) or the filter is in hook mode: the gradients would be filtered twice. The check has
        no side effect, so it raises again as long as the gradients stay the filtered ones; call it before
        changing ``.grad`` (e.g. before unscaling)."""
        if self.hook:
            raise ValueError("the filter is in hook mode, which already filters the gradients during backward; an "
                             "optimizer that filters would filter them a second time. Build the filter with "
                             "hook=False (or call filt.remove_hooks())")
        filtered = [t.name for t in self._targets
                    if t.holds_written_grad()]
        if filtered:
            raise RuntimeError(f"spectral_filter.step() was called before the optimizer's step: the gradients of "
                               f"{', '.join(filtered)} are already filtered and would be filtered twice. With an "
                               "optimizer that takes spectral_filter= do not call filt.step(); the optimizer filters "
                               "and counts the step")
        return tuple(self._targets)

    def end_step(self) -> None:
        """Close a step: forget the recorded regulariser scale, count the step, refresh the bases when due."""
        self._recorded_scale, self._recorded_unscaled = None, False
        self.steps += 1
        if self.refresh_every and self.steps % self.refresh_every == 0:
            self.refresh()

    @property
    def regularizer_pending(self) -> bool:
        """True when a backward went through ``regularization()`` since the last step (its gradient is due)."""
        return self._recorded_scale is not None

    @property
    def regularizer_unscaled(self) -> bool:
        """True when ``unscale_regularizer_`` ran since the last step."""
        return self._recorded_unscaled

    def unscale_regularizer_(self, inv_scale: torch.Tensor | float) -> None:
        """Divide the recorded regulariser scale by the loss scale S (``inv_scale`` = 1/S): what
        ``scaler.unscale_(optimizer)`` does to ``.grad``, done to the regulariser's share. Call it right after an
        explicit ``scaler.unscale_`` (e.g. before clipping); ``scaler.step`` of SpectralAdamW / SpectralSGD calls it
        itself otherwise. Once per step."""
        if self._recorded_unscaled:
            raise RuntimeError("unscale_regularizer_() was already called since the last step")
        if self._recorded_scale is not None:
            self._recorded_scale = self._recorded_scale * torch.as_tensor(inv_scale).to(self._recorded_scale)
        self._recorded_unscaled = True

    def skip_step(self) -> None:
        """Forget the gradients' recorded regulariser scale without counting a step: the gradients were discarded
        (``zero_grad`` of SpectralAdamW / SpectralSGD) or an optimizer step was skipped (inf/nan under a
        GradScaler). With another optimizer, call it when you zero gradients without stepping."""
        self._recorded_scale, self._recorded_unscaled = None, False

    def refresh(self) -> None:
        """Rebuild every graph (kNN of the current weights, or the gradient-correlation EMA) and its basis now.
        Warns, as construction does, about graphs that come out without edges (e.g. a gradient-correlation EMA of
        all-zero gradients)."""
        start = time.perf_counter()
        edgeless, staged = [], []
        generator_state = self._generator.get_state()
        with torch.no_grad():
            for t in self._targets:  # every target is rebuilt before any is replaced: a failure changes nothing
                try:
                    graph = (self._correlation_graph(t) if t.correlation is not None
                             else self._knn_graph(t.param, t.block_ptr))
                    laplacian = graph.laplacian(normalized=self.normalized)
                    state = TargetState(graph, self._basis(laplacian, t.basis), t.theta0, t.correlation)
                    staged.append((t, self._staged(t, state, laplacian)))
                except ValueError as exc:
                    self._generator.set_state(generator_state)  # the failed attempt's draws never happened
                    raise ValueError(f"refresh at step {self.steps}, target {t.name}: {exc}") from exc
                if graph.num_edges == 0 and graph.num_nodes > 1:
                    edgeless.append(t.name)
            for t, new_state in staged:
                self._assign(t, new_state)
        if edgeless:
            source = ("gradient-correlation EMAs (no two rows of a block with a non-zero gradient correlation yet, "
                      "e.g. all-zero gradients)" if self.graph_kind == "gradient_correlation"
                      else "kNN graphs of the weights (no two rows of a block with a positive cosine similarity)")
            warnings.warn(f"refresh at step {self.steps}: the graphs of {', '.join(edgeless)} have no edges, built "
                          f"from their {source}: until a refresh finds edges, their gradients are projected onto k "
                          "arbitrary basis vectors per block", stacklevel=2)
        logger.info("refreshed the graphs and bases of %d targets at step %d in %.3f s", len(self._targets),
                    self.steps, time.perf_counter() - start)

    def remove_hooks(self) -> None:
        """Detach hook mode's gradient hooks (the filter then works in explicit mode)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.hook = False

    def config(self) -> dict:
        """The settings a saved state must match to be restored into this filter."""
        return {"graph": self.graph_kind, "normalized": self.normalized, "reg_normalized": self.reg_normalized,
                "k": self.k}

    def state_dict(self) -> dict:
        """Step count, the filter's generator state (uint8, ``torch.Generator.get_state()``), and per target its
        graph, basis, W₀ and correlation EMA (references, not copies: the filter never changes these tensors in
        place). With the model's and optimizer's state it resumes bit for bit, whatever torch's global RNG holds."""
        targets = {}
        for t in self._targets:
            entry = {"block_ptr": t.graph.block_ptr, "row": t.graph.row, "col": t.graph.col,
                     "weight": t.graph.weight, "U": t.basis.U, "eigenvalues": t.basis.eigenvalues}
            if t.theta0 is not None:
                entry["theta0"] = t.theta0
            if t.correlation is not None:
                entry["correlation"] = t.correlation
            targets[t.name] = entry
        return {"version": _STATE_VERSION, "steps": self.steps, "generator": self._generator.get_state(),
                **self.config(), "targets": targets}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what ``state_dict()`` returned; the targets must have the same names and shapes. Everything is
        checked before anything is assigned: a failing load leaves the filter as it was."""
        if not isinstance(state_dict, Mapping) or state_dict.get("version") not in (1, 2, _STATE_VERSION):
            raise ValueError(f"state_dict must come from SpectralGradientFilter.state_dict() (version "
                             f"{_STATE_VERSION}), got {type(state_dict).__name__} with version "
                             f"{state_dict.get('version') if isinstance(state_dict, Mapping) else None}")
        mine = self.config()
        if state_dict["version"] == 1:  # before reg_normalized existed: the regulariser used the filter's L
            mine.pop("reg_normalized")
        for key, value in mine.items():
            if key not in state_dict or state_dict[key] != value:
                raise ValueError(f"state_dict has {key}={state_dict.get(key)!r} but this filter has {key}={value!r}")
        saved = state_dict.get("targets")
        if not isinstance(saved, Mapping):
            raise ValueError(f"state_dict['targets'] must be a dict of per-target entries, got "
                             f"{type(saved).__name__}")
        self._check_names(saved)
        generator = _checked_generator(state_dict.get("generator")) if state_dict["version"] >= 3 else None
        states = {}
        for t in self._targets:
            entry = saved[t.name]
            required = ("block_ptr", "row", "col", "weight", "U", "eigenvalues")
            missing = [key for key in required if not isinstance(entry.get(key), torch.Tensor)]
            if missing:
                raise ValueError(f"state_dict entry of {t.name} lacks the tensors {missing}")
            for key in ("theta0", "correlation"):
                if key in entry and not isinstance(entry[key], torch.Tensor):
                    raise ValueError(f"state_dict {key} of {t.name} must be a tensor, got {type(entry[key]).__name__}")
            meta = [key for key, value in entry.items() if isinstance(value, torch.Tensor) and value.is_meta]
            if meta:
                raise ValueError(f"state_dict entry of {t.name} holds meta tensors (no data) for {meta}")
            if entry["eigenvalues"].dtype != entry["U"].dtype:
                raise ValueError(f"state_dict basis of {t.name}: eigenvalues are {entry['eigenvalues'].dtype}, U is "
                                 f"{entry['U'].dtype}; they must have one dtype")
            device, rows = local_tensor(t.param).device, local_tensor(t.param).shape[0]
            if entry["U"].dim() != 2 or entry["U"].shape[0] != rows:
                raise ValueError(f"state_dict basis of {t.name} has shape {tuple(entry['U'].shape)}, but the weight "
                                 f"has {rows} rows here (for another world size, use "
                                 "spectralkern.optim.checkpoint)")
            graph = _checked_graph(t.name, rows, entry["block_ptr"], entry["row"], entry["col"], entry["weight"],
                                   device)
            try:
                basis = SpectralBasis(entry["U"].to(device).clone(), entry["eigenvalues"].to(device).clone(),
                                      graph.block_ptr)
            except (TypeError, ValueError) as error:
                raise ValueError(f"state_dict basis of {t.name}: {error}") from error
            theta0, correlation = entry.get("theta0"), entry.get("correlation")
            states[t.name] = TargetState(graph, basis, None if theta0 is None else theta0.to(device).clone(),
                                         None if correlation is None else correlation.to(device).clone())
        self.restore(states, state_dict.get("steps"))
        if generator is not None:  # versions 1 and 2 saved none: the filter keeps its own
            self._generator = generator

    def restore(self, states: Mapping[str, TargetState], steps: int) -> None:
        """Replace every target's state by ``states[name]`` and the step count by ``steps``; rebuilds Laplacians
        and gains (no eigensolve). All-or-nothing: every entry is checked (names, shapes, dtypes, devices, W₀ and
        correlation presence and shape) before the first is assigned."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        self._check_names(states)
        staged = [self._staged(t, states[t.name], None) for t in self._targets]
        for t, new in zip(self._targets, staged):
            self._assign(t, new | {"block_ptr": new["graph"].block_ptr})
        self.steps = steps
        self._recorded_scale, self._recorded_unscaled = None, False

    def __repr__(self) -> str:
        return (f"SpectralGradientFilter(targets={len(self._targets)}, graph={self.graph_kind!r}, "
                f"block_size={self.block_size}, k={self.k}, filter_method={self.filter_method!r}, "
                f"passthrough={self.passthrough}, refresh_every={self.refresh_every}, "
                f"reg_weight={self._reg_weight}, hook={self.hook}, steps={self.steps})")

    # ------------------------------------------------------------------------------------ internals
    def _skipped_nonfinite(self, name: str) -> None:
        if self.nonfinite_observations == 0:
            warnings.warn(f"the gradient of {name} holds inf/NaN values (an overflowing fp16 step?): it was left "
                          "out of the gradient-correlation statistics. Such gradients are counted in "
                          "filt.nonfinite_observations; this warning is given once", RuntimeWarning, stacklevel=4)
        self.nonfinite_observations += 1

    def _record(self, scale: torch.Tensor) -> None:
        self._recorded_scale = scale if self._recorded_scale is None else self._recorded_scale + scale

    def _check_names(self, saved: Mapping) -> None:
        names = [t.name for t in self._targets]
        if sorted(saved) != sorted(names):
            raise ValueError(f"the saved targets {sorted(saved)} differ from this filter's targets {sorted(names)}")

    def _staged(self, t: FilterTarget, state: TargetState, laplacian: GraphLaplacian | None) -> dict:
        """Everything ``_assign`` sets on ``t`` for ``state``, checked against the weight (raises, assigns nothing).
        ``laplacian``: the filter's Laplacian of ``state.graph`` when the caller has it already."""
        local = local_tensor(t.param)
        rows, device = local.shape[0], local.device
        graph, basis = state.graph, state.basis
        if not isinstance(graph, ParameterGraph) or not isinstance(basis, SpectralBasis):
            raise TypeError(f"the state of {t.name} must hold a ParameterGraph and a SpectralBasis, got "
                            f"{type(graph).__name__} and {type(basis).__name__}")
        if graph.num_nodes != rows or basis.num_nodes != rows:
            raise ValueError(f"the state of {t.name} has a graph of {graph.num_nodes} and a basis of "
                             f"{basis.num_nodes} rows, but the weight has {rows} rows here")
        if basis.k != self.k:
            raise ValueError(f"the basis of {t.name} has k = {basis.k} columns, this filter k = {self.k}")
        expected_ptr = torch.tensor([0, rows]) if graph.has_cross_block_edges else graph.block_ptr
        if not torch.equal(basis.block_ptr, expected_ptr.cpu()):
            raise ValueError(f"the basis of {t.name} has blocks {basis.block_ptr.tolist()}, its graph "
                             f"{expected_ptr.tolist()}")
        if basis.dtype != graph.dtype:
            raise ValueError(f"the basis of {t.name} is {basis.dtype}, its graph {graph.dtype}; the basis must have "
                             "the Laplacian's dtype")
        if basis.device != device or graph.device != device:
            raise ValueError(f"the state of {t.name} is on {graph.device} / {basis.device} ({basis.dtype}); the "
                             f"weight is on {device}")
        theta0, correlation = state.theta0, state.correlation
        if (theta0 is not None) != self._keeps_theta0:
            raise ValueError(f"the state {'has' if theta0 is not None else 'lacks'} W₀ for {t.name}; build the "
                             "filter with the same reg_weight (zero or non-zero) as the saved one")
        if theta0 is not None:
            if tuple(theta0.shape) != tuple(local.shape) or not theta0.is_floating_point():
                raise ValueError(f"the saved W₀ of {t.name} is {theta0.dtype} of shape {tuple(theta0.shape)}, the "
                                 f"weight here is {local.dtype} of shape {tuple(local.shape)}")
            if not bool(torch.isfinite(theta0).all()):
                raise ValueError(f"the saved W₀ of {t.name} holds inf/NaN values")
            theta0 = theta0.to(device=device, dtype=local.dtype)
        sizes = graph.block_sizes
        n_max = int(sizes.max()) if sizes.numel() else 0
        if (correlation is not None) != (self.graph_kind == "gradient_correlation"):
            raise ValueError(f"the state {'has' if correlation is not None else 'lacks'} a gradient-correlation "
                             f"EMA for {t.name}, this filter uses graph={self.graph_kind!r}")
        if correlation is not None:
            if tuple(correlation.shape) != (graph.num_blocks, n_max, n_max) or not correlation.is_floating_point():
                raise ValueError(f"the saved correlation EMA of {t.name} is {correlation.dtype} of shape "
                                 f"{tuple(correlation.shape)}, expected float of shape "
                                 f"{(graph.num_blocks, n_max, n_max)}")
            if not bool(torch.isfinite(correlation).all()) or (correlation.numel() and float(correlation.min()) < 0):
                raise ValueError(f"the saved correlation EMA of {t.name} must be finite and non-negative")
            correlation = correlation.to(device)
        if laplacian is None:
            laplacian = graph.laplacian(normalized=self.normalized)
        reg_laplacian = (laplacian if self.reg_normalized == self.normalized
                         else graph.laplacian(normalized=self.reg_normalized))
        staged = {"graph": graph, "laplacian": laplacian, "reg_laplacian": reg_laplacian, "basis": basis,
                  "gains": self._gains_for(t.name, basis), "theta0": theta0, "correlation": correlation}
        if self.filter_method == "chebyshev":
            lambda_max = laplacian.spectrum_bound() or 1.0  # an edgeless graph: spectrum {0}
            acc = torch.float64 if local.dtype == torch.float64 else torch.float32
            coeffs = chebyshev_coefficients(self.gains, self.chebyshev_order, lambda_max).to(device=device, dtype=acc)
            staged["lambda_max"], staged["chebyshev_coeffs"] = lambda_max, coeffs
            staged["block_operator"] = (_block_operator(laplacian, coeffs, lambda_max, acc)
                                        if 0 < n_max <= MATERIALIZE_MAX_BLOCK else None)
        return staged

    @staticmethod
    def _assign(t: FilterTarget, staged: dict) -> None:
        for key, value in staged.items():
            setattr(t, key, value)

    def _make_hook(self, target: FilterTarget) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                grad = target.local_grad(param.grad)
                written = target._written
                if written is not None and written[0]() is param.grad and grad._version == written[1] + 1:
                    # backward accumulated into the gradient the hook (or step) had filtered: F(F(g1) + g2)
                    raise RuntimeError(f"a second backward accumulated into the already filtered gradient of "
                                       f"{target.name}: hook mode would filter the first backward's share twice. "
                                       "Zero the gradients after each step (or, when you discard gradients "
                                       "without stepping, set them to None); for gradient accumulation over "
                                       "several backwards build the filter with hook=False")
                target.observe(grad)
                target.filter_(grad)
                target.mark_written()
                target._stepped = False
        return hook

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

    def _correlation_graph(self, t: FilterTarget) -> ParameterGraph:
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
        r, c, w = symmetrize_max(n, row[keep], col[keep], top.values[keep])
        return ParameterGraph(n, block_ptr, r, c, w)

    def _basis(self, laplacian: GraphLaplacian, previous: SpectralBasis | None) -> SpectralBasis:
        """The k lowest eigenpairs per block, warm-started from the previous basis when it has the same layout."""
        warm = (previous is not None and previous.k == self.k and previous.num_nodes == laplacian.num_nodes
                and torch.equal(previous.block_ptr, laplacian.block_ptr) and previous.dtype == laplacian.dtype
                and previous.device == laplacian.device and not laplacian.has_cross_block_edges)
        return lowest_eigenpairs(laplacian, self.k, v0=previous if warm else None, generator=self._generator)

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


def _check_reg_weight(value: object) -> float:
    value = _finite("reg_weight", value)
    if value < 0:
        raise ValueError(f"reg_weight must be >= 0 (it weighs a penalty), got {value}")
    return value


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


def _checked_generator(state: object) -> torch.Generator:
    """A CPU generator set to the saved ``get_state()`` tensor (raises ValueError for anything else)."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1 or state.is_meta:
        got = (f"{state.dtype} of shape {tuple(state.shape)} on {state.device}" if isinstance(state, torch.Tensor)
               else type(state).__name__)
        raise ValueError(f"state_dict['generator'] must be the uint8 tensor of torch.Generator.get_state(), got {got}")
    generator = torch.Generator()
    try:
        generator.set_state(state.cpu())
    except RuntimeError as error:
        raise ValueError(f"state_dict['generator'] is not a CPU generator state: {error}") from error
    return generator


def _checked_graph(name: str, rows: int, block_ptr: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                   weight: torch.Tensor, device: torch.device) -> ParameterGraph:
    """A ParameterGraph of saved edge lists, after checking them (layout, index ranges, weights)."""
    try:
        block_ptr = check_block_ptr(block_ptr, rows)
    except (TypeError, ValueError) as error:
        raise ValueError(f"state_dict block_ptr of {name}: {error}") from error
    if not (row.dim() == col.dim() == weight.dim() == 1 and row.shape == col.shape == weight.shape):
        raise ValueError(f"state_dict graph of {name}: row, col and weight must be 1-D of one length, got shapes "
                         f"{tuple(row.shape)}, {tuple(col.shape)}, {tuple(weight.shape)}")
    if any(t.device.type == "meta" for t in (row, col, weight)):   # issue 21: no values to check or load
        raise ValueError(f"state_dict graph of {name}: row, col and weight must hold data, got a meta tensor")
    if (row.is_floating_point() or col.is_floating_point() or not weight.is_floating_point()
            or any(t.is_complex() or t.dtype == torch.bool for t in (row, col))):
        raise ValueError(f"state_dict graph of {name}: integer row/col and float weights expected, got "
                         f"{row.dtype}, {col.dtype}, {weight.dtype}")
    if row.numel() and (int(row.min()) < 0 or int(col.min()) < 0 or int(row.max()) >= rows
                        or int(col.max()) >= rows):
        raise ValueError(f"state_dict graph of {name}: edge indices outside [0, {rows})")
    if not bool(torch.isfinite(weight).all()) or (weight.numel() and float(weight.min()) < 0):
        raise ValueError(f"state_dict graph of {name}: edge weights must be finite and non-negative")
    return ParameterGraph(rows, block_ptr, row.to(device, torch.int64), col.to(device, torch.int64),
                          weight.to(device))


def _block_operator(laplacian: GraphLaplacian, coeffs: torch.Tensor, lambda_max: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """(B, n_max, n_max) dense g(L_b) of every block: the Chebyshev polynomial applied to the block-local identity
    (column j of block b: g(L_b) e_j), zero-padded. No eigendecomposition."""
    ptr = laplacian.block_ptr
    sizes = ptr[1:] - ptr[:-1]
    num_blocks, n = sizes.numel(), int(ptr[-1])
    n_max = int(sizes.max())
    device = laplacian.device
    node_block = torch.repeat_interleave(torch.arange(num_blocks), sizes)
    local = torch.arange(n) - ptr[:-1][node_block]
    eye = torch.zeros(n, n_max, dtype=dtype, device=device)
    eye[torch.arange(n, device=device), local.to(device)] = 1
    columns = chebyshev_filter(eye, laplacian, coeffs, lambda_max=lambda_max)        # (N, n_max): rows of g(L_b)
    operator = torch.zeros(num_blocks, n_max, n_max, dtype=dtype, device=device)
    operator[node_block.to(device), local.to(device)] = columns
    return operator


def _apply_block_operator(operator: torch.Tensor, block_ptr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y_b = G_b x_b for every block of the rows of x (N, d); one batched GEMM; y in x's dtype."""
    num_blocks, n_max = operator.shape[0], operator.shape[1]
    sizes = block_ptr[1:] - block_ptr[:-1]
    xw = x.to(operator.dtype)
    if bool((sizes == n_max).all()):
        return torch.bmm(operator, xw.reshape(num_blocks, n_max, -1)).reshape(x.shape).to(x.dtype)
    node_block = torch.repeat_interleave(torch.arange(num_blocks), sizes).to(x.device)
    local = (torch.arange(int(block_ptr[-1])) - block_ptr[:-1][node_block.cpu()]).to(x.device)
    padded = xw.new_zeros(num_blocks, n_max, x.shape[1])
    padded[node_block, local] = xw
    return torch.bmm(operator, padded)[node_block, local].to(x.dtype)


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


__all__ = ["FILTER_METHODS", "GRAPHS", "FilterTarget", "SpectralGradientFilter", "TargetState", "find_targets"]
