"""Triton kernel 1 of the Chebyshev filter: block-diagonal graphs, every recursion step without leaving the chip.

y_b = Σ_{m=0..K} c_m T_m(Ã_b) x_b for all blocks b at once, one program per (block, column tile):

    T_0 = x,  T_1 = Ã T_0,  T_{m+1} = 2 Ã T_m − T_{m−1},  y = Σ c_m T_m

The tile of x is read from DRAM once and y written once, whatever K is. T_{m−1}, T_m and y stay in registers
for all K steps. Ã is the block's scaled Laplacian 2L_b/λ_max − I (or any dense n_b × n_b operator), in a
packed ragged layout: row i of ``a`` is node i, column j the j-th node of its block; entries past the block
are masked to zero, so padded rows of T stay zero through the recursion.

Where the operands of each step's product Ã T_m live. A single ``tl.dot`` over the whole block keeps its full
operands in registers, and the mma layouts replicate one of them across warps: for fp32 in tf32x3 (hi and lo
parts) the compile for sm_80 spilled heavily from 64-node blocks up (ptxas: 255 registers plus kilobytes of
stack; 128 × 128 fp32 Ã alone is 64 KiB, 256 × 256 is 256 KiB — more than an SM's registers or sm_80's
163 KiB of shared memory). So each step is a small GEMM with its reduction split in BLOCK_K chunks whose
operands come from memory, the way Triton pipelines them through shared memory: Ã_b chunks are re-read every
step (at most 256 KiB per block, L2-resident), and T_m is written to this program's own scratch tile (BLOCK_N ×
BLOCK_D, fp32; written and re-read at once, so served by L2) between a pair of barriers. Neither goes to DRAM
in steady state; the registers hold T_{m−1}, T_m, y and the product.

Modes (constexpr):
    X_IDENTITY  x is the identity (no x read): y_b = p(Ã_b), the filter as a dense n_b × n_b matrix. The
                launcher uses it to materialise P_b = p(Ã_b) once, then applies y_b = P_b x_b with this same
                kernel at K = 1, c = (0, 1) (T_1(P) x = P x): K times fewer FLOPs when d ≫ K·n_b.
    COEF_GRAD   also emit per-tile partial sums of ⟨T_m, s⟩ for every m (s = the ``saved`` tensor): with the
                recursion run on grad_y and s = x these are the coefficients' gradients ⟨T_m grad_y, x⟩.
    WRITE_Y     store y (off when only the coefficients' gradient is wanted).

Loads are converted to the accumulation type right away (fp32, fp64 for fp64 inputs): the interpreter gets
bf16 arithmetic wrong, and T must not be rounded to the input's precision between steps anyway.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature

MAX_BLOCK_NODES = 256  # past this, the launcher uses the CSR step kernel


def tile_config(block_n: int, fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_K, num_warps) for a padded block size BLOCK_N ∈ {16, ..., 256}.

    BLOCK_N × BLOCK_D ≤ 4096 keeps the four live tiles (T_{m−1}, T_m, y, the product) at 64 registers per
    thread with 8 warps. Untuned starting points (no GPU measurement yet), checked to compile for sm_80/sm_90
    within sm_80's shared memory."""
    block_d = max(16, min(64, 4096 // block_n))
    block_k = min(32, block_n)
    warps = 8 if block_n >= 128 else 4
    if fp64:
        block_d = max(16, block_d // 2)
        block_k = min(16, block_n)
    return block_d, block_k, warps


@triton.jit
def chebyshev_block_kernel(
    a_ptr, x_ptr, coef_ptr, block_ptr_ptr, y_ptr, saved_ptr, partial_ptr, scratch_ptr,
    d, order, num_col_tiles,
    stride_an, stride_aj, stride_xn, stride_xd, stride_yn, stride_yd, stride_sn, stride_sd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    X_IDENTITY: tl.constexpr, WRITE_Y: tl.constexpr, COEF_GRAD: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    start = tl.load(block_ptr_ptr + block)
    n = tl.load(block_ptr_ptr + block + 1) - start

    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < n
    local_cols = tl.arange(0, BLOCK_D)
    cols = tile * BLOCK_D + local_cols
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + (start + rows)[:, None] * stride_an

    if X_IDENTITY:
        t0 = tl.where(mask & (rows[:, None] == cols[None, :]), 1.0, 0.0).to(ACC_DTYPE)
    else:
        t0 = tl.load(x_ptr + (start + rows)[:, None] * stride_xn + cols[None, :] * stride_xd,
                     mask=mask, other=0.0).to(ACC_DTYPE)

    # T_1 = Ã T_0; the chunks of T_0 come straight from x (L2 now: the tile was just read) or the identity.
    t1 = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)
    for k0 in range(0, n, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < n
        a = tl.load(a_rows + kk[None, :] * stride_aj, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(ACC_DTYPE)
        chunk_mask = k_ok[:, None] & col_ok[None, :]
        if X_IDENTITY:
            b = tl.where(chunk_mask & (kk[:, None] == cols[None, :]), 1.0, 0.0).to(ACC_DTYPE)
        else:
            b = tl.load(x_ptr + (start + kk)[:, None] * stride_xn + cols[None, :] * stride_xd,
                        mask=chunk_mask, other=0.0).to(ACC_DTYPE)
        t1 = tl.dot(a, b, t1, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    c0 = tl.load(coef_ptr).to(ACC_DTYPE)
    c1 = tl.load(coef_ptr + 1).to(ACC_DTYPE)
    y = c0 * t0 + c1 * t1
    if COEF_GRAD:
        s = tl.load(saved_ptr + (start + rows)[:, None] * stride_sn + cols[None, :] * stride_sd,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        partial = partial_ptr + (block * num_col_tiles + tile) * (order + 1)
        tl.store(partial, tl.sum(t0 * s))
        tl.store(partial + 1, tl.sum(t1 * s))

    # Scratch is (N, num_col_tiles · BLOCK_D): this program's tile holds its block's own rows only, so the buffer
    # is x-sized whatever the largest block is (sizing it by BLOCK_N wasted up to BLOCK_N / n_b of it per block).
    scratch = scratch_ptr + start * (num_col_tiles * BLOCK_D) + tile * BLOCK_D
    scratch_row = num_col_tiles * BLOCK_D
    for m in range(2, order + 1):
        tl.debug_barrier()  # every thread is done reading the previous step's T from the scratch tile
        tl.store(scratch + rows[:, None] * scratch_row + local_cols[None, :], t1, mask=row_ok[:, None])
        tl.debug_barrier()  # and now every thread sees this step's
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)
        for k0 in range(0, n, BLOCK_K):
            kk = k0 + ks
            k_ok = kk < n
            a = tl.load(a_rows + kk[None, :] * stride_aj, mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0).to(ACC_DTYPE)
            b = tl.load(scratch + kk[:, None] * scratch_row + local_cols[None, :], mask=k_ok[:, None], other=0.0,
                        cache_modifier=".cg")
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        t2 = 2.0 * acc - t0
        cm = tl.load(coef_ptr + m).to(ACC_DTYPE)
        y += cm * t2
        if COEF_GRAD:
            tl.store(partial + m, tl.sum(t2 * s))
        t0 = t1
        t1 = t2

    if WRITE_Y:
        tl.store(y_ptr + (start + rows)[:, None] * stride_yn + cols[None, :] * stride_yd,
                 y.to(y_ptr.dtype.element_ty), mask=mask)


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object], dict[str, object]]]:
    """The specialisations the launcher produces, for ahead-of-time compile checks on real GPU targets.

    Returns (label, signature, constexprs, options) per variant; see ``spectralkern.ops._aot``. A subset: every
    block size, every mode and every input dtype appears at least once (each compile takes seconds).
    """
    variants = []
    cases = [  # (x type, acc, dot precision, BLOCK_N, mode)
        ("fp32", "fp32", "tf32x3", 16, "grad"), ("fp32", "fp32", "tf32x3", 64, "fwd"),
        ("fp32", "fp32", "tf32x3", 128, "fwd"), ("fp32", "fp32", "tf32x3", 256, "fwd"),
        ("fp32", "fp32", "tf32x3", 256, "grad"), ("fp32", "fp32", "tf32x3", 128, "build"),
        ("bf16", "fp32", "tf32", 128, "apply"), ("fp16", "fp32", "tf32x3", 32, "fwd"),
        ("fp64", "fp64", "ieee", 256, "fwd"),
    ]
    for x_type, acc, precision, block_n, mode in cases:
        block_d, block_k, warps = tile_config(block_n, fp64=acc == "fp64")
        y_type = acc if mode == "build" else x_type
        pointer_types = {"a_ptr": acc, "x_ptr": x_type, "coef_ptr": acc, "block_ptr_ptr": "i64", "y_ptr": y_type,
                         "saved_ptr": x_type, "partial_ptr": acc, "scratch_ptr": acc}
        constexprs = dict(BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k,
                          ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32, DOT_PRECISION=precision,
                          X_IDENTITY=mode == "build", WRITE_Y=True, COEF_GRAD=mode == "grad")
        signature = launch_signature(chebyshev_block_kernel, pointer_types, constexprs)
        variants.append((f"{x_type} BLOCK_N={block_n} {mode} {precision}", signature, constexprs,
                         {"num_warps": warps}))
    return variants
