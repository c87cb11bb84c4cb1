"""When and how an op may skip its custom-op dispatch and call its implementation directly.

``torch.ops.spectralkern.<op>`` routes through the dispatcher's autograd, fake-tensor and Python-kernel layers:
tens of µs per call (measured: ~60 µs on this repo's CPU machine), as much as a whole small filter. In eager
mode, with nothing for autograd to record and plain tensors (no subclass, e.g. DTensor or FakeTensor, that
dispatches on the op), the direct call computes the same thing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def plain_eager_call(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` can bypass the custom op (see the module docstring)."""
    for t in tensors:
        if type(t) is not torch.Tensor or (t.requires_grad and torch.is_grad_enabled()):
            return False
    return not torch.compiler.is_compiling()  # last: dynamo sees FakeTensors as plain tensors


def eager_autograd(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """``apply`` of an autograd.Function made of a custom op's own forward, setup_context and backward functions —
    the op's eager entry, computing what ``torch.ops.spectralkern.<op>`` computes without the dispatcher's Python
    layers (≈ 0.1–0.2 ms per forward + backward on the CPU, as much as a small layer's work). Old-style (forward
    takes ctx) on purpose: a Function with a separate ``setup_context`` binds its arguments through
    ``inspect.signature`` on every call (≈ 30 µs). The backward is once-differentiable, as the custom ops are."""

    def run_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    @torch.autograd.function.once_differentiable
    def run_backward(ctx, *grads):
        return backward(ctx, *grads)

    function = type(name, (torch.autograd.Function,), {"forward": staticmethod(run_forward),
                                                       "backward": staticmethod(run_backward),
                                                       "__doc__": eager_autograd.__doc__})
    return function.apply
