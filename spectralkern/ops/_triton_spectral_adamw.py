"""Triton kernel: spectral gradient filter fused with the AdamW update, for all blocks of one parameter at once.

One program per (block, column tile), as in _triton_spectral_filter.py. Pass 1 accumulates the coefficients
C = U_bᵀ g_b (k × BLOCK_D) in registers over the block's rows; C never goes to global memory. Pass 2 walks the
rows again: the filtered gradient g̃ = h·g + U_b diag(gains − h) C is formed in registers (g re-read only when
h ≠ 0, straight after pass 1, from L2), then p, m, v are read, updated as torch.optim.AdamW does, and written.
Traffic per element: g, m, v, p read once; m, v, p written once; no full-size temporary.

p, m and v share one set of strides (m, v are allocated like p); m and v are fp32, or bf16 on request (the
optimizer's state_dtype). Loads are converted to fp32 right away (the interpreter gets bf16 arithmetic wrong);
sqrt and the two divisions are IEEE-rounded, as torch's are.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature


def tile_sizes(k_pad: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D). The coefficients take K_PAD × BLOCK_D registers, plus a BLOCK_N × BLOCK_D tile for each
    of g̃, p, m, v in pass 2. Not tuned on a GPU yet: sized from ptxas's reports (benchmarks/resources.md): with
    BLOCK_D = 128 on 4 warps every variant spilled 0.4–2 KB per thread."""
    return 32, (64 if k_pad <= 128 else 32)


def num_warps(k_pad: int) -> int:
    """Warps per program (8 up to K_PAD 128: no spills at K_PAD 16/32 on sm_80 and sm_90)."""
    return 8 if k_pad <= 128 else 4


@triton.jit
def spectral_adamw_kernel(
    g_ptr, p_ptr, m_ptr, v_ptr, u_ptr, gains_ptr, block_ptr_ptr,
    d, k,
    stride_gn, stride_gd, stride_pn, stride_pd, stride_sn, stride_sd, stride_un, stride_uk, stride_gb, stride_gk,
    passthrough, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias_correction2_sqrt,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_PASSTHROUGH: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    start = tl.load(block_ptr_ptr + block)
    stop = tl.load(block_ptr_ptr + block + 1)

    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    ks = tl.arange(0, K_PAD).to(tl.int64)
    k_ok = ks < k
    chunk = tl.arange(0, BLOCK_N)

    # Pass 1: C = U_bᵀ g_b for this column tile.
    coef = tl.zeros((K_PAD, BLOCK_D), dtype=tl.float32)
    for row0 in range(start, stop, BLOCK_N):
        rows = row0 + chunk
        row_ok = rows < stop
        u = tl.load(u_ptr + rows[:, None] * stride_un + ks[None, :] * stride_uk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        gt = tl.load(g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gd,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        coef += tl.dot(tl.trans(u), gt, input_precision=DOT_PRECISION, out_dtype=tl.float32)

    gains = tl.load(gains_ptr + block * stride_gb + ks * stride_gk, mask=k_ok, other=0.0).to(tl.float32)
    scaled = coef * (gains - passthrough)[:, None]

    # Pass 2: filtered gradient, then AdamW on p, m, v.
    for row0 in range(start, stop, BLOCK_N):
        rows = row0 + chunk
        row_ok = rows < stop
        tile_mask = row_ok[:, None] & col_ok[None, :]
        u = tl.load(u_ptr + rows[:, None] * stride_un + ks[None, :] * stride_uk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        g = tl.dot(u, scaled, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if HAS_PASSTHROUGH:
            gt = tl.load(g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gd,
                         mask=tile_mask, other=0.0).to(tl.float32)
            g += passthrough * gt
        p_off = rows[:, None] * stride_pn + cols[None, :] * stride_pd
        s_off = rows[:, None] * stride_sn + cols[None, :] * stride_sd
        p = tl.load(p_ptr + p_off, mask=tile_mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + s_off, mask=tile_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + s_off, mask=tile_mask, other=0.0).to(tl.float32)
        p = p * decay
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p + tl.div_rn(-step_size * m, denom)
        tl.store(m_ptr + s_off, m.to(m_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(v_ptr + s_off, v.to(v_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(p_ptr + p_off, p.to(p_ptr.dtype.element_ty), mask=tile_mask)


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object]]]:
    """The specialisations the launcher produces (fp32 / bf16 / fp16 parameters, small and large k, with and
    without pass-through), for the AOT compile check."""
    variants = []
    for p_type, s_type, precision in (("fp32", "fp32", "tf32x3"), ("bf16", "fp32", "tf32"), ("fp16", "fp32", "tf32"),
                                      ("bf16", "bf16", "tf32")):
        for k_pad, passthrough in ((16, False), (32, True), (128, False), (256, False)):
            block_n, block_d = tile_sizes(k_pad)
            pointer_types = {"g_ptr": p_type, "p_ptr": p_type, "m_ptr": s_type, "v_ptr": s_type, "u_ptr": "fp32",
                             "gains_ptr": "fp32", "block_ptr_ptr": "i64"}
            constexprs = dict(BLOCK_N=block_n, BLOCK_D=block_d, K_PAD=k_pad, DOT_PRECISION=precision,
                              HAS_PASSTHROUGH=passthrough)
            signature = launch_signature(spectral_adamw_kernel, pointer_types, constexprs)
            label = f"p {p_type}, m/v {s_type}, K_PAD={k_pad}{', passthrough' if passthrough else ''}"
            # as the launcher passes them
            variants.append((label, signature, constexprs, {"enable_fp_fusion": False, "num_warps": num_warps(k_pad)}))
    return variants
