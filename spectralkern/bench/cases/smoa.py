"""Benchmark of an SMoA layer (paper 002) against its eager reference and LoRA at the same trainable budget.

Providers (one Linear layer, bf16 weight and activations, fp32 adapter factors, dropout 0):
    spectralkern     ``SMoALinear(impl="fused")`` → the ``smoa_linear`` op (label shows the backend that ran):
                     one GEMM with on-chip modulated weight tiles forward, the same for grad_x, and the per-block
                     factor-gradient kernel
    smoa_eager       ``SMoALinear(impl="reference")``: ΔW (out × in) materialised every call, the authors' way
    lora_peft        peft's ``LoraConfig`` Linear at rank r / K (same trainable parameters: r (in + out) / K),
                     peft defaults (adapter weights kept in fp32: x is cast to fp32 for the LoRA branch)
XX

Modes: ``fwd`` returns y; ``fwd_bwd`` runs forward and ``torch.autograd.grad`` w.r.t. x and the adapter factors
with a fixed grad_y and returns grad_x.

Checking every provider against one float64 answer: the LoRA peers are built on the weight W + ΔW_SMoA with
B = 0, so their y and grad_x equal SMoA's while their work is unchanged (GEMM cost does not depend on values);
SMoA runs with random non-zero B. The block layout is a seeded random balanced partition rather than the SVD
ordering: the kernels' cost does not depend on which rows share a block, and it saves a large SVD per case
(the SVD ordering itself is covered by the tests).

Bytes (minimum traffic): fwd reads x and W, writes y; fwd_bwd adds reading grad_y (twice: grad_x and the factor
gradients) and x again, and writing grad_x. Flops: fwd 2·T·out·in (base and update in one product);
fwd_bwd adds 2·T·out·in (grad_x) and 2·T·out·in / K (Gᵀx on the diagonal blocks).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...ops.smoa_linear import SMoALayout, smoa_delta_weight, smoa_linear_backend
from ...peft.smoa import SMoAConfig, SMoALinear
from ..case import Case, Prepared, Provider, interpreter_skip

OP = "smoa"
#: every provider name a case of this op can time or skip (``--providers`` is checked against it up front)
PROVIDERS = ("spectralkern", "smoa_eager", "lora_peft", "lora_peft_nocast")
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
_SEED = 0


@dataclass(frozen=True)
class _Config:
    out_features: int
    in_features: int
    tokens: int
    rank: int
    num_blocks: int
    mode: str  # "fwd" or "fwd_bwd"

    @property
    def name(self) -> str:
        return (f"{self.out_features}x{self.in_features}-T{self.tokens}-r{self.rank}-K{self.num_blocks}-"
                f"{self.mode}")


def _configs(quick: bool) -> list[_Config]:
    if quick:
        return [_Config(384, 256, 256, 8, 2, mode) for mode in ("fwd", "fwd_bwd")]
    # Llama-7B: q/k/v/o (4096 × 4096) and the MLP up projection (out 11008, in 4096).
    return [_Config(out, inn, tokens, 16, 2, mode)
            for out, inn in ((4096, 4096), (11008, 4096))
            for tokens in (2048, 8192, 16384)
            for mode in ("fwd", "fwd_bwd")]


def cases(device: torch.device, quick: bool) -> list[Case]:
    """bf16 on a GPU; fp32 on the CPU (a smoke test of the harness and the torch backend)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.empty(0, dtype=dtype).element_size()
    out = []
    for cfg in _configs(quick):
        t, o, i = cfg.tokens, cfg.out_features, cfg.in_features
        traffic = t * i + o * i + t * o
        flops = 2 * t * o * i
        if cfg.mode == "fwd_bwd":
            traffic += 2 * t * o + 2 * t * i
            flops += 2 * t * o * i + 2 * t * o * i // cfg.num_blocks
        shape = {"out": o, "in": i, "tokens": t, "r": cfg.rank, "K": cfg.num_blocks, "mode": cfg.mode,
                 "lora_r": cfg.rank // cfg.num_blocks}
        out.append(Case(op=OP, name=cfg.name, layout=cfg.mode, dtype=dtype, shape=shape, bytes=traffic * es,
                        flops=flops, compute_kind="bf16" if dtype == torch.bfloat16 else "tf32x3",
                        prepare=functools.partial(_prepare, cfg, dtype)))
    return out


def _random_layout(cfg: _Config, generator: torch.Generator) -> SMoALayout:
    rows = torch.randperm(cfg.out_features, generator=generator)
    cols = torch.randperm(cfg.in_features, generator=generator)
    return SMoALayout.from_blocks([b.sort().values for b in torch.tensor_split(rows, cfg.num_blocks)],
                                  [b.sort().values for b in torch.tensor_split(cols, cfg.num_blocks)])


class _Holder(torch.nn.Module):
    """A one-layer model for peft's get_peft_model."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _lora(weight: torch.Tensor, bias: torch.Tensor, rank: int, alpha: float, fp32_adapter: bool) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["layer"], lora_dropout=0.0)
    return get_peft_model(_Holder(layer), config, autocast_adapter_dtype=fp32_adapter)


def _runner(module: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor | None):
    params = [p for p in module.parameters() if p.requires_grad]
    if grad_y is None:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return module(x)
        return forward

    def forward_backward() -> torch.Tensor:
        y = module(x)
        return torch.autograd.grad(y, [x, *params], grad_y)[0]
    return forward_backward


def _prepare(cfg: _Config, dtype: torch.dtype, device: torch.device) -> Prepared:
    gen = torch.Generator().manual_seed(_SEED)
    o, i = cfg.out_features, cfg.in_features
    base = torch.nn.Linear(i, o)
    with torch.no_grad():
        base.weight.copy_(torch.randn(o, i, generator=gen) / i ** 0.5)
        base.bias.copy_(torch.randn(o, generator=gen) * 0.1)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    config = SMoAConfig(r=cfg.rank, alpha=2.0 * cfg.rank, num_blocks=cfg.num_blocks, target_modules=["layer"])
    fused = SMoALinear.from_config(base, config, layout=_random_layout(cfg, gen))
    with torch.no_grad():
        for b in fused.lora_B:
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    eager = SMoALinear.from_config(base, SMoAConfig(**{**config.to_dict(), "impl": "reference"}), layout=fused.layout)
    eager.load_state_dict(fused.state_dict())

    dev_gen = torch.Generator(device=device).manual_seed(_SEED)
    x = torch.randn(cfg.tokens, i, device=device, generator=dev_gen).to(dtype)
    grad_y = None
    if cfg.mode == "fwd_bwd":
        x.requires_grad_(True)
        grad_y = torch.randn(cfg.tokens, o, device=device, generator=dev_gen).to(dtype)

    b_packed, a_packed = (t.detach().double() for t in fused.packed_factors())
    w64 = base.weight.double()
    w_eff = w64 + smoa_delta_weight(w64, b_packed, a_packed, fused.layout, fused.scaling, dtype=torch.float64)
    if grad_y is None:
        reference = torch.nn.functional.linear(x.detach().double(), w_eff, base.bias.double())
    else:
        reference = grad_y.double() @ w_eff

    providers, skipped = [], {}
    backend = smoa_linear_backend(x, cfg.rank).backend
    if interpreter_skip(backend, dtype):
        skipped["spectralkern"] = interpreter_skip(backend, dtype)
    else:
        providers.append(Provider("spectralkern", backend, _runner(fused, x, grad_y)))
    providers.append(Provider("smoa_eager", "torch", _runner(eager, x, grad_y)))
    try:
        merged = w_eff.to(dtype)
        lora_rank = cfg.rank // cfg.num_blocks
        for name, fp32_adapter in (("lora_peft", True), ("lora_peft_nocast", False)):
            lora = _lora(merged, base.bias.detach(), lora_rank, 2.0 * lora_rank, fp32_adapter)
            providers.append(Provider(name, "torch", _runner(lora, x, grad_y)))
    except ImportError:
        skipped["lora_peft"] = "peft is not installed (pip install peft)"
    return Prepared(providers=providers, reference=reference, tolerance=_TOLERANCE[dtype], skipped=skipped)
