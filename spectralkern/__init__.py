"""spectralkern: kernels and eigensolvers for spectral-domain fine-tuning.

Layers (each only looks down): graph → basis → ops → (optim / peft) → bench / demo → cli.
"""
from .basis import SpectralBasis
from .graph import GraphLaplacian, ParameterGraph

__version__ = "0.1.0"

__all__ = ["GraphLaplacian", "ParameterGraph", "SpectralBasis", "__version__"]
