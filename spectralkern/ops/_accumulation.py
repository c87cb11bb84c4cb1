"""The dtype the ops' kernels and references accumulate in."""
from __future__ import annotations

import torch


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any operand is float64, else float32 (fp32, bf16 and fp16 operands accumulate in fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
