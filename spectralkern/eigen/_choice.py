"""Which solver runs each item of a solve (a block, a connected component or a group of them): the registry's answer
(``spectralkern._backend``, op ``lowest_eigenpairs``; its cost model is in ``_tuning``) for the item's size.

``lowest_eigenpairs(backend=...)`` maps onto the registry as:
    auto                      the registry's choice per item: the native backend (CPU, compiled module built, items up
                              to its node limit) with dense or native Lanczos, else torch with dense, ARPACK or the
                              batched Lanczos, by cost;
    native                    the native backend forced (raises with the reason when it cannot run an item);
    dense                     dense eigh for every item;
    lanczos / scipy / cupy    that solver for every item it can run (more nodes than its Krylov basis), dense for the
                              items too small for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._backend import backend_of

OP = "lowest_eigenpairs"
# lowest_eigenpairs' backend= → the registry backend and algorithm(s) it forces (None: the registry's choice)
FORCED: dict[str, tuple[str | None, str | tuple[str, ...] | None]] = {
    "auto": (None, None),
    "lanczos": ("torch", ("lanczos", "dense")),
    "dense": ("torch", "dense"),
    "scipy": ("torch", ("scipy", "dense")),
    "cupy": ("torch", ("cupy", "dense")),
    "native": ("native", None),
}
BACKENDS = tuple(FORCED)


@dataclass(frozen=True)
class SolverChoice:
    """The registry's answers for one solve.

    method: lowest_eigenpairs' ``backend=`` (a key of FORCED). krylov_basis: the restarted Krylov solvers' basis
    (ncv + block size): an item needs more nodes than this for them.
    """

    method: str
    dtype: torch.dtype
    device: torch.device
    k: int
    krylov_basis: int

    def check(self) -> None:
        """Raise BackendUnavailable (with the reason) when the forced backend cannot run on this dtype and device
        at all — before any work."""
        backend, _ = FORCED[self.method]
        backend_of(OP, dtype=self.dtype, device=self.device, backend=backend)

    def solver(self, nodes: int) -> str:
        """The solver of one item of ``nodes`` nodes: dense, native, lanczos, scipy or cupy."""
        backend, algorithm = FORCED[self.method]
        choice = backend_of(OP, dtype=self.dtype, device=self.device, backend=backend, algorithm=algorithm,
                            nodes=nodes, k=self.k, device_type=self.device.type,
                            krylov_fits=nodes > self.krylov_basis)
        return choice.algorithm  # never None: every backend of the op has algorithms, and every fact is given

    def solvers(self, sizes: torch.Tensor) -> list[str]:
        """The solver of each item of ``sizes`` (G,) int64 nodes (one registry question per distinct size)."""
        distinct, inverse = torch.unique(sizes, return_inverse=True)
        names = [self.solver(int(n)) for n in distinct.tolist()]
        return [names[i] for i in inverse.tolist()]

    def dense(self, sizes: torch.Tensor) -> torch.Tensor:
        """(G,) bool: which items of ``sizes`` (G,) int64 nodes are solved densely."""
        distinct, inverse = torch.unique(sizes, return_inverse=True)
        flags = torch.tensor([self.solver(int(n)) == "dense" for n in distinct.tolist()], dtype=torch.bool)
        return flags[inverse]
