"""Optimisation with spectral structure: the gradient filter / regulariser and the fused spectral AdamW."""
from .adamw import SpectralAdamW
from .gradient_filter import GRAPHS, SpectralGradientFilter, find_targets

__all__ = ["GRAPHS", "SpectralAdamW", "SpectralGradientFilter", "find_targets"]
