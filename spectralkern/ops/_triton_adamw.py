"""Triton kernel: the AdamW update of one flat, contiguous parameter (the path for parameters without a graph).

Elementwise, BLOCK elements per program: g, p, m, v read once; p, m, v written once; fp32 arithmetic (whatever
the storage dtypes) with IEEE-rounded sqrt and divisions, the operation order of torch.optim.AdamW.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._aot import launch_signature

# Elements per program. Untuned: 1024 × (4 loads + 3 stores) is a common size for memory-bound elementwise kernels.
BLOCK = 1024


@triton.jit
def adamw_kernel(
    g_ptr, p_ptr, m_ptr, v_ptr, numel,
    one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias_correction2_sqrt,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=ok)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=ok)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=ok)


def aot_variants() -> list[tuple[str, dict[str, str], dict[str, object]]]:
    """fp32, bf16 and fp16 parameters with fp32 states, and bf16 with bf16 states, for the AOT compile check."""
    variants = []
    for p_type, s_type in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16")):
        pointer_types = {"g_ptr": p_type, "p_ptr": p_type, "m_ptr": s_type, "v_ptr": s_type}
        constexprs = dict(BLOCK=BLOCK)
        signature = launch_signature(adamw_kernel, pointer_types, constexprs)
        # fusion off, as the launcher passes it
        variants.append((f"p {p_type}, m/v {s_type}", signature, constexprs, {"enable_fp_fusion": False}))
    return variants
