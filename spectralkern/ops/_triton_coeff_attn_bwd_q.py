"""Triton kernel of Coeff-Tuning attention's backward, query side: δ and dC (PHASE 1), then dQ (PHASE 2).

With D_h = dO_h V_hᵀ (Nq × Nk) for each output head h, the gradient reaching the probabilities of source head g is
dP_g = Σ_h C[h, g] D_h, so

    δ_g    = rowsum(P_g ⊙ dP_g)                      (flash attention's rowsum(dO ⊙ O) does not apply: head g's
                                                      probabilities feed every output head)
    dS_g   = P_g ⊙ (dP_g − δ_g)                      (softmax backward, in units of the scaled scores)
    dQ_g   = scale · dS_g K_g
    dC[h, g] = Σ_ij D_h[i, j] · P_g[i, j]

One program per (query tile, batch · group of HEADS_PER_PROG source heads) walks the key tiles; per key tile it
rebuilds its heads' P_g with one batched dot and the stored lse, and walks every output head h (dynamic loop) to
rebuild D_h and add C[h, g] D_h into dP. PHASE 1 accumulates δ (written as (B, H, Nq)) and this query tile's share
of dC (written to a (B, tiles, H, H) buffer that the launcher sums: deterministic, no atomics). PHASE 2 reads δ
and accumulates dQ. Both phases rebuild the same tiles; nothing N × N is stored.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature


def tile_sizes(head_dim_pad: int, heads_pad: int, interpreter: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, HEADS_PER_PROG, num_warps). Untuned (no GPU was available when they were chosen): the
    per-program state is P, dP (HEADS_PER_PROG · BLOCK_M · BLOCK_N each) and dQ (HEADS_PER_PROG · BLOCK_M · D),
    kept near 16 K fp32 elements in all."""
    if interpreter:
        return 16, 16, min(heads_pad, 4), 1
    heads = max(1, min(heads_pad, 8192 // (32 * head_dim_pad)))
    # 4 warps at heads · D = 256 spilled 0.7 KB per thread in phase 2 (sm_90); 8 do not.
    return 32, 32, heads, 4 if heads * head_dim_pad < 256 else 8


@triton.jit
def coeff_attn_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, c_ptr, kv_mask_ptr, lse_ptr, do_ptr, delta_ptr, dc_ptr, dq_ptr,
    num_heads, kv_rep, seq_q, seq_k, head_dim,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ch, stride_cg, stride_mb, stride_mn, stride_lb, stride_lh, stride_lm,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_ccb, stride_cct, stride_cch, stride_ccg,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    qk_scale: tl.float64, scale: tl.float64,
    PHASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, H_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    qk_scale = (tl.zeros((1,), ACC_DTYPE) + qk_scale).to(ACC_DTYPE)  # fp64 arguments, exact
    scale = (tl.zeros((1,), ACC_DTYPE) + scale).to(ACC_DTYPE)
    # One grid axis (axis 1 holds at most 65,535 programs): the tiles of one (batch, head group) are consecutive.
    tiles = tl.cdiv(seq_q, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % tiles
    pid_bh = pid // tiles
    head_groups = tl.cdiv(num_heads, HEADS_PER_PROG)
    b = pid_bh // head_groups
    gs = (pid_bh % head_groups) * HEADS_PER_PROG + tl.arange(0, HEADS_PER_PROG)
    g_ok = gs < num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    m_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    row_tile = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    row_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + gs[:, None, None] * stride_qh + row_tile[None, :, :],
                mask=g_ok[:, None, None] & row_mask[None, :, :], other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
    lse = tl.load(lse_ptr + b * stride_lb + gs[:, None] * stride_lh + offs_m[None, :] * stride_lm,
                  mask=g_ok[:, None] & m_ok[None, :], other=0.0).to(ACC_DTYPE)
    do_tile = do_ptr + b * stride_ob + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    causal_shift = seq_k - seq_q
    if PHASE == 1:
        delta = tl.zeros((HEADS_PER_PROG, BLOCK_M), ACC_DTYPE)
        dc = tl.zeros((H_PAD, HEADS_PER_PROG), ACC_DTYPE)
        h_rows = tl.arange(0, H_PAD).to(tl.int64)
    else:
        delta = tl.load(delta_ptr + b * stride_lb + gs[:, None] * stride_lh + offs_m[None, :] * stride_lm,
                        mask=g_ok[:, None] & m_ok[None, :], other=0.0).to(ACC_DTYPE)
        dq = tl.zeros((HEADS_PER_PROG, BLOCK_M, D_PAD), ACC_DTYPE)

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
        key_tile = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        val_tile = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        key_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * stride_kb + (gs // kv_rep)[:, None, None] * stride_kh + key_tile[None, :, :],
                    mask=g_ok[:, None, None] & key_mask[None, :, :], other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k, 0, 2, 1), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        p = tl.where(keep[None, :, :], tl.exp2(s - lse[:, :, None] * LOG2E), 0.0)
        dp = tl.zeros((HEADS_PER_PROG, BLOCK_M, BLOCK_N), ACC_DTYPE)
        for h32 in range(num_heads):
            h = tl.cast(h32, tl.int64)  # h · stride reaches heads·N·D
            do = tl.load(do_tile + h * stride_oh, mask=row_mask, other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
            v = tl.load(v_ptr + b * stride_vb + (h // kv_rep) * stride_vh + val_tile, mask=key_mask,
                        other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
            d_h = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            c = tl.load(c_ptr + h * stride_ch + gs * stride_cg, mask=g_ok, other=0.0).to(ACC_DTYPE)
            dp += c[:, None, None] * d_h[None, :, :]
            if PHASE == 1:
                share = tl.sum(tl.sum(p * d_h[None, :, :], axis=2), axis=1)      # (HEADS_PER_PROG,)
                dc += tl.where(h_rows[:, None] == h, share[None, :], 0.0)
        if PHASE == 1:
            delta += tl.sum(p * dp, axis=2)
        else:
            ds = (p * (dp - delta[:, :, None])).to(DOT_DTYPE)
            dq += tl.dot(ds, k, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    if PHASE == 1:
        tl.store(delta_ptr + b * stride_lb + gs[:, None] * stride_lh + offs_m[None, :] * stride_lm,
                 delta.to(delta_ptr.dtype.element_ty), mask=g_ok[:, None] & m_ok[None, :])
        tl.store(dc_ptr + b * stride_ccb + pid_m * stride_cct + h_rows[:, None] * stride_cch + gs[None, :] * stride_ccg,
                 dc.to(dc_ptr.dtype.element_ty), mask=(h_rows < num_heads)[:, None] & g_ok[None, :])
    else:
        tl.store(dq_ptr + b * stride_dqb + gs[:, None, None] * stride_dqh
                 + (offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)[None, :, :],
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=g_ok[:, None, None] & row_mask[None, :, :])


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
                    "lse_ptr": stat, "do_ptr": x_type, "delta_ptr": stat, "dc_ptr": stat, "dq_ptr": stat}
        for phase in (1, 2):
            constexprs = dict(PHASE=phase, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, HEADS_PER_PROG=heads,
                              H_PAD=heads_pad, CAUSAL=causal, HAS_KV_MASK=has_mask, ACC_DTYPE=acc, DOT_DTYPE=dot,
                              DOT_PRECISION=precision)
            variants.append((f"phase {phase} {x_type} d={d_pad} heads/prog={heads} causal={causal} mask={has_mask}",
                             launch_signature(coeff_attn_bwd_q_kernel, pointers, constexprs), constexprs,
                             {"num_warps": num_warps}))
    return variants
