"""How the compiled CUDA extension (spectralkern._C) takes tensors: raw pointers, sizes and strides."""
from __future__ import annotations

import torch


def tensor_desc(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """A 2-D tensor as the extension takes it: (data_ptr, rows, cols, stride0, stride1), strides in elements."""
    return t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), t.stride(1)
