"""Coeff-Tuning's peft tuner: which attention modules it wraps, the attention implementation switch."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._lifecycle import SpectralTuner
from .._patching import fingerprint_tensors
from .config import CoeffTuningConfig
from .layer import (HF_IMPLEMENTATION, MERGE_IMPOSSIBLE, CoeffTuning, CoeffTuningAttention, is_coeff_target,
                    num_heads_of, register_hf_attention)


class CoeffTuningModel(SpectralTuner):
    """peft tuner for Coeff-Tuning (``get_peft_model(model, CoeffTuningConfig(...))``)."""
    prefix = "coeff_tuning_"
    tuner_layer_cls = CoeffTuningAttention
    config_cls = CoeffTuningConfig
    accepts_what = "transformers attention (dispatching through ALL_ATTENTION_FUNCTIONS) or nn.MultiheadAttention"

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return is_coeff_target(module)

    @staticmethod
    def fingerprint(base: nn.Module) -> str:
        """The attention module's own weights: no adapter tensors, peft's ``base_layer`` naming undone (the same
        base gives the same fingerprint with or without LoRA around its projections)."""
        tensors = {name.replace(".base_layer", ""): p for name, p in base.named_parameters()
                   if "lora_" not in name and ".coeff_tuning_adapters." not in name}
        return fingerprint_tensors(tensors)

    def build_unit(self, config: CoeffTuningConfig, name: str, base: nn.Module,
                   saved: Mapping[str, torch.Tensor] | None) -> nn.Module:
        device = next(base.parameters()).device
        return CoeffTuning(num_heads_of(base), config.dropout, impl=config.impl, device=device)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._switch_attention(model)

    def _switch_attention(self, model: nn.Module) -> None:
        """Point every transformers model owning a wrapped HF attention module at the Coeff-Tuning attention."""
        wrapped = [layer.base_layer for layer in model.modules() if isinstance(layer, CoeffTuningAttention)]
        configs = {id(m.config): m.config for m in wrapped if not isinstance(m, nn.MultiheadAttention)}
        if not configs:
            return
        register_hf_attention()
        if not hasattr(self, "_original_attention"):
            self._original_attention: list[tuple[nn.Module, str]] = []
        for module in model.modules():
            config = getattr(module, "config", None)
            if id(config) in configs and hasattr(module, "set_attn_implementation"):
                if config._attn_implementation != HF_IMPLEMENTATION:
                    self._original_attention.append((module, config._attn_implementation))
                    module.set_attn_implementation(HF_IMPLEMENTATION)
                configs.pop(id(config))
        if configs:
            names = [type(c).__name__ for c in configs.values()]
            raise ValueError(f"the attention modules with configs {names} belong to no transformers PreTrainedModel "
                             "inside the model given; pass the model that owns them")

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, CoeffTuningAttention):
            super()._replace_module(parent, child_name, new_module, child)
        else:  # unloading: the attention module goes back as it was (peft's version assumes a .weight)
            setattr(parent, child_name, new_module)

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_IMPOSSIBLE)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        model = super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                     adapter_names=adapter_names)
        if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            for module, implementation in getattr(self, "_original_attention", []):
                module.set_attn_implementation(implementation)
            self._original_attention = []
        return model
