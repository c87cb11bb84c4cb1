"""SpectralSGD: paper 001's update rule — plain gradient descent on the spectrally filtered task gradient.

    opt = sk.SpectralSGD(model.parameters(), lr=1e-2, momentum=0.0, spectral_filter=filt)
    loss = task_loss + filt.regularization(); loss.backward(); opt.step(); opt.zero_grad()   # no filt.step()

For each weight targeted by ``spectral_filter``:

    d = F(∇L_task) + 2λ L_reg Δ           (F: the filter; the regulariser's gradient unfiltered, when present)
    b ← μ·b + d  (μ = momentum; b = d at the first step, as torch.optim.SGD)
    θ ← θ − η·b                           (μ = 0: θ ← θ − η·d, the paper's θ_i ← θ_i − η ∇θ_i^spec)

Every other parameter gets plain SGD (with the same momentum and weight decay). ``.grad`` stays the raw gradient.

Does the update stay in span(U)? With filter_method="basis", passthrough 0, weight_decay 0 and no regulariser, F
maps into span(U), so d, b and every update lie in span(U) exactly (to rounding) while the basis is fixed; a
refresh changes U, and the momentum buffer keeps its old-basis part. The regulariser's gradient 2λ L_reg Δ is
outside the band by design (the paper adds it unfiltered): the claim is about the task part of the update.
Coupled weight decay (torch SGD's ``weight_decay``: d += wd·θ) is outside the band too.

State keys as torch.optim.SGD ('momentum_buffer'), so state dicts interchange.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..distributed.shards import local_tensor
from .filtering_optimizer import FilteringOptimizer
from .gradient_filter import SpectralGradientFilter


class SpectralSGD(FilteringOptimizer):
    """Gradient descent (optional momentum) on the filtered task gradient plus the unfiltered regulariser gradient.

    Args:
        params: parameters or param groups.
        lr: η (> 0).
        momentum: μ in [0, 1) (0: the paper's plain gradient descent).
        weight_decay: coupled L2 decay as torch.optim.SGD (d += wd·θ), default 0.
        spectral_filter: the SpectralGradientFilter whose targets get the filtered update, or None (plain SGD).
            Not in hook mode, and without ``filt.step()``: the optimizer filters, adds the regulariser's gradient
            and advances the filter's step count.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, spectral_filter: SpectralGradientFilter | None = None):
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float(
                    "inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.set_spectral_filter(spectral_filter)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step; advances the spectral filter by one step."""
        loss, targets = self._begin_step(closure)
        if targets is None:
            return loss
        filt = self.spectral_filter
        for group in self.param_groups:
            lr, momentum, weight_decay = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
            for p in group["params"]:
                target = targets.get(id(p))
                reg = target.regularizer_grad() if target is not None else None
                if p.grad is None and reg is None:
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("SpectralSGD does not support sparse gradients")
                param = local_tensor(p)
                if target is None:
                    direction = local_tensor(p.grad).clone()
                else:
                    grad = target.local_grad(p.grad) if p.grad is not None else None
                    if grad is not None:
                        target.observe(grad)
                    direction = target.filter(grad) if grad is not None else torch.zeros_like(param)
                    if reg is not None:
                        direction.add_(reg.to(direction.dtype))
                if weight_decay != 0:
                    direction.add_(param, alpha=weight_decay)
                if momentum != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state or state["momentum_buffer"] is None:
                        state["momentum_buffer"] = _like(p, direction)
                    else:
                        local_tensor(state["momentum_buffer"]).mul_(momentum).add_(direction)
                    direction = local_tensor(state["momentum_buffer"])
                param.add_(direction.to(param.dtype), alpha=-lr)
        if filt is not None:
            filt.end_step()
        return loss


def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A copy of ``local`` (this rank's values) laid out as ``p`` (a DTensor of the same placements when p is one)."""
    buffer = torch.zeros_like(p)
    local_tensor(buffer).copy_(local)
    return buffer


__all__ = ["SpectralSGD"]
