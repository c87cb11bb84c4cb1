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

FSDP2 (``fsdp_config={"fsdp_version": 2}`` or an accelerate FSDP2 config): accelerate's ``prepare`` inside
``train()`` replaces every parameter by a sharded DTensor, after the optimizer was created on the old ones (it swaps
them in the optimizer's param groups). A filter built beforehand holds the old parameters; the three ways above
then raise (``SpectralAdamW.step`` at the first step, the callback and ``SpectralTrainer`` at the start of
``train()``) instead of training unfiltered. Pass a factory instead of a filter — a callable ``model -> filter``,
called once at the start of ``train()`` on the model as the engine wrapped it (under DDP or one process it is the
model you passed)::

    make_filter = functools.partial(sk.SpectralGradientFilter, target_modules=["query", "value"], k=16,
                                    align_shards=(1, 2, 4, 8))
    trainer = SpectralTrainer(model, args, train_dataset=ds, spectral_filter=make_filter)   # SpectralAdamW
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[SpectralFilterCallback(make_filter)])
    trainer.train()     # then trainer.spectral_filter (or callback.spectral_filter): the filter of the sharded model

With the callback, gradient clipping (``max_grad_norm``) acts on the raw gradient and the filter after it; with
SpectralAdamW the filter runs inside the optimizer step, also after clipping. Do not combine the callback with
SpectralAdamW (the filter would run twice; SpectralAdamW raises).

Checkpoints: the callback and SpectralTrainer write the filter's state (step count, graphs, bases, W₀, the
correlation EMA) into every ``checkpoint-N/`` the Trainer saves (``filter_checkpoint.py``: ``spectral_filter.pt``,
loadable with ``torch.load(weights_only=True)``), and ``train(resume_from_checkpoint=...)`` restores it when
training starts, after a factory built its filter. On the CPU the resumed run then ends bit-identical to the
uninterrupted one (weights, filter steps, bases, regulariser), given the Trainer's own conditions for that (its
RNG state file; the filter's eigensolver draws its start vectors from torch's global RNG, which the Trainer
restores). A resumed checkpoint without the filter's state raises, unless ``resume_without_filter_state=True``.

peft: wrap first, then build the filter on the peft model. Target names match peft's LoRA layers, so
``target_modules=["query", "value"]`` on a LoRA model filters the adapter weights ``lora_A`` / ``lora_B`` of those
layers (and the base weight only if it is trainable); ``lora_targets(model)`` lists them.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as exc:  # the integration is optional; say what to install
    raise ModuleNotFoundError("spectralkern.integrations.hf needs transformers: pip install -e '.[finetune]'") from exc

from ..optim import SpectralAdamW, SpectralGradientFilter
from .filter_checkpoint import FILTER_STATE_NAME, filter_state_path, read_filter_state, save_filter_state

__all__ = ["FilterFactory", "SpectralFilterCallback", "SpectralTrainer", "lora_targets", "spectral_adamw"]

FilterFactory = Callable[[nn.Module], SpectralGradientFilter]
"""Builds the filter on the model the Trainer trains, e.g. ``functools.partial(sk.SpectralGradientFilter,
target_modules=["query"], k=16)``."""


def _check_filter(spectral_filter: object) -> SpectralGradientFilter:
    if not isinstance(spectral_filter, SpectralGradientFilter):
        raise TypeError(f"spectral_filter must be a spectralkern.SpectralGradientFilter, "
                        f"got {type(spectral_filter).__name__}")
    return spectral_filter


def _check_source(spectral_filter: object) -> SpectralGradientFilter | FilterFactory:
    """A built filter, or a factory (any callable that is not a module) that builds one from the trained model."""
    if isinstance(spectral_filter, SpectralGradientFilter) or (
            callable(spectral_filter) and not isinstance(spectral_filter, nn.Module)):
        return spectral_filter
    raise TypeError(f"spectral_filter must be a spectralkern.SpectralGradientFilter or a factory model -> "
                    f"SpectralGradientFilter (e.g. functools.partial(sk.SpectralGradientFilter, "
                    f"target_modules=[...])), got {type(spectral_filter).__name__}")


def _filter_for(source: SpectralGradientFilter | FilterFactory, built: SpectralGradientFilter | None,
                model: nn.Module) -> SpectralGradientFilter:
    """The filter for the model ``train()`` trains: ``built`` (the factory's filter from an earlier call, or the
    filter passed in), else the factory's new one; raises if its targets are not parameters of ``model``."""
    if built is None:
        built = source(model)
        if not isinstance(built, SpectralGradientFilter):
            raise TypeError(f"the spectral_filter factory must return a spectralkern.SpectralGradientFilter, "
                            f"got {type(built).__name__}")
    mine = {id(p) for p in model.parameters()}
    stale = [name for name, p in built.targets if id(p) not in mine]
    if stale:
        raise RuntimeError(f"spectral_filter targets {', '.join(stale)}, which are not parameters of the model the "
                           f"Trainer trains ({type(model).__name__}): the filter was built before the Trainer wrapped "
                           "the model (accelerate's FSDP2 prepare, inside train(), replaces every parameter by a "
                           "sharded DTensor), so it would filter nothing. Pass a factory instead of a built filter; "
                           "it is called on the wrapped model when train() starts: spectral_filter=lambda model: "
                           "sk.SpectralGradientFilter(model, ...)")
    return built


def _adamw_kwargs(args: Any) -> dict[str, Any]:
    """lr, betas, eps and weight_decay of TrainingArguments (none when ``args`` is None: torch's defaults)."""
    if args is None:
        return {}
    return dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                weight_decay=args.weight_decay)


def spectral_adamw(spectral_filter: SpectralGradientFilter, args: Any = None,
                   **overrides: Any) -> tuple[type[SpectralAdamW], dict[str, Any]]:
    """``(SpectralAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The Trainer builds the param groups (weight decay off for biases and norms) and calls
    ``SpectralAdamW(groups, **kwargs)``. lr, betas and eps come from ``args`` (TrainingArguments) when given, else
    torch's AdamW defaults; ``overrides`` win over both. Not for FSDP2, where the Trainer replaces the parameters
    after creating the optimizer (SpectralAdamW raises at its first step): use ``SpectralTrainer`` with a factory.
    """
    kwargs: dict[str, Any] = {"spectral_filter": _check_filter(spectral_filter), **_adamw_kwargs(args)}
    kwargs.update(overrides)
    return SpectralAdamW, kwargs


def _checkpoint_folder(args: Any, state: Any) -> str:
    """The folder the Trainer writes at ``state.global_step`` (``<output_dir>/checkpoint-N``)."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _save_filter(spectral_filter: SpectralGradientFilter, args: Any, state: Any) -> None:
    """on_save: the filter's state into the checkpoint folder the Trainer has just written. The shared file is
    written where the Trainer writes (``args.should_save``: the main process); FSDP2 row shards by every rank."""
    folder = _checkpoint_folder(args, state)
    path = filter_state_path(folder, spectral_filter, args.process_index, args.world_size)
    if os.path.basename(path) != FILTER_STATE_NAME or args.should_save:
        if not os.path.isdir(folder):
            raise RuntimeError(f"the Trainer saved a checkpoint at step {state.global_step}, but {folder} does not "
                               "exist, so the spectral filter's state has nowhere to go (hyperparameter search "
                               "writes into run-* folders, which this integration does not support)")
        save_filter_state(spectral_filter, folder, global_step=state.global_step, rank=args.process_index,
                          world_size=args.world_size)


def _restore_filter(spectral_filter: SpectralGradientFilter, folders: list[str], args: Any, state: Any, *,
                    resume_without_filter_state: bool, how_to_point: str) -> None:
    """on_train_begin of a resumed run: load the filter state saved with the checkpoint the model was loaded from
    (the first of ``folders`` whose file matches the model's weights and the step), or raise."""
    problems = []
    for folder in dict.fromkeys(os.path.abspath(f) for f in folders):
        try:
            saved = read_filter_state(spectral_filter, folder, global_step=state.global_step,
                                      rank=args.process_index, world_size=args.world_size)
        except (FileNotFoundError, ValueError) as problem:
            problems.append(problem)
            continue
        spectral_filter.load_state_dict(saved)
        return
    found = any(not isinstance(p, FileNotFoundError) for p in problems)
    message = (f"the Trainer resumed training at global step {state.global_step}, but "
               f"{'no filter state matches this checkpoint' if found else 'the checkpoint holds no filter state'}: "
               f"{'; '.join(str(p) for p in problems)}. Without it the spectral filter would restart from scratch "
               f"(step count, graphs, bases and W₀ of a fresh filter). {how_to_point}")
    if not resume_without_filter_state:
        raise (ValueError if found else FileNotFoundError)(
            message + "If that is what you want, pass resume_without_filter_state=True")
    warnings.warn(message + "resume_without_filter_state=True: the filter restarts", stacklevel=3)


def _unscale_regularizer(spectral_filter: SpectralGradientFilter, scaler: Any) -> None:
    """fp16 (a GradScaler): before the optimizer step the Trainer has unscaled ``.grad`` (accelerate's
    clip_grad_norm_, for clipping or for the logged norm), but the regulariser's recorded scale still carries the
    loss scale S; divide it too. (Had ``.grad`` not been unscaled, SpectralAdamW would unscale it in
    ``scaler.step`` and leave the regulariser's scale as divided here.)"""
    if scaler is not None and spectral_filter.regularizer_pending and not spectral_filter.regularizer_unscaled:
        spectral_filter.unscale_regularizer_(1.0 / scaler.get_scale())


class SpectralFilterCallback(TrainerCallback):
    """Calls ``spectral_filter.step()`` before every optimizer step of a Trainer (the explicit filter mode), and
    keeps the filter's state in the Trainer's checkpoints.

    ``spectral_filter``: a built SpectralGradientFilter, or a factory ``model -> filter`` called on the trained
    model when ``train()`` starts (needed under FSDP2; the filter is then ``callback.spectral_filter``). A built
    filter whose targets are no longer the model's parameters raises there.

    Checkpoints: every ``checkpoint-N/`` the Trainer writes gets the filter's state (``filter_checkpoint.py``). A
    run resumed with ``train(resume_from_checkpoint=...)`` restores it when training starts, after the factory built
    its filter. The callback does not see the folder passed to ``train()``: it looks in
    ``<output_dir>/checkpoint-<step>`` and in ``TrainingArguments.resume_from_checkpoint``, and takes the file whose
    weight fingerprints match the model just loaded. No match raises (FileNotFoundError when no file exists),
    unless ``resume_without_filter_state=True``: then it warns and the filter restarts.
    """

    def __init__(self, spectral_filter: SpectralGradientFilter | FilterFactory, *,
                 resume_without_filter_state: bool = False):
        self._source = _check_source(spectral_filter)
        self.spectral_filter = spectral_filter if isinstance(spectral_filter, SpectralGradientFilter) else None
        if not isinstance(resume_without_filter_state, bool):
            raise TypeError(f"resume_without_filter_state must be a bool, got {resume_without_filter_state!r}")
        self.resume_without_filter_state = resume_without_filter_state

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        self.spectral_filter = _filter_for(self._source, self.spectral_filter, model)
        if state.global_step > 0:  # train() resumed from a checkpoint
            folders = [_checkpoint_folder(args, state)]
            if isinstance(args.resume_from_checkpoint, str) and os.path.isdir(args.resume_from_checkpoint):
                folders.append(args.resume_from_checkpoint)
            _restore_filter(self.spectral_filter, folders, args, state,
                            resume_without_filter_state=self.resume_without_filter_state,
                            how_to_point="If you resumed from a folder outside output_dir, also set "
                                         "TrainingArguments(resume_from_checkpoint=<that folder>), or use "
                                         "SpectralTrainer, which sees the folder train() resumes from. ")
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        wrapper = kwargs.get("optimizer")
        optimizer = getattr(wrapper, "optimizer", wrapper)  # accelerate wraps the Trainer's optimizer
        if isinstance(optimizer, SpectralAdamW) and optimizer.spectral_filter is self.spectral_filter:
            raise RuntimeError("SpectralFilterCallback and SpectralAdamW share one filter: the gradients would be "
                               "filtered twice. Use either the callback or SpectralAdamW")
        _unscale_regularizer(self.spectral_filter, getattr(wrapper, "scaler", None))
        self.spectral_filter.step()
        return control

    def on_save(self, args, state, control, **kwargs):
        _save_filter(self.spectral_filter, args, state)
        return control


class SpectralTrainer(Trainer):
    """A Trainer with SpectralAdamW as its default optimizer and the joint loss L_task + filt.regularization().

    Args (besides Trainer's): spectral_filter — the SpectralGradientFilter built on ``model``, or a factory
    ``model -> SpectralGradientFilter`` (required under FSDP2). A factory is called once, when ``train()`` starts,
    on the model as the engine wrapped it, and its filter is attached to the Trainer's SpectralAdamW; until then
    ``trainer.spectral_filter`` is None. The filter's reg_weight sets λ (0: no regulariser, only the filtered
    optimizer). With a built filter, an optimizer passed through ``optimizers=`` or ``optimizer_cls_and_kwargs=``
    replaces SpectralAdamW (add ``SpectralFilterCallback`` then); with a factory that raises. Under fp16 the
    regulariser's recorded loss scale is divided when the Trainer unscales the gradients (before the step).

    Checkpoints: every ``checkpoint-N/`` gets the filter's state; ``train(resume_from_checkpoint=...)`` restores it
    from that folder when training starts (after a factory built the filter). A checkpoint without it raises
    FileNotFoundError, unless ``resume_without_filter_state=True`` (a warning; the filter restarts).
    """

    def __init__(self, *args: Any, spectral_filter: SpectralGradientFilter | FilterFactory,
                 resume_without_filter_state: bool = False, **kwargs: Any):
        self._filter_source = _check_source(spectral_filter)
        if not isinstance(resume_without_filter_state, bool):
            raise TypeError(f"resume_without_filter_state must be a bool, got {resume_without_filter_state!r}")
        self.resume_without_filter_state = resume_without_filter_state
        built = spectral_filter if isinstance(spectral_filter, SpectralGradientFilter) else None
        self.spectral_filter: SpectralGradientFilter | None = built
        self._resuming_from: str | None = None  # the checkpoint folder of the train() call in progress
        if kwargs.get("optimizers", (None, None))[0] is None and kwargs.get("optimizer_cls_and_kwargs") is None:
            training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            kwargs["optimizer_cls_and_kwargs"] = (spectral_adamw(built, training_args) if built is not None
                                                  else (SpectralAdamW, _adamw_kwargs(training_args)))
        elif built is None:
            raise ValueError("spectral_filter is a factory, whose filter SpectralTrainer attaches to its own "
                             "SpectralAdamW when train() starts, but an optimizer was passed through optimizers= or "
                             "optimizer_cls_and_kwargs=. Drop that optimizer (set lr, betas, eps and weight_decay in "
                             "TrainingArguments), or use Trainer with SpectralFilterCallback(factory)")
        super().__init__(*args, **kwargs)
        self.add_callback(_AttachSpectralFilter(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """Trainer.train; remembers the checkpoint folder it resumes from (``True``: the last one in output_dir, as
        Trainer resolves it), so that the filter's state is restored from that very folder."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # None: Trainer raises
        self._resuming_from = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._resuming_from = None

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training or self.spectral_filter is None or self.spectral_filter.reg_weight == 0:
            return result
        loss, outputs = result if return_outputs else (result, None)
        regularization = self.spectral_filter.regularization()
        if self._trainer_skips_ga_division(num_items_in_batch):
            # The Trainer will not divide this loss by the accumulation steps, but adds one per micro-batch.
            regularization = regularization / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
        loss = loss + regularization.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _trainer_skips_ga_division(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Mirror of Trainer.training_step's rule: the loss is not divided by the accumulation steps when the model
        normalised it by ``num_items_in_batch`` (it accepts loss kwargs and got the count) or a compute_loss_func
        did; ``loss_is_scaled_for_ga`` overrides both."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)


class _AttachSpectralFilter(TrainerCallback):
    """SpectralTrainer's own callback: when ``train()`` starts (after the engine wrapped the model and prepared the
    optimizer), builds the factory's filter on ``trainer.model`` and attaches it to the SpectralAdamW, or checks
    that a built filter still targets the model's parameters; then restores the filter's state when ``train()``
    resumes. Writes the filter's state into every checkpoint."""

    def __init__(self, trainer: SpectralTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        from_factory = trainer.spectral_filter is None
        trainer.spectral_filter = _filter_for(trainer._filter_source, trainer.spectral_filter, trainer.model)
        if from_factory:
            optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
            optimizer.set_spectral_filter(trainer.spectral_filter)
        if trainer._resuming_from is not None:
            _restore_filter(trainer.spectral_filter, [trainer._resuming_from], args, state,
                            resume_without_filter_state=trainer.resume_without_filter_state, how_to_point="")
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        _unscale_regularizer(self.trainer.spectral_filter, getattr(self.trainer.accelerator, "scaler", None))
        return control

    def on_save(self, args, state, control, **kwargs):
        _save_filter(self.trainer.spectral_filter, args, state)
        return control


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the peft LoRA layers of ``model`` (usable as ``target_modules`` to filter their adapters)."""
    names = [name for name, module in model.named_modules()
             if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and len(module.lora_A)]
    if not names:
        raise ValueError(f"model ({type(model).__name__}) has no peft LoRA layers; wrap it with "
                         "peft.get_peft_model(model, LoraConfig(...)) first")
    return names
