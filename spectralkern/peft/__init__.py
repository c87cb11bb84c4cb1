"""Parameter-efficient adapters (SMoA, ...) and the model-patching helpers they share."""
from ._patching import (BaseWeightMismatchError, ParameterReport, find_target_modules, fingerprint_tensors,
                        freeze_all_except, is_linear_like, linear_features, linear_like_names, linear_weight,
                        replace_module, trainable_parameters)

__all__ = [
    "BaseWeightMismatchError", "ParameterReport", "find_target_modules", "fingerprint_tensors",
    "freeze_all_except", "is_linear_like", "linear_features", "linear_like_names", "linear_weight",
    "replace_module", "trainable_parameters",
]
