"""SpectralAdamW: AdamW whose update of the targeted weights uses the spectrally filtered task gradient, fused.

    opt = sk.SpectralAdamW(model.parameters(), lr=1e-3, weight_decay=0.01, spectral_filter=filt)
    loss = task_loss + filt.regularization(); loss.backward(); opt.step(); opt.zero_grad()   # no filt.step()

For each weight targeted by ``spectral_filter`` the step is torch.optim.AdamW applied to

    g̃ = F(∇L_task) + 2λ L_reg Δ        (F: the filter, module docstring of gradient_filter.py)

the regulariser's gradient added unfiltered, only when a backward went through ``filt.regularization()``. Without
it, on CUDA, filter and AdamW run as one Triton kernel per weight that keeps Uᵀg on chip and reads g, m, v, p once
and writes m, v, p once (``ops/_triton_spectral_adamw.py``); with it, F runs first (the spectral-filter kernel)
and the plain AdamW kernel takes g̃. Every other parameter gets the plain AdamW update. ``.grad`` is left as it was
(the raw task gradient).

Does the update stay in the filter's band? Adam divides every element by its own √v̂, which mixes graph
frequencies: with ``lowpass_update=False`` (default) the applied update of a targeted weight is NOT in span(U)
(measured 10–17% of its energy outside after 1–3 steps). ``lowpass_update=True`` filters Adam's direction again
before applying it, p ← p·(1 − lr·wd) − lr·F(m̂ / (√v̂ + ε)): the update (weight decay aside) is F of something,
so with filter_method="basis" and passthrough 0 it lies in span(U) exactly (to rounding) — regulariser included,
whose gradient enters the moments unfiltered and is then filtered with the rest. That mode runs as separate
torch / kernel passes (filter, moments, filter, update), not the fused kernel.

Compatibility with torch.optim.AdamW: same constructor arguments (amsgrad must stay False), param groups, lr
read from the groups at every step (LR schedulers work), state keys 'step', 'exp_avg', 'exp_avg_sq' (a torch
AdamW state_dict loads, and ours loads into torch's). Differences: fp16/bf16 parameters keep fp32 moments (torch
keeps them in the parameter's dtype; ``state_dtype=torch.bfloat16`` does the same for bf16 parameters, with
fp32 arithmetic); maximize, foreach, fused, capturable and differentiable are not offered.
On the CPU each param group is updated by multi-tensor calls (``ops.adamw_update.adamw_update_group_``): the
untargeted fp32/fp64 parameters bit-identical to torch.optim.AdamW, the targeted ones to
``torch.optim.AdamW(fused=True)`` given their filtered gradients; half-precision parameters are updated in fp32 and
rounded once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain

import torch

from ..distributed.shards import local_tensor
from ..ops.adamw_update import AdamWHyper, GroupHyper, SpectralTarget, adamw_update_group_, state_dtype
from .filtering_optimizer import FilteringOptimizer
from .gradient_filter import FilterTarget, SpectralGradientFilter


class SpectralAdamW(FilteringOptimizer):
    """AdamW (decoupled weight decay, torch's defaults) fused with a SpectralGradientFilter.

    Args:
        params: parameters or param groups, as for torch.optim.AdamW.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (read from the param groups at every step).
        amsgrad: must be False (not implemented; raises ValueError).
        spectral_filter: the SpectralGradientFilter whose targets get the filtered update, or None (plain
            AdamW). It must not be in hook mode, and ``filt.step()`` must not be called: the optimizer filters
            inside its update, adds the regulariser's gradient and advances the filter's step count (and
            refreshes its bases when due).
        lowpass_update: filter Adam's direction again before applying it, so that the applied update of a
            targeted weight is itself low-pass (module docstring). Default False: AdamW on the filtered gradient.
        state_dtype: storage of the moments of fp16/bf16 parameters: torch.float32 (default; 8 bytes per
            parameter) or torch.bfloat16 (4 bytes, as torch.optim.AdamW keeps them for bf16 parameters). fp32 and
            fp64 parameters always keep moments in their own dtype. The arithmetic is fp32 either way.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, spectral_filter: SpectralGradientFilter | None = None,
                 state_dtype: torch.dtype = torch.float32, lowpass_update: bool = False):
        _check_hyper(lr, betas, eps, weight_decay, amsgrad)
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype!r}")
        self.half_state_dtype = state_dtype
        if not isinstance(lowpass_update, bool):
            raise TypeError(f"lowpass_update must be a bool, got {type(lowpass_update).__name__}")
        self.lowpass_update = lowpass_update
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults)
        self.set_spectral_filter(spectral_filter)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step (filtered for the targeted weights); advances the spectral filter by one step."""
        loss, targets = self._begin_step(closure)
        if targets is None:
            return loss
        filt = self.spectral_filter
        for group in self.param_groups:
            if group.get("amsgrad", False):
                raise ValueError("SpectralAdamW does not implement amsgrad; the param group has amsgrad=True")
            if group.get("maximize", False):
                raise ValueError("SpectralAdamW does not implement maximize; the param group has maximize=True")
            beta1, beta2 = group["betas"]
            hyper = GroupHyper(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                               eps=float(group["eps"]), weight_decay=float(group["weight_decay"]))
            batch = _GroupBatch()  # the group's updates, run together by adamw_update_group_ (multi-tensor calls)
            for p in group["params"]:
                target = targets.get(id(p))
                reg = target.regularizer_grad() if target is not None else None
                if p.grad is None and reg is None:
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("SpectralAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # 'step' as torch keeps it for non-capturable, non-fused AdamW: a CPU float32 scalar.
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    dtype = state_dtype(p, self.half_state_dtype)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                # DTensors (FSDP2 shards, replicas): the update is elementwise, or row-local for the filtered
                # weights (blocks never straddle shards), so it runs on the local tensors in place.
                param, exp_avg, exp_avg_sq = local_tensor(p), local_tensor(state["exp_avg"]), local_tensor(
                    state["exp_avg_sq"])
                if target is None:
                    batch.add(param, local_tensor(p.grad), exp_avg, exp_avg_sq, state["step"], None)
                    continue
                grad = target.local_grad(p.grad) if p.grad is not None else None
                if grad is not None:
                    target.observe(grad)
                if self.lowpass_update:
                    _lowpass_adamw_update_(param, _filtered_direction(target, grad, reg, param), exp_avg,
                                           exp_avg_sq, hyper.at(float(state["step"])), target)
                elif reg is None and target.filter_method == "basis":
                    batch.add(param, grad, exp_avg, exp_avg_sq, state["step"],
                              SpectralTarget(target.basis, target.gains, target.passthrough))
                else:
                    direction = _filtered_direction(target, grad, reg, param)
                    batch.add(param, direction.to(param.dtype), exp_avg, exp_avg_sq, state["step"], None)
            adamw_update_group_(batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.steps, hyper,
                                batch.targets)
        if filt is not None:
            filt.end_step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the moments of fp16/bf16 parameters keep ``state_dtype`` (torch would cast them to the
        parameter's dtype)."""
        saved_groups = state_dict["param_groups"]
        saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        super().load_state_dict(state_dict)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            dtype = state_dtype(p, self.half_state_dtype)
            if saved is None or dtype == p.dtype:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype, copy=True)


def _filtered_direction(target: FilterTarget, grad: torch.Tensor | None, reg: torch.Tensor | None,
                        param: torch.Tensor) -> torch.Tensor:
    """F(grad) + reg (either may be absent), in fp32 (fp64 for fp64 parameters)."""
    work = torch.float64 if param.dtype == torch.float64 else torch.float32
    out = target.filter(grad).to(work) if grad is not None else torch.zeros(param.shape, dtype=work,
                                                                             device=param.device)
    return out if reg is None else out.add_(reg.to(work))


def _lowpass_adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                           hyper: AdamWHyper, target: FilterTarget) -> None:
    """AdamW's moments of ``grad`` (already filtered), then p ← p·(1 − lr·wd) − lr·F(m̂ / (√v̂ + ε)); fp32 math
    (fp64 for fp64 parameters), stored values rounded once. The same operation order as torch's AdamW for the
    moments and the decay."""
    work = grad.dtype
    p, m, v = (t if t.dtype == work else t.to(work) for t in (param, exp_avg, exp_avg_sq))
    if hyper.weight_decay != 0:
        p.mul_(1 - hyper.lr * hyper.weight_decay)
    m.lerp_(grad, 1 - hyper.beta1)
    v.mul_(hyper.beta2).addcmul_(grad, grad, value=1 - hyper.beta2)
    direction = (m / hyper.bias_correction1) / (v.sqrt() / hyper.bias_correction2_sqrt).add_(hyper.eps)
    p.sub_(target.filter(direction), alpha=hyper.lr)
    for stored, worked in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
        if worked is not stored:
            stored.copy_(worked)


class _GroupBatch:
    """One param group's tensors, collected for ``adamw_update_group_``."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []
        self.targets: list[SpectralTarget | None] = []

    def add(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
            step: torch.Tensor, target: SpectralTarget | None) -> None:
        self.params.append(param)
        self.grads.append(grad)
        self.exp_avgs.append(exp_avg)
        self.exp_avg_sqs.append(exp_avg_sq)
        self.steps.append(step)
        self.targets.append(target)


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool) -> None:
    if isinstance(lr, torch.Tensor):
        raise TypeError("lr must be a float (tensor learning rates are not supported)")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{index}] must be in [0, 1), got {beta!r}")
    if amsgrad:
        raise ValueError("amsgrad=True is not implemented by SpectralAdamW; use amsgrad=False")
