"""One AdamW update of one parameter, optionally on the spectrally filtered gradient, in place.

    g̃ = h·g + U diag(gains − h) Uᵀ g      per block (skipped without a basis)
    p ← p·(1 − lr·wd);  m ← m + (1 − β1)(g̃ − m);  v ← β2·v + (1 − β2)·g̃²
    p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)

This is exactly torch.optim.AdamW's non-amsgrad step (decoupled weight decay, same operation order as its
single-tensor path), so the torch backend is bit-identical to torch AdamW on the CPU.

Backends (the registry decides: ``adamw_update_backend``; a forced backend that cannot run raises):
    triton  with a basis: ``_triton_spectral_adamw`` — one program per (block, column tile) keeps Uᵀg on chip and
            reads g, m, v, p once and writes m, v, p once (g is read a second time, from L2, only when h ≠ 0);
            without a basis: ``_triton_adamw``, a flat elementwise kernel.
    cuda    the compiled kernels of csrc/ (``_cuda_adamw``), the same two structures, when built (preferred on CUDA).
    torch   the reference: filter into a temporary, then the AdamW ops of torch's single-tensor path.
All arithmetic is fp32 (fp64 for fp64 parameters) whatever the storage: fp16/bf16 parameters are updated in fp32
and rounded once; their moments are fp32 by default, or bf16 (rounded once per step) when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._backend import Choice, backend_of
from ..basis import SpectralBasis
from ._cuda_adamw import adamw_update_cuda_
from .spectral_filter import filter_gradient, spectral_filter_reference


@dataclass(frozen=True)
class AdamWHyper:
    """Hyper-parameters of one step; ``step`` is t after its increment (1 on the first step)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: float

    @property
    def bias_correction1(self) -> float:
        return 1 - self.beta1 ** self.step

    @property
    def bias_correction2_sqrt(self) -> float:
        return (1 - self.beta2 ** self.step) ** 0.5


def state_dtype(param: torch.Tensor, half_state_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """dtype of m and v for ``param``: ``half_state_dtype`` (fp32 by default) for fp16/bf16 parameters, the
    parameter's own dtype otherwise."""
    return half_state_dtype if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


# ------------------------------------------------------------------------------------------ torch reference
def adamw_update_reference_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                            exp_avg_sq: torch.Tensor, hyper: AdamWHyper, basis: SpectralBasis | None = None,
                            gains: torch.Tensor | None = None, passthrough: float = 0.0) -> None:
    """The update in plain torch (in place on param, exp_avg, exp_avg_sq). gains: (B, k) when basis is given."""
    work = torch.float64 if param.dtype == torch.float64 else torch.float32
    g = grad
    if basis is not None:
        g = spectral_filter_reference(g, basis.U, basis.block_ptr, gains, passthrough)
    g = g.to(work)
    p, m, v = (t if t.dtype == work else t.to(work) for t in (param, exp_avg, exp_avg_sq))
    if hyper.weight_decay != 0:
        p.mul_(1 - hyper.lr * hyper.weight_decay)
    m.lerp_(g, 1 - hyper.beta1)
    v.mul_(hyper.beta2).addcmul_(g, g, value=1 - hyper.beta2)
    step_size = hyper.lr / hyper.bias_correction1
    denom = (v.sqrt() / hyper.bias_correction2_sqrt).add_(hyper.eps)
    p.addcdiv_(m, denom, value=-step_size)
    for stored, worked in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
        if worked is not stored:
            stored.copy_(worked)


# ------------------------------------------------------------------------------------------ triton launchers
def _launch_spectral(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     hyper: AdamWHyper, basis: SpectralBasis, gains: torch.Tensor, passthrough: float) -> None:
    import triton

    from ._triton_spectral_adamw import num_warps, spectral_adamw_kernel, tile_sizes

    n, d = param.shape
    if n == 0 or d == 0:
        return
    k = basis.k
    k_pad = max(16, triton.next_power_of_2(k))
    block_n, block_d = tile_sizes(k_pad)
    U = basis.U
    ptr = basis.block_ptr_on(param.device)
    spectral_adamw_kernel[(basis.num_blocks, triton.cdiv(d, block_d))](
        grad, param, exp_avg, exp_avg_sq, U, gains, ptr,
        d, k,
        grad.stride(0), grad.stride(1), param.stride(0), param.stride(1), exp_avg.stride(0), exp_avg.stride(1),
        U.stride(0), U.stride(1), gains.stride(0), gains.stride(1),
        float(passthrough), *_scalars(hyper),
        BLOCK_N=block_n, BLOCK_D=block_d, K_PAD=k_pad,
        # tf32x3 keeps fp32 gradients at ~fp32 accuracy on tensor cores; half gradients take one tf32 pass, which
        # rounds U (fp32) to tf32 (2^-11, under the bf16/fp16 rounding of the update; docs/gpu.md).
        DOT_PRECISION="tf32x3" if grad.dtype == torch.float32 else "tf32",
        HAS_PASSTHROUGH=passthrough != 0.0,
        enable_fp_fusion=False,  # each operation rounded once, as the CUDA kernel and torch do (no FMA contraction)
        num_warps=num_warps(k_pad),
    )


def _launch_plain(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  hyper: AdamWHyper) -> None:
    import triton

    from ._triton_adamw import BLOCK, adamw_kernel

    numel = param.numel()
    if numel == 0:
        return
    adamw_kernel[(triton.cdiv(numel, BLOCK),)](
        grad.contiguous(), param, exp_avg, exp_avg_sq, numel, *_scalars(hyper), BLOCK=BLOCK,
        enable_fp_fusion=False)  # each operation rounded once, as the CUDA kernel and torch do


def _scalars(hyper: AdamWHyper) -> tuple[float, ...]:
    """(1 − β1, β2, 1 − β2, ε, 1 − lr·wd, lr / bc1, √bc2), rounded to fp32 by the launch as torch rounds them."""
    return (1 - hyper.beta1, hyper.beta2, 1 - hyper.beta2, hyper.eps, 1 - hyper.lr * hyper.weight_decay,
            hyper.lr / hyper.bias_correction1, hyper.bias_correction2_sqrt)


# ------------------------------------------------------------------------------------------ dispatch
def adamw_update_backend(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         basis: SpectralBasis | None = None, backend: str | None = None, *,
                         grad: torch.Tensor | None = None) -> Choice:
    """The registry's choice for one update of ``param`` with these moments (and basis). With ``grad`` (as
    ``adamw_update_group_`` asks) also the torch backend's group algorithm."""
    # The kernels index p, m and v with one set of strides (m, v) and assume flat, dense storage without a basis.
    dense_state = (exp_avg.dtype == exp_avg_sq.dtype and exp_avg.stride() == param.stride() == exp_avg_sq.stride()
                   and param.is_contiguous())
    facts = {}
    if grad is not None:
        facts = {"grouped": True, "filtered": basis is not None, "plain": basis is None,
                 "same_dtype": (param.dtype in (torch.float32, torch.float64)
                                and grad.dtype == exp_avg.dtype == exp_avg_sq.dtype == param.dtype)}
    return backend_of("adamw_update", param, backend=backend, k=basis.k if basis is not None else None,
                      state_dtype=exp_avg.dtype, dense_state=dense_state, **facts)


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  hyper: AdamWHyper, basis: SpectralBasis | None = None, gains: torch.Tensor | None = None,
                  passthrough: float = 0.0) -> str:
    """Apply one AdamW step in place, on the filtered gradient when ``basis`` is given; returns the backend used.

    Shapes: param, grad (N, d) with a basis (N = basis.num_nodes), any shape without; exp_avg, exp_avg_sq like
    param (fp32, or bf16 for half-precision parameters); gains (B, k) on the basis' device. grad is only read.
    Raises BackendUnavailable when SPECTRALKERN_BACKEND forces a backend that cannot run this update.
    """
    backend = adamw_update_backend(param, exp_avg, exp_avg_sq, basis).backend
    with torch.no_grad():
        if backend == "cuda":
            adamw_update_cuda_(param, grad, exp_avg, exp_avg_sq, _scalars(hyper), basis, gains, passthrough)
        elif backend == "triton" and basis is not None:
            _launch_spectral(param, grad, exp_avg, exp_avg_sq, hyper, basis, gains, passthrough)
        elif backend == "triton":
            _launch_plain(param, grad, exp_avg, exp_avg_sq, hyper)
        else:
            adamw_update_reference_(param, grad, exp_avg, exp_avg_sq, hyper, basis, gains, passthrough)
    return backend


# ------------------------------------------------------------------------------------------ a whole param group
@dataclass(frozen=True)
class GroupHyper:
    """A param group's hyper-parameters (each parameter brings its own step count)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    def at(self, step: float) -> AdamWHyper:
        return AdamWHyper(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, step)


@dataclass(frozen=True)
class SpectralTarget:
    """How one parameter's gradient is filtered: its basis, gains (B, k) and passthrough h."""

    basis: SpectralBasis
    gains: torch.Tensor
    passthrough: float = 0.0


def _foreach_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor], steps: list[float], hyper: GroupHyper) -> None:
    """torch.optim.AdamW's multi-tensor step (non-capturable, non-amsgrad), op for op: bit-identical to it and to
    its single-tensor path. ``steps``: each parameter's t after its increment."""
    if hyper.weight_decay != 0:
        torch._foreach_mul_(params, 1 - hyper.lr * hyper.weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - hyper.beta1)
    torch._foreach_mul_(exp_avg_sqs, hyper.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - hyper.beta2)
    step_size = [(hyper.lr / (1 - hyper.beta1 ** t)) * -1 for t in steps]
    bias_correction2_sqrt = [(1 - hyper.beta2 ** t) ** 0.5 for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, hyper.eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


def adamw_update_group_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                        exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], hyper: GroupHyper,
                        targets: list[SpectralTarget | None]) -> list[str]:
    """One AdamW step of a whole param group in place; entry i on the filtered gradient when ``targets[i]`` is
    given. Returns each parameter's backend ("torch:fused", "torch:foreach", "torch:reference", "triton", "cuda").

    steps: each parameter's step count t after its increment, as a CPU float32 scalar tensor (torch.optim's
    'step' state). The registry picks per parameter (``adamw_update_backend``); the torch backend then updates all
    unfiltered float32/float64 parameters with one set of torch._foreach_* calls (bit-identical to
    torch.optim.AdamW) and all filtered ones with one torch._fused_adamw_ call on their filtered gradients
    (bit-identical to torch.optim.AdamW(fused=True) given those gradients); the rest one by one.
    """
    lengths = {len(params), len(grads), len(exp_avgs), len(exp_avg_sqs), len(steps), len(targets)}
    if len(lengths) != 1:
        raise ValueError(f"params, grads, exp_avgs, exp_avg_sqs, steps and targets must have one length each, got "
                         f"{len(params)}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}, {len(steps)}, "
                         f"{len(targets)}")
    used = []
    buckets: dict[str, list[int]] = {"fused": [], "foreach": []}
    with torch.no_grad():
        for i, (p, g, m, v, target) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, targets)):
            basis = target.basis if target is not None else None
            choice = adamw_update_backend(p, m, v, basis, grad=g)
            if choice.algorithm in buckets:
                buckets[choice.algorithm].append(i)
            elif target is None:
                adamw_update_(p, g, m, v, hyper.at(float(steps[i])))
            else:
                adamw_update_(p, g, m, v, hyper.at(float(steps[i])), basis, target.gains, target.passthrough)
            used.append(f"{choice.backend}:{choice.algorithm}" if choice.algorithm else choice.backend)
        plain = buckets["foreach"]
        if plain:
            _foreach_adamw_([params[i] for i in plain], [grads[i] for i in plain], [exp_avgs[i] for i in plain],
                            [exp_avg_sqs[i] for i in plain], [float(steps[i]) for i in plain], hyper)
        filtered = buckets["fused"]
        if filtered:
            filtered_grads = [filter_gradient(grads[i], targets[i].basis, targets[i].gains, targets[i].passthrough)
                              for i in filtered]
            torch._fused_adamw_([params[i] for i in filtered], filtered_grads, [exp_avgs[i] for i in filtered],
                                [exp_avg_sqs[i] for i in filtered], [], [steps[i] for i in filtered],
                                lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2,
                                weight_decay=hyper.weight_decay, eps=hyper.eps, amsgrad=False, maximize=False)
    return used
