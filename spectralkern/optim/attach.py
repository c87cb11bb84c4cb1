"""Checks shared by the optimizers that take ``spectral_filter=``: the filter can drive them, and it holds the very
parameter tensors they update."""
from __future__ import annotations

from itertools import chain

from .gradient_filter import SpectralGradientFilter


def check_filter_attachable(spectral_filter: SpectralGradientFilter) -> None:
    """Raise if ``spectral_filter`` cannot drive an optimizer that filters inside its step (hook mode)."""
    if spectral_filter.hook:
        raise ValueError("spectral_filter is in hook mode, which already filters the gradients during backward; "
                         "an optimizer with spectral_filter= would filter them a second time. Build the filter with "
                         "hook=False (or call filt.remove_hooks())")


def check_targets_updated(spectral_filter: SpectralGradientFilter, param_groups: list[dict]) -> None:
    """Raise if a weight the filter targets is not among the optimizer's parameters (the same tensor object)."""
    mine = {id(p) for p in chain.from_iterable(g["params"] for g in param_groups)}
    missing = [name for name, p in spectral_filter.targets if id(p) not in mine]
    if missing:
        raise ValueError(f"spectral_filter targets {', '.join(missing)}, which this optimizer does not update: "
                         "its parameters are other tensors. Pass every targeted parameter to the optimizer, and "
                         "build the filter after the model is wrapped (fully_shard, and accelerate's FSDP2 prepare "
                         "inside Trainer.train(), replace the parameters); with the HF Trainer pass a factory: "
                         "SpectralTrainer(..., spectral_filter=lambda model: sk.SpectralGradientFilter(model, ...))")


__all__ = ["check_filter_attachable", "check_targets_updated"]
