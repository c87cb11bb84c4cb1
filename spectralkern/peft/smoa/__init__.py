"""SMoA (paper 002) as a peft method: ``get_peft_model(model, SMoAConfig(...))``.

config.py (hyper-parameters), layout.py (spectral blocks), layer.py (adapter unit + tuner layer, fused forward),
model.py (the peft tuner). :func:`load` is the one validated entry for adapter folders.
"""
from __future__ import annotations

import os

from torch import nn

from .._lifecycle import apply as _apply
from .._lifecycle import load as _load
from .._lifecycle import register
from .config import SMoAConfig
from .layer import SMoAAdapter, SMoALinear
from .layout import spectral_layout, spectral_order
from .model import SMoAModel

register(SMoAModel)


def load(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default",
         is_trainable: bool = False) -> nn.Module:
    """Load an SMoA adapter folder (``peft_model.save_pretrained(dir)``) into ``model``, checked before applied;
    see :func:`spectralkern.peft.load`."""
    return _load(model, path, config_cls=SMoAConfig, adapter_name=adapter_name, is_trainable=is_trainable)




def apply_smoa(model: nn.Module, config: SMoAConfig, *, adapter_name: str = "default") -> nn.Module:
    """``model`` with SMoA injected in place (no PeftModel wrapper); see :func:`spectralkern.peft._lifecycle.apply`."""
    if not isinstance(config, SMoAConfig):
        raise TypeError(f"config must be an SMoAConfig, got {type(config).__name__}")
    return _apply(model, config, adapter_name=adapter_name)


__all__ = ["SMoAAdapter", "SMoAConfig", "SMoALinear", "SMoAModel", "apply_smoa", "load", "spectral_layout",
           "spectral_order"]
