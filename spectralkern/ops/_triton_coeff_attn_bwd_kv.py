"""Triton kernel of Coeff-Tuning attention's backward, key side: dK and dV.

    dV_h = M_hᵀ dO_h,               M_h = Σ_g C[h, g] P_g           (the mixed map output head h used)
    dK_g = scale · dS_gᵀ Q_g,       dS_g = P_g ⊙ (dP_g − δ_g),  dP_g = Σ_h C[h, g] dO_h V_hᵀ

(δ from the query-side kernel's PHASE 1.) One program per (key tile, batch · group of HEADS_PER_PROG heads) walks
the query tiles (from the causal diagonal on); per query tile one dynamic loop over all heads x rebuilds P_x (for
the mixed maps M of the program's output heads) and D_x = dO_x V_xᵀ (for dP of its source heads), then batched dots
add M_hᵀ dO_h into dV and dS_gᵀ Q_g into dK. dK and dV come out per query head, (B, H, Nk, D); the launcher sums
the query heads that share a key/value head (grouped-query attention).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature


def tile_sizes(head_dim_pad: int, heads_pad: int, interpreter: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, HEADS_PER_PROG, num_warps). Untuned (no GPU was available when they were chosen): the
    per-program state is M, dP, P (HEADS_PER_PROG · BLOCK_M · BLOCK_N each) and dK, dV (HEADS_PER_PROG · BLOCK_N · D
    each), kept near 16 K fp32 elements in all."""
    if interpreter:
        return 16, 16, min(heads_pad, 4), 1
    heads = max(1, min(heads_pad, 4096 // (32 * head_dim_pad)))
    return 32, 32, heads, 4 if heads * head_dim_pad <= 128 else 8


@triton.jit
def coeff_attn_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, c_ptr, kv_mask_ptr, lse_ptr, do_ptr, delta_ptr, dk_ptr, dv_ptr,
    num_heads, kv_rep, seq_q, seq_k, head_dim,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ch, stride_cg, stride_mb, stride_mn, stride_lb, stride_lh, stride_lm,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    qk_scale: tl.float64, scale: tl.float64,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    qk_scale = (tl.zeros((1,), ACC_DTYPE) + qk_scale).to(ACC_DTYPE)  # fp64 arguments, exact
    scale = (tl.zeros((1,), ACC_DTYPE) + scale).to(ACC_DTYPE)
    # One grid axis (axis 1 holds at most 65,535 programs): the tiles of one (batch, head group) are consecutive.
    tiles = tl.cdiv(seq_k, BLOCK_N)
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid % tiles
    pid_bh = pid // tiles
    head_groups = tl.cdiv(num_heads, HEADS_PER_PROG)
    b = pid_bh // head_groups
    hs = (pid_bh % head_groups) * HEADS_PER_PROG + tl.arange(0, HEADS_PER_PROG)
    h_ok = hs < num_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    n_ok = offs_n < seq_k
    d_ok = offs_d < head_dim
    key_tile = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    val_tile = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    key_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * stride_kb + (hs // kv_rep)[:, None, None] * stride_kh + key_tile[None, :, :],
                mask=h_ok[:, None, None] & key_mask[None, :, :], other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
    col_keep = n_ok
    if HAS_KV_MASK:
        kv = tl.load(kv_mask_ptr + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0)
        col_keep &= kv != 0
    causal_shift = seq_k - seq_q

    dk = tl.zeros((HEADS_PER_PROG, BLOCK_N, D_PAD), ACC_DTYPE)
    dv = tl.zeros((HEADS_PER_PROG, BLOCK_N, D_PAD), ACC_DTYPE)
    m_start = 0
    if CAUSAL:  # query rows before the tile's first key minus the shift see none of its keys
        m_start = tl.maximum(pid_n * BLOCK_N - causal_shift, 0) // BLOCK_M * BLOCK_M
    for m0 in range(m_start, seq_q, BLOCK_M):
        offs_m = tl.cast(m0, tl.int64) + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seq_q
        keep = col_keep[None, :] & m_ok[:, None]
        if CAUSAL:
            keep &= offs_n[None, :] <= offs_m[:, None] + causal_shift
        row_tile = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_tile = offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        row_mask = m_ok[:, None] & d_ok[None, :]
        mixed = tl.zeros((HEADS_PER_PROG, BLOCK_M, BLOCK_N), ACC_DTYPE)
        dp = tl.zeros((HEADS_PER_PROG, BLOCK_M, BLOCK_N), ACC_DTYPE)
        for x32 in range(num_heads):
            x = tl.cast(x32, tl.int64)  # x · stride reaches heads·N·D
            q_x = tl.load(q_ptr + b * stride_qb + x * stride_qh + row_tile, mask=row_mask,
                          other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
            k_x = tl.load(k_ptr + b * stride_kb + (x // kv_rep) * stride_kh + key_tile, mask=key_mask,
                          other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
            lse_x = tl.load(lse_ptr + b * stride_lb + x * stride_lh + offs_m * stride_lm, mask=m_ok, other=0.0)
            s_x = tl.dot(q_x, tl.trans(k_x), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
            p_x = tl.where(keep, tl.exp2(s_x - lse_x.to(ACC_DTYPE)[:, None] * LOG2E), 0.0)
            c_hx = tl.load(c_ptr + hs * stride_ch + x * stride_cg, mask=h_ok, other=0.0).to(ACC_DTYPE)
            mixed += c_hx[:, None, None] * p_x[None, :, :]
            do_x = tl.load(do_ptr + b * stride_ob + x * stride_oh + do_tile, mask=row_mask,
                           other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
            v_x = tl.load(v_ptr + b * stride_vb + (x // kv_rep) * stride_vh + val_tile, mask=key_mask,
                          other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
            d_x = tl.dot(do_x, tl.trans(v_x), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            c_xg = tl.load(c_ptr + x * stride_ch + hs * stride_cg, mask=h_ok, other=0.0).to(ACC_DTYPE)
            dp += c_xg[:, None, None] * d_x[None, :, :]
        q = tl.load(q_ptr + b * stride_qb + hs[:, None, None] * stride_qh + row_tile[None, :, :],
                    mask=h_ok[:, None, None] & row_mask[None, :, :], other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
        do = tl.load(do_ptr + b * stride_ob + hs[:, None, None] * stride_oh + do_tile[None, :, :],
                     mask=h_ok[:, None, None] & row_mask[None, :, :], other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
        lse = tl.load(lse_ptr + b * stride_lb + hs[:, None] * stride_lh + offs_m[None, :] * stride_lm,
                      mask=h_ok[:, None] & m_ok[None, :], other=0.0).to(ACC_DTYPE)
        delta = tl.load(delta_ptr + b * stride_lb + hs[:, None] * stride_lh + offs_m[None, :] * stride_lm,
                        mask=h_ok[:, None] & m_ok[None, :], other=0.0).to(ACC_DTYPE)
        s = tl.dot(q, tl.trans(k, 0, 2, 1), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        p = tl.where(keep[None, :, :], tl.exp2(s - lse[:, :, None] * LOG2E), 0.0)
        ds = p * (dp - delta[:, :, None])
        dv += tl.dot(tl.trans(mixed.to(DOT_DTYPE), 0, 2, 1), do, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dk += tl.dot(tl.trans(ds.to(DOT_DTYPE), 0, 2, 1), q, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    out_tile = (offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd)[None, :, :]
    out_mask = h_ok[:, None, None] & key_mask[None, :, :]
    tl.store(dk_ptr + b * stride_gb + hs[:, None, None] * stride_gh + out_tile,
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + b * stride_gb + hs[:, None, None] * stride_gh + out_tile, dv.to(dv_ptr.dtype.element_ty),
             mask=out_mask)


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object], dict[str, int]]]:
    """The specialisations the launcher produces on a GPU, for ahead-of-time compile checks (see ``_aot``)."""
    variants = []
    for x_type, d_pad, heads_pad, causal, has_mask in (("bf16", 64, 16, True, False), ("bf16", 128, 32, False, True),
                                                       ("fp32", 64, 16, True, True), ("fp64", 16, 4, False, True)):
        acc = tl.float64 if x_type == "fp64" else tl.float32
        dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}[x_type]
        precision = {"fp32": "tf32x3", "fp64": "ieee"}.get(x_type, "tf32")
        block_m, block_n, heads, num_warps = tile_sizes(d_pad, heads_pad, False)
        stat = "fp64" if x_type == "fp64" else "fp32"
        pointers = {"q_ptr": x_type, "k_ptr": x_type, "v_ptr": x_type, "c_ptr": stat, "kv_mask_ptr": "i8",
                    "lse_ptr": stat, "do_ptr": x_type, "delta_ptr": stat, "dk_ptr": stat, "dv_ptr": stat}
        constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, HEADS_PER_PROG=heads, CAUSAL=causal,
                          HAS_KV_MASK=has_mask, ACC_DTYPE=acc, DOT_DTYPE=dot, DOT_PRECISION=precision)
        variants.append((f"{x_type} d={d_pad} heads/prog={heads} causal={causal} mask={has_mask}",
                         launch_signature(coeff_attn_bwd_kv_kernel, pointers, constexprs), constexprs,
                         {"num_warps": num_warps}))
    return variants
