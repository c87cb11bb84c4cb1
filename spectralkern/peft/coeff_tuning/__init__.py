"""Coeff-Tuning (paper 004) as a peft method: ``get_peft_model(model, CoeffTuningConfig(...))``.

config.py (hyper-parameters), layer.py (ΔC unit, attention wrapper, the HF attention function with the base's
attention dropout kept), model.py (the peft tuner). :func:`load` is the one validated entry for adapter folders.
Merging raises (see ``MERGE_IMPOSSIBLE``); ``unload()`` restores the base model and its attention implementation.
"""
from __future__ import annotations

import os

from torch import nn

from .._lifecycle import apply as _apply
from .._lifecycle import layers_of, parameter_count, register
from .._lifecycle import load as _load
from .config import CoeffTuningConfig
from .layer import (HF_IMPLEMENTATION, MERGE_IMPOSSIBLE, CoeffTuning, CoeffTuningAttention, hf_attention,
                    is_coeff_target, is_hf_attention, mixed_attention)
from .model import CoeffTuningModel

register(CoeffTuningModel)


def load(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default",
         is_trainable: bool = False) -> nn.Module:
    """Load a Coeff-Tuning adapter folder into ``model``, checked before applied; see
    :func:`spectralkern.peft.load`."""
    return _load(model, path, config_cls=CoeffTuningConfig, adapter_name=adapter_name, is_trainable=is_trainable)


def apply_coeff_tuning(model: nn.Module, config: CoeffTuningConfig, *, freeze_others: bool = True,
                       adapter_name: str = "default") -> nn.Module:
    """``model`` with Coeff-Tuning injected in place (no PeftModel wrapper). ``freeze_others=False`` keeps what
    was trainable (e.g. LoRA applied first) trainable."""
    if not isinstance(config, CoeffTuningConfig):
        raise TypeError(f"config must be a CoeffTuningConfig, got {type(config).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    _apply(model, config, adapter_name=adapter_name)
    if not freeze_others:
        for p in trainable:
            p.requires_grad_(True)
    return model


def coeff_tuning_layers(model: nn.Module) -> dict[str, CoeffTuningAttention]:
    """{full module name: CoeffTuningAttention} of ``model``."""
    return layers_of(model, CoeffTuningAttention)


coeff_tuning_parameter_count = parameter_count

__all__ = ["CoeffTuning", "CoeffTuningAttention", "CoeffTuningConfig", "CoeffTuningModel", "HF_IMPLEMENTATION",
           "MERGE_IMPOSSIBLE", "apply_coeff_tuning", "coeff_tuning_layers", "coeff_tuning_parameter_count",
           "hf_attention", "is_coeff_target", "is_hf_attention", "load", "mixed_attention"]
