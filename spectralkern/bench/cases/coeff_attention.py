"""Benchmark of Coeff-Tuning's head-mixed attention (paper 004): the fused op against eager peers and plain SDPA.

Providers (q, k, v (1, H, N, D) in bf16 on a GPU, fp32 on the CPU; C = I + ΔC fp32 with random ΔC; no dropout):
    spectralkern     the ``coeff_attention`` op (label shows the backend that ran): per-head lse pass, then P_g
                     rebuilt on chip, mixed by C and multiplied by V_h; backward recomputes tiles. Memory O(N·H·D).
    coeff_eager      the authors' formulation in the input dtype: all H maps (H × N × N) materialised, softmax in
                     fp32, ``einsum`` with C, then P V; autograd backward
    coeff_reference  ``coeff_attention_reference``: the package's eager reference (fp32 maps, 2× the eager memory)
    sdpa             ``F.scaled_dot_product_attention`` without mixing: the cost floor of attention itself (it
                     computes plain attention, so it is checked against its own float64 answer)

Eager providers are left out where their maps would not fit (estimated bytes > 60 % of the device memory).

Modes: ``fwd`` returns out; ``fwd_bwd`` runs forward and ``torch.autograd.grad`` w.r.t. q, k, v (and C) with a fixed
grad_out and returns grad_q.

Bytes (minimum traffic): fwd reads q, k, v and writes out (4·H·N·D elements); fwd_bwd adds reading q, k, v, dO and
writing dq, dk, dv (7 more). Flops (useful work, tile recomputation not counted; halved when causal): fwd
4·H·N²·D (Q Kᵀ, P V) + 2·H²·N² (the mix); fwd_bwd adds 8·H·N²·D (dO Vᵀ, dV, dK, dQ) + 6·H²·N² (mixed maps for dV,
dP, dC).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ops.coeff_attention import coeff_attention, coeff_attention_backend, coeff_attention_reference
from ..case import Case, Prepared, Provider, interpreter_skip

OP = "coeff_attention"
#: every provider name a case of this op can time or skip (``--providers`` is checked against it up front)
PROVIDERS = ("spectralkern", "coeff_eager", "coeff_reference", "sdpa")
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
_SEED = 0


@dataclass(frozen=True)
class _Config:
    seq: int
    heads: int
    head_dim: int
    causal: bool
    mode: str  # "fwd" or "fwd_bwd"

    @property
    def name(self) -> str:
        return f"N{self.seq}-H{self.heads}-D{self.head_dim}-{'causal' if self.causal else 'full'}-{self.mode}"


def _configs(quick: bool) -> list[_Config]:
    if quick:
        return [_Config(64, 4, 16, causal, mode) for causal in (False, True) for mode in ("fwd", "fwd_bwd")]
    return [_Config(seq, heads, dim, causal, mode)
            for seq in (512, 2048, 8192) for heads in (12, 32) for dim in (64, 128)
            for causal in (False, True) for mode in ("fwd", "fwd_bwd")]


def cases(device: torch.device, quick: bool) -> list[Case]:
    """bf16 on a GPU; fp32 on the CPU (a smoke test of the harness and the torch / interpreter backends)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    es = torch.empty(0, dtype=dtype).element_size()
    out = []
    for cfg in _configs(quick):
        n, h, d = cfg.seq, cfg.heads, cfg.head_dim
        share = 0.5 if cfg.causal else 1.0
        elements, flops = 4 * h * n * d, share * (4 * h * n * n * d + 2 * h * h * n * n)
        if cfg.mode == "fwd_bwd":
            elements += 7 * h * n * d
            flops += share * (8 * h * n * n * d + 6 * h * h * n * n)
        shape = {"N": n, "H": h, "D": d, "causal": str(cfg.causal), "mode": cfg.mode, "batch": 1}
        out.append(Case(op=OP, name=cfg.name, layout=cfg.mode, dtype=dtype, shape=shape, bytes=elements * es,
                        flops=int(flops), compute_kind="bf16" if dtype == torch.bfloat16 else "tf32x3",
                        prepare=functools.partial(_prepare, cfg, dtype)))
    return out


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coeff: torch.Tensor, causal: bool) -> torch.Tensor:
    """The authors' way in the input dtype: every map materialised, softmax in fp32, mixed with einsum."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(torch.einsum("hg,bgij->bhij", coeff.to(q.dtype), probs), v)


def _runner(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor | None):
    if grad_out is None:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(*inputs)
        return forward

    def forward_backward() -> torch.Tensor:
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)[0]
    return forward_backward


def _map_bytes(cfg: _Config, element_size: int) -> int:
    """Rough peak of the eager peers: ~4 live H × N × N tensors (scores, probabilities, mixed maps, grads)."""
    return 4 * cfg.heads * cfg.seq * cfg.seq * element_size


def _prepare(cfg: _Config, dtype: torch.dtype, device: torch.device) -> Prepared:
    gen = torch.Generator(device=device).manual_seed(_SEED)
    shape = (1, cfg.heads, cfg.seq, cfg.head_dim)
    q, k, v = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in range(3))
    coeff = torch.eye(cfg.heads, device=device) + 0.1 * torch.randn(cfg.heads, cfg.heads, device=device,
                                                                     generator=gen)
    grad_out = None
    if cfg.mode == "fwd_bwd":
        grad_out = torch.randn(shape, device=device, generator=gen).to(dtype)
        for t in (q, k, v, coeff):
            t.requires_grad_(True)

    def float64(fn, mixing: bool) -> torch.Tensor:
        leaves = [t.detach().double().requires_grad_(grad_out is not None) for t in (q, k, v, coeff)]
        out = fn(*leaves) if mixing else fn(*leaves[:3])
        if grad_out is None:
            return out.detach()
        return torch.autograd.grad(out, leaves[0], grad_out.double())[0]

    reference = float64(lambda *t: coeff_attention_reference(*t, causal=cfg.causal), True)

    def sdpa(a, b, c, *_):
        return F.scaled_dot_product_attention(a, b, c, is_causal=cfg.causal)

    providers, skipped = [], {}
    backend = coeff_attention_backend(q).backend
    if interpreter_skip(backend, dtype):
        skipped["spectralkern"] = interpreter_skip(backend, dtype)
    else:
        providers.append(Provider("spectralkern", backend,
                                  _runner(lambda *t: coeff_attention(*t, causal=cfg.causal), [q, k, v, coeff],
                                          grad_out)))
    budget = 0.6 * (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 2**34)
    for name, fn, element_size in (("coeff_eager", _eager, q.element_size()),
                                   ("coeff_reference", coeff_attention_reference, 4)):
        if _map_bytes(cfg, element_size) > budget:
            skipped[name] = (f"its H × N × N maps (~{_map_bytes(cfg, element_size) / 2**30:.0f} GiB) would not fit "
                             f"in 60% of the device memory")
        elif name == "coeff_eager":
            providers.append(Provider(name, "torch", _runner(lambda *t: _eager(*t, cfg.causal), [q, k, v, coeff],
                                                             grad_out)))
        else:
            providers.append(Provider(name, "torch", _runner(
                lambda *t: coeff_attention_reference(*t, causal=cfg.causal), [q, k, v, coeff], grad_out)))
    providers.append(Provider("sdpa", "torch", _runner(sdpa, [q, k, v], grad_out)))
    plain = float64(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=cfg.causal), False)
    return Prepared(providers=providers, reference=reference, tolerance=_TOLERANCE[dtype], skipped=skipped,
                    references={"sdpa": plain})
