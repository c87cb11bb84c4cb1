"""Partial eigensolvers: the k lowest eigenpairs of many Laplacian blocks at once (``lowest_eigenpairs``)."""
from ._info import EigenInfo, NoConvergence
from ._solve import BACKENDS, lowest_eigenpairs

__all__ = ["BACKENDS", "EigenInfo", "NoConvergence", "lowest_eigenpairs"]
