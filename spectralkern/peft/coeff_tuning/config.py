"""Coeff-Tuning's hyper-parameters (a peft config: ``get_peft_model(model, CoeffTuningConfig(...))``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .._lifecycle import SpectralPeftConfig

IMPLS = ("fused", "reference")


@dataclass
class CoeffTuningConfig(SpectralPeftConfig):
    """Coeff-Tuning hyper-parameters.

    Args:
        dropout: probability of dropping each entry of ΔC in training mode (the paper's best: about 0.2).
        target_modules: attention modules to tune: a list of name suffixes or one regex over full names (peft's
            rule); None: every supported attention module of the model.
        impl: "fused" (the ``coeff_attention`` op: Triton on a GPU, the torch reference elsewhere) or
            "reference" (eager, all H maps materialised). While the base model's attention-probability dropout is
            active (training, p > 0) the reference path runs, with that dropout on the mixed maps.
        base_fingerprints, progress, weights_sha256: see ``SpectralPeftConfig``.
    """
    dropout: float = 0.2
    target_modules: list[str] | str | None = None
    impl: str = "fused"

    PEFT_TYPE: ClassVar[str] = "SPECTRALKERN_COEFF_TUNING"
    requires_targets: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not math.isfinite(self.dropout) or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
