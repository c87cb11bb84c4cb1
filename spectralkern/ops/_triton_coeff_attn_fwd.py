"""Triton kernel of Coeff-Tuning attention, pass 2: rebuild the P_g tiles on chip, mix them with C, multiply by V_h.

    out[b, h] = Σ_g C[h, g] · P_g V_h,    P_g = exp(scale · Q_g K_gᵀ + mask − lse_g)  (normalised by pass 1)

One program per (query tile, batch · group of HEADS_PER_PROG output heads). Per key tile it walks the source heads
g (a dynamic loop), recomputes the score tile S_g from Q_g and K_g, turns it into P_g with the stored lse, and adds
C[h, g] · P_g into the mixed maps M_h of every output head of its group (an (HEADS_PER_PROG, BLOCK_M, BLOCK_N) fp32
tile); then one batched dot adds M_h V_h to the (HEADS_PER_PROG, BLOCK_M, D) accumulator. No N × N map leaves the
chip; memory is the output plus lse.

Cost: every program rebuilds all H score tiles, so Q Kᵀ is computed H / HEADS_PER_PROG times over (the output
accumulators of all H heads do not fit in registers); the mix itself is H² multiply-adds per score element on the
CUDA cores. See benchmarks/NOTES.md for the floors.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature


def tile_sizes(head_dim_pad: int, heads_pad: int, interpreter: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, HEADS_PER_PROG, num_warps). Untuned (no GPU was available when they were chosen): the
    fp32 accumulator HEADS_PER_PROG · BLOCK_M · D is held near 16 K elements (flash-attention's 128 × 128), so
    more heads share a program, and fewer score tiles are recomputed, when the head dimension is small."""
    if interpreter:
        return 16, 16, min(heads_pad, 4), 1
    heads = max(1, min(heads_pad, 16384 // (32 * head_dim_pad)))
    return 32, 32, heads, 4 if heads * head_dim_pad <= 256 else 8


@triton.jit
def coeff_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, c_ptr, kv_mask_ptr, lse_ptr, out_ptr,
    num_heads, kv_rep, seq_q, seq_k, head_dim,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ch, stride_cg, stride_mb, stride_mn, stride_lb, stride_lh, stride_lm,
    stride_ob, stride_oh, stride_om, stride_od,
    qk_scale: tl.float64,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, HEADS_PER_PROG: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    qk_scale = (tl.zeros((1,), ACC_DTYPE) + qk_scale).to(ACC_DTYPE)  # fp64 arguments, exact
    # One grid axis (axis 1 holds at most 65,535 programs): the tiles of one (batch, head group) are consecutive.
    tiles = tl.cdiv(seq_q, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % tiles
    pid_bh = pid // tiles
    head_groups = tl.cdiv(num_heads, HEADS_PER_PROG)
    b = pid_bh // head_groups
    hs = (pid_bh % head_groups) * HEADS_PER_PROG + tl.arange(0, HEADS_PER_PROG)
    h_ok = hs < num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    m_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    q_tile = q_ptr + b * stride_qb + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q_mask = m_ok[:, None] & d_ok[None, :]
    causal_shift = seq_k - seq_q

    acc = tl.zeros((HEADS_PER_PROG, BLOCK_M, D_PAD), ACC_DTYPE)
    n_end = seq_k
    if CAUSAL:
        n_end = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M + causal_shift)
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = tl.cast(n0, tl.int64) + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_k
        keep = n_ok[None, :] & m_ok[:, None]
        if HAS_KV_MASK:
            kv = tl.load(kv_mask_ptr + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0)
            keep &= (kv != 0)[None, :]
        if CAUSAL:
            keep &= offs_n[None, :] <= offs_m[:, None] + causal_shift
        kv_tile = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        kv_mask2 = n_ok[:, None] & d_ok[None, :]
        mixed = tl.zeros((HEADS_PER_PROG, BLOCK_M, BLOCK_N), ACC_DTYPE)
        for g32 in range(num_heads):
            g = tl.cast(g32, tl.int64)  # g · stride reaches heads·N·D
            q = tl.load(q_tile + g * stride_qh, mask=q_mask, other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
            k = tl.load(k_ptr + b * stride_kb + (g // kv_rep) * stride_kh + kv_tile, mask=kv_mask2,
                        other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
            lse = tl.load(lse_ptr + b * stride_lb + g * stride_lh + offs_m * stride_lm, mask=m_ok, other=0.0)
            p = tl.where(keep, tl.exp2(s - lse.to(ACC_DTYPE)[:, None] * LOG2E), 0.0)
            c = tl.load(c_ptr + hs * stride_ch + g * stride_cg, mask=h_ok, other=0.0).to(ACC_DTYPE)
            mixed += c[:, None, None] * p[None, :, :]
        v = tl.load(v_ptr + b * stride_vb + (hs // kv_rep)[:, None, None] * stride_vh
                    + (offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)[None, :, :],
                    mask=h_ok[:, None, None] & kv_mask2[None, :, :], other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
        acc += tl.dot(mixed.to(DOT_DTYPE), v, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(out_ptr + b * stride_ob + hs[:, None, None] * stride_oh
             + (offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)[None, :, :],
             acc.to(out_ptr.dtype.element_ty), mask=h_ok[:, None, None] & q_mask[None, :, :])


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object], dict[str, int]]]:
    """The specialisations the launcher produces on a GPU, for ahead-of-time compile checks (see ``_aot``)."""
    variants = []
    for x_type, d_pad, heads_pad, causal, has_mask in (("bf16", 64, 16, True, False), ("bf16", 128, 32, False, True),
                                                       ("fp16", 64, 16, False, False), ("fp32", 64, 16, True, True),
                                                       ("fp64", 16, 4, True, True)):
        acc = tl.float64 if x_type == "fp64" else tl.float32
        dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}[x_type]
        precision = {"fp32": "tf32x3", "fp64": "ieee"}.get(x_type, "tf32")
        block_m, block_n, heads, num_warps = tile_sizes(d_pad, heads_pad, False)
        constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, HEADS_PER_PROG=heads, CAUSAL=causal,
                          HAS_KV_MASK=has_mask, ACC_DTYPE=acc, DOT_DTYPE=dot, DOT_PRECISION=precision)
        stat = "fp64" if x_type == "fp64" else "fp32"
        pointers = {"q_ptr": x_type, "k_ptr": x_type, "v_ptr": x_type, "c_ptr": stat, "kv_mask_ptr": "i8",
                    "lse_ptr": stat, "out_ptr": x_type}
        variants.append((f"{x_type} d={d_pad} heads/prog={heads} causal={causal} mask={has_mask}",
                         launch_signature(coeff_attn_fwd_kernel, pointers, constexprs), constexprs,
                         {"num_warps": num_warps}))
    return variants
