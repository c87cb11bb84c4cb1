"""Test-only shim: the Triton interpreter computes bfloat16 on values, the way the GPU does.

Triton 3.9's interpreter stores bf16 as uint16 and runs numpy on the bit patterns (a*b + a comes out ~1e37 off,
a 16 × 16 ``tl.dot`` ~1e10), and it converts fp32 → bf16 by truncation. Upstream does not support bf16 there, so
the kernels of this package used to convert every load to fp32 and the launchers switched the tensor-core operands
to fp32 under the interpreter: CI never ran the bf16 paths a GPU runs. This module patches the interpreter's
builder so that, for bf16 operands:

- element-wise ops (arithmetic, comparisons, min/max, clamp, fma, math functions) decode to fp32, compute there
  and round back to bf16 to nearest even — what a GPU does for bf16 ops (Triton upcasts bf16 math to fp32);
- casts to and from bf16 round to nearest even (``cvt.rn.bf16.f32``);
- reductions (``tl.sum``/``tl.max``/``tl.min``) of bf16 run as a pairwise tree that rounds to bf16 after every
  level, like the GPU's shuffle tree (whose exact order differs: results may differ by an ulp per level);
- ``tl.dot`` decodes bf16/fp16 operands, multiplies in fp32 and accumulates in fp32 (the tensor cores'
  accumulator); fp32 operands with ``input_precision="tf32"`` are first rounded to tf32 (10 mantissa bits,
  nearest, ties away from zero — ``cvt.rna.tf32.f32``), so CI sees tf32's error too; "tf32x3" and "ieee" stay fp32.

fp16 needs no help for element-wise ops (numpy's float16 computes in float and rounds each result).
``install()`` is called by tests/conftest.py only; it marks the builder with ``computes_half_on_values`` so the
launchers know the bf16 operand paths are safe to run under this interpreter.
"""
from __future__ import annotations

import numpy as np

_INSTALLED: dict[str, object] = {}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values -> bf16 bit patterns, round to nearest even; NaN stays a (quiet) NaN."""
    values = np.asarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def round_to_tf32(values: np.ndarray) -> np.ndarray:
    """float32 -> float32 with 10 explicit mantissa bits, nearest with ties away from zero (cvt.rna.tf32.f32)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where(special, bits, rounded).view(np.float32)


def install() -> None:
    """Patch triton's interpreter builder (idempotent). Must run after TRITON_INTERPRET=1 is set."""
    if _INSTALLED:
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder_cls = interp.InterpreterBuilder
    TensorHandle = interp.TensorHandle

    def is_bf16(handle) -> bool:
        return handle.dtype.scalar == tl.bfloat16 and handle.data.dtype == np.uint16

    def values(handle) -> np.ndarray:
        return bf16_to_f32(handle.data) if is_bf16(handle) else handle.data

    original = {name: getattr(builder_cls, name) for name in
                ("binary_op", "ternary_op", "create_fma", "unary_op", "cast_impl", "create_fp_to_fp", "create_dot",
                 "create_rsqrt", "create_erf")}
    reduce_original = {name: getattr(interp.ReduceOps, name) for name in ("sum", "min_max")}

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return original["binary_op"](self, lhs, rhs, op)
        out = op(values(lhs).astype(np.float32), values(rhs).astype(np.float32))
        if out.dtype == np.bool_:
            return TensorHandle(out, lhs.dtype.scalar)
        return TensorHandle(f32_to_bf16(out), tl.bfloat16)

    def ternary_op(self, lhs, rhs, other, op):
        if op is np.clip and is_bf16(lhs):
            return TensorHandle(f32_to_bf16(np.clip(values(lhs), values(rhs), values(other))), tl.bfloat16)
        return original["ternary_op"](self, lhs, rhs, other, op)

    def create_fma(self, x, y, z):
        if not is_bf16(z):
            return original["create_fma"](self, x, y, z)
        exact = np.multiply(values(x), values(y), dtype=np.float64) + values(z).astype(np.float64)
        return TensorHandle(f32_to_bf16(exact.astype(np.float32)), tl.bfloat16)

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return original["unary_op"](self, arg, op)
        return TensorHandle(f32_to_bf16(op(values(arg))), tl.bfloat16)

    def create_rsqrt(self, arg):
        if not is_bf16(arg):
            return original["create_rsqrt"](self, arg)
        return TensorHandle(f32_to_bf16(np.float32(1) / np.sqrt(values(arg))), tl.bfloat16)

    def create_erf(self, arg):
        if not is_bf16(arg):
            return original["create_erf"](self, arg)
        as_f32 = original["create_erf"](self, TensorHandle(values(arg), tl.float32))
        return TensorHandle(f32_to_bf16(as_f32.data), tl.bfloat16)

    def cast_impl(self, src, dst_type):
        dst = dst_type.scalar
        if is_bf16(src):
            if dst == tl.bfloat16:
                return TensorHandle(src.data.copy(), dst)
            return TensorHandle(values(src).astype(interp._get_np_dtype(dst)), dst)
        if dst == tl.bfloat16:
            return TensorHandle(f32_to_bf16(np.asarray(src.data).astype(np.float32)), dst)
        return original["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        half_cast = dst == tl.bfloat16 or is_bf16(src)
        if not half_cast or min(dst.primitive_bitwidth, src.dtype.scalar.primitive_bitwidth) < 16:  # fp8 too
            return original["create_fp_to_fp"](self, src, dst_type, rounding_mode)
        if dst == tl.bfloat16 and rounding_mode == interp._ir.ROUNDING_MODE.RTZ:
            truncated = values(src).astype(np.float32).view(np.uint32) >> np.uint32(16)
            return TensorHandle(truncated.astype(np.uint16), dst)
        return cast_impl(self, src, dst_type)

    def dot_operand(handle, precision: str) -> np.ndarray:
        data = values(handle)
        if data.dtype == np.float16:
            return data.astype(np.float32)
        if data.dtype == np.float32 and precision == "tf32":
            return round_to_tf32(data)
        return data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8:  # fp8: the interpreter's own path
            return original["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
        precision = str(input_precision).rsplit(".", 1)[-1].lower() if input_precision is not None else "tf32"
        lhs, rhs = dot_operand(a, precision), dot_operand(b, precision)
        acc = values(d)
        compute = np.float64 if acc.dtype == np.float64 else np.float32
        out = np.matmul(lhs.astype(compute), rhs.astype(compute)) + acc.astype(compute)
        if is_bf16(d):
            return TensorHandle(f32_to_bf16(out.astype(np.float32)), tl.bfloat16)
        return TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    def tree_sum_bf16(data: np.ndarray, axis: int, keepdims: bool) -> np.ndarray:
        level = np.moveaxis(bf16_to_f32(data), axis, 0)
        if level.shape[0] == 0:
            level = np.zeros((1, *level.shape[1:]), dtype=np.float32)
        while level.shape[0] > 1:
            if level.shape[0] % 2:
                level = np.concatenate([level, np.zeros((1, *level.shape[1:]), dtype=np.float32)])
            level = bf16_to_f32(f32_to_bf16(level[0::2] + level[1::2]))
        out = f32_to_bf16(level[0])
        return np.expand_dims(out, axis) if keepdims else out

    def reduce_sum(self, input):
        data = input.handle.data
        if not (input.dtype.scalar == tl.bfloat16 and data.dtype == np.uint16):
            return reduce_original["sum"](self, input)
        if self.axis is None:
            out = tree_sum_bf16(data.reshape(-1), 0, False)
            if self.keep_dims:
                out = out.reshape((1,) * data.ndim)
        else:
            out = tree_sum_bf16(data, self.axis, self.keep_dims)
        return self.to_tensor(out, input.dtype)

    def reduce_min_max(self, input, val_reduce_op, idx_reduce_op=None):
        tensor = input[0] if isinstance(input, tuple) else input
        if not (tensor.dtype.scalar == tl.bfloat16 and tensor.handle.data.dtype == np.uint16):
            return reduce_original["min_max"](self, input, val_reduce_op, idx_reduce_op)
        as_f32 = self.to_tensor(bf16_to_f32(tensor.handle.data), tl.float32)
        result = reduce_original["min_max"](self, as_f32, val_reduce_op, idx_reduce_op)

        def back(t):
            return self.to_tensor(f32_to_bf16(np.asarray(t.handle.data)), tl.bfloat16)

        if val_reduce_op and idx_reduce_op:
            return back(result[0]), result[1]
        return back(result) if val_reduce_op else result

    patches = dict(binary_op=binary_op, ternary_op=ternary_op, create_fma=create_fma, unary_op=unary_op,
                   cast_impl=cast_impl, create_fp_to_fp=create_fp_to_fp, create_dot=create_dot,
                   create_rsqrt=create_rsqrt, create_erf=create_erf)
    for name, fn in patches.items():
        setattr(builder_cls, name, fn)
    # The class-level lambdas (create_fadd = lambda self, l, r: self.binary_op(...)) call binary_op through self,
    # so they pick the patch up; the casts are bound the same way.
    interp.ReduceOps.sum = reduce_sum
    interp.ReduceOps.min_max = reduce_min_max
    builder_cls.computes_half_on_values = True
    _INSTALLED.update(builder=original, reduce=reduce_original)


def uninstall() -> None:
    """Undo ``install`` (the shim's own test compares against the raw interpreter)."""
    if not _INSTALLED:
        return
    from triton.runtime import interpreter as interp

    for name, fn in _INSTALLED["builder"].items():
        setattr(interp.InterpreterBuilder, name, fn)
    for name, fn in _INSTALLED["reduce"].items():
        setattr(interp.ReduceOps, name, fn)
    interp.InterpreterBuilder.computes_half_on_values = False
    _INSTALLED.clear()
