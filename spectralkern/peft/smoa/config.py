"""SMoA's hyper-parameters (a peft config: ``get_peft_model(model, SMoAConfig(...))``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..._checks import check_int
from .._lifecycle import SpectralPeftConfig

IMPLS = ("fused", "reference")


@dataclass
class SMoAConfig(SpectralPeftConfig):
    """SMoA hyper-parameters.

    Args:
        r: total rank per layer (summed over blocks); trainable parameters ≈ r (in + out) / K per layer.
        alpha: the update is scaled by alpha / r.
        num_blocks: K, the number of aligned spectral blocks (must be ≤ min(out, in) of every target).
        branch_ranks: per-block ranks r_k (K entries ≥ 0 summing to r); None splits r evenly (r % K == 0).
        dropout: dropout probability on x before the adapter branch.
        target_modules: names matched by suffix (``["query", "value"]``, ``["q_proj", "v_proj"]``,
            ``["c_attn"]``), or one regex over the full module name.
        impl: "fused" (the ``smoa_linear`` custom op) or "reference" (eager, ΔW materialised).
        base_fingerprints, progress: see ``SpectralPeftConfig``.
    """
    r: int = 8
    alpha: float = 8.0
    num_blocks: int = 2
    branch_ranks: list[int] | None = None
    dropout: float = 0.0
    target_modules: list[str] | str | None = field(default_factory=lambda: ["q_proj", "v_proj"])
    impl: str = "fused"

    PEFT_TYPE: ClassVar[str] = "SPECTRALKERN_SMOA"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, 1)
        check_int("num_blocks", self.num_blocks, 1)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise TypeError(f"alpha must be a finite number, got {self.alpha!r}")
        if self.branch_ranks is None:
            if self.r % self.num_blocks:
                raise ValueError(f"r = {self.r} does not split evenly across num_blocks = {self.num_blocks}; "
                                 "choose r divisible by num_blocks or give branch_ranks (one rank per block)")
        else:
            ranks = list(self.branch_ranks)
            if len(ranks) != self.num_blocks:
                raise ValueError(f"branch_ranks must have num_blocks = {self.num_blocks} entries, got {ranks}")
            for k, rank in enumerate(ranks):
                check_int(f"branch_ranks[{k}]", rank, 0)
            if sum(ranks) != self.r:
                raise ValueError(f"branch_ranks must sum to r = {self.r}, got {ranks} (sum {sum(ranks)})")
            self.branch_ranks = ranks
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    @property
    def ranks(self) -> list[int]:
        if self.branch_ranks is not None:
            return list(self.branch_ranks)
        return [self.r // self.num_blocks] * self.num_blocks

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
