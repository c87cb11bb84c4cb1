"""torch.amp.GradScaler support for the optimizers that filter inside their step (SpectralAdamW, SpectralSGD).

They declare ``_step_supports_amp_scaling``: ``scaler.step(opt)`` then does not unscale ``.grad`` itself but sets
``opt.grad_scale`` (the loss scale S, or None when ``scaler.unscale_(opt)`` already ran) and ``opt.found_inf``
before calling ``opt.step()``. That lets the step (a) skip on inf/nan without the filter keeping a stale
regulariser scale, and (b) divide the regulariser's recorded scale by S together with the gradients — the
recorded scale came through the scaled loss, so it carries S too.
"""
from __future__ import annotations

import torch

from ..distributed.shards import local_tensor
from .gradient_filter import SpectralGradientFilter


def prepare_scaled_step(optimizer: torch.optim.Optimizer, spectral_filter: SpectralGradientFilter | None) -> bool:
    """Unscale ``.grad`` and the filter's recorded regulariser scale when a GradScaler hands a scaled step to
    ``optimizer``; False when the step must be skipped (inf/nan gradients: nothing is updated or counted). True
    at once when no GradScaler is involved."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return True
    if float(found_inf.sum()) > 0:  # one host sync per step, as GradScaler's own skip check
        if spectral_filter is not None:
            spectral_filter.skip_step()
        return False
    grad_scale = getattr(optimizer, "grad_scale", None)
    if grad_scale is None:  # scaler.unscale_(optimizer) already divided .grad by S (e.g. for clipping)
        if (spectral_filter is not None and spectral_filter.regularizer_pending
                and not spectral_filter.regularizer_unscaled):
            spectral_filter.skip_step()
            raise RuntimeError("scaler.unscale_(optimizer) ran before scaler.step(optimizer) while the spectral "
                               "regulariser's gradient is pending: .grad is unscaled but the regulariser's recorded "
                               "scale still carries the loss scale, which the optimizer cannot see. Call "
                               "filt.unscale_regularizer_(1 / scaler.get_scale()) right after scaler.unscale_()")
        return True
    inverse = grad_scale.double().reciprocal().float()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                grad = local_tensor(p.grad)
                grad.mul_(inverse.to(grad.device))
    if spectral_filter is not None and not spectral_filter.regularizer_unscaled:
        spectral_filter.unscale_regularizer_(inverse)
    return True


__all__ = ["prepare_scaled_step"]
