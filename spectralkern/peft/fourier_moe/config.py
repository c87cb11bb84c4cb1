"""FourierMoE and FourierFT hyper-parameters (two peft methods sharing one layer)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..._checks import check_int
from .._lifecycle import SpectralPeftConfig

IMPLS = ("fused", "reference")
ROUTERS = ("linear", "spectral", None)
INITS = ("zeros", "normal")


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class FourierMoEConfig(SpectralPeftConfig):
    """FourierMoE hyper-parameters.

    Args:
        num_experts: E, experts per layer, one radial frequency band each.
        top_k: experts each token is routed to (1 ≤ top_k ≤ E); ignored when router is None.
        n_frequencies: complex coefficients per layer, summed over the experts (2 real parameters each).
        scale: multiplies the spectrum (peft's FourierFT ``scaling``; 150 is its default for n = 1000).
        router: "linear" (gate on x), "spectral" (gate on x's rfft band energies) or None (all experts, weight 1;
            static, mergeable).
        router_bands: rfft bands the spectral router reads.
        seed: seeds the frequency positions (the "normal" init and the router use torch's global RNG).
        init: "zeros" (ΔW = 0 at start) or "normal" (coefficients ~ N(0, 1), like peft's default).
        target_modules: names matched by suffix (``["q_proj", "v_proj"]``) or one regex over the full name.
        impl: "fused" (custom op, ΔW never built) or "reference" (eager, ΔW_e via torch.fft.ifft2 each call).
        base_fingerprints, progress, weights_sha256: see ``SpectralPeftConfig``.
    """
    num_experts: int = 4
    top_k: int = 2
    n_frequencies: int = 1000
    scale: float = 150.0
    router: str | None = "linear"
    router_bands: int = 16
    seed: int = 0
    init: str = "zeros"
    target_modules: list[str] | str | None = field(default_factory=lambda: ["q_proj", "v_proj"])
    impl: str = "fused"

    PEFT_TYPE: ClassVar[str] = "SPECTRALKERN_FOURIER_MOE"
    #: coefficients are complex (2 reals each) for every config written by this class
    complex_coefficients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts, 1)
        check_int("top_k", self.top_k, 1)
        check_int("n_frequencies", self.n_frequencies, 1)
        check_int("router_bands", self.router_bands, 1)
        check_int("seed", self.seed, 0)
        self.scale = _check_number("scale", self.scale)
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.router is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k = {self.top_k} is larger than num_experts = {self.num_experts}; "
                             "a token cannot be routed to more experts than exist")
        if self.n_frequencies < self.num_experts:
            raise ValueError(f"n_frequencies = {self.n_frequencies} is smaller than num_experts = "
                             f"{self.num_experts}; every expert needs at least one coefficient")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    @property
    def routed(self) -> bool:
        return self.router is not None


@dataclass
class FourierFTConfig(SpectralPeftConfig):
    """FourierFT: one expert, no router — FourierMoE's layer with E = 1 (see ``FourierMoEConfig`` for the fields).

    Unlike peft's FourierFT (a real spectrum at arbitrary positions, Re(ifft2) taken afterwards), the
    coefficients are complex and conjugate-symmetric. ``complex_coefficients=False`` and ``positions="saved"``
    describe an adapter converted from peft's FourierFT (``from_peft_fourierft_model``): real coefficients at
    the positions and amplitudes stored in its weights file.
    """
    n_frequencies: int = 1000
    scale: float = 150.0
    seed: int = 0
    init: str = "zeros"
    target_modules: list[str] | str | None = field(default_factory=lambda: ["q_proj", "v_proj"])
    impl: str = "fused"
    complex_coefficients: bool = True
    positions: str = "sampled"

    PEFT_TYPE: ClassVar[str] = "SPECTRALKERN_FOURIERFT"
    POSITIONS: ClassVar[tuple[str, ...]] = ("sampled", "saved")
    num_experts: ClassVar[int] = 1
    top_k: ClassVar[int] = 1
    router: ClassVar[None] = None
    router_bands: ClassVar[int] = 16
    routed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_frequencies", self.n_frequencies, 1)
        check_int("seed", self.seed, 0)
        self.scale = _check_number("scale", self.scale)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if not isinstance(self.complex_coefficients, bool):
            raise TypeError(f"complex_coefficients must be a bool, got {self.complex_coefficients!r}")
        if self.positions not in self.POSITIONS:
            raise ValueError(f"positions must be one of {self.POSITIONS}, got {self.positions!r}")
