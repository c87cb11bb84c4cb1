"""Parameter-efficient adapters (SMoA, FourierMoE, Coeff-Tuning, ...) and the model-patching helpers they share."""
from ._patching import (BaseWeightMismatchError, ParameterReport, combine_fingerprints, find_target_modules,
                        fingerprint_tensors, freeze_all_except, is_linear_like, linear_features, linear_like_names,
                        linear_weight, replace_module, trainable_parameters)
from .smoa import (SMoAConfig, SMoALinear, apply_smoa, load_smoa, merge_smoa, save_smoa, smoa_layers,
                   smoa_parameter_count, unmerge_smoa)
from .fourier_moe import (FourierFTConfig, FourierMoEConfig, FourierMoELinear, apply_fourier_moe,
                          fourier_moe_aux_loss, fourier_moe_layers, fourier_moe_parameter_count, from_peft_fourierft,
                          from_peft_fourierft_model, load_fourier_moe, merge_fourier_moe, save_fourier_moe,
                          unmerge_fourier_moe)
from .coeff_tuning import (CoeffMultiheadAttention, CoeffTuning, CoeffTuningConfig, apply_coeff_tuning,
                           coeff_tuning_layers, coeff_tuning_parameter_count, is_coeff_target, load_coeff_tuning,
                           merge_coeff_tuning, save_coeff_tuning)

__all__ = [
    "BaseWeightMismatchError", "ParameterReport", "combine_fingerprints", "find_target_modules", "fingerprint_tensors",
    "freeze_all_except", "is_linear_like", "linear_features", "linear_like_names", "linear_weight",
    "replace_module", "trainable_parameters",
    "SMoAConfig", "SMoALinear", "apply_smoa", "load_smoa", "merge_smoa", "save_smoa", "smoa_layers",
    "smoa_parameter_count", "unmerge_smoa",
    "FourierFTConfig", "FourierMoEConfig", "FourierMoELinear", "apply_fourier_moe", "fourier_moe_aux_loss",
    "fourier_moe_layers", "fourier_moe_parameter_count", "from_peft_fourierft", "from_peft_fourierft_model",
    "load_fourier_moe", "merge_fourier_moe", "save_fourier_moe", "unmerge_fourier_moe",
    "CoeffMultiheadAttention", "CoeffTuning", "CoeffTuningConfig", "apply_coeff_tuning", "coeff_tuning_layers",
    "coeff_tuning_parameter_count", "is_coeff_target", "load_coeff_tuning", "merge_coeff_tuning", "save_coeff_tuning",
]
