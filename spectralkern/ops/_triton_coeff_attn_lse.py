"""Triton kernel of Coeff-Tuning attention, pass 1: every head's softmax normaliser, online.

    lse[b, g, i] = log Σ_j exp(scale · q[b, g, i] · k[b, g // rep, j])      over the keys row i may see

One program per (query tile, batch · head) walks the key tiles with the running max / running sum of flash
attention and writes only lse (B, H, Nq) (fp32; fp64 for fp64 inputs): the mixing pass needs *normalised* probabilities P_g before it can
combine heads, so the normaliser must be known before any tile of P_g is used. A row that sees no key at all
(every key masked) gets lse = +inf, which later turns every p = exp(s − lse) of that row into 0 (output 0, no NaN).

Masks: key padding (kv_mask[b, j] = 0 drops key j) and causal, aligned bottom-right like flash-attention
(query i sees key j iff j ≤ i + Nk − Nq, so a 1-token decode step sees the whole cache). Exponentials are exp2
with log2(e) folded into the scale. Loads are converted to fp32 (fp64 for fp64 inputs) right away: the
interpreter computes bf16 arithmetic wrongly.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature

LOG2E = 1.4426950408889634


def tile_sizes(head_dim_pad: int, interpreter: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). Untuned starting points (no GPU was available when they were chosen):
    a flash-attention-like 64 × 64 score tile on a GPU, 16 × 16 under the interpreter (fewer padded lanes)."""
    if interpreter:
        return 16, 16, 1
    return 64, 64 if head_dim_pad <= 64 else 32, 4


@triton.jit
def coeff_attn_lse_kernel(
    q_ptr, k_ptr, kv_mask_ptr, lse_ptr,
    num_heads, kv_rep, seq_q, seq_k, head_dim,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mn, stride_lb, stride_lh, stride_lm,
    qk_scale: tl.float64,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    qk_scale = (tl.zeros((1,), ACC_DTYPE) + qk_scale).to(ACC_DTYPE)  # fp64 argument, exact
    # One grid axis (axis 1 holds at most 65,535 programs): query tiles of one head are consecutive.
    tiles_m = tl.cdiv(seq_q, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % tiles_m
    pid_bh = pid // tiles_m
    b = pid_bh // num_heads
    g = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    m_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    q = tl.load(q_ptr + b * stride_qb + g * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
    k_base = k_ptr + b * stride_kb + (g // kv_rep) * stride_kh
    causal_shift = seq_k - seq_q

    n_end = seq_k
    if CAUSAL:  # keys past the tile's last query (bottom-right aligned) are masked for every row of it
        n_end = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M + causal_shift)
    row_max = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = tl.cast(n0, tl.int64) + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_k
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(ACC_DTYPE).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        keep = n_ok[None, :] & m_ok[:, None]
        if HAS_KV_MASK:
            kv = tl.load(kv_mask_ptr + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0)
            keep &= (kv != 0)[None, :]
        if CAUSAL:
            keep &= offs_n[None, :] <= offs_m[:, None] + causal_shift
        s = tl.where(keep, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        # A row with no key seen yet keeps max −inf: subtract 0 instead so exp2 gives 0, not NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2(row_max - safe_max) + tl.sum(tl.exp2(s - safe_max[:, None]), axis=1)
        row_max = new_max
    # lse in natural-log units of the scaled scores (fp64 for fp64 inputs: gradcheck needs it); +inf for
    # rows without a key.
    seen = row_sum > 0
    lse = tl.where(seen, (row_max + tl.log2(tl.where(seen, row_sum, 1.0))) / 1.4426950408889634, float("inf"))
    tl.store(lse_ptr + b * stride_lb + g * stride_lh + offs_m * stride_lm, lse.to(lse_ptr.dtype.element_ty),
             mask=m_ok)


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object], dict[str, int]]]:
    """The specialisations the launcher produces on a GPU, for ahead-of-time compile checks (see ``_aot``)."""
    variants = []
    for x_type, d_pad, causal, has_mask in (("bf16", 64, True, False), ("bf16", 128, False, True),
                                            ("fp16", 64, False, False), ("fp32", 64, True, True),
                                            ("fp64", 16, True, True)):
        acc = tl.float64 if x_type == "fp64" else tl.float32
        dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}[x_type]
        precision = {"fp32": "tf32x3", "fp64": "ieee"}.get(x_type, "tf32")
        block_m, block_n, num_warps = tile_sizes(d_pad, False)
        constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, CAUSAL=causal, HAS_KV_MASK=has_mask,
                          ACC_DTYPE=acc, DOT_DTYPE=dot, DOT_PRECISION=precision)
        pointers = {"q_ptr": x_type, "k_ptr": x_type, "kv_mask_ptr": "i8",
                    "lse_ptr": "fp64" if x_type == "fp64" else "fp32"}
        variants.append((f"{x_type} d={d_pad} causal={causal} mask={has_mask}",
                         launch_signature(coeff_attn_lse_kernel, pointers, constexprs), constexprs,
                         {"num_warps": num_warps}))
    return variants
