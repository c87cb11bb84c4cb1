"""When an op may skip its custom-op dispatch and call its implementation directly.

``torch.ops.spectralkern.<op>`` routes through the dispatcher's autograd, fake-tensor and Python-kernel layers:
tens of µs per call (measured: ~60 µs on this repo's CPU machine), as much as a whole small filter. In eager
mode, with nothing for autograd to record and plain tensors (no subclass, e.g. DTensor or FakeTensor, that
dispatches on the op), the direct call computes the same thing.
"""
from __future__ import annotations

import torch


def plain_eager_call(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` can bypass the custom op (see the module docstring)."""
    for t in tensors:
        if type(t) is not torch.Tensor or (t.requires_grad and torch.is_grad_enabled()):
            return False
    return not torch.compiler.is_compiling()  # last: dynamo sees FakeTensors as plain tensors
