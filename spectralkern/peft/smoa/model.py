"""SMoA's peft tuner: which modules it adapts, how it builds and checks one adapter per layer."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .._lifecycle import SpectralTuner
from .._patching import is_linear_like, linear_features, linear_weight
from .config import SMoAConfig
from .layer import SMoALinear, new_adapter
from .layout import layout_from_permutations, spectral_layout


class SMoAModel(SpectralTuner):
    """peft tuner for SMoA (``get_peft_model(model, SMoAConfig(...))`` builds one)."""
    prefix = "smoa_"
    tuner_layer_cls = SMoALinear
    config_cls = SMoAConfig
    accepts_what = "nn.Linear or transformers Conv1D"

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return is_linear_like(module)

    def build_unit(self, config: SMoAConfig, name: str, base: nn.Module,
                   saved: Mapping[str, torch.Tensor] | None) -> nn.Module:
        if saved is None:
            layout = spectral_layout(linear_weight(base), config.num_blocks)  # one SVD per layer
        else:
            layout = layout_from_permutations(saved["row_perm"], saved["col_perm"], config.num_blocks)
        return new_adapter(base, config, layout)

    @classmethod
    def check_saved_tensors(cls, config: SMoAConfig, name: str, base: nn.Module,
                            tensors: Mapping[str, torch.Tensor]) -> None:
        in_features, out_features = linear_features(base)
        for key, n in (("row_perm", out_features), ("col_perm", in_features)):
            perm = tensors.get(key)
            if perm is None:
                raise ValueError(f"the adapter file lacks {key!r}")
            if perm.dtype != torch.int64 or perm.shape != (n,):
                raise ValueError(f"{key} must be an int64 ({n},) permutation, got shape {tuple(perm.shape)}, dtype "
                                 f"{str(perm.dtype).removeprefix('torch.')}")
            if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
                raise ValueError(f"{key} is not a permutation of range({n}) (out-of-range or repeated indices)")
