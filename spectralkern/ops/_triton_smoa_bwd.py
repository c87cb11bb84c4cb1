"""Triton kernel of SMoA's factor gradients, block by block, without materialising Gᵀx or ΔW.

For block k (rows_k = row_perm[row_ptr[k]:row_ptr[k+1]], cols_k likewise) with H_k = s · (G[:, rows_k]ᵀ
X[:, cols_k]) ⊙ W[rows_k][:, cols_k]:

    dB[rows of k, :] = H_k A[:, cols of k]ᵀ          dA[:, cols of k] = B[rows of k, :]ᵀ H_k

(B, A the packed factors, in permuted order). One program per (column tile, row tile, block): it accumulates
its (BLOCK_O × BLOCK_I) tile of G_kᵀ X_k over all tokens in registers, gathering the block's rows of G and
columns of X straight from the unpermuted tensors (the within-block indices are sorted, so a tile's gathers stay
in a narrow window of each row); then it gathers the anchor tile from W once, forms H and contracts it with the
A and B tiles. Partial products of tiles that share rows (dB) or columns (dA) are summed with fp32/fp64 atomics
into (out × R) / (R × in) accumulators: no (tiles × out × R) partial buffers, so the backward needs no memory
beyond its outputs. The atomics make the last bits depend on tile order (not bitwise deterministic).

Ragged blocks: the grid covers the largest block; tiles past a smaller block's end run zero tokens and store
nothing. Loads are converted to fp32 right away (fp64 for fp64 inputs) except the two GEMM operands on a GPU,
which stay in DOT_DTYPE (the input dtype) for the tensor cores.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature


def tile_sizes(dtype_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_I, BLOCK_T, num_warps). Untuned starting points (no GPU was available): the fp32
    (BLOCK_O × BLOCK_I) accumulator plus the R_PAD ≤ 64 factor tiles fit sm_80 registers."""
    if dtype_bytes >= 8:
        return 32, 32, 16, 4
    return 64, 64, 32, 4


@triton.jit
def smoa_factor_grad_kernel(
    g_ptr, x_ptr, w_ptr, row_perm_ptr, col_perm_ptr, row_ptr_ptr, col_ptr_ptr, b_ptr, a_ptr, db_ptr, da_ptr,
    num_t, rank,
    stride_gt, stride_go, stride_xt, stride_xi, stride_wo, stride_wi,
    stride_bp, stride_br, stride_ar, stride_aq, stride_dbp, stride_dbr, stride_dar, stride_daq,
    scale: tl.float64,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, R_PAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FACTOR_PRECISION: tl.constexpr,
):
    tile_i = tl.program_id(0).to(tl.int64)
    tile_o = tl.program_id(1).to(tl.int64)
    block = tl.program_id(2).to(tl.int64)
    row_start = tl.load(row_ptr_ptr + block)
    row_stop = tl.load(row_ptr_ptr + block + 1)
    col_start = tl.load(col_ptr_ptr + block)
    col_stop = tl.load(col_ptr_ptr + block + 1)

    ps = row_start + tile_o * BLOCK_O + tl.arange(0, BLOCK_O)  # permuted row positions
    qs = col_start + tile_i * BLOCK_I + tl.arange(0, BLOCK_I)  # permuted column positions
    p_ok = ps < row_stop
    q_ok = qs < col_stop
    rows = tl.load(row_perm_ptr + ps, mask=p_ok, other=0)  # original row / column indices
    cols = tl.load(col_perm_ptr + qs, mask=q_ok, other=0)
    # Tiles past this block's end (ragged blocks) run zero token steps.
    tokens = tl.where((row_start + tile_o * BLOCK_O < row_stop) & (col_start + tile_i * BLOCK_I < col_stop),
                      num_t, 0)

    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC_DTYPE)
    for t0 in range(0, tokens, BLOCK_T):
        ts = tl.cast(t0, tl.int64) + tl.arange(0, BLOCK_T)  # t · stride reaches tokens·out
        t_ok = ts < num_t
        g = tl.load(g_ptr + ts[:, None] * stride_gt + rows[None, :] * stride_go,
                    mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(DOT_DTYPE)
        xt = tl.load(x_ptr + ts[:, None] * stride_xt + cols[None, :] * stride_xi,
                     mask=t_ok[:, None] & q_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc += tl.dot(tl.trans(g), xt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    tile_ok = p_ok[:, None] & q_ok[None, :]
    anchor = tl.load(w_ptr + rows[:, None] * stride_wo + cols[None, :] * stride_wi, mask=tile_ok,
                     other=0.0).to(ACC_DTYPE)
    h = acc * anchor * (tl.zeros((1,), ACC_DTYPE) + scale).to(ACC_DTYPE)  # fp64 argument, exact

    rs = tl.arange(0, R_PAD).to(tl.int64)
    r_ok = rs < rank
    a = tl.load(a_ptr + rs[:, None] * stride_ar + qs[None, :] * stride_aq, mask=r_ok[:, None] & q_ok[None, :],
                other=0.0).to(ACC_DTYPE)
    b = tl.load(b_ptr + ps[:, None] * stride_bp + rs[None, :] * stride_br, mask=p_ok[:, None] & r_ok[None, :],
                other=0.0).to(ACC_DTYPE)
    db = tl.dot(h, tl.trans(a), input_precision=FACTOR_PRECISION, out_dtype=ACC_DTYPE)  # (BLOCK_O, R_PAD)
    da = tl.dot(tl.trans(b), h, input_precision=FACTOR_PRECISION, out_dtype=ACC_DTYPE)  # (R_PAD, BLOCK_I)
    tl.atomic_add(db_ptr + ps[:, None] * stride_dbp + rs[None, :] * stride_dbr, db,
                  mask=p_ok[:, None] & r_ok[None, :], sem="relaxed")
    tl.atomic_add(da_ptr + rs[:, None] * stride_dar + qs[None, :] * stride_daq, da,
                  mask=r_ok[:, None] & q_ok[None, :], sem="relaxed")


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object]]]:
    """The specialisations the launcher produces on a GPU, for ahead-of-time compile checks (see ``_aot``)."""
    variants = []
    for x_type, nbytes in (("bf16", 2), ("fp16", 2), ("fp32", 4), ("fp64", 8)):
        acc_type = "fp64" if x_type == "fp64" else "fp32"
        dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}[x_type]
        precision = {"fp32": "tf32x3", "fp64": "ieee"}.get(x_type, "tf32")
        factor_precision = "ieee" if x_type == "fp64" else "tf32x3"
        block_o, block_i, block_t, warps = tile_sizes(nbytes)
        for r_pad in (16, 64):
            constexprs = dict(BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t, R_PAD=r_pad,
                              ACC_DTYPE=tl.float64 if acc_type == "fp64" else tl.float32, DOT_DTYPE=dot,
                              DOT_PRECISION=precision, FACTOR_PRECISION=factor_precision)
            pointer_types = {"g_ptr": x_type, "x_ptr": x_type, "w_ptr": x_type, "row_perm_ptr": "i64",
                             "col_perm_ptr": "i64", "row_ptr_ptr": "i64", "col_ptr_ptr": "i64",
                             "b_ptr": acc_type, "a_ptr": acc_type, "db_ptr": acc_type, "da_ptr": acc_type}
            signature = launch_signature(smoa_factor_grad_kernel, pointer_types, constexprs)
            # num_warps as the launcher passes it
            variants.append((f"x {x_type}, R_PAD={r_pad}", signature, constexprs, {"num_warps": warps}))
    return variants
