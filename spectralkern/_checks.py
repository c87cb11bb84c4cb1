"""Input checks for user-facing functions: every message names the argument, what it got and what it expected."""
from __future__ import annotations

import operator
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object, *, ndim: int | Iterable[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            want = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({want}), got {str(value.dtype).removeprefix('torch.')}")
    return value


def check_same_device(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if value.device != other.device:
        raise ValueError(f"{name} is on {value.device} but {other_name} is on {other.device}; move both to one device")


def check_has_data(name: str, value: torch.Tensor) -> None:
    """Refuses a tensor on the ``meta`` device: it has a shape but no values, and everything computed here needs
    them (raw torch errors like "Tensor.item() cannot be called on meta tensors" otherwise)."""
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values; got shape {tuple(value.shape)}, "
                         f"device meta); expected a tensor with data on the CPU or a GPU — materialise it first "
                         f"(e.g. model.to_empty(device=...) and load the weights)")


def check_finite(name: str, value: torch.Tensor) -> None:
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); expected finite numbers")


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum`` (bools refused), or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_block_ptr(block_ptr: object, num_nodes: int) -> torch.Tensor:
    """Validate block offsets: 1-D int, starts at 0, non-decreasing, ends at num_nodes. Returns int64 on CPU."""
    if isinstance(block_ptr, (list, tuple)):
        # torch.tensor(..., dtype=int64) would silently truncate 2.5 to 2: accept only integer entries.
        offsets = []
        for position, value in enumerate(block_ptr):
            try:
                if isinstance(value, bool):
                    raise TypeError
                offsets.append(operator.index(value))
            except TypeError:
                raise TypeError(f"block_ptr must hold integers, got {value!r} at position {position}") from None
        block_ptr = torch.tensor(offsets, dtype=torch.int64)
    check_tensor("block_ptr", block_ptr, ndim=1)
    check_has_data("block_ptr", block_ptr)
    if block_ptr.is_floating_point() or block_ptr.dtype == torch.bool or block_ptr.is_complex():
        raise TypeError(f"block_ptr must be an integer tensor, got {block_ptr.dtype}")
    ptr = block_ptr.detach().to("cpu", torch.int64)
    if ptr.numel() < 2:
        raise ValueError(f"block_ptr must hold at least 2 offsets (one block), got {ptr.tolist()}")
    if int(ptr[0]) != 0 or int(ptr[-1]) != num_nodes:
        raise ValueError(f"block_ptr must start at 0 and end at the number of nodes ({num_nodes}); "
                         f"got first={int(ptr[0])}, last={int(ptr[-1])}")
    steps = ptr[1:] - ptr[:-1]
    if bool((steps < 0).any()):
        b = int(torch.nonzero(steps < 0)[0])
        raise ValueError(f"block_ptr must be non-decreasing; block {b} has offsets {int(ptr[b])} > {int(ptr[b + 1])}")
    return ptr


def block_ptr_from_size(num_nodes: int, block_size: int) -> torch.Tensor:
    check_positive_int("block_size", block_size)
    starts = list(range(0, num_nodes, block_size)) + [num_nodes]
    return torch.tensor(starts if num_nodes else [0, 0], dtype=torch.int64)
