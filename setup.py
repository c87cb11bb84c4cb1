"""Build script.

Today spectralkern is pure Python (Triton kernels are JIT-compiled at first use). The compiled CUDA
backend in csrc/ will be built from here (nvcc + pybind11, no libtorch linkage); until then this
file only installs the Python package, so `pip install .` works on any machine.
"""
from setuptools import setup

setup()
