"""Triton kernel of the fused spectral filter: y_b = h·x_b + U_b diag(g_b − h) U_bᵀ x_b for all blocks at once.

One program per (block, column tile). Pass 1 accumulates the coefficients C = U_bᵀ x_b (k × tile) in
registers, row chunk by row chunk; pass 2 rebuilds y = h·x + U_b diag(g − h) C chunk by chunk. C never goes to
global memory. The second read of the x tile (only when h ≠ 0) comes straight after the first, from L2.

The same kernel is the backward: the operator is symmetric, so grad_x is the filter applied to grad_y, and with
GAIN_GRAD it also emits per-tile partial sums of (U_bᵀ grad_y) ⊙ (U_bᵀ x) for the gains' gradient.

Loads are converted to the accumulation type right away (fp32, or fp64 for fp64 inputs): the interpreter gets
bf16 arithmetic wrong, and the low-precision inputs gain nothing from staying narrow in registers.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature


def tile_sizes(k_pad: int, fp64: bool) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D). Registers scale with K_PAD × BLOCK_D (the coefficients stay on chip).
    Not yet tuned on a GPU: sized from ptxas's reports (benchmarks/resources.md) so the headline variants
    (k ≤ 64) do not spill on sm_90; BLOCK_D = 128 spilled 0.5–2 KB per thread at K_PAD 32."""
    if fp64 or k_pad >= 256:
        return 32, 32
    return 64, 64


def num_warps(k_pad: int, fp64: bool) -> int:
    """Warps per program: 8 spread the (K_PAD × BLOCK_D) coefficients and the tf32x3 operand splits over twice
    the threads (4 warps: 255 registers and 0.5–4.7 KB of spills per thread at K_PAD 32–64 on sm_90)."""
    return 4 if fp64 or k_pad >= 256 else 8


@triton.jit
def spectral_filter_kernel(
    x_ptr, u_ptr, gains_ptr, block_ptr_ptr, y_ptr, saved_x_ptr, gain_grad_ptr,
    d, k, num_col_tiles,
    stride_xn, stride_xd, stride_un, stride_uk, stride_gb, stride_gk,
    stride_yn, stride_yd, stride_sn, stride_sd,
    passthrough: tl.float64,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_PASSTHROUGH: tl.constexpr, WRITE_Y: tl.constexpr, GAIN_GRAD: tl.constexpr,
):
    # fp64 argument (a Python float compiles to fp32 otherwise), exact under the interpreter too
    passthrough = (tl.zeros((1,), ACC_DTYPE) + passthrough).to(ACC_DTYPE)
    block = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    start = tl.load(block_ptr_ptr + block)
    stop = tl.load(block_ptr_ptr + block + 1)

    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    ks = tl.arange(0, K_PAD).to(tl.int64)
    k_ok = ks < k
    chunk = tl.arange(0, BLOCK_N)

    # Pass 1: coefficients of x (and of the saved input, for the gains' gradient).
    coef = tl.zeros((K_PAD, BLOCK_D), dtype=ACC_DTYPE)
    saved_coef = tl.zeros((K_PAD, BLOCK_D), dtype=ACC_DTYPE)
    for row0 in range(start, stop, BLOCK_N):
        rows = row0 + chunk
        row_ok = rows < stop
        u = tl.load(u_ptr + rows[:, None] * stride_un + ks[None, :] * stride_uk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(ACC_DTYPE)
        tile_mask = row_ok[:, None] & col_ok[None, :]
        xt = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                     mask=tile_mask, other=0.0).to(ACC_DTYPE)
        coef += tl.dot(tl.trans(u), xt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if GAIN_GRAD:
            st = tl.load(saved_x_ptr + rows[:, None] * stride_sn + cols[None, :] * stride_sd,
                         mask=tile_mask, other=0.0).to(ACC_DTYPE)
            saved_coef += tl.dot(tl.trans(u), st, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    if GAIN_GRAD:
        partial = tl.sum(coef * saved_coef, axis=1)  # (K_PAD,)
        tl.store(gain_grad_ptr + (block * num_col_tiles + tile) * K_PAD + ks, partial)

    if WRITE_Y:
        gains = tl.load(gains_ptr + block * stride_gb + ks * stride_gk, mask=k_ok, other=0.0).to(ACC_DTYPE)
        scaled = coef * (gains - passthrough)[:, None]
        # Pass 2: y = h·x + U diag(g − h) C, chunk by chunk.
        for row0 in range(start, stop, BLOCK_N):
            rows = row0 + chunk
            row_ok = rows < stop
            u = tl.load(u_ptr + rows[:, None] * stride_un + ks[None, :] * stride_uk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(ACC_DTYPE)
            tile_mask = row_ok[:, None] & col_ok[None, :]
            out = tl.dot(u, scaled, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_PASSTHROUGH:
                xt = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                             mask=tile_mask, other=0.0).to(ACC_DTYPE)
                out += passthrough * xt
            tl.store(y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_yd,
                     out.to(y_ptr.dtype.element_ty), mask=tile_mask)


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object]]]:
    """The specialisations the launcher can produce, for ahead-of-time compile checks on real GPU targets.

    Returns (label, signature, constexprs) per variant; see ``spectralkern.ops._aot``.
    """
    # Every tile-size branch, both passes, and each dtype at least once; fp32 (the main path) in full.
    # K_PAD 256 is the largest the launcher uses (_backend.TRITON_MAX_K).
    cases = {("fp32", "fp32", "tf32x3"): ((16, False), (32, False), (64, False), (128, False), (64, True), (256, True)),
             ("bf16", "fp32", "tf32"): ((16, False), (32, False), (64, False), (128, False), (64, True)),
             ("fp16", "fp32", "tf32"): ((128, False),),
             ("fp64", "fp64", "ieee"): ((16, False), (64, True))}
    variants = []
    for (x_type, acc, precision), k_cases in cases.items():
        for k_pad, backward in k_cases:
            block_n, block_d = tile_sizes(k_pad, fp64=acc == "fp64")
            warps = num_warps(k_pad, fp64=acc == "fp64")
            # U is usually fp32; a basis cast to the half dtype of x (to halve U's traffic) is the other case.
            u_type = x_type if (x_type in ("bf16", "fp16") and k_pad == 128) else "fp32"
            pointer_types = {"x_ptr": x_type, "u_ptr": u_type, "gains_ptr": "fp32", "block_ptr_ptr": "i64",
                             "y_ptr": x_type, "saved_x_ptr": x_type, "gain_grad_ptr": acc}
            constexprs = dict(BLOCK_N=block_n, BLOCK_D=block_d, K_PAD=k_pad,
                              ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32, DOT_PRECISION=precision,
                              HAS_PASSTHROUGH=True, WRITE_Y=True, GAIN_GRAD=backward)
            signature = launch_signature(spectral_filter_kernel, pointer_types, constexprs)
            variants.append((f"x {x_type}, U {u_type}, K_PAD={k_pad}{' backward' if backward else ''}", signature,
                             constexprs, {"num_warps": warps}))  # as the launcher passes them
    return variants
