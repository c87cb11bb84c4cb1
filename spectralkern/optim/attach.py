"""Checks shared by the optimizers that take ``spectral_filter=``: the filter can drive them, and it holds the very
parameter tensors they update."""
from __future__ import annotations

from itertools import chain

import torch

from .gradient_filter import SpectralGradientFilter

# the dtypes the update kernels implement (real floating point); complex parameters would lose their imaginary part
SUPPORTED_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_filter_attachable(spectral_filter: SpectralGradientFilter) -> None:
    """Raise if ``spectral_filter`` cannot drive an optimizer that filters inside its step (hook mode)."""
    if spectral_filter.hook:
        raise ValueError("spectral_filter is in hook mode, which already filters the gradients during backward; "
                         "an optimizer with spectral_filter= would filter them a second time. Build the filter with "
                         "hook=False (or call filt.remove_hooks())")


def check_param_dtypes(param_group: dict, group_index: int, optimizer: str) -> None:
    """Raise TypeError naming the parameter (its name when the group has ``param_names``, else its index) whose
    dtype the optimizer does not implement (complex, integer, float8)."""
    params = param_group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    names = param_group.get("param_names")
    if params and all(isinstance(p, tuple) and len(p) == 2 for p in params):  # named parameters: (name, tensor)
        names, params = [name for name, _ in params], [p for _, p in params]
    for index, p in enumerate(params):
        if isinstance(p, torch.Tensor) and p.dtype not in SUPPORTED_PARAM_DTYPES:
            which = (f"parameter {names[index]!r}" if names is not None and index < len(names)
                     else f"parameter {index}")
            raise TypeError(f"{optimizer} supports parameters of dtype float16, bfloat16, float32 or float64; "
                            f"{which} of param group {group_index} is {p.dtype} (shape {tuple(p.shape)})"
                            + (": complex parameters would lose their imaginary part; train real and imaginary "
                               "parts as separate real parameters (torch.view_as_real)" if p.is_complex() else ""))


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


__all__ = ["SUPPORTED_PARAM_DTYPES", "check_filter_attachable", "check_param_dtypes", "check_targets_updated"]
