"""SMoA (paper 002) layers: one adapter unit per adapter name around a Linear-like base layer.

Per adapter, block k (rows_k, cols_k of the layout) gets a low-rank branch A_k (r_k × in_k, kaiming-uniform
a=√5), B_k (out_k × r_k, zeros), and

    ΔW[rows_k, cols_k] = (alpha / r) · (B_k A_k) ⊙ W[rows_k, cols_k],     y = W x + b + ΔW dropout(x)

with anchors read from the base weight (never saved). This follows the authors' parameterisation
(misonsky/SMoA, ``cpeft/tuners/smoa.py``) with two deliberate differences: the total rank must split evenly
across blocks unless ``branch_ranks`` is given, and inside each block the indices are kept in ascending order
rather than score order (a relabelling of B_k's rows and A_k's columns that keeps the fused backward's gathers
within narrow windows of each row). The block assignment is saved with the adapter, so a save/load round trip
never depends on SVD round-off.

Several adapters on one layer: each is anchored on the base weight W, y = W x + b + Σ_active ΔW_a x. Merging
multiplies: W + Σ_a ΔW_a = W ⊙ (1 + Σ_a s·(B A)_a on the blocks), so unmerge divides by the same modulation.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ...ops.smoa_linear import SMoALayout, smoa_delta_weight, smoa_linear
from .._lifecycle import SpectralTunerLayer
from .._patching import is_linear_like, linear_features, linear_weight
from .config import SMoAConfig

# unmerge divides the merged weight by the modulation 1 + Σ s·(B A); below this it is not invertible in practice.
MIN_UNMERGE_FACTOR = 1e-3


class SMoAAdapter(nn.Module):
    """One SMoA adapter of one layer: ``lora_A[k]`` (r_k × in_k), ``lora_B[k]`` (out_k × r_k), fp32 (fp64 for
    fp64 bases); buffers ``row_perm`` (out,) / ``col_perm`` (in,) int64: the layout (block k is the k-th
    ``block_sizes`` run of each). ``forward(x, weight, bias, include_base)``: x (..., in) -> (..., out)."""

    def __init__(self, config: SMoAConfig, layout: SMoALayout, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        if layout.num_blocks != config.num_blocks:
            raise ValueError(f"the layout has {layout.num_blocks} blocks, the config num_blocks = {config.num_blocks}")
        self.ranks = config.ranks
        self.scaling = config.scaling
        self.impl = config.impl
        self.num_blocks = config.num_blocks
        parts = layout.parts()
        self.register_buffer("row_perm", parts.row_perm.to(device, torch.int64))
        self.register_buffer("col_perm", parts.col_perm.to(device, torch.int64))
        self._set_layout(layout.to(device))
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for rank, rows, cols in zip(self.ranks, layout.row_sizes, layout.col_sizes):
            a = torch.empty(rank, cols, dtype=dtype, device=device)
            if a.numel():
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear(in_k, r_k).weight
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(rows, rank, dtype=dtype, device=device)))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_layout())

    def _set_layout(self, layout: SMoALayout) -> None:
        self.row_sizes, self.col_sizes = layout.row_sizes, layout.col_sizes
        # not persistent: rebuilt from row_perm / col_perm, which are saved
        self.register_buffer("smoa_index", layout.index, persistent=False)

    def _refresh_layout(self) -> None:
        """Rebuild the packed index from the (just loaded) row / column orders, keeping the block sizes."""
        rows = torch.split(self.row_perm, list(self.row_sizes))
        cols = torch.split(self.col_perm, list(self.col_sizes))
        self._set_layout(SMoALayout.from_blocks(list(rows), list(cols)))

    @property
    def layout(self) -> SMoALayout:
        return SMoALayout(self.smoa_index, self.row_sizes, self.col_sizes)

    def packed_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out × r), A (r × in)) block-diagonal in the layout's permuted order, differentiable."""
        return torch.block_diag(*self.lora_B), torch.block_diag(*self.lora_A)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW (out × in) anchored on ``weight`` (the base's (out, in) weight), in the factors' dtype."""
        b, a = self.packed_factors()
        return smoa_delta_weight(weight, b, a, self.layout, self.scaling, dtype=b.dtype)

    def modulation_delta(self, out_features: int, in_features: int) -> torch.Tensor:
        """s·(B_k A_k) on the blocks, 0 elsewhere: ΔW / W (the ΔW of an all-ones anchor)."""
        b, _ = self.packed_factors()
        return self.delta_weight(torch.ones(out_features, in_features, dtype=b.dtype, device=b.device))

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                include_base: bool) -> torch.Tensor:
        if sum(self.ranks) == 0:
            return F.linear(x, weight, bias) if include_base else x.new_zeros(*x.shape[:-1], weight.shape[0])
        b, a = self.packed_factors()
        if self.impl == "reference":
            # as the authors: ΔW built in the factors' dtype, applied in x's dtype
            update = F.linear(self.dropout(x), self.delta_weight(weight).to(x.dtype))
            return F.linear(x, weight, bias) + update if include_base else update
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return smoa_linear(x, weight, bias if include_base else None, b, a, self.layout, self.scaling,
                               include_base=include_base)
        update = smoa_linear(self.dropout(x), weight, None, b, a, self.layout, self.scaling, include_base=False)
        return F.linear(x, weight, bias) + update if include_base else update

    def extra_repr(self) -> str:
        return (f"ranks={self.ranks}, scaling={self.scaling:g}, blocks rows={list(self.row_sizes)} "
                f"cols={list(self.col_sizes)}, impl={self.impl}")


def new_adapter(base_layer: nn.Module, config: SMoAConfig, layout: SMoALayout) -> SMoAAdapter:
    """A fresh adapter for ``base_layer`` (nn.Linear or HF Conv1D) with the given blocks."""
    if not is_linear_like(base_layer):
        raise TypeError(f"SMoA adapts nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
    in_features, out_features = linear_features(base_layer)
    if (layout.out_features, layout.in_features) != (out_features, in_features):
        raise ValueError(f"the layout covers a ({layout.out_features}, {layout.in_features}) weight, the layer is "
                         f"({out_features}, {in_features})")
    if config.num_blocks > min(out_features, in_features):
        raise ValueError(f"num_blocks = {config.num_blocks} is larger than min(out, in) = "
                         f"{min(out_features, in_features)} (weight {out_features} x {in_features}); every block "
                         "needs at least one row and one column")
    weight = linear_weight(base_layer)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return SMoAAdapter(config, layout, dtype=dtype, device=weight.device)


class SMoALinear(SpectralTunerLayer):
    """A Linear-like layer (``nn.Linear`` or HF ``Conv1D``) with SMoA adapters ``smoa_adapters[name]``.

    The base layer stays as ``base_layer``, unmodified except by ``merge``. x (..., in) -> (..., out).
    """
    adapter_attr = "smoa_adapters"

    @classmethod
    def from_config(cls, base_layer: nn.Module, config: SMoAConfig, *, layout: SMoALayout | None = None,
                    adapter_name: str = "default") -> SMoALinear:
        """One layer with one adapter, outside any model (benchmarks, tests); blocks from SVD unless given."""
        from .layout import spectral_layout

        if layout is None:
            layout = spectral_layout(linear_weight(base_layer), config.num_blocks)
        return cls.wrap(base_layer, adapter_name, new_adapter(base_layer, config, layout))

    # the active adapter's pieces, for single-adapter users (benchmarks)
    @property
    def lora_A(self) -> nn.ParameterList:
        return self.active_unit.lora_A

    @property
    def lora_B(self) -> nn.ParameterList:
        return self.active_unit.lora_B

    @property
    def layout(self) -> SMoALayout:
        return self.active_unit.layout

    @property
    def scaling(self) -> float:
        return self.active_unit.scaling

    def packed_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.active_unit.packed_factors()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        units = self.active_units()
        if self.merged or not units:
            return self.base_layer(x, *args, **kwargs)
        weight, bias = linear_weight(self.base_layer), self.base_layer.bias
        result = units[0](x, weight, bias, include_base=True)
        for unit in units[1:]:
            result = result + unit(x, weight, None, include_base=False)
        return result

    def _modulation(self, names: list[str]) -> torch.Tensor | None:
        """1 + Σ_a s·(B A)_a over ``names`` (None for no adapters)."""
        if not names:
            return None
        out_features, in_features = linear_weight(self.base_layer).shape
        total = None
        for name in names:
            delta = self.units[name].modulation_delta(out_features, in_features)
            total = delta if total is None else total + delta.to(total.dtype)
        return 1.0 + total

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base weight: W ← W_base ⊙ (1 + Σ_merged s·(B A))."""
        names = self.adapters_to_merge(adapter_names)
        if not names:
            return
        weight = linear_weight(self.base_layer)
        current = self._modulation(self.merged_adapters)
        target = self._modulation(self.merged_adapters + names)
        value = weight.to(target.dtype)
        if current is not None:
            value = value / current
        value = (value * target).to(weight.dtype)
        if safe_merge and not bool(torch.isfinite(value).all()):
            raise ValueError(f"merging adapters {names} would put NaN/Inf into the base weight; nothing was merged")
        if float(target.abs().min()) < MIN_UNMERGE_FACTOR:
            raise ValueError(f"merging adapters {names}: a modulation factor 1 + s·(B A) reaches "
                             f"{float(target.abs().min()):.2e}, so unmerge could not recover the base weight; "
                             "nothing was merged")
        weight.copy_(value)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (W ← W_merged / (1 + Σ s·(B A))); exact up to rounding in the weight's dtype."""
        current = self._modulation(self.merged_adapters)
        if current is None:
            return
        weight = linear_weight(self.base_layer)
        weight.copy_((weight.to(current.dtype) / current).to(weight.dtype))
        self.merged_adapters = []

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW (out × in) of one adapter, anchored on the current base weight (unmerged)."""
        return self.units[adapter_name].delta_weight(linear_weight(self.base_layer))

    def extra_repr(self) -> str:
        return f"merged={self.merged_adapters}"
