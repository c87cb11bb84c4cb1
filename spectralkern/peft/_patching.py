"""Linear-like layer helpers, parameter reports and weight fingerprints shared by every adapter.

* ``nn.Linear`` and HF GPT-2's ``Conv1D`` (weight stored in × out) alike: :func:`is_linear_like`,
  :func:`linear_features`, :func:`linear_weight` (always an (out, in) *view*, so in-place merges write through);
* :func:`find_target_modules`: the target rule of ``spectralkern._targets`` for Linear-like modules;
* :func:`trainable_parameters`: what trains (peft's count: tied weights once);
* :func:`fingerprint_tensors`: a digest of base weights, so an adapter loaded onto other weights fails loudly.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._targets import find_modules


class BaseWeightMismatchError(ValueError):
    """The adapter was trained on other base weights than the model it is being loaded into."""


# ------------------------------------------------------------------------------------------ Linear-like layers
def _is_hf_conv1d(module: nn.Module) -> bool:
    # Checked by class name and attributes so transformers stays an optional dependency.
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and subclasses) and HF ``Conv1D`` (GPT-2's Linear with a transposed weight)."""
    return isinstance(module, nn.Linear) or _is_hf_conv1d(module)


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as (in, out) — HF ``Conv1D`` (peft calls it fan_in_fan_out)."""
    return _is_hf_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_hf_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"module must be nn.Linear or transformers Conv1D, got {type(module).__name__}")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear-like module as an (out, in) tensor that shares storage with the parameter.

    For ``Conv1D`` this is ``weight.T`` (a view): ``linear_weight(m).add_(delta)`` updates the stored weight.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_hf_conv1d(module):
        return module.weight.T
    raise TypeError(f"module must be nn.Linear or transformers Conv1D, got {type(module).__name__}")


# ------------------------------------------------------------------------------------------ finding targets
def linear_like_names(model: nn.Module) -> list[str]:
    """Full names of every Linear-like module in ``model``."""
    return [name for name, module in model.named_modules() if name and is_linear_like(module)]


def find_target_modules(model: nn.Module, target_modules: str | Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The Linear-like (name, module) pairs ``target_modules`` selects (``spectralkern._targets``' rule).

    Raises:
        ValueError: nothing matched (the message lists the Linear-like names that exist).
        TypeError: a matched module is not Linear-like, or ``target_modules`` is malformed.
    """
    return find_modules(model, target_modules, accept=is_linear_like, what="nn.Linear or transformers Conv1D")


# ------------------------------------------------------------------------------------------ trainability
@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable and total parameters (shared parameters counted once, like peft)."""
    trainable = total = 0
    for parameter in model.parameters():  # parameters() already de-duplicates tied weights
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return ParameterReport(trainable, total)


# ------------------------------------------------------------------------------------------ fingerprints
def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the names, shapes, dtypes and exact bytes of ``tensors`` (order-independent).

    Meant for the base weights an adapter was built on. Independent of device and strides; a different dtype
    (the same model loaded in bf16 instead of fp32) gives a different fingerprint, which is intended: anchors
    and adapters built on rounded weights differ. Costs one pass over the bytes (a copy to CPU for GPU tensors).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        header = f"{name}|{tuple(t.shape)}|{str(t.dtype).removeprefix('torch.')}\n"
        digest.update(header.encode())
        # view as bytes: dtypes without a numpy equivalent (bf16) hash fine this way.
        digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
