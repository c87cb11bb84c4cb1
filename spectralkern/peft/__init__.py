"""Parameter-efficient adapters (SMoA, FourierFT / FourierMoE, Coeff-Tuning) as peft methods.

``peft.get_peft_model(model, sk.peft.SMoAConfig(...))`` and the rest of peft's lifecycle; :func:`load` is the
validated entry for adapter folders (checked completely before the model is touched).
"""
from ._lifecycle import (SpectralPeftConfig, SpectralTuner, SpectralTunerLayer, adapter_parameters, layers_of,
                         load, parameter_count)
from ._patching import (BaseWeightMismatchError, ParameterReport, fingerprint_tensors, is_linear_like,
                        linear_features, linear_weight, trainable_parameters)
from .smoa import SMoAConfig, SMoALinear, SMoAModel, apply_smoa
from .fourier_moe import (FourierFTConfig, FourierFTLinear, FourierMoEConfig, FourierMoELinear, apply_fourier_moe,
                          fourier_moe_aux_loss, fourier_moe_layers, from_peft_fourierft, from_peft_fourierft_model)
from .coeff_tuning import (CoeffTuning, CoeffTuningAttention, CoeffTuningConfig, apply_coeff_tuning,
                           coeff_tuning_layers, coeff_tuning_parameter_count, is_coeff_target)
from ._patching import find_target_modules, linear_like_names

__all__ = [
    "BaseWeightMismatchError", "ParameterReport", "SpectralPeftConfig", "SpectralTuner", "SpectralTunerLayer",
    "adapter_parameters", "find_target_modules", "fingerprint_tensors", "is_linear_like", "layers_of",
    "linear_features", "linear_like_names", "linear_weight", "load", "parameter_count", "trainable_parameters",
    "SMoAConfig", "SMoALinear", "SMoAModel", "apply_smoa",
    "FourierFTConfig", "FourierFTLinear", "FourierMoEConfig", "FourierMoELinear", "apply_fourier_moe",
    "fourier_moe_aux_loss", "fourier_moe_layers", "from_peft_fourierft", "from_peft_fourierft_model",
    "CoeffTuning", "CoeffTuningAttention", "CoeffTuningConfig", "apply_coeff_tuning", "coeff_tuning_layers",
    "coeff_tuning_parameter_count", "is_coeff_target",
]
