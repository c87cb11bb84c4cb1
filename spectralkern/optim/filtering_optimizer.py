"""What every optimizer that takes ``spectral_filter=`` shares: attaching the filter, the parameter dtype check,
forgetting the regulariser's recorded share on ``zero_grad``, and the targets of one step."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .amp import prepare_scaled_step
from .attach import check_filter_attachable, check_param_dtypes, check_targets_updated
from .gradient_filter import FilterTarget, SpectralGradientFilter


class FilteringOptimizer(torch.optim.Optimizer):
    """Base of SpectralAdamW and SpectralSGD (not an optimizer on its own: subclasses implement ``step``)."""

    # torch.amp.GradScaler hands us scaled gradients with grad_scale / found_inf (optim/amp.py)
    _step_supports_amp_scaling = True
    spectral_filter: SpectralGradientFilter | None = None

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, after checking that every parameter has a real floating-point dtype."""
        check_param_dtypes(param_group, len(self.param_groups), type(self).__name__)
        super().add_param_group(param_group)

    def set_spectral_filter(self, spectral_filter: SpectralGradientFilter | None) -> None:
        """Attach ``spectral_filter`` (None: detach; the plain update from the next step on).

        For a filter that can only be built after the optimizer: an engine that replaces the parameters this
        optimizer was created with (accelerate's FSDP2 ``prepare`` swaps them for sharded DTensors) needs the filter
        built on the new ones; ``spectralkern.integrations.hf.SpectralTrainer`` does this with a filter factory.
        Raises as the constructor does (a filter in hook mode, or one targeting parameters this optimizer does not
        update)."""
        if spectral_filter is not None:
            if not isinstance(spectral_filter, SpectralGradientFilter):
                raise TypeError(f"spectral_filter must be a SpectralGradientFilter or None, "
                                f"got {type(spectral_filter).__name__}")
            check_filter_attachable(spectral_filter)
            check_targets_updated(spectral_filter, self.param_groups)
        self.spectral_filter = spectral_filter

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; the spectral filter also forgets the regulariser's recorded share of the discarded
        gradients."""
        super().zero_grad(set_to_none)
        if self.spectral_filter is not None:
            self.spectral_filter.skip_step()

    def _begin_step(self, closure: Callable[[], float] | None) -> tuple[float | None, dict[int, FilterTarget] | None]:
        """The closure's loss, and {id(parameter): FilterTarget} for this step — None when GradScaler found inf
        gradients and the step is skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        targets = self._step_targets()
        return loss, (targets if prepare_scaled_step(self, self.spectral_filter) else None)

    def _step_targets(self) -> dict[int, FilterTarget]:
        """{id(parameter): its FilterTarget} for this step (empty without a filter). Call before GradScaler's
        unscaling: that changes ``.grad``, which would hide gradients ``filt.step()`` already filtered."""
        filt = self.spectral_filter
        if filt is None:
            return {}
        # Engines may swap the parameters after construction (accelerate's FSDP2 prepare); a filter holding the
        # old ones would silently filter nothing.
        check_targets_updated(filt, self.param_groups)
        return {id(t.param): t for t in filt.targets_for_update()}


__all__ = ["FilteringOptimizer"]
