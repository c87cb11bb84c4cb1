"""FourierMoE (paper 003) and FourierFT as peft methods: ``get_peft_model(model, FourierMoEConfig(...))``.

config.py (hyper-parameters), frequencies.py (bands, positions, sampling), layer.py (adapter unit + tuner
layers, fused forward), model.py (the peft tuners), conversion.py (peft's FourierFT → ours). :func:`load` is the
one validated entry for adapter folders of either method.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .._lifecycle import apply as _apply
from .._lifecycle import layers_of, register
from .._lifecycle import load as _load
from .config import FourierFTConfig, FourierMoEConfig
from .conversion import check_peft_config, from_peft_fourierft, from_peft_fourierft_model, ifft2_amplitude
from .frequencies import (FrequencyLayout, band_energy_features, conjugate_pairs, radial_band_of,
                          sample_frequencies)
from .layer import FourierAdapter, FourierFTLinear, FourierMoELinear, fourier_delta_weights
from .model import FourierFTModel, FourierMoEModel

register(FourierMoEModel)
register(FourierFTModel)


def load(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default",
         is_trainable: bool = False) -> nn.Module:
    """Load a FourierMoE or FourierFT adapter folder into ``model``, checked before applied; see
    :func:`spectralkern.peft.load`."""
    from .._lifecycle import read_adapter_config

    peft_type = read_adapter_config(path).get("peft_type")
    config_cls = FourierFTConfig if peft_type == FourierFTConfig.PEFT_TYPE else FourierMoEConfig
    return _load(model, path, config_cls=config_cls, adapter_name=adapter_name, is_trainable=is_trainable)


def apply_fourier_moe(model: nn.Module, config: FourierMoEConfig | FourierFTConfig, *,
                      adapter_name: str = "default") -> nn.Module:
    """``model`` with FourierMoE / FourierFT injected in place (no PeftModel wrapper); only the coefficients and
    routers train afterwards."""
    if not isinstance(config, (FourierMoEConfig, FourierFTConfig)):
        raise TypeError(f"config must be a FourierMoEConfig or FourierFTConfig, got {type(config).__name__}")
    return _apply(model, config, adapter_name=adapter_name)


def fourier_moe_layers(model: nn.Module) -> dict[str, FourierMoELinear]:
    """{full module name: FourierMoELinear / FourierFTLinear} of ``model``."""
    return layers_of(model, FourierMoELinear)


def fourier_moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing losses of the routed layers' last forward (0.0 when none): add
    ``weight · fourier_moe_aux_loss(model)`` to the task loss yourself."""
    losses = [layer.aux_loss for layer in fourier_moe_layers(model).values() if layer.aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


__all__ = [
    "FourierAdapter", "FourierFTConfig", "FourierFTLinear", "FourierFTModel", "FourierMoEConfig", "FourierMoELinear",
    "FourierMoEModel", "FrequencyLayout", "apply_fourier_moe", "band_energy_features", "check_peft_config",
    "conjugate_pairs", "fourier_delta_weights", "fourier_moe_aux_loss", "fourier_moe_layers", "from_peft_fourierft",
    "from_peft_fourierft_model", "ifft2_amplitude", "load", "radial_band_of", "sample_frequencies",
]
