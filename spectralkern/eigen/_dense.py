"""Dense eigensolves: batched ``torch.linalg.eigh`` of small padded items, bucketed by size.

``eigh_small`` is also the Rayleigh–Ritz step of the Lanczos solver.
"""
from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor

import torch

from ._tuning import one_thread

# On the CPU, torch's batched eigh calls LAPACK once per matrix, in a loop on one thread, and MKL's threading of
# one small matrix costs more than it brings. Measured here (2 cores, torch 2.13, MKL 2024.2, float64, 256
# matrices of 48 × 48): 0.37 s with one thread vs 3.2 s with two while other processes kept the cores busy. Up
# to this size eigh runs with one LAPACK thread per matrix, and the batch is split across ``workers`` Python
# threads instead (torch releases the GIL inside the op): 1024 matrices of 128 × 128 took 1.94 s as one call and
# 1.01 s split across two threads, on the idle machine. Bigger matrices keep torch's setting and one call.
_ONE_THREAD_MAX_N = 512
# Least work (m³ summed over a thread's matrices) worth a thread of its own: ≈ 1 ms of eigh here.
_MIN_WORK_PER_THREAD = 1_000_000


def eigh_small(matrices: torch.Tensor, *, columns: int | None = None, workers: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a (G, m, m) batch: eigenvalues (G, c) ascending and eigenvectors (G, m, c) of
    the c = ``columns`` lowest (default: all m).

    On the CPU, matrices up to 512 × 512 run with one LAPACK thread each; with ``workers`` > 1 the batch is
    split across up to that many threads (see above), each with at least ~1 ms of work. Elsewhere it is one
    batched call.
    """
    count, m = matrices.shape[0], matrices.shape[-1]
    columns = m if columns is None else columns

    def lowest(chunk: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            values, vectors = torch.linalg.eigh(chunk)
        except torch.linalg.LinAlgError as exc:  # LAPACK numbers the failed matrix within the chunk
            if not offset:
                raise
            raise torch.linalg.LinAlgError(re.sub(r"Batch element (\d+)",
                                                  lambda hit: f"Batch element {int(hit[1]) + offset}",
                                                  str(exc))) from exc
        if columns == m:
            return values, vectors
        return values[:, :columns].clone(), vectors[:, :, :columns].clone()   # free the other m − c columns

    small_cpu = matrices.device.type == "cpu" and m <= _ONE_THREAD_MAX_N
    with one_thread(small_cpu):
        # every thread gets at least ~1 ms of LAPACK work (≈ 1e6·m⁻³ matrices): starting a thread costs ~0.1 ms
        threads = min(workers, count, count * m**3 // _MIN_WORK_PER_THREAD) if small_cpu else 1
        if threads <= 1:
            return lowest(matrices)
        # torch's thread setting is per thread for OpenMP and MKL: pin each worker to one LAPACK thread too
        with ThreadPoolExecutor(threads, thread_name_prefix="spectralkern-eigh", initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            chunks = matrices.tensor_split(threads)
            offsets = list(itertools.accumulate((c.shape[0] for c in chunks[:-1]), initial=0))
            parts = list(pool.map(lowest, chunks, offsets))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def size_buckets(sizes: torch.Tensor, smallest: int = 8) -> list[torch.Tensor]:
    """Group item indices by size into powers-of-two buckets (≤ 8, 9..16, 17..32, ...), so a padded batch wastes at
    most half of each dimension: dense eigh costs n_pad³ per item. Returns the index tensors of non-empty buckets."""
    caps = sizes.clamp(min=smallest).to(torch.float64).log2().ceil()
    return [torch.nonzero(caps == cap).flatten() for cap in torch.unique(caps).tolist()]


def dense_blocks(matrix: torch.Tensor, node_map: torch.Tensor, pad_value: float) -> torch.Tensor:
    """The (G, n_pad, n_pad) dense submatrices of L on the items' nodes; padding rows/columns are zero with
    ``pad_value`` on the diagonal (so padded eigenvalues sort after every real one)."""
    from ._operator import PaddedOperator

    op = PaddedOperator.build(matrix, node_map, 0.0, "dense")
    blocks = op.blocks  # L's entries (apply() would flip them; here we want L itself)
    pad = (node_map < 0).to(blocks.dtype) * pad_value
    blocks.diagonal(dim1=1, dim2=2).add_(pad)
    return blocks


def dense_lowest(matrix: torch.Tensor, node_map: torch.Tensor, k: int, pad_value: float, workers: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, n_g) lowest eigenpairs of every item: values (G, k'), vectors (G, n_pad, k'), k' = min(k, n_pad).

    Columns past an item's size hold padding eigenpairs; callers use only the first min(k, n_g). ``workers``:
    CPU threads to split the batch across (see ``eigh_small``)."""
    blocks = dense_blocks(matrix, node_map, pad_value)
    return eigh_small(blocks, columns=min(k, blocks.shape[-1]), workers=workers)
