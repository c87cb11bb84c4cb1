"""Benchmark of a FourierFT / FourierMoE layer (paper 003) against the eager ΔW-materialising reference, peft's
FourierFT and LoRA at the same trainable budget.

One Linear layer, bf16 weight and tokens (fp32 on the CPU), fp32 coefficients and router. E = 1 is FourierFT
(no router); E > 1 is FourierMoE with a linear top-2 router. ``n`` complex coefficients per layer (2n reals).

Providers:
    spectralkern     ``FourierMoELinear(impl="fused")`` → the ``fourier_adapter`` op (label: the backend and the
                     algorithm the registry picks for the forward); on a GPU the base GEMM is cuBLAS (F.linear),
                     the adapter is added in the synthesis kernel's epilogue
    fourier_fft      the same layer on the torch backend with the op's form forced to "fft": rfft → gather → scale
                     → scatter → irfft (O(in log in + out log out) per token, cuFFT on a GPU)
    fourier_dense    ... forced to "dense": ΔW built once per call (one irfft2), then GEMMs
    fourier_per_frequency  ... forced to "per_frequency": twiddle GEMMs, 4·T·n·(in + out) FLOPs forward
    fourier_eager    ``impl="reference"``: every ΔW_e (out × in) rebuilt with torch.fft.ifft2 on each call, then
                     a dense product per expert — what peers do
    fourierft_peft   (E = 1) peft's FourierFT with n_frequency = 2n (same real parameters), peft defaults
                     (spectrum kept in fp32, so ΔW and the adapter product run in fp32)
    lora_peft        peft LoRA at rank r = max(1, round(2n / (in + out))) — the closest rank to the same budget
                     (r = 1 already holds 4–8× more parameters than n = 1000 complex coefficients)

Modes: ``fwd`` returns y; ``fwd_bwd`` runs forward and ``torch.autograd.grad`` w.r.t. x and every trainable
parameter (coefficients, router, LoRA factors) with a fixed grad_y and returns grad_x.

Answers: each provider is checked against a float64 run of the same function — our layers against a float64 copy
of themselves on the torch backend (router kept in fp32 so the top-k choices match the timed run), peft's
FourierFT through ``from_peft_fourierft`` likewise, LoRA (B = 0) against x Wᵀ + b / grad_y W.

Bytes (minimum traffic): fwd reads x and W, writes y; fwd_bwd adds reading grad_y and writing grad_x.
Flops: the base GEMM 2·T·out·in (fwd; fwd_bwd adds grad_x through W, the same again) plus the adapter's useful
work, 4·T·n_k·(in + out) forward and 4·T·n_k·(out + 2·in) more backward (analysis of grad_y and of x, synthesis
of grad_x), with n_k = n·k/E the coefficients a token is routed to (the layer sorts tokens by expert set
so that whole token tiles skip the experts they are not routed to; tiles that mix sets still do all n).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass

import torch

from ..._backend import forced
from ...ops.fourier_adapter import fourier_adapter_backend, fourier_adapter_unchecked
from ...peft.fourier_moe import FourierMoEConfig, FourierMoELinear, from_peft_fourierft, sample_frequencies
from ..case import Case, Prepared, Provider

OP = "fourier"
#: every provider name a case of this op can time or skip (``--providers`` is checked against it up front)
PROVIDERS = ("spectralkern", "fourier_fft", "fourier_dense", "fourier_per_frequency", "fourier_eager",
             "fourierft_peft", "lora_peft")
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
_SEED = 0
_SCALE = 150.0


@dataclass(frozen=True)
class _Config:
    out_features: int
    in_features: int
    tokens: int
    n: int
    experts: int
    mode: str  # "fwd" or "fwd_bwd"

    @property
    def top_k(self) -> int:
        return 1 if self.experts == 1 else 2

    @property
    def lora_rank(self) -> int:
        return max(1, round(2 * self.n / (self.in_features + self.out_features)))

    @property
    def name(self) -> str:
        return (f"{self.out_features}x{self.in_features}-T{self.tokens}-n{self.n}-E{self.experts}"
                f"{'-top' + str(self.top_k) if self.experts > 1 else ''}-{self.mode}")


# The CPU shape sweep of issue 19 (FourierFT, n = 1000, fwd_bwd; run it with one thread, OMP_NUM_THREADS=1).
CPU_SWEEP_SHAPES = ((384, 384), (768, 768), (1024, 1024), (2048, 2048), (4096, 1024))
CPU_SWEEP_TOKENS = (256, 1024)


def _configs(quick: bool, device: torch.device) -> list[_Config]:
    if quick:
        return [_Config(96, 64, 64, 40, e, mode) for e in (1, 4) for mode in ("fwd", "fwd_bwd")]
    if device.type == "cpu":
        return [_Config(out, inn, tokens, 1000, 1, "fwd_bwd")
                for out, inn in CPU_SWEEP_SHAPES for tokens in CPU_SWEEP_TOKENS]
    # Llama-7B: q/k/v/o (4096 × 4096) and the MLP up projection (out 11008, in 4096).
    return [_Config(out, inn, tokens, n, e, mode)
            for out, inn in ((4096, 4096), (11008, 4096))
            for tokens in (2048, 8192)
            for n in (1000, 5000)
            for e in (1, 4, 8)
            for mode in ("fwd", "fwd_bwd")]


def cases(device: torch.device, quick: bool) -> list[Case]:
    """bf16 on a GPU (Llama shapes); fp32 on the CPU (``--quick``: a smoke test; full: the CPU shape sweep)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.empty(0, dtype=dtype).element_size()
    out = []
    for cfg in _configs(quick, device):
        t, o, i = cfg.tokens, cfg.out_features, cfg.in_features
        n_k = cfg.n * cfg.top_k // cfg.experts
        traffic = t * i + o * i + t * o
        flops = 2 * t * o * i + 4 * t * n_k * (i + o)
        if cfg.mode == "fwd_bwd":
            traffic += t * o + t * i
            flops += 2 * t * o * i + 4 * t * n_k * (o + 2 * i)
        shape = {"out": o, "in": i, "tokens": t, "n": cfg.n, "E": cfg.experts, "top_k": cfg.top_k,
                 "mode": cfg.mode, "lora_r": cfg.lora_rank}
        out.append(Case(op=OP, name=cfg.name, layout=cfg.mode, dtype=dtype, shape=shape, bytes=traffic * es,
                        flops=flops, compute_kind="bf16" if dtype == torch.bfloat16 else "tf32x3",
                        prepare=functools.partial(_prepare, cfg, dtype)))
    return out


class _Holder(torch.nn.Module):
    """A one-layer model for peft's get_peft_model."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _runner(module: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor | None, backend: str | None = None):
    params = [p for p in module.parameters() if p.requires_grad]
    context = (lambda: forced(backend)) if backend is not None else contextlib.nullcontext

    def forward() -> torch.Tensor:
        with torch.no_grad(), context():
            return module(x)

    def forward_backward() -> torch.Tensor:
        with context():
            y = module(x)
            return torch.autograd.grad(y, [x, *params], grad_y)[0]
    return forward if grad_y is None else forward_backward


def _form_runner(layer: FourierMoELinear, x: torch.Tensor, grad_y: torch.Tensor | None, form: str):
    """The layer's forward with the op's algorithm forced to ``form`` (the same calls as ``layer.forward`` on the
    torch backend, where tokens are not sorted by expert)."""
    params = [p for p in layer.parameters() if p.requires_grad]

    unit = layer.active_unit

    def forward() -> torch.Tensor:
        base = layer.base_layer(x)
        gates, _ = unit.route(x)
        coef_re, coef_im = unit.effective_coefficients()
        return fourier_adapter_unchecked(x, unit.rows, unit.cols, coef_re, coef_im, unit.expert_ptr, gates, base,
                                         unit.out_features, form)

    def forward_backward() -> torch.Tensor:
        with forced("torch"):
            return torch.autograd.grad(forward(), [x, *params], grad_y)[0]

    def forward_no_grad() -> torch.Tensor:
        with torch.no_grad(), forced("torch"):
            return forward()
    return forward_no_grad if grad_y is None else forward_backward


def _float64_answer(layer: FourierMoELinear, x: torch.Tensor, grad_y: torch.Tensor | None) -> torch.Tensor:
    """The layer's y (or grad_x) in float64 on the torch backend; the router stays fp32 (same top-k choices)."""
    twin = copy.deepcopy(layer)
    twin.base_layer.double()
    twin.coef_re.data = twin.coef_re.data.double()
    if twin.coef_im is not None:
        twin.coef_im.data = twin.coef_im.data.double()
    twin.active_unit.amplitude = twin.active_unit.amplitude.double()
    twin.active_unit.impl = "fused"
    x64 = x.detach().double().requires_grad_(grad_y is not None)
    with forced("torch"):
        y = twin(x64)
        if grad_y is None:
            return y.detach()
        return torch.autograd.grad(y, x64, grad_y.double())[0]


def _prepare(cfg: _Config, dtype: torch.dtype, device: torch.device) -> Prepared:
    gen = torch.Generator().manual_seed(_SEED)
    o, i = cfg.out_features, cfg.in_features
    base = torch.nn.Linear(i, o)
    with torch.no_grad():
        base.weight.copy_(torch.randn(o, i, generator=gen) / i ** 0.5)
        base.bias.copy_(torch.randn(o, generator=gen) * 0.1)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)

    moe = FourierMoEConfig(num_experts=cfg.experts, top_k=cfg.top_k, n_frequencies=cfg.n, scale=_SCALE,
                           router="linear" if cfg.experts > 1 else None, seed=_SEED, init="normal",
                           target_modules=["layer"])
    layout = sample_frequencies(o, i, cfg.n, cfg.experts, _SEED)
    torch.manual_seed(_SEED)  # the coefficients' "normal" init and the router draw from the global RNG
    fused = FourierMoELinear.from_layout(base, layout, scale=moe.scale, top_k=moe.top_k, router=moe.router,
                                         init="normal")
    eager = copy.deepcopy(fused)
    eager.base_layer = base  # share the frozen weight instead of holding a second copy
    eager.active_unit.impl = "reference"

    dev_gen = torch.Generator(device=device).manual_seed(_SEED)
    x = torch.randn(cfg.tokens, i, device=device, generator=dev_gen).to(dtype)
    grad_y = None
    if cfg.mode == "fwd_bwd":
        x.requires_grad_(True)
        grad_y = torch.randn(cfg.tokens, o, device=device, generator=dev_gen).to(dtype)
    reference = _float64_answer(fused, x, grad_y)

    providers, skipped, references = [], {}, {}
    choice = fourier_adapter_backend(x, i, o, n=cfg.n)  # the forward's choice labels the row
    if choice.backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        skipped["spectralkern"] = "the Triton interpreter computes bf16 wrongly; run bf16 on a GPU"
    else:
        label = choice.backend + (f"-{choice.algorithm}" if choice.algorithm else "")
        providers.append(Provider("spectralkern", label, _runner(fused, x, grad_y)))
    for form in ("fft", "dense", "per_frequency"):
        providers.append(Provider(f"fourier_{form}", "torch", _form_runner(fused, x, grad_y, form)))
    providers.append(Provider("fourier_eager", "torch", _runner(eager, x, grad_y)))
    try:
        import peft

        if cfg.experts == 1:
            config = peft.FourierFTConfig(n_frequency=2 * cfg.n, scaling=_SCALE, target_modules=["layer"],
                                          random_loc_seed=_SEED, init_weights=False)
            peft_model = peft.get_peft_model(_Holder(base), config)
            providers.append(Provider("fourierft_peft", "torch", _runner(peft_model, x, grad_y)))
            references["fourierft_peft"] = _float64_answer(from_peft_fourierft(peft_model.base_model.model.layer),
                                                           x, grad_y)
        else:
            skipped["fourierft_peft"] = "peft's FourierFT has no experts (E = 1 only)"
        lora_config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=["layer"],
                                      lora_dropout=0.0)
        lora_layer = copy.deepcopy(base)
        lora = peft.get_peft_model(_Holder(lora_layer), lora_config)  # B = 0: y = x Wᵀ + b
        providers.append(Provider("lora_peft", "torch", _runner(lora, x, grad_y)))
        w64, b64 = base.weight.double(), base.bias.double()
        references["lora_peft"] = (torch.nn.functional.linear(x.detach().double(), w64, b64) if grad_y is None
                                   else grad_y.double() @ w64)
    except ImportError:
        skipped["fourierft_peft"] = skipped["lora_peft"] = "peft is not installed (pip install peft)"
    return Prepared(providers=providers, reference=reference, tolerance=_TOLERANCE[dtype], skipped=skipped,
                    references=references)
