"""Tuning constants of the eigensolver and the ``auto`` backend's choices, with the measurements behind them.

Measured on the development machine: 2 cores of an AMD EPYC (AVX2), torch 2.13 with MKL 2024.2, float64,
with other processes keeping both cores busy (load 6–9), so every number is relative. kNN Laplacians of
synthetic rows (10 neighbours, rows on an 8-dim latent manifold), tol 1e-8 unless said otherwise.
"""
from __future__ import annotations

import torch


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


def dense_max(device: torch.device, k: int) -> int:
    """Largest block ``auto`` solves with dense eigh instead of Lanczos."""
    return 64


def operator_kind(device: torch.device, n_pad: int) -> str:
    """Dense padded blocks (one baddbmm) or one padded CSR (one sparse matmul) for the Lanczos products."""
    return "dense" if n_pad <= 256 else "csr"
