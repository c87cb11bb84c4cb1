"""Optimisation with spectral structure: the gradient filter / regulariser, its per-target protocol, the paper's
gradient descent (SpectralSGD), the fused spectral AdamW, and checkpoints of all three (``optim.checkpoint``)."""
from .adamw import SpectralAdamW
from .gradient_filter import (FILTER_METHODS, GRAPHS, FilterTarget, SpectralGradientFilter, TargetState,
                              find_targets)
from .sgd import SpectralSGD

__all__ = ["FILTER_METHODS", "GRAPHS", "FilterTarget", "SpectralAdamW", "SpectralGradientFilter", "SpectralSGD",
           "TargetState", "find_targets"]
