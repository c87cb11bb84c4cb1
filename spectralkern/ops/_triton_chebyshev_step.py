"""Triton kernel 2 of the Chebyshev filter: one recursion step on a general sparse (CSR) Laplacian.

One launch per step m → m + 1, one program per (row tile, column tile):

    L̃ T_m = (2/λ_max · L) T_m − T_m                  the CSR values come pre-scaled by 2/λ_max
    T_{m+1} = L̃ T_m                (FIRST, m = 0)     or   2 L̃ T_m − T_{m−1}
    y      = c_0 T_0 + c_1 T_1      (FIRST)            or   y + c_{m+1} T_{m+1}

The sparse product gathers, for each row of the tile, the rows of T_m its nonzeros point to (for the
block-sparse graphs here mostly rows of the same block, so mostly L2 hits) and the rest is fused: T_m, T_{m−1}
and y are each read once and T_{m+1} and y written once per step. The rows of a tile walk their nonzeros in
lock step up to the tile's longest row, which suits graphs of even degree (kNN, chains); a hub row makes its
whole tile wait.

T_{m+1} may be written over T_{m−1} in place (the launcher does so from the third step on): each program reads
its own tile of T_{m−1} before writing the same tile, and no other program reads T_{m−1}. y is updated in place
the same way. T and y are kept in the accumulation type (fp32, fp64 for fp64 inputs) between steps; the last
step writes y in the output's dtype. All tensors are row-major with row stride d (the launcher makes x
contiguous).

Modes (constexpr): FIRST (the m = 0 step: no T_{m−1}, y starts here), WRITE_T (off in the last step, whose
T_{K} only feeds y), HAS_Y (off when only the coefficients' gradient is wanted), COEF_GRAD (per-program partial
sums ⟨T_{m+1}, s⟩, and ⟨T_0, s⟩ in the first step, into partial[m, program]).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature


def tile_config(fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps). Untuned starting point (no GPU measurement yet): 64 contiguous columns per
    gathered row is a 256-byte fp32 segment, two full sectors per row."""
    return (16, 32, 4) if fp64 else (16, 64, 4)


@triton.jit
def chebyshev_step_kernel(
    crow_ptr, col_ptr, val_ptr, t_cur_ptr, t_prev_ptr, t_next_ptr, y_in_ptr, y_out_ptr, saved_ptr, partial_ptr,
    coef_ptr,
    n, d, step, num_programs,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    FIRST: tl.constexpr, WRITE_T: tl.constexpr, HAS_Y: tl.constexpr, COEF_GRAD: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    cols = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * d + cols[None, :]

    row_start = tl.load(crow_ptr + rows, mask=row_ok, other=0)
    row_len = tl.load(crow_ptr + rows + 1, mask=row_ok, other=0) - row_start
    longest = tl.max(row_len, axis=0)
    lt = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
    for j in range(0, longest):
        nz_ok = j < row_len
        at = row_start + j
        neighbour = tl.load(col_ptr + at, mask=nz_ok, other=0)
        weight = tl.load(val_ptr + at, mask=nz_ok, other=0.0).to(ACC_DTYPE)
        gathered = tl.load(t_cur_ptr + neighbour[:, None] * d + cols[None, :], mask=nz_ok[:, None] & col_ok[None, :],
                           other=0.0).to(ACC_DTYPE)
        lt += weight[:, None] * gathered
    cur = tl.load(t_cur_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    lt -= cur  # L̃ T_m

    coef_next = tl.load(coef_ptr + step + 1).to(ACC_DTYPE)
    if FIRST:
        nxt = lt
    else:
        nxt = 2.0 * lt - tl.load(t_prev_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if WRITE_T:
        tl.store(t_next_ptr + offsets, nxt, mask=mask)
    if HAS_Y:
        if FIRST:
            y = tl.load(coef_ptr).to(ACC_DTYPE) * cur + coef_next * nxt
        else:
            y = tl.load(y_in_ptr + offsets, mask=mask, other=0.0) + coef_next * nxt
        tl.store(y_out_ptr + offsets, y.to(y_out_ptr.dtype.element_ty), mask=mask)
    if COEF_GRAD:
        s = tl.load(saved_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        program = pid_r * tl.num_programs(1) + pid_c
        if FIRST:
            tl.store(partial_ptr + program, tl.sum(cur * s))
        tl.store(partial_ptr + (step + 1) * num_programs + program, tl.sum(nxt * s))


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object], dict[str, object]]]:
    """The specialisations the launcher produces, for ahead-of-time compile checks on real GPU targets.

    Returns (label, signature, constexprs, options) per variant; see ``spectralkern.ops._aot``.
    """
    variants = []
    cases = [  # (x type, acc, FIRST, WRITE_T, HAS_Y, COEF_GRAD, output type)
        ("fp32", "fp32", True, True, True, False, "fp32"), ("fp32", "fp32", False, True, True, False, "fp32"),
        ("fp32", "fp32", False, False, True, True, "fp32"), ("bf16", "fp32", True, True, True, False, "fp32"),
        ("bf16", "fp32", False, False, True, False, "bf16"), ("fp16", "fp32", True, False, False, True, "fp16"),
        ("fp64", "fp64", False, True, True, True, "fp64"),
    ]
    for x_type, acc, first, write_t, has_y, coef_grad, out_type in cases:
        block_r, block_d, warps = tile_config(fp64=acc == "fp64")
        # The first step reads x (T_0) as t_cur; later steps read the fp32/fp64 buffers.
        cur_type = x_type if first else acc
        pointer_types = {"crow_ptr": "i64", "col_ptr": "i64", "val_ptr": acc, "t_cur_ptr": cur_type,
                         "t_prev_ptr": acc, "t_next_ptr": acc, "y_in_ptr": acc, "y_out_ptr": out_type,
                         "saved_ptr": x_type, "partial_ptr": acc, "coef_ptr": acc}
        constexprs = dict(BLOCK_R=block_r, BLOCK_D=block_d, ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32,
                          FIRST=first, WRITE_T=write_t, HAS_Y=has_y, COEF_GRAD=coef_grad)
        signature = launch_signature(chebyshev_step_kernel, pointer_types, constexprs)
        label = (f"{x_type}{' first' if first else ''}{' write_t' if write_t else ''}{' y' if has_y else ''}"
                 f"{' coef_grad' if coef_grad else ''}")
        variants.append((label, signature, constexprs, {"num_warps": warps}))
    return variants
