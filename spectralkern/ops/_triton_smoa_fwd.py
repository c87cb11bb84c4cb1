"""Triton kernel of SMoA's forward: a GEMM whose weight tiles are modulated on chip.

    y[t, o] = Σ_i x[t, i] · W[o, i] · (c + s · [blk_r(o) = blk_c(i)] · Σ_ρ Bt[o, ρ] At[ρ, i])   (+ bias[o])

in the weight's own (unpermuted) coordinates. Bt (out × R) and At (R × in) are the packed SMoA factors
re-indexed to original rows/columns; the block test [blk_r(o) = blk_c(i)] keeps only the K aligned diagonal
blocks, and ``W`` itself is the anchor (M_k = W[rows_k][:, cols_k]), so no anchor is stored. Each program owns
a (BLOCK_T × BLOCK_O) output tile and walks the input dimension: per step it rebuilds the (BLOCK_O × BLOCK_I)
modulation Bt·At from the two small factors, multiplies it into the W tile and feeds the result to the tensor
cores. ΔW never reaches global memory. With c = 1 (INCLUDE_BASE) the base product W x comes out of the same
GEMM, so a dropout-free SMoA layer costs one GEMM plus the on-chip rebuild (R / BLOCK_T of its FLOPs).

The same kernel computes grad_x = grad_y · W_eff with the roles swapped through strides (W → Wᵀ, Bt ↔ Atᵀ,
row blocks ↔ column blocks); see ``smoa_linear._launch_modulated_gemm``.

Operands of the big dot use DOT_DTYPE: the input dtype for fp16/bf16 (tensor cores; also under the interpreter
when the tests' value-correct bf16 shim is installed, fp32 under Triton's own interpreter), fp32 with tf32x3 for
fp32 inputs, fp64 for fp64. With 16-bit operands the base product and the update are two dots: W ⊙ (1 + s·BA)
rounded to bf16 would drop every update below half an ulp of W (|s·BA| ≈ 1e-3 left ~99% of the effective weights
equal to W), while ΔW = W ⊙ s·BA rounded on its own keeps the update to bf16's relative precision. The cost is a
second tensor-core GEMM per tile (2× the forward's MMA work for 16-bit inputs; fp32/fp64 keep one dot).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature


def tile_sizes(dtype_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_O, BLOCK_I, num_warps) for an input element size. Untuned starting points (no GPU was
    available when they were chosen): sized so the fp32 accumulator, the R_PAD ≤ 64 Bt tile and the pipelined
    operand tiles fit sm_80 registers and shared memory."""
    if dtype_bytes >= 8:
        return 32, 32, 16, 4
    if dtype_bytes == 4:
        return 64, 64, 32, 4
    return 128, 64, 32, 8  # 4 warps: 255 registers + 0.4–0.6 KB spills per thread (two dots per tile)


@triton.jit
def smoa_modulated_gemm_kernel(
    x_ptr, w_ptr, bt_ptr, at_ptr, row_block_ptr, col_block_ptr, bias_ptr, y_ptr,
    num_t, num_out, num_in, rank,
    stride_xt, stride_xi, stride_wo, stride_wi, stride_bo, stride_br, stride_ar, stride_ai,
    stride_rb, stride_cb, stride_yt, stride_yo,
    scale: tl.float64,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, R_PAD: tl.constexpr,
    GROUP_T: tl.constexpr, INCLUDE_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MOD_PRECISION: tl.constexpr,
):
    # Grouped program order: GROUP_T consecutive token tiles share each weight column of tiles, so the
    # W / Bt / At tiles a group needs stay in L2.
    pid = tl.program_id(0)
    tiles_t = tl.cdiv(num_t, BLOCK_T)
    tiles_o = tl.cdiv(num_out, BLOCK_O)
    per_group = GROUP_T * tiles_o
    first_t = (pid // per_group) * GROUP_T
    group_size = tl.minimum(tiles_t - first_t, GROUP_T)
    pid_t = (first_t + (pid % per_group) % group_size).to(tl.int64)
    pid_o = ((pid % per_group) // group_size).to(tl.int64)

    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    os_ = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok = ts < num_t
    o_ok = os_ < num_out
    rs = tl.arange(0, R_PAD).to(tl.int64)
    r_ok = rs < rank
    # fp64 argument (a Python float compiles to fp32 otherwise); exact under the interpreter too
    scale = (tl.zeros((1,), ACC_DTYPE) + scale).to(ACC_DTYPE)

    # Loop-invariant: this tile's rows of Bt and their block ids.
    bt = tl.load(bt_ptr + os_[:, None] * stride_bo + rs[None, :] * stride_br,
                 mask=o_ok[:, None] & r_ok[None, :], other=0.0).to(ACC_DTYPE)
    row_blk = tl.load(row_block_ptr + os_ * stride_rb, mask=o_ok, other=-1)

    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=ACC_DTYPE)
    for i0 in range(0, num_in, BLOCK_I):
        is_ = tl.cast(i0, tl.int64) + tl.arange(0, BLOCK_I)  # i · stride reaches out·in in grad_x
        i_ok = is_ < num_in
        xt = tl.load(x_ptr + ts[:, None] * stride_xt + is_[None, :] * stride_xi,
                     mask=t_ok[:, None] & i_ok[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptr + os_[:, None] * stride_wo + is_[None, :] * stride_wi,
                    mask=o_ok[:, None] & i_ok[None, :], other=0.0)
        at = tl.load(at_ptr + rs[:, None] * stride_ar + is_[None, :] * stride_ai,
                     mask=r_ok[:, None] & i_ok[None, :], other=0.0).to(ACC_DTYPE)
        col_blk = tl.load(col_block_ptr + is_ * stride_cb, mask=i_ok, other=-2)
        # ΔW tile / W tile, built on chip: (Bt At) restricted to the diagonal blocks, scaled.
        mod = tl.dot(bt, at, input_precision=MOD_PRECISION, out_dtype=ACC_DTYPE)
        mod = tl.where(row_blk[:, None] == col_blk[None, :], mod * scale, 0.0)
        if INCLUDE_BASE and DOT_DTYPE != ACC_DTYPE:
            # 16-bit operands: W ⊙ (1 + s·BA) rounded to bf16 would lose every update below half an ulp of W,
            # so the base product and the update ΔW = W ⊙ s·BA (rounded relative to itself) are two dots.
            acc += tl.dot(xt, tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        elif INCLUDE_BASE:
            mod += 1.0  # fp32/fp64 operands carry W ⊙ (1 + s·BA) to their own precision: one dot
        w_eff = (w.to(ACC_DTYPE) * mod).to(DOT_DTYPE)
        acc += tl.dot(xt, tl.trans(w_eff), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + os_, mask=o_ok, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + ts[:, None] * stride_yt + os_[None, :] * stride_yo, acc.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & o_ok[None, :])


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object]]]:
    """The specialisations the launcher produces on a GPU, for ahead-of-time compile checks (see ``_aot``)."""
    variants = []
    for x_type, nbytes in (("bf16", 2), ("fp16", 2), ("fp32", 4), ("fp64", 8)):
        acc = tl.float64 if x_type == "fp64" else tl.float32
        dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}[x_type]
        precision = {"fp32": "tf32x3", "fp64": "ieee"}.get(x_type, "tf32")
        mod_precision = "ieee" if x_type == "fp64" else ("tf32x3" if x_type == "fp32" else "tf32")
        factor_type = "fp64" if x_type == "fp64" else "fp32"
        block_t, block_o, block_i, warps = tile_sizes(nbytes)
        for r_pad, include_base, has_bias in ((16, True, True), (64, False, False)):
            constexprs = dict(BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_I=block_i, R_PAD=r_pad, GROUP_T=8,
                              INCLUDE_BASE=include_base, HAS_BIAS=has_bias, ACC_DTYPE=acc, DOT_DTYPE=dot,
                              DOT_PRECISION=precision, MOD_PRECISION=mod_precision)
            pointer_types = {"x_ptr": x_type, "w_ptr": x_type, "bt_ptr": factor_type, "at_ptr": factor_type,
                             "row_block_ptr": "i64", "col_block_ptr": "i64", "bias_ptr": x_type, "y_ptr": x_type}
            signature = launch_signature(smoa_modulated_gemm_kernel, pointer_types, constexprs)
            # num_warps as the launcher passes it
            variants.append((f"x {x_type}, R_PAD={r_pad}, base={include_base}", signature, constexprs,
                             {"num_warps": warps}))
    return variants
