"""SpectralAdamW: AdamW whose update of the targeted weights uses the spectrally filtered gradient, fused.

    opt = sk.SpectralAdamW(model.parameters(), lr=1e-3, weight_decay=0.01, spectral_filter=filt)
    loss.backward(); opt.step(); opt.zero_grad()          # no filt.step(): the optimizer filters and counts

For each weight targeted by ``spectral_filter`` the step is torch.optim.AdamW applied to
h·g + U diag(g(λ) − h) Uᵀ g; on CUDA it runs as one Triton kernel per weight that keeps Uᵀg on chip and reads
g, m, v, p once and writes m, v, p once (``ops/_triton_spectral_adamw.py``). Every other parameter gets the plain
AdamW update (a flat Triton kernel on CUDA). ``.grad`` is left as it was (the raw gradient).

Compatibility with torch.optim.AdamW: same constructor arguments (amsgrad must stay False), param groups, lr
read from the groups at every step (LR schedulers work), state keys 'step', 'exp_avg', 'exp_avg_sq' (a torch
AdamW state_dict loads, and ours loads into torch's). Differences: fp16/bf16 parameters keep fp32 moments (torch
keeps them in the parameter's dtype; ``state_dtype=torch.bfloat16`` does the same for bf16 parameters, with
fp32 arithmetic); maximize, foreach, fused, capturable and differentiable are not offered.
On the CPU (``adamw_update_group_``): untargeted fp32/fp64 parameters bit-identical to torch.optim.AdamW, targeted
ones to torch.optim.AdamW(fused=True) on the filtered gradients; half-precision parameters are updated in fp32 and
rounded once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain

import torch

from ..distributed.shards import local_tensor
from ..ops.adamw_update import GroupHyper, SpectralTarget, adamw_update_group_, state_dtype
from .gradient_filter import SpectralGradientFilter


class SpectralAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's defaults) fused with a SpectralGradientFilter.

    Args:
        params: parameters or param groups, as for torch.optim.AdamW.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (read from the param groups at every step).
        amsgrad: must be False (not implemented; raises ValueError).
        spectral_filter: the SpectralGradientFilter whose targets get the filtered update, or None (plain
            AdamW). It must not be in hook mode, and ``filt.step()`` must not be called: the optimizer filters
            inside its update and advances the filter's step count (and refreshes its bases when due).
        state_dtype: storage of the moments of fp16/bf16 parameters: torch.float32 (default; 8 bytes per
            parameter) or torch.bfloat16 (4 bytes, as torch.optim.AdamW keeps them for bf16 parameters). fp32 and
            fp64 parameters always keep moments in their own dtype. The arithmetic is fp32 either way.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, spectral_filter: SpectralGradientFilter | None = None,
                 state_dtype: torch.dtype = torch.float32):
        _check_hyper(lr, betas, eps, weight_decay, amsgrad)
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype!r}")
        self.half_state_dtype = state_dtype
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults)
        self.spectral_filter: SpectralGradientFilter | None = None
        self.set_spectral_filter(spectral_filter)

    def set_spectral_filter(self, spectral_filter: SpectralGradientFilter | None) -> None:
        """Attach ``spectral_filter`` (None: detach; plain AdamW from the next step on).

        For a filter that can only be built after the optimizer: an engine that replaces the parameters this
        optimizer was created with (accelerate's FSDP2 ``prepare`` swaps them for sharded DTensors) needs the filter
        built on the new ones; ``spectralkern.integrations.hf.SpectralTrainer`` does this with a filter factory.
        Raises as the constructor does (a filter in hook mode, or one targeting parameters this optimizer does not
        update)."""
        if spectral_filter is not None:
            if not isinstance(spectral_filter, SpectralGradientFilter):
                raise TypeError(f"spectral_filter must be a SpectralGradientFilter or None, "
                                f"got {type(spectral_filter).__name__}")
            if spectral_filter.hook:
                raise ValueError("spectral_filter is in hook mode, which already filters the gradients during "
                                 "backward; SpectralAdamW would filter them a second time. Build the filter with "
                                 "hook=False (or call filt.remove_hooks())")
            _check_targets_updated(spectral_filter, self.param_groups)
        self.spectral_filter = spectral_filter

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step (filtered for the targeted weights); advances the spectral filter by one step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        filt = self.spectral_filter
        if filt is not None:
            # Engines may swap the parameters after construction (accelerate's FSDP2 prepare); a filter holding the
            # old ones would silently filter nothing.
            _check_targets_updated(filt, self.param_groups)
        if filt is not None and filt._explicit_pending:
            filt._explicit_pending = False
            raise RuntimeError("spectral_filter.step() was called before SpectralAdamW.step(): the gradients are "
                               "already filtered and would be filtered twice. With SpectralAdamW do not call "
                               "filt.step(); the optimizer filters and counts the step itself")
        for group in self.param_groups:
            if group.get("amsgrad", False):
                raise ValueError("SpectralAdamW does not implement amsgrad; the param group has amsgrad=True")
            if group.get("maximize", False):
                raise ValueError("SpectralAdamW does not implement maximize; the param group has maximize=True")
            beta1, beta2 = group["betas"]
            batch = _GroupBatch()  # the group's updates, run together by adamw_update_group_ (one multi-tensor call)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SpectralAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # 'step' as torch keeps it for non-capturable, non-fused AdamW: a CPU float32 scalar.
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    dtype = state_dtype(p, self.half_state_dtype)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                target = filt._target_of(p) if filt is not None else None
                # DTensors (FSDP2 shards, replicas): the update is elementwise, or row-local for the filtered
                # weights (blocks never straddle shards), so it runs on the local tensors in place.
                param, exp_avg, exp_avg_sq = local_tensor(p), local_tensor(state["exp_avg"]), local_tensor(
                    state["exp_avg_sq"])
                if target is None:
                    batch.add(param, local_tensor(p.grad), exp_avg, exp_avg_sq, state["step"], None)
                else:
                    grad = filt.local_grad(target, p.grad)
                    filt._observe(target, grad)
                    batch.add(param, grad, exp_avg, exp_avg_sq, state["step"],
                              SpectralTarget(target.basis, target.gains, filt.passthrough))
            adamw_update_group_(*batch.lists(), GroupHyper(lr=float(group["lr"]), beta1=float(beta1),
                                                           beta2=float(beta2), eps=float(group["eps"]),
                                                           weight_decay=float(group["weight_decay"])),
                                batch.targets)
        if filt is not None:
            filt._advance()
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


class _GroupBatch:
    """One param group's tensors, collected for adamw_update_group_."""

    def __init__(self):
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps, self.targets = [], [], [], [], [], []

    def add(self, param, grad, exp_avg, exp_avg_sq, step, target) -> None:
        for bucket, value in zip((self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps,
                                  self.targets), (param, grad, exp_avg, exp_avg_sq, step, target)):
            bucket.append(value)

    def lists(self) -> tuple[list, ...]:
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps


def _check_targets_updated(spectral_filter: SpectralGradientFilter, param_groups: list[dict]) -> None:
    """Raise if a weight the filter targets is not among the optimizer's parameters (the same tensor object)."""
    mine = {id(p) for p in chain.from_iterable(g["params"] for g in param_groups)}
    missing = [name for name, p in spectral_filter.targets if id(p) not in mine]
    if missing:
        raise ValueError(f"spectral_filter targets {', '.join(missing)}, which this optimizer does not update: "
                         "its parameters are other tensors. Pass every targeted parameter to SpectralAdamW, and "
                         "build the filter after the model is wrapped (fully_shard, and accelerate's FSDP2 prepare "
                         "inside Trainer.train(), replace the parameters); with the HF Trainer pass a factory: "
                         "SpectralTrainer(..., spectral_filter=lambda model: sk.SpectralGradientFilter(model, ...))")


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
