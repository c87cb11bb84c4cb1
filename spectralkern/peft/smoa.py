"""SMoA (paper 002): Spectrum Modulation Adapter for the Linear layers of any torch model.

Per target layer W (out × in):

1. once, in fp32: SVD W = U S Vᵀ; row i scores its spectral centre of mass
   score_i = Σ_j j·U_ij² S_j² / Σ_j U_ij² S_j² (j = 0, 1, ... over singular values, largest first); rows are
   ordered by score, columns likewise with V;
2. the ordered rows and columns are split into K aligned groups (``torch.tensor_split`` sizes: the first groups
   get the remainder); block k's anchor is M_k = W[rows_k][:, cols_k], read from the base weight (never saved);
3. block k gets a low-rank branch A_k (r_k × in_k, kaiming-uniform a=√5), B_k (out_k × r_k, zeros);
4. ΔW[rows_k, cols_k] = (alpha / r) · (B_k A_k) ⊙ M_k, and y = W x + ΔW dropout(x).

This follows the authors' parameterisation (misonsky/SMoA, ``cpeft/tuners/smoa.py``) with two deliberate
differences: the total rank must split evenly across blocks unless ``branch_ranks`` is given (the authors hand
the remainder to the first blocks), and inside each block the indices are kept in ascending order rather than
score order. The second is a relabelling of B_k's rows and A_k's columns (B starts at zero and A's columns are
i.i.d., so training is equivalent); it keeps the fused backward's gathers within narrow windows of each row.
The block assignment is saved with the adapter, so a save/load round trip never depends on SVD round-off.

``impl="fused"`` runs ``spectralkern.ops.smoa_linear`` (ΔW never materialised, the base GEMM fused in when
dropout is off); ``impl="reference"`` materialises ΔW every call, like the authors.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_int
from ..ops.smoa_linear import SMoALayout, smoa_delta_weight, smoa_linear
from ._patching import (combine_fingerprints, find_target_modules, fingerprint_tensors, freeze_all_except,
                        is_linear_like, linear_features, linear_weight, load_adapter_file, read_adapter_metadata,
                        replace_module, save_adapter_file)

METHOD = "smoa"
IMPLS = ("fused", "reference")
# unmerge divides the merged weight by the modulation 1 + s·(B_k A_k); below this it is not invertible in practice.
MIN_UNMERGE_FACTOR = 1e-3


# ------------------------------------------------------------------------------------------ config
@dataclass
class SMoAConfig:
    """SMoA hyper-parameters.

    Args:
        r: total rank per layer (summed over blocks); trainable parameters ≈ r (in + out) / K per layer.
        alpha: the update is scaled by alpha / r.
        num_blocks: K, the number of aligned spectral blocks (must be ≤ min(out, in) of every target).
        branch_ranks: per-block ranks r_k (K entries ≥ 0 summing to r); None splits r evenly (r % K == 0).
        dropout: dropout probability on x before the adapter branch.
        target_modules: names matched by suffix (``["query", "value"]``, ``["q_proj", "v_proj"]``,
            ``["c_attn"]``), or one regex over the full module name.
        impl: "fused" (Triton/custom op) or "reference" (eager, ΔW materialised).
    """
    r: int = 8
    alpha: float = 8.0
    num_blocks: int = 2
    branch_ranks: list[int] | None = None
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    impl: str = "fused"

    def __post_init__(self) -> None:
        check_int("r", self.r, 1)
        check_int("num_blocks", self.num_blocks, 1)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise TypeError(f"alpha must be a finite number, got {self.alpha!r}")
        if self.branch_ranks is None:
            if self.r % self.num_blocks:
                raise ValueError(f"r = {self.r} does not split evenly across num_blocks = {self.num_blocks}; "
                                 "choose r divisible by num_blocks or give branch_ranks (one rank per block)")
        else:
            ranks = list(self.branch_ranks)
            if len(ranks) != self.num_blocks:
                raise ValueError(f"branch_ranks must have num_blocks = {self.num_blocks} entries, got {ranks}")
            for k, rank in enumerate(ranks):
                check_int(f"branch_ranks[{k}]", rank, 0)
            if sum(ranks) != self.r:
                raise ValueError(f"branch_ranks must sum to r = {self.r}, got {ranks} (sum {sum(ranks)})")
            self.branch_ranks = ranks
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def ranks(self) -> list[int]:
        return list(self.branch_ranks) if self.branch_ranks is not None else [self.r // self.num_blocks] * self.num_blocks

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> SMoAConfig:
        return SMoAConfig(**values)


# ------------------------------------------------------------------------------------------ spectral blocks
def spectral_order(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row order, column order) of a (out × in) weight by spectral centre of mass (fp32 SVD), ascending.

    score_i = Σ_j j e_ij / Σ_j e_ij with e_ij = U_ij² S_j² (columns: V instead of U). Ties keep index order.
    """
    w = weight.detach().to(torch.float32)
    out_features, in_features = w.shape
    if min(out_features, in_features) == 0:
        return torch.arange(out_features, device=w.device), torch.arange(in_features, device=w.device)
    try:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    except RuntimeError:  # some GPU solvers fail on ill-conditioned input; the CPU one does not
        u, s, vh = (t.to(w.device) for t in torch.linalg.svd(w.cpu(), full_matrices=False))

    def order(vectors: torch.Tensor) -> torch.Tensor:
        energy = vectors.square() * s.square()
        positions = torch.arange(s.numel(), device=w.device, dtype=w.dtype)
        score = (energy * positions).sum(1) / energy.sum(1).clamp_min(torch.finfo(w.dtype).tiny)
        return torch.argsort(score, stable=True)

    return order(u), order(vh.T)


def spectral_layout(weight: torch.Tensor, num_blocks: int) -> SMoALayout:
    """The K aligned blocks of ``weight`` (see the module docstring), indices ascending inside each block."""
    rows, cols = spectral_order(weight)
    row_blocks = [torch.sort(b).values for b in torch.tensor_split(rows, num_blocks)]
    col_blocks = [torch.sort(b).values for b in torch.tensor_split(cols, num_blocks)]
    return SMoALayout.from_blocks(row_blocks, col_blocks)


# ------------------------------------------------------------------------------------------ the layer
class SMoALinear(nn.Module):
    """A Linear-like layer (``nn.Linear`` or HF ``Conv1D``) with an SMoA adapter.

    Trainable: ``lora_A[k]`` (r_k × in_k) and ``lora_B[k]`` (out_k × r_k), fp32 (fp64 for fp64 bases); the base
    layer stays as ``base_layer`` and is not modified except by ``merge``. x (..., in) -> (..., out).
    """

    def __init__(self, base_layer: nn.Module, config: SMoAConfig, *, layout: SMoALayout | None = None,
                 name: str = "") -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"base_layer {name!r} must be nn.Linear or transformers Conv1D, "
                            f"got {type(base_layer).__name__}")
        in_features, out_features = linear_features(base_layer)
        if config.num_blocks > min(out_features, in_features):
            raise ValueError(f"num_blocks = {config.num_blocks} is larger than min(out, in) = "
                             f"{min(out_features, in_features)} of layer {name!r} (weight {out_features} x "
                             f"{in_features}); every block needs at least one row and one column")
        weight = linear_weight(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.ranks = config.ranks
        self.scaling = config.scaling
        self.impl = config.impl
        self.merged = False
        self.base_fingerprint = fingerprint_tensors({"weight": weight})
        if layout is None:
            layout = spectral_layout(weight, config.num_blocks)
        self._set_layout(layout.to(weight.device))

        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for rank, rows, cols in zip(self.ranks, self.row_sizes, self.col_sizes):
            a = torch.empty(rank, cols, dtype=dtype, device=weight.device)
            if a.numel():
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear(in_k, r_k).weight
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(rows, rank, dtype=dtype, device=weight.device)))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _set_layout(self, layout: SMoALayout) -> None:
        if (layout.out_features, layout.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"layout covers a ({layout.out_features}, {layout.in_features}) weight, the layer is "
                             f"({self.out_features}, {self.in_features})")
        if hasattr(self, "lora_A") and layout.num_blocks != len(self.lora_A):
            raise ValueError(f"layout has {layout.num_blocks} blocks, the layer has {len(self.lora_A)}")
        self.row_sizes, self.col_sizes = layout.row_sizes, layout.col_sizes
        # Not persistent: the layout is recomputable from the base weight, and save_smoa stores it explicitly.
        self.register_buffer("smoa_index", layout.index, persistent=False)

    @property
    def layout(self) -> SMoALayout:
        return SMoALayout(self.smoa_index, self.row_sizes, self.col_sizes)

    def packed_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out × r), A (r × in)) block-diagonal in the layout's permuted order, differentiable."""
        return torch.block_diag(*self.lora_B), torch.block_diag(*self.lora_A)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out × in), fp32 (fp64 for fp64 bases), materialised; anchors from the current base weight."""
        b, a = self.packed_factors()
        return smoa_delta_weight(linear_weight(self.base_layer), b, a, self.layout, self.scaling, dtype=b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or sum(self.ranks) == 0:
            return self.base_layer(x)
        weight = linear_weight(self.base_layer)
        b, a = self.packed_factors()
        if self.impl == "reference":
            # As the authors: ΔW built in the factors' dtype, applied in x's dtype.
            delta = smoa_delta_weight(weight, b, a, self.layout, self.scaling, dtype=b.dtype).to(x.dtype)
            return self.base_layer(x) + F.linear(self.dropout(x), delta)
        bias = self.base_layer.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return smoa_linear(x, weight, bias, b, a, self.layout, self.scaling, include_base=True)
        return self.base_layer(x) + smoa_linear(self.dropout(x), weight, None, b, a, self.layout, self.scaling,
                                                include_base=False)

    def _modulation(self) -> torch.Tensor:
        # 1 + s·(B_k A_k) on the blocks, 1 elsewhere: merged weight = W ⊙ modulation (ΔW of an all-ones anchor).
        b, a = self.packed_factors()
        ones = torch.ones(self.out_features, self.in_features, dtype=b.dtype, device=b.device)
        return 1.0 + smoa_delta_weight(ones, b, a, self.layout, self.scaling, dtype=b.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight (W ← W + ΔW = W ⊙ (1 + s·B_k A_k on the blocks))."""
        if self.merged:
            warnings.warn("SMoA layer is already merged; nothing to do", stacklevel=2)
            return
        weight = linear_weight(self.base_layer)
        modulation = self._modulation()
        if float(modulation.abs().min()) < MIN_UNMERGE_FACTOR:
            warnings.warn("a modulation factor 1 + s·(B A) is near zero: unmerge() will not be able to recover "
                          "the base weights", stacklevel=2)
        weight.copy_((weight.to(modulation.dtype) * modulation).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (W ← W_merged / (1 + s·B_k A_k)); exact up to rounding in the weight's dtype."""
        if not self.merged:
            warnings.warn("SMoA layer is not merged; nothing to do", stacklevel=2)
            return
        modulation = self._modulation()
        smallest = float(modulation.abs().min())
        if smallest < MIN_UNMERGE_FACTOR:
            raise RuntimeError(f"cannot unmerge: the modulation 1 + s·(B A) reaches {smallest:.2e}, so the base "
                               "weights are not recoverable from the merged ones; reload the base model")
        weight = linear_weight(self.base_layer)
        weight.copy_((weight.to(modulation.dtype) / modulation).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}, scaling={self.scaling:g}, "
                f"blocks rows={list(self.row_sizes)} cols={list(self.col_sizes)}, impl={self.impl}, "
                f"merged={self.merged}")


# ------------------------------------------------------------------------------------------ model level
def smoa_layers(model: nn.Module) -> dict[str, SMoALinear]:
    """{full module name: SMoALinear} of ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SMoALinear)}


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for layer in smoa_layers(model).values() for p in (*layer.lora_A, *layer.lora_B)}


def apply_smoa(model: nn.Module, config: SMoAConfig, *, layouts: dict[str, SMoALayout] | None = None) -> nn.Module:
    """Wrap the target layers of ``model`` (in place) with SMoA adapters and freeze everything else.

    Args:
        model: any torch model (HF transformers models included; GPT-2's Conv1D is handled).
        config: the ``SMoAConfig``.
        layouts: precomputed blocks per module name (``load_smoa`` passes the saved ones); others come from SVD.
    Returns:
        ``model``; only the SMoA factors require grad afterwards. Report with ``trainable_parameters(model)``.
    """
    if not isinstance(config, SMoAConfig):
        raise TypeError(f"config must be an SMoAConfig, got {type(config).__name__}")
    existing = smoa_layers(model)
    if existing:
        raise ValueError(f"model already has SMoA adapters at {sorted(existing)}; apply_smoa adds one adapter per "
                         "model")
    targets = find_target_modules(model, config.target_modules)
    for name, module in targets:
        layout = None if layouts is None else layouts.get(name)
        replace_module(model, name, SMoALinear(module, config, layout=layout, name=name))
    keep = _adapter_parameter_ids(model)
    freeze_all_except(model, lambda _, p: id(p) in keep)
    model.smoa_config = config  # read by save_smoa
    return model


def merge_smoa(model: nn.Module) -> None:
    """Merge every SMoA layer of ``model`` into its base weight."""
    for layer in smoa_layers(model).values():
        layer.merge()


def unmerge_smoa(model: nn.Module) -> None:
    """Undo ``merge_smoa``."""
    for layer in smoa_layers(model).values():
        layer.unmerge()


def smoa_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the base weights of the SMoA layers (taken when each layer was wrapped)."""
    return combine_fingerprints({name: layer.base_fingerprint for name, layer in smoa_layers(model).items()})


def save_smoa(model: nn.Module, path: str | Path) -> Path:
    """Save the SMoA factors and block layouts (safetensors), with the config and base fingerprint as metadata.

    Anchors are not saved: they are the base weight's own entries.
    """
    layers = smoa_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SMoA layers to save; call apply_smoa first")
    config = getattr(model, "smoa_config", None)
    if not isinstance(config, SMoAConfig):
        raise ValueError("model.smoa_config is missing; save_smoa needs a model prepared by apply_smoa")
    tensors, layer_meta = {}, {}
    for name, layer in layers.items():
        for k, (a, b) in enumerate(zip(layer.lora_A, layer.lora_B)):
            tensors[f"{name}.lora_A.{k}"] = a
            tensors[f"{name}.lora_B.{k}"] = b
        parts = layer.layout.parts()
        tensors[f"{name}.row_perm"] = parts.row_perm
        tensors[f"{name}.col_perm"] = parts.col_perm
        layer_meta[name] = {"row_sizes": list(layer.row_sizes), "col_sizes": list(layer.col_sizes),
                            "fingerprint": layer.base_fingerprint}
    return save_adapter_file(path, tensors, method=METHOD, fingerprint=smoa_fingerprint(model),
                             config={"config": config.to_dict(), "layers": layer_meta})


def _saved_layout(tensors: dict[str, torch.Tensor], name: str, meta: dict) -> SMoALayout:
    row_perm, col_perm = tensors[f"{name}.row_perm"], tensors[f"{name}.col_perm"]
    row_blocks = torch.split(row_perm, meta["row_sizes"])
    col_blocks = torch.split(col_perm, meta["col_sizes"])
    return SMoALayout.from_blocks(list(row_blocks), list(col_blocks))


def load_smoa(model: nn.Module, path: str | Path, *, impl: str | None = None) -> nn.Module:
    """Load an adapter saved by ``save_smoa`` into ``model`` (in place) and return it.

    If ``model`` has no SMoA layers yet, they are created from the saved config and block layouts (no SVD);
    otherwise the saved factors replace the current ones. Anchors always come from ``model``'s base weights.
    ``impl`` ("fused" / "reference") overrides the saved config's implementation.

    Raises:
        BaseWeightMismatchError: the targeted base weights differ from those the adapter was trained on
            (checked before the model is modified).
        ValueError: the file is not an SMoA adapter, or its layers do not match the model's.
    """
    _, stored_fingerprint, meta = read_adapter_metadata(path)
    config = SMoAConfig.from_dict(meta["config"])
    if impl is not None:
        config = SMoAConfig.from_dict({**config.to_dict(), "impl": impl})
    layer_meta: dict = meta["layers"]
    layers = smoa_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"SMoA layers {merged} are merged into their base weights; unmerge_smoa(model) first "
                         "(the anchors are read from the unmerged base)")
    if layers:
        if set(layers) != set(layer_meta):
            raise ValueError(f"the adapter file has SMoA layers {sorted(layer_meta)}, the model has {sorted(layers)}")
        fingerprint = smoa_fingerprint(model)
    else:
        modules = dict(model.named_modules())
        missing = [name for name in layer_meta if name not in modules or not is_linear_like(modules[name])]
        if missing:
            raise ValueError(f"the adapter file targets modules {missing} that {type(model).__name__} lacks "
                             "(or that are not Linear-like)")
        fingerprint = combine_fingerprints({name: fingerprint_tensors({"weight": linear_weight(modules[name])})
                                            for name in layer_meta})
    tensors, _ = load_adapter_file(path, method=METHOD, expected_fingerprint=fingerprint)
    layouts = {name: _saved_layout(tensors, name, layer_meta[name]) for name in layer_meta}
    if not layers:
        apply_smoa(model, config, layouts=layouts)
        layers = smoa_layers(model)
    for name, layer in layers.items():
        layer._set_layout(layouts[name].to(layer.smoa_index.device))
        if impl is not None:
            layer.impl = impl
        _copy_factors(layer, name, tensors)
    return model


def _copy_factors(layer: SMoALinear, name: str, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for kind, params in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            for k, param in enumerate(params):
                key = f"{name}.{kind}.{k}"
                if key not in tensors:
                    raise ValueError(f"the adapter file lacks {key!r}")
                if tuple(tensors[key].shape) != tuple(param.shape):
                    raise ValueError(f"{key} has shape {tuple(tensors[key].shape)} in the file, the layer expects "
                                     f"{tuple(param.shape)}")
                param.copy_(tensors[key])


def smoa_parameter_count(config: SMoAConfig, layout: SMoALayout) -> int:
    """Trainable parameters of one SMoA layer: Σ_k r_k (in_k + out_k)."""
    return sum(r * (rows + cols) for r, rows, cols in zip(config.ranks, layout.row_sizes, layout.col_sizes))


__all__ = ["SMoAConfig", "SMoALinear", "apply_smoa", "load_smoa", "merge_smoa", "save_smoa",
                          "smoa_fingerprint", "smoa_layers", "smoa_parameter_count", "spectral_layout",
                          "spectral_order", "unmerge_smoa"]
