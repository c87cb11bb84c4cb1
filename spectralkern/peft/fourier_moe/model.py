"""FourierMoE's and FourierFT's peft tuners: which modules they adapt, how they build and check one adapter."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .._lifecycle import SpectralTuner
from .._patching import is_linear_like, linear_features
from .config import FourierFTConfig, FourierMoEConfig
from .frequencies import FrequencyLayout, sample_frequencies
from .layer import FourierFTLinear, FourierMoELinear, new_adapter


class FourierMoEModel(SpectralTuner):
    """peft tuner for FourierMoE (``get_peft_model(model, FourierMoEConfig(...))``)."""
    prefix = "fourier_moe_"
    tuner_layer_cls = FourierMoELinear
    config_cls = FourierMoEConfig
    accepts_what = "nn.Linear or transformers Conv1D"

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return is_linear_like(module)

    def build_unit(self, config: FourierMoEConfig | FourierFTConfig, name: str, base: nn.Module,
                   saved: Mapping[str, torch.Tensor] | None) -> nn.Module:
        in_features, out_features = linear_features(base)
        if saved is not None:
            layout = FrequencyLayout(rows=saved["rows"], cols=saved["cols"], expert_ptr=saved["expert_ptr"],
                                     amplitude=saved["amplitude"])
        elif getattr(config, "positions", "sampled") == "saved":
            raise ValueError("positions='saved' (a converted peft FourierFT adapter) needs the saved tensors; load "
                             "it with PeftModel.from_pretrained or spectralkern.peft.load")
        else:
            layout = sample_frequencies(out_features, in_features, config.n_frequencies, config.num_experts,
                                        config.seed)
        return new_adapter(base, layout, scale=config.scale, top_k=config.top_k, router=config.router,
                           router_bands=config.router_bands, complex_coefficients=config.complex_coefficients,
                           init=config.init, impl=config.impl)

    @classmethod
    def check_saved_tensors(cls, config: FourierMoEConfig | FourierFTConfig, name: str, base: nn.Module,
                            tensors: Mapping[str, torch.Tensor]) -> None:
        in_features, out_features = linear_features(base)
        for key in ("rows", "cols", "expert_ptr", "amplitude"):
            if key not in tensors:
                raise ValueError(f"the adapter file lacks {key!r}")
        n = config.n_frequencies
        for key, limit in (("rows", out_features), ("cols", in_features)):
            index = tensors[key]
            if index.dtype != torch.int32 or index.shape != (n,):
                raise ValueError(f"{key} must be int32 of shape ({n},), got shape {tuple(index.shape)}, dtype "
                                 f"{str(index.dtype).removeprefix('torch.')}")
            if n and (int(index.min()) < 0 or int(index.max()) >= limit):
                raise ValueError(f"{key} holds frequency indices outside [0, {limit}) (range {int(index.min())}.."
                                 f"{int(index.max())}) for a {out_features} x {in_features} weight")
        ptr = tensors["expert_ptr"]
        if ptr.dtype != torch.int32 or ptr.shape != (config.num_experts + 1,):
            raise ValueError(f"expert_ptr must be int32 of shape ({config.num_experts + 1},), got shape "
                             f"{tuple(ptr.shape)}, dtype {str(ptr.dtype).removeprefix('torch.')}")
        if int(ptr[0]) != 0 or int(ptr[-1]) != n or bool((ptr.diff() < 0).any()):
            raise ValueError(f"expert_ptr must rise from 0 to n_frequencies = {n}, got {ptr.tolist()}")
        amplitude = tensors["amplitude"]
        if not amplitude.is_floating_point() or amplitude.shape != (n,):
            raise ValueError(f"amplitude must be a float ({n},) tensor, got shape {tuple(amplitude.shape)}, dtype "
                             f"{str(amplitude.dtype).removeprefix('torch.')}")


class FourierFTModel(FourierMoEModel):
    """peft tuner for spectralkern's FourierFT (``get_peft_model(model, FourierFTConfig(...))``)."""
    prefix = "sk_fourierft_"
    tuner_layer_cls = FourierFTLinear
    config_cls = FourierFTConfig
