"""Hugging Face integration: spectral fine-tuning inside ``transformers.Trainer``, on plain or peft models.

Three ways in, from least to most change to a Trainer script::

    import spectralkern as sk
    from spectralkern.integrations.hf import SpectralFilterCallback, SpectralTrainer, spectral_adamw

    filt = sk.SpectralGradientFilter(model, target_modules=["query", "value"], k=16, reg_weight=0.0)

    # 1. keep the Trainer's own optimizer; the callback filters the gradients before every optimizer step
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[SpectralFilterCallback(filt)])

    # 2. the fused SpectralAdamW as the Trainer's optimizer (the factory gives Trainer the class and its kwargs)
    trainer = Trainer(model, args, train_dataset=ds, optimizer_cls_and_kwargs=spectral_adamw(filt, args))

    # 3. SpectralAdamW plus the joint loss L_task + reg_weight·Σ tr(ΔᵀLΔ) (build the filter with reg_weight > 0)
    trainer = SpectralTrainer(model, args, train_dataset=ds, spectral_filter=filt)

    trainer.train()

With the callback, gradient clipping (``max_grad_norm``) acts on the raw gradient and the filter after it; with
SpectralAdamW the filter runs inside the optimizer step, also after clipping. Do not combine the callback with
SpectralAdamW (the filter would run twice; SpectralAdamW raises).

peft: wrap first, then build the filter on the peft model. Target names match peft's LoRA layers, so
``target_modules=["query", "value"]`` on a LoRA model filters the adapter weights ``lora_A`` / ``lora_B`` of those
layers (and the base weight only if it is trainable); ``lora_targets(model)`` lists them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # the integration is optional; say what to install
    raise ModuleNotFoundError("spectralkern.integrations.hf needs transformers: pip install -e '.[finetune]'") from exc

from ..optim import SpectralAdamW, SpectralGradientFilter

__all__ = ["SpectralFilterCallback", "SpectralTrainer", "lora_targets", "spectral_adamw"]


def _check_filter(spectral_filter: object) -> SpectralGradientFilter:
    if not isinstance(spectral_filter, SpectralGradientFilter):
        raise TypeError(f"spectral_filter must be a spectralkern.SpectralGradientFilter, "
                        f"got {type(spectral_filter).__name__}")
    return spectral_filter


def spectral_adamw(spectral_filter: SpectralGradientFilter, args: Any = None,
                   **overrides: Any) -> tuple[type[SpectralAdamW], dict[str, Any]]:
    """``(SpectralAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The Trainer builds the param groups (weight decay off for biases and norms) and calls
    ``SpectralAdamW(groups, **kwargs)``. lr, betas and eps come from ``args`` (TrainingArguments) when given, else
    torch's AdamW defaults; ``overrides`` win over both.
    """
    _check_filter(spectral_filter)
    kwargs: dict[str, Any] = {"spectral_filter": spectral_filter}
    if args is not None:
        kwargs.update(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                      weight_decay=args.weight_decay)
    kwargs.update(overrides)
    return SpectralAdamW, kwargs


class SpectralFilterCallback(TrainerCallback):
    """Calls ``spectral_filter.step()`` before every optimizer step of a Trainer (the explicit filter mode)."""

    def __init__(self, spectral_filter: SpectralGradientFilter):
        self.spectral_filter = _check_filter(spectral_filter)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        optimizer = kwargs.get("optimizer")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the Trainer's optimizer
        if isinstance(optimizer, SpectralAdamW) and optimizer.spectral_filter is self.spectral_filter:
            raise RuntimeError("SpectralFilterCallback and SpectralAdamW share one filter: the gradients would be "
                               "filtered twice. Use either the callback or SpectralAdamW")
        self.spectral_filter.step()
        return control


class SpectralTrainer(Trainer):
    """A Trainer with SpectralAdamW as its default optimizer and the joint loss L_task + filt.regularization().

    Args (besides Trainer's): spectral_filter — the SpectralGradientFilter built on ``model``. Its reg_weight
    sets λ (0: no regulariser, only the filtered optimizer). An optimizer passed through ``optimizers=`` or
    ``optimizer_cls_and_kwargs=`` replaces SpectralAdamW (add ``SpectralFilterCallback`` then).
    """

    def __init__(self, *args: Any, spectral_filter: SpectralGradientFilter, **kwargs: Any):
        self.spectral_filter = _check_filter(spectral_filter)
        if kwargs.get("optimizers", (None, None))[0] is None and kwargs.get("optimizer_cls_and_kwargs") is None:
            training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            kwargs["optimizer_cls_and_kwargs"] = spectral_adamw(spectral_filter, training_args)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training or self.spectral_filter.reg_weight == 0:
            return result
        loss, outputs = result if return_outputs else (result, None)
        regularization = self.spectral_filter.regularization()
        if self._trainer_skips_ga_division():
            # The Trainer will not divide this loss by the accumulation steps, but adds one per micro-batch.
            regularization = regularization / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
        loss = loss + regularization.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _trainer_skips_ga_division(self) -> bool:
        """Mirror of Trainer's rule: the loss is not divided by the accumulation steps when the model or a
        compute_loss_func already normalised it over the accumulated batch."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool(getattr(self, "model_accepts_loss_kwargs", False) or getattr(self, "compute_loss_func", None))


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the peft LoRA layers of ``model`` (usable as ``target_modules`` to filter their adapters)."""
    names = [name for name, module in model.named_modules()
             if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and len(module.lora_A)]
    if not names:
        raise ValueError(f"model ({type(model).__name__}) has no peft LoRA layers; wrap it with "
                         "peft.get_peft_model(model, LoraConfig(...)) first")
    return names
