"""Tuning constants of the eigensolver and the cost model by which the registry (``spectralkern._backend``, op
``lowest_eigenpairs``) picks each item's solver, with the measurements behind them.

Measured on the development machine: 2 cores of an AMD EPYC (AVX2), torch 2.13 with MKL 2024.2, float64,
with other processes keeping both cores busy (load 6–9), so every number is relative. kNN Laplacians of
synthetic rows (10 neighbours, rows on an 8-dim latent manifold), tol 1e-8 unless said otherwise.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch

# Largest Krylov basis (bytes) for which the CPU solve runs on one thread. Its operations are memory-bound
# BLAS-2 / skinny GEMMs, QRs and small eigh calls; with both cores busy elsewhere, OpenMP's fork/join made the
# two-thread run of tests/test_eigen.py take 306 s against 15 s on one thread (a 64 MB copy: 2.0 vs 7.9 GB/s).
# Bigger problems keep torch's setting, where more cores add memory bandwidth on an idle machine.
ONE_THREAD_MAX_BYTES = 64 * 2**20


@contextlib.contextmanager
def one_thread(enabled: bool) -> Iterator[None]:
    """Run the enclosed torch work on one CPU thread when ``enabled`` (torch's setting is restored after)."""
    if not enabled or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_threads(device: torch.device, basis_bytes: int) -> contextlib.AbstractContextManager[None]:
    """Run the enclosed solve on one CPU thread when its Krylov basis is small (see ONE_THREAD_MAX_BYTES)."""
    return one_thread(device.type == "cpu" and basis_bytes <= ONE_THREAD_MAX_BYTES)


def block_size(k: int, device: torch.device) -> int:
    """Vectors per Krylov block.

    CPU: 2. The Gram–Schmidt GEMMs are memory-bound on V (per step V is read four times), and MKL on this CPU
    gains little from more rows per read: a (8, p, 4096) x (8, 4096, 129) product costs 6.4 ms for p = 1,
    11.8 ms for p = 2, 21 ms for p = 8, while bigger blocks need more products (4096-node blocks, k = 64:
    577 products at p = 1, 582 at p = 2, 850 at p = 4, 1188 at p = 8). p = 2 rather than 1 so that a start block
    sees double eigenvalues (symmetric graphs) in exact arithmetic. GPU: 8 (GEMMs with more rows are nearly free
    there) — untuned, no GPU was available.
    """
    return min(k, 2) if device.type != "cuda" else min(k, 8) if k > 1 else 1


def default_ncv(k: int, block: int) -> int:
    """Krylov basis size: ARPACK's 2k + 1 for large k, more room for small k (k = 16, p = 2: m = 36 took 241
    products per 1000-node block, m = 48 took 210)."""
    return max(2 * k + 4 * block, k + 32)


# ``auto`` on the CPU, measured here (one thread, float64, tol 1e-8, 3-D kNN Laplacians with 10 neighbours,
# 16384 nodes in blocks of n; ms per block, best of two):
#
#     k = 16   n =   64    128    256    512   1024   2048   4096
#     dense          0.49   1.85   9.71   54.9    316   2683     -
#     lanczos        1.28   2.44   8.90   11.6   23.6   83.9    206
#     scipy (ARPACK) 1.95   2.81   4.18   6.54   14.4   42.2   87.1
#
#     k = 64   n =  128    256    512   1024   2048
#     dense          2.78   11.7   57.3    378   2539
#     lanczos        2.34   25.3   45.0    106    270
#     scipy (ARPACK) 2.66   19.7   29.6   64.7    140
#
# so the CPU takes dense eigh up to max(160, 4k) nodes and ARPACK above. These are one-thread costs: the dense
# solve splits its batch across torch's threads (1.9× on this machine's 2 cores, ``_dense.eigh_small``) and
# ARPACK cannot (scipy's wrappers hold the GIL), so with more cores dense would pay further up; the threshold
# stays at the one-thread crossover, the only one measured. The batched Lanczos loses to ARPACK
# per block on this CPU by 1.6–2.4×: per step it runs ~25 small torch ops (each a few µs to tens of µs), and
# MKL's skinny GEMMs on this AMD part gain little from the block rows (see block_size), while ARPACK works on
# one block's basis in cache with one compiled loop. Batching pays where kernel launches and memory traffic
# are shared across blocks: on a GPU.
DENSE_MIN_NODES = 160        # the CPU crossover dense eigh / ARPACK: max(DENSE_MIN_NODES, DENSE_NODES_PER_PAIR·k)
DENSE_NODES_PER_PAIR = 4
LANCZOS_VS_ARPACK_CPU = 2.0  # the batched Lanczos's time per block over ARPACK's on the CPU (1.6–2.4× above)
# On a GPU: dense up to 32 nodes — torch's batched eigh runs a batched Jacobi solver only up to 32 × 32 and one
# solver call per matrix above — and the batched Lanczos above; ARPACK there copies every item to the host.
# Untuned: no GPU was available.
GPU_DENSE_MAX_NODES = 32
ARPACK_VS_LANCZOS_GPU = 2.0


# ``auto`` on the CPU when the compiled ``native`` backend is built (same machine, graphs and settings as the table
# above, one thread, ms per block, best of two; 16384 nodes in blocks of n, at least 2 blocks). Session 5, full
# reorthogonalisation, idle machine:
#
#     k = 16   n =   64    128    256    512   1024   2048
#     native         0.40   0.65   1.41   4.60   13.0   35.6
#     dense          0.50   2.23   10.7   55.6    324      -
#     scipy (ARPACK) 2.91   3.47   7.80   9.61   14.6   31.6
#
# Session 6, partial reorthogonalisation (native v8; products per block in brackets, native / ARPACK):
#
#     k = 16   n =    64    128    256    512   1024   2048   4096   8192  16384
#     native         0.25   0.54   0.86   1.99   4.82   10.9   31.9   93.9    243
#     scipy (ARPACK) 2.19   4.23   4.32   9.26   15.3   36.1   84.5    174    441
#                                                (198/192)    (324/335)   (505/542)
#     k = 64   n =   256    512   1024   2048   4096   8192  16384
#     native         3.90   8.46   16.1   31.5    104    340   1024
#     scipy (ARPACK) 14.8   30.9   51.2    114    348    847   2784
#                                (355/300)     (687/617)    (1079/1024)
#
# (blocks of ≤ 50 nodes at k = 16 go dense whatever the backend: 0.18 ms at 32 nodes.) So with the module:
# dense up to max(48, 2k) nodes, native up to 16384 (the registry's NATIVE_LANCZOS_MAX_NODES), ARPACK above. Native
# is 1.8–4× faster than ARPACK at every size measured and also splits its items across threads (≈ 1.9× on this
# machine's 2 cores), which these one-thread numbers do not show. Above 16384 nodes its unrestarted basis (steps × n
# values: 1079 × 16384 doubles = 141 MB at k = 64) is what stops it, not speed; ARPACK restarts in O(k·n).
NATIVE_DENSE_MIN_NODES = 48     # the CPU crossover dense eigh / native:
NATIVE_DENSE_NODES_PER_PAIR = 2  # max(NATIVE_DENSE_MIN_NODES, NATIVE_DENSE_NODES_PER_PAIR·k)

# Worst-case bytes of the native bases held at once (each thread's basis may grow to n × n values): the threads
# are cut to fit, so a many-core machine solving 16384-node components keeps to a few GB.
NATIVE_MEMORY_BUDGET = 8 * 2**30


def native_threads(threads: int, n_max: int, itemsize: int) -> int:
    """Threads for the native backend: ``threads``, fewer when their worst-case bases (n_max² values each) would
    exceed NATIVE_MEMORY_BUDGET."""
    return max(1, min(threads, NATIVE_MEMORY_BUDGET // max(1, n_max * n_max * itemsize)))


def dense_crossover(backend: str, device_type: str, k: int) -> int:
    """The largest item dense eigh beats the preferred Krylov solver of ``backend`` on (the tables above)."""
    if backend == "native":
        return max(NATIVE_DENSE_MIN_NODES, NATIVE_DENSE_NODES_PER_PAIR * k)
    if device_type == "cuda":
        return GPU_DENSE_MAX_NODES
    return max(DENSE_MIN_NODES, DENSE_NODES_PER_PAIR * k)


def solver_cost(solver: str, backend: str, facts: Mapping[str, object]) -> float:
    """The registry's cost of ``solver`` on one item (facts: nodes, k, device_type), a ranking rather than a time:
    1 is the backend's preferred Krylov solver on this device, the other Krylov solvers cost their measured time
    ratio to it, and dense costs nodes / crossover, so that it wins up to the crossover measured above (ties go to
    dense, listed first). The Krylov solvers that need a basis smaller than the item say so in the table's
    ``krylov_fits``; an item too small for them is solved densely, whatever the cost."""
    device_type = str(facts["device_type"])
    if solver == "dense":
        return float(facts["nodes"]) / dense_crossover(backend, device_type, int(facts["k"]))
    on_gpu = device_type == "cuda"
    if solver == "native":
        return 1.0
    if solver == "lanczos":
        return 1.0 if on_gpu else LANCZOS_VS_ARPACK_CPU
    if solver == "scipy":
        return ARPACK_VS_LANCZOS_GPU if on_gpu else 1.0
    if solver == "cupy":
        return math.inf  # only when asked for: never measured (no GPU)
    raise ValueError(f"solver must be one of dense, native, lanczos, scipy, cupy; got {solver!r}")


# The batched Lanczos's products (``_operator``): dense padded blocks (one baddbmm, n_pad² values per item) up to
# this many rows per item, one padded CSR (one sparse matmul, nnz values) above.
DENSE_PRODUCTS_MAX_PAD = 256


def products_cost(storage: str, facts: Mapping[str, object]) -> float:
    """The registry's cost of a storage for the Lanczos products (facts: n_pad), a ranking: the CSR costs 1, the
    dense blocks n_pad / DENSE_PRODUCTS_MAX_PAD (ties go to dense, listed first)."""
    if storage == "dense":
        return float(facts["n_pad"]) / DENSE_PRODUCTS_MAX_PAD
    if storage == "csr":
        return 1.0
    raise ValueError(f"storage must be dense or csr; got {storage!r}")
