"""Triton kernel of the Laplacian quadratic form Σ_i ⟨Δ_i, (LΔ)_i⟩ and of the product s·LΔ (its backward).

One program per (row tile, column tile). A row tile holds at most BLOCK_N rows of one block. The program builds
the (BLOCK_N × BLOCK_D) tile of LΔ in registers from two parts of the plan (see laplacian_quadratic.py):
  - the dense diagonal block L_b, when the block has one: Σ over BLOCK_C-column chunks of L_b[rows, c] @ Δ[c]
    (tl.dot, tensor cores);
  - the remainder CSR (edges between blocks, blocks too large to store densely): ELL-style, step j gathers the
    j-th neighbour row of every row in the tile, up to the longest row of the tile.
Forward (REDUCE): the tile is multiplied by the Δ tile and summed to one partial per program; LΔ never reaches
global memory. Backward: the tile is scaled by s (read from device memory, no host sync) and stored.

Loads are converted to the accumulation type right away (the interpreter gets bf16 arithmetic wrong).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature


def tile_sizes(fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_D). Not tuned on a GPU yet: sized like the spectral filter's tiles, so the
    (BLOCK_N × BLOCK_D) accumulator and one chunk each of L_b and Δ fit in registers with room to spare."""
    if fp64:
        return 16, 16, 32
    return 32, 32, 64


@triton.jit
def laplacian_quadratic_kernel(
    x_ptr, crow_ptr, col_ptr, val_ptr, dense_ptr, tiles_ptr, scale_ptr, out_ptr, partial_ptr,
    d, num_col_tiles,
    stride_xn, stride_xd, stride_on, stride_od,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, REDUCE: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    col_tile = tl.program_id(1).to(tl.int64)
    row_start = tl.load(tiles_ptr + tile * 6)
    row_stop = tl.load(tiles_ptr + tile * 6 + 1)
    block_start = tl.load(tiles_ptr + tile * 6 + 2)
    dense_n = tl.load(tiles_ptr + tile * 6 + 3)
    dense_off = tl.load(tiles_ptr + tile * 6 + 4)
    longest = tl.load(tiles_ptr + tile * 6 + 5)

    rows = row_start + tl.arange(0, BLOCK_N)
    row_ok = rows < row_stop
    cols = col_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)

    # Dense diagonal block (zero iterations when the block has none).
    chunk = tl.arange(0, BLOCK_C)
    local_rows = rows - block_start
    for c0 in range(0, dense_n, BLOCK_C):
        c = c0 + chunk
        c_ok = c < dense_n
        lt = tl.load(dense_ptr + dense_off + local_rows[:, None] * dense_n + c[None, :],
                     mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(ACC_DTYPE)
        xt = tl.load(x_ptr + (block_start + c)[:, None] * stride_xn + cols[None, :] * stride_xd,
                     mask=c_ok[:, None] & col_ok[None, :], other=0.0).to(ACC_DTYPE)
        acc += tl.dot(lt, xt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    # Remainder CSR, one neighbour per row per step.
    first = tl.load(crow_ptr + rows, mask=row_ok, other=0)
    last = tl.load(crow_ptr + rows + 1, mask=row_ok, other=0)
    for j in range(0, longest):
        idx = first + j
        ok = row_ok & (idx < last)
        nbr = tl.load(col_ptr + idx, mask=ok, other=0)
        w = tl.load(val_ptr + idx, mask=ok, other=0.0).to(ACC_DTYPE)
        xt = tl.load(x_ptr + nbr[:, None] * stride_xn + cols[None, :] * stride_xd,
                     mask=ok[:, None] & col_ok[None, :], other=0.0).to(ACC_DTYPE)
        acc += w[:, None] * xt

    tile_mask = row_ok[:, None] & col_ok[None, :]
    if REDUCE:
        xr = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                     mask=tile_mask, other=0.0).to(ACC_DTYPE)
        tl.store(partial_ptr + tile * num_col_tiles + col_tile, tl.sum(tl.sum(acc * xr, axis=1), axis=0))
    else:
        scale = tl.load(scale_ptr).to(ACC_DTYPE)
        tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_od,
                 (acc * scale).to(out_ptr.dtype.element_ty), mask=tile_mask)


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object]]]:
    """The specialisations the launcher produces (forward and backward per input dtype), for the AOT check."""
    variants = []
    for x_type, acc, precision in (("fp32", "fp32", "tf32x3"), ("bf16", "fp32", "tf32"),
                                   ("fp16", "fp32", "tf32"), ("fp64", "fp64", "ieee")):
        block_n, block_c, block_d = tile_sizes(acc == "fp64")
        for reduce in (True, False):
            pointer_types = {"x_ptr": x_type, "crow_ptr": "i64", "col_ptr": "i64", "val_ptr": acc,
                             "dense_ptr": acc, "tiles_ptr": "i64", "scale_ptr": acc, "out_ptr": x_type,
                             "partial_ptr": acc}
            constexprs = dict(BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d,
                              ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32, DOT_PRECISION=precision,
                              REDUCE=reduce)
            signature = launch_signature(laplacian_quadratic_kernel, pointer_types, constexprs)
            variants.append((f"x {x_type}, {'forward' if reduce else 'backward'}", signature, constexprs))
    return variants
