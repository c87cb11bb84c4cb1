"""spectralkern: kernels and eigensolvers for spectral-domain fine-tuning.

Layers (each only looks down): graph → basis → ops → (optim / peft) → bench / demo → cli.
"""
from logging import NullHandler as _NullHandler, getLogger as _getLogger

# Modules log through logging.getLogger(__name__); the application (or the `spectralkern` command) adds handlers.
_getLogger(__name__).addHandler(_NullHandler())

from . import filters
from ._backend import BackendUnavailable, Choice, backend_of
from .basis import SpectralBasis
from .eigen import EigenInfo, NoConvergence, lowest_eigenpairs
from .filters import heat, learnable_gains, low_pass, tikhonov
from .graph import GraphLaplacian, ParameterGraph
from .lambda_max import estimate_lambda_max
from .ops.chebyshev_filter import chebyshev_filter, chebyshev_filter_reference
from .ops.fourier_adapter import fourier_adapter, fourier_adapter_reference
from .ops.laplacian_quadratic import laplacian_matmul, laplacian_quadratic, laplacian_quadratic_reference
from .ops.spectral_filter import spectral_filter, spectral_filter_reference
from .optim import SpectralAdamW, SpectralGradientFilter, SpectralSGD

__version__ = "0.1.0"

__all__ = [
    "GraphLaplacian", "ParameterGraph", "SpectralBasis", "filters", "heat", "learnable_gains", "low_pass",
    "spectral_filter", "spectral_filter_reference", "tikhonov", "__version__",
    "laplacian_matmul", "laplacian_quadratic", "laplacian_quadratic_reference", "SpectralAdamW", "SpectralGradientFilter", "SpectralSGD",
    "chebyshev_filter", "chebyshev_filter_reference", "estimate_lambda_max",
    "fourier_adapter", "fourier_adapter_reference",
    "lowest_eigenpairs", "NoConvergence", "EigenInfo", "backend_of", "BackendUnavailable", "Choice",
]


def __getattr__(name: str):
    # `sk.peft` needs the optional peft package, so it is imported on first use rather than with spectralkern
    if name == "peft":
        import importlib

        return importlib.import_module(".peft", __name__)
    raise AttributeError(f"module 'spectralkern' has no attribute {name!r}")
