"""Benchmark of the Chebyshev filter y = Σ_{m=0..K} c_m T_m(2L/λ_max − I) x on kNN graphs of random rows.

Providers:
    spectralkern            ``spectralkern.chebyshev_filter`` with precomputed coefficients and the cached λ_max
                            (label: the path that ran — triton-block, triton-block-materialized, triton-csr,
                            torch-recursion, torch-materialized)
    torch_recursion         the same call on the torch backend with ``algorithm="recursion"`` forced: K CSR
    torch_materialized      products over x, or P_b = p(Ã_b) per block and one product (block-diagonal cases only)
                            — the registry's two CPU forms side by side, to check its choice
    torch_sparse_eager      the eager recursion: one ``torch.sparse.mm`` (CSR) plus the recurrence and the
                            accumulation as separate torch ops per step, in fp32 (bf16 inputs upcast once) —
                            what PyG's ChebConv and PyGSP do, on the device
    spectral_filter+eigh    the eigendecomposition route, eigensolve included in every call: the full basis of
                            every block by dense batched ``eigh`` (``SpectralBasis.from_laplacian``), then
                            ``spectral_filter`` with gains p(λ_j) — the same polynomial, so the same answer.
                            Block-diagonal cases only (a global dense eigh of 131072 nodes is out of reach)
    spectral_filter(cached) the same with the basis computed once outside the timing (a graph that never
                            changes): shows where an eigensolve amortised over many calls beats the recursion

Traffic counted (``bytes``): one read of x and one write of y, 2·N·d·elem — the floor the block kernel is built
to reach whatever K is. FLOPs: the sparse recursion's arithmetic, K·(2·nnz + 4·N)·d (what the eager peer
executes); the block kernel does dense per-block products instead (benchmarks/NOTES.md has both counts).
Compute ceiling: tf32x3, the precision of the block kernel's recursion for every input dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..._backend import forced
from ...basis import SpectralBasis
from ...filters import chebyshev_coefficients, heat
from ...graph import GraphLaplacian, ParameterGraph
from ...lambda_max import estimate_lambda_max
from ...ops.chebyshev_filter import (chebyshev_filter, chebyshev_filter_path, chebyshev_filter_reference,
                                     chebyshev_recursion_reference)
from ...ops.spectral_filter import spectral_filter
from ..case import Case, Prepared, Provider, interpreter_skip
from ..inputs import ragged_block_ptr, uniform_block_ptr

OP = "chebyshev_filter"
#: every provider name a case of this op can time or skip (``--providers`` is checked against it up front)
PROVIDERS = ("spectralkern", "torch_recursion", "torch_materialized", "torch_sparse_eager", "spectral_filter+eigh",
             "spectral_filter(cached)")

# ‖out − ref‖ / ‖ref‖ against the float64 recursion on the same rounded inputs. The eigh route adds the fp32
# eigensolver's error (~1e-6 relative on these blocks); bf16 rounds the output.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
_SEED = 0
_KNN = 8           # neighbours per node inside a block
_FEATURES = 64     # width of the random rows the kNN graph is built from
_HEAT_T = 1.0      # g(λ) = exp(−t·λ)
_MAX_DENSE_EIGH_BLOCK = 1024


@dataclass(frozen=True)
class _Config:
    layout: str              # "uniform", "ragged" or "cross" (block-sparse: a chain links the blocks)
    num_nodes: int
    dim: int
    block_ptr: torch.Tensor  # (B+1,) int64, CPU
    block_label: str
    order: int

    @property
    def name(self) -> str:
        return f"{self.layout}-N{self.num_nodes}-d{self.dim}-b{self.block_label}-K{self.order}"


def _configs(quick: bool) -> list[_Config]:
    gen = torch.Generator().manual_seed(_SEED)
    if quick:  # small enough for the Triton interpreter (CI runs --quick with TRITON_INTERPRET=1)
        small = uniform_block_ptr(256, 32)
        return [_Config("uniform", 256, 32, small, "32", 4), _Config("uniform", 256, 32, small, "32", 8),
                _Config("cross", 128, 16, uniform_block_ptr(128, 32), "32", 4)]
    # Llama-7B shapes, as in the spectral_filter benchmark: q/k/v/o (4096 × 4096) with 128-row blocks (one head),
    # the MLP (11008 × 4096) with 256-row blocks, and ragged blocks of 1..512 rows (those over 256 take kernel 2).
    attn, mlp = uniform_block_ptr(4096, 128), uniform_block_ptr(11008, 256)
    ragged = ragged_block_ptr(11008, 512, gen)
    out = []
    for order in (4, 8, 16):
        out += [_Config("uniform", 4096, 4096, attn, "128", order), _Config("uniform", 11008, 4096, mlp, "256", order),
                _Config("ragged", 11008, 4096, ragged, "1..512", order),
                _Config("cross", 131072, 1024, uniform_block_ptr(131072, 128), "128", order)]
    return out


def cases(device: torch.device, quick: bool) -> list[Case]:
    """fp32 only in --quick on the CPU; fp32 and bf16 otherwise. The graph is built in ``prepare``, so nnz in
    the FLOP count is the kNN estimate N·(2·KNN + 1) (each node's own list and the symmetric additions, roughly)."""
    dtypes = [torch.float32] if quick and device.type != "cuda" else [torch.float32, torch.bfloat16]
    out = []
    for dtype in dtypes:
        for cfg in _configs(quick):
            es = torch.empty(0, dtype=dtype).element_size()
            nnz = cfg.num_nodes * (2 * _KNN + 1)
            shape = {"N": cfg.num_nodes, "d": cfg.dim, "K": cfg.order, "blocks": cfg.block_ptr.numel() - 1,
                     "block_size": cfg.block_label, "graph": f"knn{_KNN}" + ("+chain" if cfg.layout == "cross" else "")}
            out.append(Case(op=OP, name=cfg.name, layout=cfg.layout, dtype=dtype, shape=shape,
                            bytes=2 * cfg.num_nodes * cfg.dim * es,
                            flops=cfg.order * (2 * nnz + 4 * cfg.num_nodes) * cfg.dim,
                            compute_kind="tf32x3", prepare=functools.partial(_prepare, cfg, dtype)))
    return out


# ------------------------------------------------------------------------------------------ inputs and peers
def _graph(cfg: _Config, device: torch.device) -> GraphLaplacian:
    """Normalized Laplacian of a cosine kNN graph of random rows per block (plus, for "cross", a chain through
    every node that also links each block to the next)."""
    gen = torch.Generator().manual_seed(_SEED)
    rows = torch.randn(cfg.num_nodes, _FEATURES, generator=gen).to(device)
    graph = ParameterGraph.knn(rows, k=_KNN, block_ptr=cfg.block_ptr)
    if cfg.layout == "cross":
        links = ParameterGraph.chain(cfg.num_nodes, block_ptr=cfg.block_ptr, link_blocks=True)
        graph = ParameterGraph.from_scipy(graph.to_scipy() + links.to_scipy(), block_ptr=cfg.block_ptr,
                                          dtype=torch.float32, device=device)
    return graph.laplacian(normalized=True)


def _polynomial_gains(eigenvalues: torch.Tensor, coeffs: torch.Tensor, lambda_max: float) -> torch.Tensor:
    """p(λ) = Σ c_m T_m(2λ/λ_max − 1) at every eigenvalue: the polynomial filter's exact spectral gains."""
    t = (2.0 * eigenvalues.double() / lambda_max - 1.0).clamp(-1.0, 1.0)
    m = torch.arange(coeffs.numel(), dtype=torch.float64, device=eigenvalues.device)
    return (torch.cos(m * torch.arccos(t).unsqueeze(-1)) @ coeffs.double()).to(eigenvalues.dtype)


def _eigh_route(x: torch.Tensor, L: GraphLaplacian, k: int, coeffs: torch.Tensor, lambda_max: float) -> torch.Tensor:
    basis = SpectralBasis.from_laplacian(L, k)
    return spectral_filter(x, basis, _polynomial_gains(basis.eigenvalues, coeffs, lambda_max))


def _forced_torch(x: torch.Tensor, L: GraphLaplacian, coeffs: torch.Tensor, lambda_max: float, algorithm: str):
    """``chebyshev_filter`` on the torch backend with ``algorithm`` forced (the registry's forced() and algorithm=)."""
    def run() -> torch.Tensor:
        with forced("torch"):
            return chebyshev_filter(x, L, coeffs, lambda_max=lambda_max, algorithm=algorithm)
    return run


def _prepare(cfg: _Config, dtype: torch.dtype, device: torch.device) -> Prepared:
    L = _graph(cfg, device)
    lam = estimate_lambda_max(L)  # once per graph, as in training; cached on L
    coeffs64 = chebyshev_coefficients(heat(_HEAT_T), cfg.order, lam)
    coeffs = coeffs64.to(device=device, dtype=torch.float32)
    dev_gen = torch.Generator(device=device).manual_seed(_SEED)
    x = torch.randn(cfg.num_nodes, cfg.dim, device=device, generator=dev_gen).to(dtype)
    reference = chebyshev_filter_reference(x.double(), L, coeffs64.to(device), lam)
    providers, skipped = [], {}

    path = chebyshev_filter_path(x, L, cfg.order)
    if interpreter_skip(path, dtype):
        skipped["spectralkern"] = interpreter_skip(path, dtype)
    else:
        providers.append(Provider("spectralkern", path, lambda: chebyshev_filter(x, L, coeffs, lambda_max=lam)))

    for algorithm in ("recursion", "materialized"):
        name = f"torch_{algorithm}"
        if algorithm == "materialized" and L.has_cross_block_edges:
            skipped[name] = "needs a block-diagonal Laplacian (this graph has cross-block edges)"
        else:
            providers.append(Provider(name, f"torch-{algorithm}", _forced_torch(x, L, coeffs, lam, algorithm)))

    matrix = L.matrix
    crow, col = matrix.crow_indices(), matrix.col_indices()
    val = matrix.values().float() * (2.0 / lam)
    providers.append(Provider("torch_sparse_eager", "torch",
                              lambda: chebyshev_recursion_reference(x, coeffs, crow, col, val)))

    n_max = int((cfg.block_ptr[1:] - cfg.block_ptr[:-1]).max())
    if L.has_cross_block_edges:
        why = f"needs a dense eigh of the whole {cfg.num_nodes}-node graph (cross-block edges)"
        skipped["spectral_filter+eigh"] = skipped["spectral_filter(cached)"] = why
    elif n_max > _MAX_DENSE_EIGH_BLOCK:
        skipped["spectral_filter+eigh"] = skipped["spectral_filter(cached)"] = f"blocks of {n_max} > 1024 nodes"
    else:
        providers.append(Provider("spectral_filter+eigh", "eigh+spectral_filter",
                                  lambda: _eigh_route(x, L, n_max, coeffs, lam)))
        basis = SpectralBasis.from_laplacian(L, n_max)
        gains = _polynomial_gains(basis.eigenvalues, coeffs, lam)
        providers.append(Provider("spectral_filter(cached)", "spectral_filter",
                                  lambda: spectral_filter(x, basis, gains)))
    return Prepared(providers=providers, reference=reference, tolerance=_TOLERANCE[dtype], skipped=skipped)
