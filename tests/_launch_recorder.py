"""Test helper: record every Triton launch the launchers make under the interpreter (kernel, grid, bound arguments),
optionally without running it — so launch geometry can be checked at sizes the interpreter could never run, on
``meta`` tensors."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

# Grid limits of a CUDA launch: axis 0 up to 2³¹ − 1 programs, axes 1 and 2 up to 65,535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    args: dict[str, object]
    annotations: dict[str, str]

    def scalar_types(self) -> dict[str, str]:
        """The type Triton's compiled launcher gives each Python float argument: its annotation, else fp32."""
        out = {}
        for name, value in self.args.items():
            if isinstance(value, float):
                annotation = self.annotations.get(name, "")
                out[name] = {"tl.float64": "fp64", "tl.float32": "fp32"}.get(annotation, annotation or "fp32")
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in self.args.items() if isinstance(value, torch.Tensor)}


@contextlib.contextmanager
def record_launches(execute: bool = True):
    """Yield a list that fills with ``Launch`` records; with ``execute=False`` kernels are not run."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[Launch] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        signature = inspect.signature(self.fn)
        bound = signature.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
        annotations = {name: str(p.annotation) for name, p in signature.parameters.items()
                       if p.annotation is not inspect.Parameter.empty}
        launches.append(Launch(self.fn.__name__, tuple(grid), dict(bound.arguments), annotations))
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original
