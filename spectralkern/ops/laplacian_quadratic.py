"""laplacian_quadratic: R(Δ) = tr(Δᵀ L Δ), with gradient 2 L Δ, as a torch custom op.

For the combinatorial L = D − W, R = ½ Σ_ij W_ij ‖Δ_i − Δ_j‖²; for the normalized L = I − D^{-1/2} W D^{-1/2},
R = ½ Σ_ij W_ij ‖Δ_i/√d_i − Δ_j/√d_j‖² (d_i the degree; isolated nodes contribute 0) — not the same number.

Paper 001's spectral regulariser L_spec, with Δ = θ − θ₀ the change from the pretrained weights.

Three layers, as for ``spectral_filter``: the plain-torch reference, the Triton launcher, and the custom ops
``spectralkern::laplacian_quadratic`` (forward, a scalar) and ``spectralkern::laplacian_matmul`` (s·L x, the
backward) with fake and autograd registrations. the registry (``_backend``) picks the implementation.

Both implementations read L through a *plan* built once per (Laplacian, device, dtype, backend) and cached:

    crow, col, val   (N+1,), (E,), (E,)   CSR of every entry of L that is not in a dense block
    dense            (Σ n_b²,)            row-major dense diagonal blocks L_b of the blocks stored densely
    tiles            (T, 6) int64         row tiles: row_start, row_stop, block_start, dense n_b (0: none),
                                          dense offset, the largest remainder-CSR row length in the tile

The Triton plan stores every diagonal block with 1 ≤ n_b ≤ ``DENSE_MAX_BLOCK`` densely (its product runs on
tensor cores; a gather per CSR entry would re-read Δ rows through L2 once per neighbour), and leaves edges
between blocks, and blocks too large for the dense form, to the CSR. The torch plan keeps everything in the CSR
(one ``torch.sparse.mm``).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .._backend import Choice, backend_of
from .._checks import FLOAT_DTYPES, check_tensor
from ..graph import GraphLaplacian
from ._accumulation import accumulation_dtype

# Largest diagonal block kept dense in the Triton plan: a row tile then reads n_b/BLOCK_C chunks of L_b and of Δ
# (both L2-resident for n_b ≤ 256). Untuned: chosen from the byte count, no GPU measurement yet.
DENSE_MAX_BLOCK = 256


# ------------------------------------------------------------------------------------------ torch reference
def laplacian_quadratic_reference(delta: torch.Tensor, laplacian: GraphLaplacian) -> torch.Tensor:
    """Plain torch tr(Δᵀ L Δ) = Σ (Δ ⊙ LΔ), differentiable through torch.sparse.mm.

    delta (N, d) or (N,); returns a 0-dim tensor in fp32 (fp64 for fp64 inputs)."""
    acc = accumulation_dtype(delta.dtype)
    x = delta.to(acc)
    x2 = x.unsqueeze(1) if x.dim() == 1 else x
    lx = torch.sparse.mm(laplacian.matrix.to(acc), x2)
    return (x2 * lx).sum()


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class _Plan:
    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    dense: torch.Tensor
    tiles: torch.Tensor


_PLANS: weakref.WeakKeyDictionary[GraphLaplacian, dict[tuple, _Plan]] = weakref.WeakKeyDictionary()


def tile_rows(acc: torch.dtype) -> int:
    """Rows per tile: the kernel's BLOCK_N (see _triton_laplacian_quadratic.tile_sizes)."""
    from ._triton_laplacian_quadratic import tile_sizes  # imports triton; only reached on the triton path
    return tile_sizes(acc == torch.float64)[0]


def build_plan(laplacian: GraphLaplacian, device: torch.device, acc: torch.dtype, dense_max: int,
               rows_per_tile: int) -> _Plan:
    """Split L into dense diagonal blocks (1 ≤ n_b ≤ dense_max) and a CSR of everything else; cut row tiles."""
    n = laplacian.num_nodes
    matrix = laplacian.matrix.to(device)
    crow_all = matrix.crow_indices().to(torch.int64)
    col_all = matrix.col_indices().to(torch.int64)
    val_all = matrix.values().to(acc)
    row_all = torch.repeat_interleave(torch.arange(n, device=device), crow_all[1:] - crow_all[:-1])

    ptr = laplacian.block_ptr  # CPU int64
    sizes = ptr[1:] - ptr[:-1]
    dense_block = (sizes >= 1) & (sizes <= dense_max)                                    # (B,)
    node_block = torch.repeat_interleave(torch.arange(sizes.numel()), sizes).to(device)  # (N,)
    starts = ptr[:-1].to(device)
    block_of_row = node_block[row_all]
    in_dense = (block_of_row == node_block[col_all]) & dense_block.to(device)[block_of_row]

    # Dense blocks, packed row-major one after another.
    dense_sizes = torch.where(dense_block, sizes, torch.zeros_like(sizes))
    dense_off = torch.cumsum(dense_sizes * dense_sizes, 0) - dense_sizes * dense_sizes   # (B,) CPU
    dense = torch.zeros(int((dense_sizes * dense_sizes).sum()), dtype=acc, device=device)
    if bool(in_dense.any()):
        b = block_of_row[in_dense]
        nb = dense_sizes.to(device)[b]
        local_r = row_all[in_dense] - starts[b]
        local_c = col_all[in_dense] - starts[b]
        dense[dense_off.to(device)[b] + local_r * nb + local_c] = val_all[in_dense]

    keep = ~in_dense
    counts = torch.bincount(row_all[keep], minlength=n)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum(counts, 0)
    col, val = col_all[keep].contiguous(), val_all[keep].contiguous()

    # Row tiles: at most rows_per_tile rows, never across a block boundary.
    tiles = []
    for b, (start, stop) in enumerate(zip(ptr[:-1].tolist(), ptr[1:].tolist())):
        for row0 in range(start, stop, rows_per_tile):
            tiles.append((row0, min(row0 + rows_per_tile, stop), start, int(dense_sizes[b]), int(dense_off[b])))
    tile_t = torch.tensor(tiles, dtype=torch.int64).reshape(-1, 5)
    if tile_t.shape[0]:
        tile_of_row = torch.repeat_interleave(torch.arange(tile_t.shape[0]), tile_t[:, 1] - tile_t[:, 0])
        longest = torch.zeros(tile_t.shape[0], dtype=torch.int64).scatter_reduce_(
            0, tile_of_row, counts.cpu(), reduce="amax", include_self=True)
    else:
        longest = torch.zeros(0, dtype=torch.int64)
    tile_t = torch.cat([tile_t, longest[:, None]], dim=1).to(device).contiguous()
    return _Plan(crow, col, val, dense, tile_t)


def _plan_for(laplacian: GraphLaplacian, device: torch.device, acc: torch.dtype, backend: str) -> _Plan:
    dense_max, rows = (DENSE_MAX_BLOCK, tile_rows(acc)) if backend == "triton" else (0, 1 << 30)
    key = (device, acc, dense_max, rows)
    cache = _PLANS.setdefault(laplacian, {})
    if key not in cache:
        cache[key] = build_plan(laplacian, device, acc, dense_max, rows)
    return cache[key]


def _matmul_torch(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, dense: torch.Tensor,
                  tiles: torch.Tensor) -> torch.Tensor:
    """L x from a plan, in val's dtype: one sparse mm for the CSR, one small mm per dense block."""
    n = crow.numel() - 1
    xs = x.to(val.dtype)
    with torch.sparse.check_sparse_tensor_invariants(False):
        csr = torch.sparse_csr_tensor(crow, col, val, (n, n))
    out = torch.sparse.mm(csr, xs) if val.numel() else torch.zeros_like(xs)
    if dense.numel():  # only plans built for the Triton kernel have dense blocks
        for start, nb, off in {(int(t[2]), int(t[3]), int(t[4])) for t in tiles.tolist() if t[3] > 0}:
            block = dense[off:off + nb * nb].view(nb, nb)
            out[start:start + nb] += block @ xs[start:start + nb]
    return out


# ------------------------------------------------------------------------------------------ triton launcher
def _launch_triton(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, dense: torch.Tensor,
                   tiles: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """scale None: the forward, Σ (x ⊙ Lx) as a 0-dim tensor of val's dtype, Lx never written.
    scale given (0-dim tensor): returns scale · L x, shape (N, d), x's dtype (into ``out`` when given)."""
    import triton
    import triton.language as tl

    from ._triton_laplacian_quadratic import laplacian_quadratic_kernel, tile_sizes

    n, d = x.shape
    acc = val.dtype
    fp64 = acc == torch.float64
    block_n, block_c, block_d = tile_sizes(fp64)
    num_tiles = tiles.shape[0]
    num_col_tiles = triton.cdiv(d, block_d)
    reduce = scale is None
    if out is None:
        out = torch.empty((n, d) if not reduce else (0, 0), dtype=x.dtype, device=x.device)
    partial = torch.empty((num_tiles, num_col_tiles) if reduce else (0,), dtype=acc, device=x.device)
    if num_tiles == 0 or d == 0:
        return torch.zeros((), dtype=acc, device=x.device) if reduce else out.zero_()
    out_strides = out.stride() if not reduce else (0, 0)
    laplacian_quadratic_kernel[(num_tiles, num_col_tiles)](
        x, crow, col, val, dense, tiles, scale if scale is not None else partial, out, partial,
        d, num_col_tiles, x.stride(0), x.stride(1), out_strides[0], out_strides[1],
        BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d,
        ACC_DTYPE=tl.float64 if fp64 else tl.float32,
        # tf32x3: fp32 accuracy on tensor cores for fp32 inputs. Half inputs take one tf32 pass: exact on the Δ
        # side, but L (fp32) is rounded to tf32 (2^-11 per entry; docs/gpu.md has the measured error).
        DOT_PRECISION="ieee" if fp64 else ("tf32x3" if x.dtype == torch.float32 else "tf32"),
        REDUCE=reduce,
    )
    return partial.sum() if reduce else out


# ------------------------------------------------------------------------------------------ custom ops
def laplacian_quadratic_backend(x: torch.Tensor | None = None, backend: str | None = None, *,
                                dtype: torch.dtype | None = None, device: torch.device | None = None) -> Choice:
    """The registry's choice for an input like ``x`` (or of this dtype on this device)."""
    return backend_of("laplacian_quadratic", x, backend=backend, dtype=dtype, device=device)



@torch.library.custom_op("spectralkern::laplacian_quadratic", mutates_args=())
def _laplacian_quadratic_op(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                            dense: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    if laplacian_quadratic_backend(x) == "triton":
        return _launch_triton(x, crow, col, val, dense, tiles, None)
    return (x.to(val.dtype) * _matmul_torch(x, crow, col, val, dense, tiles)).sum()


@_laplacian_quadratic_op.register_fake
def _(x, crow, col, val, dense, tiles):
    return val.new_empty(())


@torch.library.custom_op("spectralkern::laplacian_matmul", mutates_args=())
def _laplacian_matmul_op(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                         dense: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale · L x, (N, d) in x's dtype; scale is a 0-dim tensor (stays on the device: no host sync)."""
    if laplacian_quadratic_backend(x) == "triton":
        return _launch_triton(x, crow, col, val, dense, tiles, scale.to(val.dtype))
    return (scale.to(val.dtype) * _matmul_torch(x, crow, col, val, dense, tiles)).to(x.dtype)


@_laplacian_matmul_op.register_fake
def _(x, crow, col, val, dense, tiles, scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _quadratic_setup(ctx, inputs, output):
    x, crow, col, val, dense, tiles = inputs
    ctx.save_for_backward(x, crow, col, val, dense, tiles)


def _quadratic_backward(ctx, grad_out):
    x, crow, col, val, dense, tiles = ctx.saved_tensors
    grad_x = torch.ops.spectralkern.laplacian_matmul(x, crow, col, val, dense, tiles, 2 * grad_out)
    return grad_x, None, None, None, None, None


_laplacian_quadratic_op.register_autograd(_quadratic_backward, setup_context=_quadratic_setup)


def _matmul_setup(ctx, inputs, output):
    x, crow, col, val, dense, tiles, scale = inputs
    ctx.save_for_backward(x, crow, col, val, dense, tiles, scale)


def _matmul_backward(ctx, grad_y):
    # y = s·L x with L symmetric: grad_x = s·L grad_y, grad_s = Σ grad_y ⊙ L x (makes the regulariser twice
    # differentiable).
    x, crow, col, val, dense, tiles, scale = ctx.saved_tensors
    grad_x = grad_s = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.spectralkern.laplacian_matmul(grad_y, crow, col, val, dense, tiles, scale)
    if ctx.needs_input_grad[6]:
        one = torch.ones((), dtype=val.dtype, device=x.device)
        lx = torch.ops.spectralkern.laplacian_matmul(x, crow, col, val, dense, tiles, one)
        grad_s = (grad_y.to(val.dtype) * lx.to(val.dtype)).sum().to(scale.dtype)
    return grad_x, None, None, None, None, None, grad_s


_laplacian_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)


# ------------------------------------------------------------------------------------------ public API
def laplacian_quadratic(delta: torch.Tensor, L: GraphLaplacian) -> torch.Tensor:
    """tr(Δᵀ L Δ): the graph-smoothness (Dirichlet) energy of the rows of Δ — ½ Σ_ij W_ij ‖Δ_i − Δ_j‖² for the
    combinatorial L = D − W, ½ Σ_ij W_ij ‖Δ_i/√d_i − Δ_j/√d_j‖² for the normalized L.

    Args:
        delta: (N, d) or (N,), float16/bfloat16/float32/float64, any strides; one row per graph node.
        L: a GraphLaplacian with N nodes on delta's device (``graph.laplacian()``), block-diagonal or not.
    Returns:
        A 0-dim tensor, float32 (float64 for float64 delta). Differentiable w.r.t. delta: the gradient is 2·L·Δ
        (L is symmetric), returned in delta's dtype. Works under torch.compile.

    On CUDA the Triton kernel computes LΔ tile by tile and reduces Δ ⊙ LΔ on chip (LΔ is never written); the plan
    it reads is built once per Laplacian and cached while L lives.
    """
    if not isinstance(L, GraphLaplacian):
        raise TypeError(f"L must be a GraphLaplacian (from ParameterGraph.laplacian()), got {type(L).__name__}")
    check_tensor("delta", delta, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    x = delta.unsqueeze(1) if delta.dim() == 1 else delta
    plan = _plan_tensors(L, tuple(delta.shape), delta.device, delta.dtype)
    return torch.ops.spectralkern.laplacian_quadratic(x, *plan)


def laplacian_matmul(x: torch.Tensor, L: GraphLaplacian, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """scale · L x, the product ``laplacian_quadratic``'s backward uses (2·L Δ is the regulariser's gradient).

    Args:
        x: (N, d) or (N,), float16/bfloat16/float32/float64; N = L.num_nodes, on L's device.
        L: a GraphLaplacian.
        scale: a number or a 0-dim tensor on x's device (kept on the device: no host sync).
    Returns:
        (N, d) or (N,) in x's dtype (accumulated in fp32, fp64 for fp64 x). Differentiable w.r.t. x and scale.
    """
    if not isinstance(L, GraphLaplacian):
        raise TypeError(f"L must be a GraphLaplacian (from ParameterGraph.laplacian()), got {type(L).__name__}")
    check_tensor("x", x, ndim=(1, 2), dtypes=FLOAT_DTYPES)
    x2 = x.unsqueeze(1) if x.dim() == 1 else x
    plan = _plan_tensors(L, tuple(x.shape), x.device, x.dtype)
    scale = torch.as_tensor(scale, dtype=plan[2].dtype, device=x.device)
    if scale.dim() != 0:
        raise ValueError(f"scale must be a number or a 0-dim tensor, got shape {tuple(scale.shape)}")
    y = torch.ops.spectralkern.laplacian_matmul(x2, *plan, scale)
    return y.squeeze(1) if x.dim() == 1 else y


def _plan_tensors(L: GraphLaplacian, shape: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Checks delta against L and returns the cached plan's tensors. Run eagerly even under torch.compile (the
    CSR matrix and the cache are not traceable); the compiled graph holds the plan as constants."""
    if shape[0] != L.num_nodes:
        raise ValueError(f"delta must have {L.num_nodes} rows (L has {L.num_nodes} nodes), got shape {shape}")
    if device != L.device:
        raise ValueError(f"delta is on {device} but L is on {L.device}; move L with L.to(delta.device)")
    backend = laplacian_quadratic_backend(dtype=dtype, device=device).backend
    plan = _plan_for(L, device, accumulation_dtype(dtype), backend)
    return plan.crow, plan.col, plan.val, plan.dense, plan.tiles


# What torch.compiler.assume_constant_result(_plan_tensors) does, minus its import of torch._dynamo (seconds at
# `import spectralkern`); the torch.compile test guards this.
_plan_tensors._dynamo_marked_constant = True
