"""What the Triton interpreter (TRITON_INTERPRET=1) can be trusted with.

Triton's own interpreter stores bf16 as uint16 and computes on the bit patterns, so a kernel that feeds bf16
operands to ``tl.dot`` (or does bf16 arithmetic) gets garbage there. The launchers therefore ask
``half_operands_ok()`` before choosing 16-bit dot operands: always on a GPU; under the interpreter only when a
value-correct bf16 interpreter is installed (the test suite installs one, ``tests/_bf16_interpreter.py``, so CI
runs the same operand dtypes as a GPU instead of silently switching to fp32).
"""
from __future__ import annotations

from .._backend import triton_interpreter_on


def half_operands_ok() -> bool:
    """True when Triton kernels may compute on bf16/fp16 values as a GPU would."""
    if not triton_interpreter_on():
        return True
    from triton.runtime.interpreter import InterpreterBuilder

    return bool(getattr(InterpreterBuilder, "computes_half_on_values", False))
