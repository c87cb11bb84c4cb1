"""Triton kernel: spectral analysis of a token tile at a sparse set of DFT frequencies, scaled by the
coefficients and the gate — the first half of the fused Fourier adapter (forward) and its whole parameter
backward.

For one (token tile, frequency tile) program and signal s (tokens × L) it computes

    W[t, j] = Σ_q s[t, q] · exp(+2πi f_j q / L)          (complex, BLOCK_T × BLOCK_J, on chip)

as two real ``tl.dot``s against twiddle tiles cos/sin(2π (q·f_j mod L) / L) generated in registers: no stored
basis, no dense ΔW. Then, depending on the constexpr flags:

* ``WRITE_A``: stores A = G[t, e] · C_j · W[t, j] (complex, two planes) for the synthesis kernel.
  Forward: s = x, f = column frequencies v, L = in. Backward: s = grad_y, f = row frequencies u, L = out
  (A is then the spectrum whose synthesis at v gives grad_x).
* ``PARAM_GRAD`` (backward): also analyses a second signal s2 = x at f2 = v (L2 = in) into V, and emits
  per-tile partial gradients of the coefficients, Σ_t G·Re(W V) and −Σ_t G·Im(W V), and the gate gradient
  Σ_{j in tile} Re(C_j W V) (atomically added into (T, E); zero where the gate is zero — see fourier_adapter).
  The fp32 atomics make the gate gradient's last bits depend on the order the frequency tiles finish in: not
  bitwise deterministic run to run on a GPU (bounded by ~(tiles per expert) · 2^-24 of Σ|partials|; the
  interpreter runs tiles in order). A deterministic version would write (tiles × T × E) partials and sum them
  (≈ 40 MB at T = 8192, E = 8, n = 5000): not done; docs/gpu.md says so.

Frequency tiles never straddle experts: expert e owns the tiles [Σ_{e'<e} ⌈n_e'/BLOCK_J⌉, ...), found by a scalar
loop over expert_ptr (E is small); the launcher gives an upper bound of tiles and the surplus programs do
nothing. A tile whose gates are all zero (no token of the tile routed to its expert) skips the work.

Phase precision: q·f is reduced modulo L in int32 *before* converting to float (q, f < L ≤ 46000, so q·f < 2^31):
the quotient is estimated with an fp32 reciprocal (off by at most one for these sizes) and corrected with two
selects, then centred to [−L/2, L/2) so cos/sin see arguments in [−π, π). Converting q·f to fp32 first would
lose the phase entirely once q·f ≫ 2^24.

cos/sin: with ``FAST_TRIG`` (fp32 on a GPU) the MUFU approximations ``__nv_fast_cosf/sinf`` (absolute error
≈ 2^-21 on [−π, π], which the centring guarantees); the precise ``tl.cos/tl.sin`` otherwise (fp64, and the
interpreter, which has no libdevice).

Loads are converted to the accumulation type right away (fp32, or fp64 for fp64 inputs): the interpreter gets
bf16 arithmetic wrong, and the twiddles need more than 8 mantissa bits anyway.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature
from triton.language.extra import libdevice


def tile_sizes(fp64: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_J, BLOCK_Q). Untuned (no GPU measurement yet): each twiddle element feeds 2·BLOCK_T
    multiply-adds, so 128 tokens (8 warps) keep its generation (two MUFU ops + ~10 integer/float ops) under the
    tensor-core time; 32 × 32 twiddle tiles keep the backward's four accumulators at 64 registers a thread."""
    if fp64:
        return 32, 16, 16
    return 128, 32, 32


NUM_WARPS = 8


@triton.jit
def fourier_analysis_kernel(
    sig_ptr, freq_ptr, sig2_ptr, freq2_ptr, coef_re_ptr, coef_im_ptr, gates_ptr, expert_ptr_ptr,
    a_ptr, coef_grad_ptr, gate_grad_ptr,
    num_tokens, size, size2, num_experts,
    stride_st, stride_sq, stride_s2t, stride_s2q, stride_gt, stride_ge,
    stride_ap, stride_at, stride_cgt, stride_cgp,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
    HAS_GATE: tl.constexpr, WRITE_A: tl.constexpr, PARAM_GRAD: tl.constexpr,
):
    token_tile = tl.program_id(0).to(tl.int64)
    freq_tile = tl.program_id(1)

    # Which expert owns this frequency tile, and the tile's frequency range [start, stop).
    expert = freq_tile * 0
    start = freq_tile * 0
    stop = freq_tile * 0
    seen = freq_tile * 0
    for e in range(0, num_experts):
        lo = tl.load(expert_ptr_ptr + e)
        hi = tl.load(expert_ptr_ptr + e + 1)
        count = (hi - lo + BLOCK_J - 1) // BLOCK_J
        inside = (freq_tile >= seen) & (freq_tile < seen + count)
        expert = tl.where(inside, e, expert)
        start = tl.where(inside, lo + (freq_tile - seen) * BLOCK_J, start)
        stop = tl.where(inside, hi, stop)
        seen += count

    ts = token_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < num_tokens
    js = start + tl.arange(0, BLOCK_J)
    j_ok = js < stop
    if HAS_GATE:
        g = tl.load(gates_ptr + ts * stride_gt + tl.cast(expert, tl.int64) * stride_ge, mask=t_ok, other=0.0).to(ACC_DTYPE)
        active = (stop > start) & (tl.max(tl.abs(g), axis=0) > 0)
    else:
        active = stop > start
    # 2π as a constant of the accumulation type: a bare Python float literal would be rounded to fp32.
    two_pi = tl.full((), 6.283185307179586, ACC_DTYPE)

    # W = Σ_q s[t, q] e^{2πi f_j q / L}; the loop is empty for an inactive tile (W = 0).
    f = tl.load(freq_ptr + js, mask=j_ok, other=0)
    inv_size = 1.0 / size.to(tl.float32)
    step = two_pi / size.to(ACC_DTYPE)
    w_re = tl.zeros((BLOCK_T, BLOCK_J), dtype=ACC_DTYPE)
    w_im = tl.zeros((BLOCK_T, BLOCK_J), dtype=ACC_DTYPE)
    for q0 in range(0, tl.where(active, size, 0), BLOCK_Q):
        qs = tl.cast(q0, tl.int64) + tl.arange(0, BLOCK_Q)
        s = tl.load(sig_ptr + ts[:, None] * stride_st + qs[None, :] * stride_sq,
                    mask=t_ok[:, None] & (qs < size)[None, :], other=0.0).to(ACC_DTYPE)
        prod = qs[:, None] * f[None, :]
        r = prod - (prod.to(tl.float32) * inv_size).to(tl.int32) * size
        r = tl.where(r < 0, r + size, r)
        r = tl.where(r >= size, r - size, r)
        angle = tl.where(2 * r >= size, r - size, r).to(ACC_DTYPE) * step
        if FAST_TRIG:
            cos, sin = libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
        else:
            cos, sin = tl.cos(angle), tl.sin(angle)
        w_re += tl.dot(s, cos, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        w_im += tl.dot(s, sin, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    c_re = tl.load(coef_re_ptr + js, mask=j_ok, other=0.0).to(ACC_DTYPE)[None, :]
    c_im = tl.load(coef_im_ptr + js, mask=j_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if WRITE_A:
        a_re = c_re * w_re - c_im * w_im
        a_im = c_re * w_im + c_im * w_re
        if HAS_GATE:
            a_re = a_re * g[:, None]
            a_im = a_im * g[:, None]
        a_offsets = ts[:, None] * stride_at + js[None, :]
        a_mask = t_ok[:, None] & j_ok[None, :]
        tl.store(a_ptr + a_offsets, a_re.to(a_ptr.dtype.element_ty), mask=a_mask)
        tl.store(a_ptr + stride_ap + a_offsets, a_im.to(a_ptr.dtype.element_ty), mask=a_mask)

    if PARAM_GRAD:
        # V = Σ_q s2[t, q] e^{2πi f2_j q / L2}: the same analysis of the second signal.
        f2 = tl.load(freq2_ptr + js, mask=j_ok, other=0)
        inv_size2 = 1.0 / size2.to(tl.float32)
        step2 = two_pi / size2.to(ACC_DTYPE)
        v_re = tl.zeros((BLOCK_T, BLOCK_J), dtype=ACC_DTYPE)
        v_im = tl.zeros((BLOCK_T, BLOCK_J), dtype=ACC_DTYPE)
        for q0 in range(0, tl.where(active, size2, 0), BLOCK_Q):
            qs = tl.cast(q0, tl.int64) + tl.arange(0, BLOCK_Q)
            s2 = tl.load(sig2_ptr + ts[:, None] * stride_s2t + qs[None, :] * stride_s2q,
                         mask=t_ok[:, None] & (qs < size2)[None, :], other=0.0).to(ACC_DTYPE)
            prod = qs[:, None] * f2[None, :]
            r = prod - (prod.to(tl.float32) * inv_size2).to(tl.int32) * size2
            r = tl.where(r < 0, r + size2, r)
            r = tl.where(r >= size2, r - size2, r)
            angle = tl.where(2 * r >= size2, r - size2, r).to(ACC_DTYPE) * step2
            if FAST_TRIG:
                cos, sin = libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
            else:
                cos, sin = tl.cos(angle), tl.sin(angle)
            v_re += tl.dot(s2, cos, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            v_im += tl.dot(s2, sin, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        # The loss is Σ G·Re(C·W·V): d/dC_re = G·Re(WV), d/dC_im = −G·Im(WV), d/dG = Re(C·W·V).
        p_re = w_re * v_re - w_im * v_im
        p_im = w_re * v_im + w_im * v_re
        if HAS_GATE:
            # Inactive and surplus tiles add zeros (W = 0, or C = 0 past the end).
            gate_partial = tl.sum(c_re * p_re - c_im * p_im, axis=1)
            tl.atomic_add(gate_grad_ptr + ts * num_experts + expert, tl.where(g != 0, gate_partial, 0.0),
                          mask=t_ok)
            p_re = p_re * g[:, None]
            p_im = p_im * g[:, None]
        coef_offsets = token_tile * stride_cgt + js
        tl.store(coef_grad_ptr + coef_offsets, tl.sum(p_re, axis=0), mask=j_ok)
        tl.store(coef_grad_ptr + stride_cgp + coef_offsets, -tl.sum(p_im, axis=0), mask=j_ok)


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object], dict[str, int]]]:
    """The specialisations the launcher can produce, for ahead-of-time compile checks on real GPU targets.

    Returns (label, signature, constexprs, compile options) per variant; see ``spectralkern.ops._aot``.
    """
    variants = []
    # One variant per distinct code path (dtype × flags); the full cross product would only repeat them.
    for x_type, has_gate, write_a, param_grad, label in (("fp32", False, True, False, "forward"),
                                                         ("bf16", True, True, False, "forward gated"),
                                                         ("bf16", True, True, True, "backward gated"),
                                                         ("fp32", False, False, True, "backward coef-only"),
                                                         ("fp64", True, True, True, "backward gated")):
        acc = "fp64" if x_type == "fp64" else "fp32"
        precision = {"fp32": "tf32x3", "fp64": "ieee"}.get(x_type, "tf32")
        block_t, block_j, block_q = tile_sizes(fp64=acc == "fp64")
        pointer_types = {"sig_ptr": x_type, "freq_ptr": "i32", "sig2_ptr": x_type, "freq2_ptr": "i32",
                         "coef_re_ptr": acc, "coef_im_ptr": acc, "gates_ptr": acc, "expert_ptr_ptr": "i32",
                         "a_ptr": acc, "coef_grad_ptr": acc, "gate_grad_ptr": acc}
        constexprs = dict(BLOCK_T=block_t, BLOCK_J=block_j, BLOCK_Q=block_q,
                          ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32, DOT_PRECISION=precision,
                          FAST_TRIG=acc == "fp32", HAS_GATE=has_gate, WRITE_A=write_a, PARAM_GRAD=param_grad)
        signature = launch_signature(fourier_analysis_kernel, pointer_types, constexprs)
        options = {"num_warps": NUM_WARPS if acc == "fp32" else 4}  # as the launcher passes them
        variants.append((f"x {x_type}, {label}", signature, constexprs, options))
    return variants
