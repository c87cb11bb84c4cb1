"""Deliberately bad Triton kernels for the compile gates' own tests (never launched)."""
from __future__ import annotations

import triton
import triton.language as tl

from spectralkern.ops._aot import launch_signature


@triton.jit
def bad_kernel(x_ptr, y_ptr, n, stride_x, BLOCK: tl.constexpr, ROWS: tl.constexpr, WIDE: tl.constexpr):
    # rows · stride_x in 32 bits (arange is i32): wraps once n · stride_x reaches 2^31. With WIDE the (ROWS × BLOCK)
    # fp32 tile with a data-dependent reduction needs far more registers than one thread has: it spills.
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    tile = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=rows[:, None] < n, other=0.0)
    if WIDE:
        tile = tl.exp(tile) + tl.sum(tile, axis=1)[:, None]
    tl.store(y_ptr + rows[:, None] * stride_x + cols[None, :], tile, mask=rows[:, None] < n)


def aot_variants():
    pointer_types = {"x_ptr": "fp32", "y_ptr": "fp32"}
    out = []
    for label, wide in (("narrow", False), ("wide", True)):
        constexprs = dict(BLOCK=256, ROWS=64 if wide else 16, WIDE=wide)
        out.append((label, launch_signature(bad_kernel, pointer_types, constexprs), constexprs, {"num_warps": 1}))
    return out
