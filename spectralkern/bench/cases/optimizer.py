"""Benchmark of one optimizer step over a Llama-7B-shaped parameter set, spectral filtering included.

Parameter set: ``layers`` transformer layers of q/k/v/o (hidden × hidden) and gate/up (mlp × hidden), down
(hidden × mlp) Linear weights, no biases — 7B has 32 layers of hidden 4096, mlp 11008; the full run times 1 and 8
of them (the step is linear in the layer count; 32 layers of fp32 moments and four providers' copies do not fit
one 80 GB card). Every weight is targeted by the spectral filter: blocks of 128 output rows, kNN graph (8
neighbours) of random rows, k lowest eigenpairs, ideal low-pass gains (the projection U Uᵀ g of paper 001).
Parameters and gradients are bf16 on CUDA and fp32 on the CPU (``--quick``: 1 layer of hidden 256, mlp 688).

Providers (each on its own copy of the parameters; gradients are shared except where a provider writes them):
    spectralkern              SpectralAdamW, filter fused into the update; fp32 moments (the default).
    spectralkern_bf16_states  the same with state_dtype=bf16 — the moments torch keeps for bf16 parameters.
    spectralkern_triton       when ``spectralkern`` ran on the compiled CUDA kernels (csrc/): the same optimizer
                              with SPECTRALKERN_BACKEND=triton during its step, timed beside them (1-layer cases:
                              one more copy of the parameters and fp32 moments does not fit at 8 layers).
    torch_adamw_fused         torch.optim.AdamW(fused=True) on CUDA (foreach=True on the CPU), no filtering; its
                              moments are in the parameter dtype (bf16 on CUDA).
    filter_then_adamw         filt.step() (spectral_filter into a temporary, copied into .grad) then
                              torch_adamw_fused: the unfused way to get the same update.
    galore                    a minimal GaLore-style step: per weight, the gradient is projected on the top-r
                              singular vectors of the gradient along its shorter side (P: m × r, or Q: n × r),
                              Adam runs on the r × n (or m × r) projected gradient with fp32 moments, and the
                              normalised step is projected back: W ← W(1 − lr·wd) − lr·P N. The projector is
                              computed once at setup (GaLore refreshes it every 200 steps; that SVD is not in the
                              timed step and its one-off time is printed). Rank r = 128 on CUDA, 16 on the CPU.

Correctness: the parameters start at zero (the graphs are built from random weights first), so after the checked
first call the representative weight (layer 0's q_proj) holds exactly the first update, compared with a float64
recomputation of that provider's algorithm.

Bytes (``bytes``): the fused step's minimal traffic, g + p + m + v read and p + m + v written, with fp32 moments
(22 B per bf16 parameter, 28 B per fp32 one); the same count divides every provider's time, so GB/s compare
like the times do. FLOPs: the filter's two products, 4·k·d per row.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..._backend import forced
from ...basis import SpectralBasis
from ...filters import low_pass
from ...ops.adamw_update import adamw_update_backend
from ...optim import SpectralAdamW, SpectralGradientFilter
from ..case import Case, Prepared, Provider

OP = "optimizer"
#: every provider name a case of this op can time or skip (``--providers`` is checked against it up front)
PROVIDERS = ("spectralkern", "spectralkern_bf16_states", "spectralkern_triton", "torch_adamw_fused",
             "filter_then_adamw", "galore")
_SEED = 0
_LR, _WD, _BETAS, _EPS = 1e-3, 0.01, (0.9, 0.999), 1e-8
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
_COMPUTE_KIND = {torch.float32: "tf32x3", torch.bfloat16: "tf32"}


@dataclass(frozen=True)
class _Config:
    layers: int
    hidden: int
    mlp: int
    block_size: int
    k: int
    rank: int  # GaLore's projection rank

    @property
    def name(self) -> str:
        return f"llama-L{self.layers}-h{self.hidden}-m{self.mlp}-b{self.block_size}-k{self.k}"

    def shapes(self) -> list[tuple[str, int, int]]:
        """(name, out, in) of every weight."""
        h, m = self.hidden, self.mlp
        per_layer = [("q_proj", h, h), ("k_proj", h, h), ("v_proj", h, h), ("o_proj", h, h),
                     ("gate_proj", m, h), ("up_proj", m, h), ("down_proj", h, m)]
        return [(f"layers.{i}.{name}", out, inp) for i in range(self.layers) for name, out, inp in per_layer]

    @property
    def numel(self) -> int:
        return sum(out * inp for _, out, inp in self.shapes())


def _configs(device: torch.device, quick: bool) -> list[_Config]:
    if quick or device.type != "cuda":
        return [_Config(1, 256, 688, 64, 16, 16)]
    return [_Config(1, 4096, 11008, 128, 8, 128), _Config(1, 4096, 11008, 128, 32, 128),
            _Config(8, 4096, 11008, 128, 32, 128)]


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for cfg in _configs(device, quick):
        es = torch.empty(0, dtype=dtype).element_size()
        bytes_per_param = 3 * es + 16  # g, p read and p written in the parameter dtype; m, v read + written fp32
        flops = sum(4 * min(cfg.k, cfg.block_size) * out_ * inp for _, out_, inp in cfg.shapes())
        shape = {"layers": cfg.layers, "hidden": cfg.hidden, "mlp": cfg.mlp, "params": cfg.numel,
                 "block_size": cfg.block_size, "k": cfg.k, "galore_rank": cfg.rank}
        out.append(Case(op=OP, name=cfg.name, layout="uniform", dtype=dtype, shape=shape,
                        bytes=cfg.numel * bytes_per_param, flops=flops, compute_kind=_COMPUTE_KIND[dtype],
                        prepare=functools.partial(_prepare, cfg, dtype)))
    return out


# ------------------------------------------------------------------------------------------ the model
class _Stack(nn.Module):
    """Bias-free Linear layers named like Llama's (layers.{i}.q_proj, ...), so target_modules work as usual."""

    def __init__(self, cfg: _Config, weights: list[torch.Tensor]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Module() for _ in range(cfg.layers))
        for (name, out_, inp), weight in zip(cfg.shapes(), weights):
            layer, attr = name.split(".")[1:]
            linear = nn.Linear(inp, out_, bias=False, device="meta")
            linear.weight = nn.Parameter(weight.clone())
            setattr(self.layers[int(layer)], attr, linear)


def _zeroed_copy(cfg: _Config, weights: list[torch.Tensor], filtered: bool
                 ) -> tuple[_Stack, SpectralGradientFilter | None]:
    """A model holding the weights (the filter's graphs are built from them), then zeroed."""
    model = _Stack(cfg, weights)
    filt = None
    if filtered:
        filt = SpectralGradientFilter(model, _TARGETS, block_size=cfg.block_size, k=cfg.k, knn=8,
                                      gains=low_pass(2.0), refresh_every=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model, filt


def _attach(model: nn.Module, grads: list[torch.Tensor], own: bool) -> None:
    """Set .grad to the shared gradients, or to own copies when the provider writes them."""
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone() if own else g


# ------------------------------------------------------------------------------------------ GaLore-style peer
class _GaLoreStep:
    """Minimal GaLore-style step (see the module docstring): projector from the first gradient, Adam in the
    projected space with fp32 moments, projected back and applied with decoupled weight decay."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], rank: int):
        self.params, self.grads = params, grads
        self.proj, self.left = [], []
        for g in grads:
            m, n = g.shape
            left = m <= n
            u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
            self.proj.append((u[:, :rank] if left else vh[:rank].T).to(g.dtype).contiguous())  # (m|n, r)
            self.left.append(left)
        self.m = [torch.zeros(self._low_shape(g, l, rank), dtype=torch.float32, device=g.device)
                  for g, l in zip(grads, self.left)]
        self.v = [torch.zeros_like(m) for m in self.m]
        self.t = 0

    @staticmethod
    def _low_shape(g: torch.Tensor, left: bool, rank: int) -> tuple[int, int]:
        return (rank, g.shape[1]) if left else (g.shape[0], rank)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = _BETAS
        bc1, bc2_sqrt = 1 - b1 ** self.t, (1 - b2 ** self.t) ** 0.5
        for p, g, P, left, m, v in zip(self.params, self.grads, self.proj, self.left, self.m, self.v):
            low = (P.T @ g if left else g @ P).float()
            m.lerp_(low, 1 - b1)
            v.mul_(b2).addcmul_(low, low, value=1 - b2)
            normalized = (m / bc1) / (v.sqrt() / bc2_sqrt + _EPS)
            update = P @ normalized.to(p.dtype) if left else normalized.to(p.dtype) @ P.T
            p.mul_(1 - _LR * _WD).add_(update, alpha=-_LR)


def _galore_reference(g: torch.Tensor, P: torch.Tensor, left: bool) -> torch.Tensor:
    """float64 first GaLore step from zero weights."""
    b1, b2 = _BETAS
    P64, g64 = P.double(), g.double()
    low = P64.T @ g64 if left else g64 @ P64
    normalized = ((1 - b1) * low / (1 - b1)) / (((1 - b2) * low.square()).sqrt() / (1 - b2) ** 0.5 + _EPS)
    return -_LR * (P64 @ normalized if left else normalized @ P64.T)


# ------------------------------------------------------------------------------------------ references
def _adamw_first_step(g: torch.Tensor) -> torch.Tensor:
    """float64 first AdamW step from zero weights and moments: −lr · ĝ / (|ĝ| + ε), ĝ = g."""
    b1, b2 = _BETAS
    m, v = (1 - b1) * g, (1 - b2) * g.square()
    return -_LR * (m / (1 - b1)) / (v.sqrt() / (1 - b2) ** 0.5 + _EPS)


def _projected(g: torch.Tensor, filt: SpectralGradientFilter, name: str) -> torch.Tensor:
    """float64 U_b diag(gains) U_bᵀ g per block, for one targeted weight."""
    basis = filt.bases()[name]
    gains = next(t.gains for t in filt.filter_targets if t.name == name).double()
    U, out = basis.U.double(), torch.empty_like(g, dtype=torch.float64)
    ptr = basis.block_ptr.tolist()
    for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
        U_b = U[start:stop]
        out[start:stop] = U_b @ (gains[b, :, None] * (U_b.T @ g[start:stop].double()))
    return out


# ------------------------------------------------------------------------------------------ setup
def _prepare(cfg: _Config, dtype: torch.dtype, device: torch.device) -> Prepared:
    gen = torch.Generator(device=device).manual_seed(_SEED)
    weights = [(0.02 * torch.randn(out_, inp, generator=gen, device=device)).to(dtype)
               for _, out_, inp in cfg.shapes()]
    grads = [torch.randn(out_, inp, generator=gen, device=device).to(dtype) for _, out_, inp in cfg.shapes()]
    probe = "layers.0.q_proj.weight"
    fused_kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    torch_backend = "torch-fused" if device.type == "cuda" else "torch-foreach"
    providers = []

    ours, filt = _zeroed_copy(cfg, weights, filtered=True)
    spectral_backend = _spectral_backend(device, weights[0], filt.bases()[probe])
    _attach(ours, grads, own=False)
    opt = SpectralAdamW(ours.parameters(), lr=_LR, weight_decay=_WD, spectral_filter=filt)
    ours_probe = ours.layers[0].q_proj.weight
    providers.append(Provider("spectralkern", spectral_backend, lambda: (opt.step(), ours_probe.detach())[1]))

    if dtype == torch.bfloat16:
        ours16, filt16 = _zeroed_copy(cfg, weights, filtered=True)
        _attach(ours16, grads, own=False)
        opt16 = SpectralAdamW(ours16.parameters(), lr=_LR, weight_decay=_WD, spectral_filter=filt16,
                              state_dtype=torch.bfloat16)
        probe16 = ours16.layers[0].q_proj.weight
        providers.append(Provider("spectralkern_bf16_states", spectral_backend,
                                  lambda: (opt16.step(), probe16.detach())[1]))

    skipped = {}
    if spectral_backend == "cuda" and cfg.layers == 1:
        ours_tr, filt_tr = _zeroed_copy(cfg, weights, filtered=True)
        _attach(ours_tr, grads, own=False)
        opt_tr = SpectralAdamW(ours_tr.parameters(), lr=_LR, weight_decay=_WD, spectral_filter=filt_tr)
        probe_tr = ours_tr.layers[0].q_proj.weight
        providers.append(Provider("spectralkern_triton", "triton",
                                  _forced("triton", lambda: (opt_tr.step(), probe_tr.detach())[1])))
    elif spectral_backend == "cuda":
        skipped["spectralkern_triton"] = ("one more copy of the parameters and fp32 moments does not fit beside the "
                                          "other providers at this size; compared on the 1-layer cases")

    plain, _ = _zeroed_copy(cfg, weights, filtered=False)
    _attach(plain, grads, own=False)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=_LR, weight_decay=_WD, **fused_kw)
    plain_probe = plain.layers[0].q_proj.weight
    providers.append(Provider("torch_adamw_fused", torch_backend,
                              lambda: (plain_opt.step(), plain_probe.detach())[1]))

    unfused, unfused_filt = _zeroed_copy(cfg, weights, filtered=True)
    _attach(unfused, grads, own=True)  # filt.step() overwrites .grad in place
    unfused_opt = torch.optim.AdamW(unfused.parameters(), lr=_LR, weight_decay=_WD, **fused_kw)
    unfused_probe = unfused.layers[0].q_proj.weight
    unfused_grads = [p.grad for p in unfused.parameters()]

    def filter_then_adamw() -> torch.Tensor:
        # Each step starts from the raw gradient, as after a backward (the filter refuses to filter its own output
        # again); the copy stands in for backward's write of .grad.
        torch._foreach_copy_(unfused_grads, grads)
        unfused_filt.step()
        unfused_opt.step()
        return unfused_probe.detach()
    providers.append(Provider("filter_then_adamw", torch_backend, filter_then_adamw))

    galore_params = [torch.zeros_like(w) for w in weights]
    started = time.perf_counter()
    galore = _GaLoreStep(galore_params, grads, cfg.rank)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"  galore: one-off SVD projectors for {len(grads)} weights took {time.perf_counter() - started:.2f} s "
          "(not in the timed step)", flush=True)
    providers.append(Provider("galore", "torch", lambda: (galore.step(), galore_params[0])[1]))

    _print_resident(cfg, dtype)
    g0 = grads[0]
    reference = _adamw_first_step(_projected(g0, filt, probe))
    references = {"torch_adamw_fused": _adamw_first_step(g0.double()),
                  "galore": _galore_reference(g0, galore.proj[0], galore.left[0])}
    return Prepared(providers=providers, reference=reference, tolerance=_TOLERANCE[dtype], references=references,
                    skipped=skipped)


def _spectral_backend(device: torch.device, weight: torch.Tensor, basis: SpectralBasis) -> str:
    """The registry's backend for SpectralAdamW's fused update of a weight like ``weight`` (fp32 moments)."""
    moments = torch.zeros_like(weight, dtype=torch.float32)
    return adamw_update_backend(weight.to(device), moments.to(device), moments.to(device), basis).backend


def _forced(backend: str, fn):
    """``fn`` run under the registry's ``forced(backend)`` (SPECTRALKERN_BACKEND, restored after)."""
    def run() -> torch.Tensor:
        with forced(backend):
            return fn()
    return run


def _print_resident(cfg: _Config, dtype: torch.dtype) -> None:
    """What each provider keeps between steps besides the shared gradients (analytic, MiB)."""
    es = torch.empty(0, dtype=dtype).element_size()
    n = cfg.numel
    bases = sum(out_ * cfg.k * 4 + (out_ // cfg.block_size + 1) * cfg.k * 8 for _, out_, _ in cfg.shapes())
    galore = sum(min(o, i) * cfg.rank * es + 2 * 4 * cfg.rank * max(o, i) for _, o, i in cfg.shapes())
    mib = 2 ** 20
    print(f"  resident besides params ({n * es / mib:.0f} MiB) and grads ({n * es / mib:.0f} MiB): "
          f"spectralkern {(8 * n + bases) / mib:.0f} MiB (m, v fp32 + bases {bases / mib:.1f}); "
          f"bf16 states {(4 * n + bases) / mib:.0f}; torch AdamW {2 * es * n / mib:.0f}; "
          f"filter_then_adamw {(2 * es * n + bases) / mib:.0f} (+ one weight-sized temporary per filter call); "
          f"galore {galore / mib:.0f} (projectors + low-rank moments)", flush=True)
