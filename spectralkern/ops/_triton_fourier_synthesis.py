"""Triton kernel: synthesis of a sparse complex spectrum at every output position — the second half of the
fused Fourier adapter (forward: y; backward: grad_x).

One program per (token tile, output tile) computes

    y[t, p] = base[t, p] + Σ_j Re(A[t, j] · exp(+2πi f_j p / L))
            = base[t, p] + Σ_j (A_re[t, j] cos θ_jp − A_im[t, j] sin θ_jp),      θ_jp = 2π (f_j·p mod L) / L

as two real ``tl.dot``s per frequency chunk against twiddle tiles generated in registers (no stored basis, no
dense ΔW). A (tokens × n, two planes) comes from the analysis kernel and already carries the coefficients and
the gate. The frequencies are walked expert by expert; with gates, an expert none of the tile's tokens is routed
to is skipped (its A is zero there).

cos/sin: ``FAST_TRIG`` as in the analysis kernel (MUFU approximations for fp32 on a GPU, precise otherwise).

Phase precision: f·p is reduced modulo L in int32 before converting to float, exactly as in the analysis kernel
(see ``_triton_fourier_analysis``), and centred so cos/sin see arguments in [−π, π).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature
from triton.language.extra import libdevice


def tile_sizes(fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_P, BLOCK_J). Untuned (no GPU measurement yet): 128 tokens (8 warps) amortise each
    twiddle tile (as in the analysis kernel), 64 output columns per program, 32 frequencies per dot."""
    if fp64:
        return 32, 32, 16
    return 128, 64, 32


NUM_WARPS = 8


@triton.jit
def fourier_synthesis_kernel(
    a_ptr, freq_ptr, gates_ptr, expert_ptr_ptr, base_ptr, y_ptr,
    num_tokens, size, num_experts,
    stride_ap, stride_at, stride_gt, stride_ge, stride_bt, stride_bp, stride_yt, stride_yp,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_BASE: tl.constexpr,
):
    token_tile = tl.program_id(0).to(tl.int64)
    out_tile = tl.program_id(1)
    ts = token_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < num_tokens
    ps = out_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < size
    inv_size = 1.0 / size.to(tl.float32)
    # 2π as a constant of the accumulation type: a bare Python float literal would be rounded to fp32.
    step = tl.full((), 6.283185307179586, ACC_DTYPE) / size.to(ACC_DTYPE)

    acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=ACC_DTYPE)
    for e in range(0, num_experts):
        lo = tl.load(expert_ptr_ptr + e)
        hi = tl.load(expert_ptr_ptr + e + 1)
        if HAS_GATE:
            g = tl.load(gates_ptr + ts * stride_gt + tl.cast(e, tl.int64) * stride_ge, mask=t_ok, other=0.0)
            hi = tl.where(tl.max(tl.abs(g), axis=0) > 0, hi, lo)  # nobody routed here: skip the expert
        for j0 in range(lo, hi, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            j_ok = js < hi
            f = tl.load(freq_ptr + js, mask=j_ok, other=0)
            a_offsets = ts[:, None] * stride_at + js[None, :]
            a_mask = t_ok[:, None] & j_ok[None, :]
            a_re = tl.load(a_ptr + a_offsets, mask=a_mask, other=0.0).to(ACC_DTYPE)
            a_im = tl.load(a_ptr + stride_ap + a_offsets, mask=a_mask, other=0.0).to(ACC_DTYPE)
            prod = f[:, None] * ps[None, :]
            r = prod - (prod.to(tl.float32) * inv_size).to(tl.int32) * size
            r = tl.where(r < 0, r + size, r)
            r = tl.where(r >= size, r - size, r)
            angle = tl.where(2 * r >= size, r - size, r).to(ACC_DTYPE) * step
            if FAST_TRIG:
                cos, sin = libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
            else:
                cos, sin = tl.cos(angle), tl.sin(angle)
            acc += tl.dot(a_re, cos, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            acc -= tl.dot(a_im, sin, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    out_mask = t_ok[:, None] & p_ok[None, :]
    ps = ps.to(tl.int64)  # 32-bit above for the twiddle arithmetic; 64-bit for addresses
    if HAS_BASE:
        acc += tl.load(base_ptr + ts[:, None] * stride_bt + ps[None, :] * stride_bp, mask=out_mask,
                       other=0.0).to(ACC_DTYPE)
    tl.store(y_ptr + ts[:, None] * stride_yt + ps[None, :] * stride_yp, acc.to(y_ptr.dtype.element_ty),
             mask=out_mask)


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object], dict[str, int]]]:
    """The specialisations the launcher can produce, for ahead-of-time compile checks on real GPU targets.

    Returns (label, signature, constexprs, compile options) per variant; see ``spectralkern.ops._aot``.
    """
    variants = []
    # One variant per distinct code path (dtype × flags); the full cross product would only repeat them.
    for x_type, has_gate, has_base, label in (("fp32", False, True, "forward"), ("bf16", True, True, "forward gated"),
                                              ("fp16", True, False, "grad_x gated"), ("fp64", False, False, "grad_x")):
        acc = "fp64" if x_type == "fp64" else "fp32"
        precision = {"fp32": "tf32x3", "fp64": "ieee"}.get(x_type, "tf32")
        block_t, block_p, block_j = tile_sizes(fp64=acc == "fp64")
        pointer_types = {"a_ptr": acc, "freq_ptr": "i32", "gates_ptr": acc, "expert_ptr_ptr": "i32",
                         "base_ptr": x_type, "y_ptr": x_type}
        constexprs = dict(BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_J=block_j,
                          ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32, DOT_PRECISION=precision,
                          FAST_TRIG=acc == "fp32", HAS_GATE=has_gate, HAS_BASE=has_base)
        signature = launch_signature(fourier_synthesis_kernel, pointer_types, constexprs)
        options = {"num_warps": NUM_WARPS if acc == "fp32" else 4}  # as the launcher passes them
        variants.append((f"x {x_type}, {label}", signature, constexprs, options))
    return variants
