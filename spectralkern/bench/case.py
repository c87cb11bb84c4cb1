"""What an op's benchmark module hands the runner: cases, and per case the providers to time."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..ops._interpreter import half_operands_ok


@dataclass(frozen=True)
class Provider:
    """One implementation of the op, bound to a case's inputs.

    ``name`` is the implementation ("spectralkern", "torch_loop", ...), ``backend`` what actually executes it
    ("triton", "torch", "inductor"), so a CPU run of the torch fallback is never mistaken for the kernel.
    """

    name: str
    backend: str
    fn: Callable[[], torch.Tensor]

    @property
    def label(self) -> str:
        return f"{self.name}[{self.backend}]" if self.name == "spectralkern" else self.name


@dataclass
class Prepared:
    """A case's inputs made on a device: the providers to time, the ones left out and why, and the answer."""

    providers: list[Provider]
    reference: torch.Tensor            # float64 result on the same (already rounded) inputs
    tolerance: float                   # largest acceptable ‖out − ref‖ / ‖ref‖ for this dtype
    skipped: dict[str, str] = field(default_factory=dict)
    # Answers for providers that compute something else than ``reference`` (another algorithm timed in the same
    # case, e.g. a GaLore step beside AdamW steps), by provider name.
    references: dict[str, torch.Tensor] = field(default_factory=dict)

    def reference_for(self, provider: str) -> torch.Tensor:
        return self.references.get(provider, self.reference)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration of an op.

    ``bytes`` is the op's minimum memory traffic and ``flops`` its useful arithmetic; ``compute_kind`` names the
    matmul ceiling its rate is judged against (a kind from ``ceilings``).
    """

    op: str
    name: str
    layout: str
    dtype: torch.dtype
    shape: dict[str, int | float | str]
    bytes: int
    flops: int
    compute_kind: str
    prepare: Callable[[torch.device], Prepared]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def interpreter_skip(backend: str, dtype: torch.dtype) -> str | None:
    """Why spectralkern's provider of a 16-bit case is left out, or None: its ``backend`` (the registry's label) is a
    Triton kernel, and Triton's interpreter here computes on 16-bit bit patterns (``ops/_interpreter.py``)."""
    if backend.startswith("triton") and dtype in (torch.bfloat16, torch.float16) and not half_operands_ok():
        return (f"the Triton interpreter computes {str(dtype).removeprefix('torch.')} wrongly (no value-correct "
                "16-bit interpreter installed); run it on a GPU")
    return None
