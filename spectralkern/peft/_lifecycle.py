"""The one adapter lifecycle every spectralkern method shares, built on peft's own tuner machinery.

A method (SMoA, FourierFT / FourierMoE, Coeff-Tuning) supplies three classes, like peft's
``tuners/<method>/{config,layer,model}.py``:

* a :class:`SpectralPeftConfig` subclass (its own ``peft_type``, strict loading: unknown fields raise);
* a :class:`SpectralTunerLayer` subclass: the wrapped ``base_layer`` plus one ``nn.ModuleDict`` of per-adapter
  *units* keyed by adapter name (peft's convention), with merge / unmerge / forward over the active adapters;
* a :class:`SpectralTuner` subclass (peft's ``BaseTuner``): which modules it accepts, how it builds one unit for
  one target (``build_unit``) and how it checks saved tensors (``check_saved_tensors``).

:func:`register` puts the method into peft's mappings, so ``get_peft_model``, ``PeftModel.from_pretrained``,
``save_pretrained``, ``set_adapter``, ``disable_adapter``, ``merge_and_unload``, ``unload``, TRL's ``peft_config=``
and Trainer's adapter checkpoints all work unchanged.

What this layer adds on top of peft:

* **validate, then apply.** ``inject_adapter`` resolves every target, checks the base-weight fingerprints stored
  in the config (``base_fingerprints``), reads and checks every saved tensor when the config came from
  ``from_pretrained`` (presence, shape, dtype, finiteness, index ranges) and builds every unit *before* the first
  module is replaced; loading into a merged model is refused. A failed load leaves the model as it was.
* **no silent loss through transformers' save.** The transformers model under a spectralkern adapter gets a
  ``save_pretrained`` that raises (before anything is written) while adapter layers are inside it: its file
  would hold ``...base_layer.weight`` keys that a plain model silently re-initialises.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .._atomic import write_atomically
from .._targets import check_target_modules, find_modules
from ._patching import BaseWeightMismatchError, fingerprint_tensors

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------ config
def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass
class SpectralPeftConfig(PeftConfig):
    """Fields every spectralkern method has (subclasses add their hyper-parameters).

    Args:
        target_modules: peft's rule (see ``spectralkern._targets``): names matched by suffix, or one regex over
            the full module name.
        base_fingerprints: {module name: sha256 of its base weight}, filled in when the adapter is created and
            checked whenever it is loaded (a different base raises ``BaseWeightMismatchError`` naming the layer).
        progress: tqdm bar over the layers while the adapter is set up (None: tqdm's auto-disable when not a
            TTY). Does not change the adapter.
        weights_sha256: digest of the adapter tensors last saved with this config (set by ``save_pretrained``,
            checked at load: a damaged or edited weights file raises instead of loading wrong numbers).
    """
    target_modules: list[str] | str | None = None
    base_fingerprints: dict[str, str] | None = None
    weights_sha256: str | None = None
    progress: bool | None = field(default=None, metadata={"help": "progress bar during setup; no effect on weights"})

    PEFT_TYPE: ClassVar[str] = ""
    #: False for methods where target_modules=None means "every module the method accepts"
    requires_targets: ClassVar[bool] = True
    # Set by from_pretrained (never saved): the weights file next to the config, checked before injection.
    _weights_file: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft_type not in (None, self.PEFT_TYPE):
            raise ValueError(f"peft_type {self.peft_type!r} does not belong to {type(self).__name__} "
                             f"(expected {self.PEFT_TYPE!r})")
        self.peft_type = self.PEFT_TYPE
        if self.target_modules is None:
            if self.requires_targets:
                raise ValueError(f"{type(self).__name__} needs target_modules (module-name suffixes or a regex); "
                                 "spectralkern has no per-architecture defaults")
        else:
            self.target_modules = check_target_modules(self.target_modules)
        if self.base_fingerprints is not None:
            if (not isinstance(self.base_fingerprints, Mapping)
                    or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.base_fingerprints.items())):
                raise TypeError("base_fingerprints must map module names to sha256 hex strings, got "
                                f"{self.base_fingerprints!r}")
            self.base_fingerprints = dict(self.base_fingerprints)
            damaged = {k: v for k, v in self.base_fingerprints.items() if not _is_sha256(v)}
            if damaged:
                name, value = next(iter(damaged.items()))
                raise ValueError(f"base_fingerprints[{name!r}] = {value!r} is not a sha256 digest (64 lowercase hex "
                                 "digits): damaged or edited adapter config")
        if self.weights_sha256 is not None and not isinstance(self.weights_sha256, str):
            raise TypeError(f"weights_sha256 must be a hex string or None, got {self.weights_sha256!r}")
        if self.weights_sha256 is not None and not _is_sha256(self.weights_sha256):
            raise ValueError(f"weights_sha256 = {self.weights_sha256!r} is not a sha256 digest (64 lowercase hex "
                             "digits): damaged or edited adapter config")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True, False or None, got {self.progress!r}")

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> SpectralPeftConfig:
        """Strict: a field this version does not know, or another method's ``peft_type``, raises ValueError."""
        peft_type = kwargs.get("peft_type", cls.PEFT_TYPE)
        if peft_type != cls.PEFT_TYPE:
            raise ValueError(f"the adapter config has peft_type {peft_type!r}; {cls.__name__} reads "
                             f"{cls.PEFT_TYPE!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"the {cls.__name__} adapter config has fields this spectralkern does not know: "
                             f"{unknown} (written by a newer version?); refusing to load it partly")
        return cls(**kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """peft's ``adapter_config.json``, replaced atomically: a failure half-way leaves the previous config (and
        the weights digest it records) as it was, never a truncated file."""
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".adapter_config.") as staging:
            super().save_pretrained(staging, **kwargs)
            written = os.path.join(staging, ADAPTER_CONFIG_NAME)
            write_atomically(os.path.join(save_directory, ADAPTER_CONFIG_NAME),
                             lambda temp: shutil.copyfile(written, temp))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        **kwargs: Any) -> SpectralPeftConfig:
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        weights = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
        # Local folders only: their tensors are checked against the model before anything is replaced.
        object.__setattr__(config, "_weights_file", weights if os.path.isfile(weights) else None)
        return config


# ------------------------------------------------------------------------------------------ layer
class SpectralTunerLayer(nn.Module, BaseTunerLayer):
    """A target module wrapped by a spectralkern method: ``base_layer`` + ``<adapter_attr>[adapter name]``.

    Subclasses set ``adapter_attr`` and implement ``forward``, ``merge``, ``unmerge``.
    """
    adapter_attr: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module, adapter_name: str, unit: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.add_module(self.adapter_attr, nn.ModuleDict())
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.train(base_layer.training)  # follow the model's mode (a new module starts in training mode)
        self.add_unit(adapter_name, unit)

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.adapter_attr,)

    @property
    def units(self) -> nn.ModuleDict:
        return getattr(self, self.adapter_attr)

    @property
    def active_unit(self) -> nn.Module:
        """The first active adapter's unit: the one piece single-adapter users (benchmarks, tests) reach into."""
        return self.units[self.active_adapters[0]]

    def add_unit(self, adapter_name: str, unit: nn.Module) -> None:
        if adapter_name in self.units:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        unit.train(self.training)
        self.units[adapter_name] = unit
        self.set_adapter(self.active_adapters)  # only the active adapters train (peft's convention)

    def active_units(self) -> list[nn.Module]:
        """The units of the active adapters present on this layer (empty when adapters are disabled)."""
        if self.disable_adapters:
            return []
        return [self.units[name] for name in self.active_adapters if name in self.units]

    def adapters_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.units]
        if unknown:
            raise ValueError(f"adapters {unknown} do not exist on this layer; it has {list(self.units)}")
        return [n for n in names if n not in self.merged_adapters]

    def check_mergeable(self, name: str) -> None:
        """Raise (with the reason) when this layer's adapters cannot be folded into the base weights."""

    @classmethod
    def wrap(cls, base_layer: nn.Module, adapter_name: str, unit: nn.Module) -> SpectralTunerLayer:
        """The tuner layer around ``base_layer`` holding one adapter ``unit`` (what the tuner calls; methods whose
        layers need more set-up override it)."""
        return cls(base_layer, adapter_name, unit)


# ------------------------------------------------------------------------------------------ tuner
class SpectralTuner(BaseTuner):
    """peft ``BaseTuner`` for a spectralkern method; see the module docstring for what it adds."""
    tuner_layer_cls: type[SpectralTunerLayer]
    config_cls: ClassVar[type[SpectralPeftConfig]]
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}
    #: what the method adapts, for error messages ("nn.Linear or transformers Conv1D")
    accepts_what: ClassVar[str] = ""

    # -------------------------------------------------------------- per-method hooks
    @staticmethod
    def accepts(module: nn.Module) -> bool:
        raise NotImplementedError

    def build_unit(self, config: SpectralPeftConfig, name: str, base: nn.Module,
                   saved: dict[str, torch.Tensor] | None) -> nn.Module:
        """One adapter unit for the target ``name`` (base module ``base``); ``saved``: its checked tensors
        (unit-relative keys) when loading, else None (fresh init)."""
        raise NotImplementedError

    @classmethod
    def check_saved_tensors(cls, config: SpectralPeftConfig, name: str, base: nn.Module,
                            tensors: Mapping[str, torch.Tensor]) -> None:
        """Method-specific checks of one layer's saved tensors (unit-relative keys) before a unit is built from
        them: index ranges, permutations, ... (presence, shape, dtype, finiteness are checked generically after).
        Raise ValueError / TypeError."""

    @staticmethod
    def fingerprint(base: nn.Module) -> str:
        """sha256 of the base module's weights (the adapter's anchors / the weights it was trained against)."""
        return fingerprint_tensors({"weight": base.weight})

    # -------------------------------------------------------------- peft hooks
    def _check_target_module_exists(self, peft_config: PeftConfig, key: str) -> bool:  # type: ignore[override]
        # the targets were resolved (by the one rule, spectralkern._targets) and built before injection
        return key in self._pending_units

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        return peft_config

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        attr = cls.tuner_layer_cls.adapter_attr
        return key.replace(f".{attr}.{adapter_name}.", f".{attr}.", 1)

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor], unwanted_adapter_names: list[str]
                                ) -> dict[str, torch.Tensor]:
        """peft's selection; records the digest of what is saved in the config (peft writes the config after the
        weights, so the file and its digest travel together)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        config.weights_sha256 = cls._digest({cls._remove_adapter_name_from_key(k, adapter_name): v
                                             for k, v in selected.items()})
        return selected

    @classmethod
    def _digest(cls, checkpoint_tensors: Mapping[str, torch.Tensor]) -> str:
        """sha256 of this method's tensors in a checkpoint-keyed state dict (``base_model.model.`` stripped)."""
        attr = f".{cls.tuner_layer_cls.adapter_attr}."
        return fingerprint_tensors({k.removeprefix(PEFT_PREFIX): v for k, v in checkpoint_tensors.items()
                                    if attr in k})

    @classmethod
    def _check_digest(cls, config: PeftConfig, checkpoint_tensors: Mapping[str, torch.Tensor], where: str) -> None:
        if config.weights_sha256 is not None and cls._digest(checkpoint_tensors) != config.weights_sha256:
            raise ValueError(f"{where}: the adapter tensors do not match the weights_sha256 recorded in "
                             "adapter_config.json when they were saved (damaged or edited file)")

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's key remapping, then every tensor of this adapter checked (presence, shape, dtype, finiteness,
        the method's index ranges) before peft copies anything into the model. (The digest is checked where the
        file's own config is known: :func:`load` and ``from_pretrained``; here ``config`` is the in-memory one.)"""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        attr = cls.tuner_layer_cls.adapter_attr
        marker = f".{attr}.{adapter_name}."
        model_state = model.state_dict()
        layers = layers_of(model, cls.tuner_layer_cls)
        merged = [name for name, layer in layers.items() if layer.merged]
        if merged:  # the new tensors would not match what is folded into the base weights
            raise ValueError(f"the model has merged adapter layers {merged[:4]}; unmerge_adapter() before loading "
                             f"adapter {adapter_name!r}")
        for layer_name, layer in layers.items():
            if adapter_name not in layer.units:
                continue
            head = f"{layer_name}{marker}"
            expected = {k[len(head):]: v for k, v in model_state.items() if k.startswith(head)}
            found = {k[len(head):]: v for k, v in remapped.items() if k.startswith(head)}
            what = f"adapter {adapter_name!r}, layer {layer_name!r}"
            try:
                cls.check_saved_tensors(config, layer_name, layer.get_base_layer(), found)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{what}: {exc}") from None
            _check_tensors_match(expected, found, what=what)
        stray = [k for k in remapped if f".{attr}." in k and marker not in k]
        if stray:
            raise ValueError(f"adapter {adapter_name!r}: the file has tensors for no layer of this model, e.g. "
                             f"{stray[:3]}")
        return remapped

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for name, module in self.model.named_modules():
            if isinstance(module, self.tuner_layer_cls):
                module.check_mergeable(name)

    def _create_and_replace(self, peft_config: PeftConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: str | None = None) -> None:
        unit = self._pending_units.pop(current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.add_unit(adapter_name, unit)
            return
        self._replace_module(parent, target_name, self.tuner_layer_cls.wrap(target, adapter_name, unit), target)

    def _post_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        _guard_transformers_save(model)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Check everything and build every unit first, then let peft replace the modules."""
        config = self.peft_config[adapter_name]
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        if state_dict is not None or low_cpu_mem_usage:
            raise ValueError(f"{type(self).__name__} builds its layers from the config and the base weights; "
                             "state_dict= and low_cpu_mem_usage=True injection are not supported")
        merged = [n for n, m in model.named_modules() if isinstance(m, SpectralTunerLayer) and m.merged]
        if merged:
            raise ValueError(f"the model has merged adapter layers {merged[:4]}; unmerge them "
                             "(peft_model.unmerge_adapter()) before adding or loading an adapter")
        targets = self._resolve_targets(model, config)
        fingerprints = {name: self.fingerprint(_base_of(module)) for name, module in targets}
        _check_fingerprints(config, fingerprints)
        saved = _read_saved_file(self, config, targets)
        self._pending_units = self._build_units(config, targets, saved)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=False, state_dict=None)
        finally:
            leftover, self._pending_units = self._pending_units, {}
        if leftover:  # peft's own matching disagreed with ours; cannot happen with the shared rule
            raise RuntimeError(f"targets {sorted(leftover)} were resolved but not injected")
        if config.base_fingerprints is None:
            config.base_fingerprints = fingerprints
        object.__setattr__(config, "_weights_file", None)

    # -------------------------------------------------------------- helpers
    def _resolve_targets(self, model: nn.Module, config: SpectralPeftConfig) -> list[tuple[str, nn.Module]]:
        inside = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}

        def accept(module: nn.Module) -> bool:
            return isinstance(module, self.tuner_layer_cls) or self.accepts(module)

        if config.target_modules is None:  # every module the method accepts
            found = [(n, m) for n, m in model.named_modules() if n and accept(m)]
            if not found:
                raise ValueError(f"{type(model).__name__} has no module {type(self).__name__} can adapt "
                                 f"({self.accepts_what})")
        else:
            found = find_modules(model, config.target_modules, accept=accept, what=self.accepts_what)
        # leave out what lives inside an existing tuner layer (its base_layer and units)
        return [(n, m) for n, m in found if not any(n.startswith(p + ".") for p in inside)]

    def _build_units(self, config: SpectralPeftConfig, targets: list[tuple[str, nn.Module]],
                     saved: dict[str, dict[str, torch.Tensor]] | None) -> dict[str, nn.Module]:
        from tqdm.auto import tqdm

        start = time.perf_counter()
        units = {}
        disable = None if config.progress is None else not config.progress
        for name, module in tqdm(targets, desc=f"{type(self).__name__} layers", disable=disable, leave=False):
            base = _base_of(module)
            tensors = None if saved is None else saved[name]
            where = f"layer {name!r}" if config._weights_file is None else f"{config._weights_file}: layer {name!r}"
            try:
                if tensors is not None:
                    self.check_saved_tensors(config, name, base, tensors)
                unit = self.build_unit(config, name, base, tensors)
                if tensors is not None:
                    _check_tensors_match(unit.state_dict(), tensors)
                    unit.load_state_dict(tensors)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{where}: {exc}") from None
            units[name] = unit
        logger.info("%s: %d layers set up in %.2f s", type(self).__name__, len(units), time.perf_counter() - start)
        return units


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


# ------------------------------------------------------------------------------------------ checks
def _check_fingerprints(config: SpectralPeftConfig, fingerprints: dict[str, str]) -> None:
    stored = config.base_fingerprints
    if stored is None:
        return
    if set(stored) != set(fingerprints):
        raise ValueError(f"the adapter was made for layers {sorted(stored)}; target_modules selects "
                         f"{sorted(fingerprints)} in this model")
    for name in sorted(stored):
        if stored[name] != fingerprints[name]:
            raise BaseWeightMismatchError(
                f"layer {name!r}: its base weight differs from the one the adapter was trained on (fingerprint "
                f"{fingerprints[name][:12]}… vs {stored[name][:12]}… in the adapter config); load the adapter onto "
                "the base model it was trained on")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).removeprefix('torch.')}"


def _check_tensors_match(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], *,
                         what: str = "") -> None:
    """Every expected key present with the same shape and dtype, nothing extra, floats finite. ``what`` prefixes
    the messages."""
    what = f"{what}" if what else ""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{what}the adapter file lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{what}the adapter file has tensors the adapter does not, e.g. {extra[:3]}")
    for key in sorted(expected):
        want, got = expected[key], found[key]
        if not isinstance(got, torch.Tensor):
            raise TypeError(f"{what}{key} is a {type(got).__name__}, expected a tensor")
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ValueError(f"{what}{key} has {_describe(got)} in the file; expected {_describe(want)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise ValueError(f"{what}{key} holds {bad} NaN/Inf value(s)")


def _read_saved_file(tuner: SpectralTuner, config: SpectralPeftConfig, targets: list[tuple[str, nn.Module]]
                     ) -> dict[str, dict[str, torch.Tensor]] | None:
    """{layer name: {unit key: tensor}} from the config's weights file (checked by _build_units); None without
    a file. Every tensor must belong to a targeted layer."""
    initial = getattr(config, "_initial_tensors", None)
    if initial is not None:  # a conversion hands its tensors over directly (see fourier_moe/conversion.py)
        unknown = sorted(set(initial) - {name for name, _ in targets})
        if unknown or len(initial) != len(targets):
            raise ValueError(f"initial tensors for layers {sorted(initial)} do not match the targets "
                             f"{[name for name, _ in targets]}")
        object.__setattr__(config, "_initial_tensors", None)
        return initial
    path = config._weights_file
    if path is None:
        return None
    tensors = read_safetensors(path)
    type(tuner)._check_digest(config, tensors, path)
    attr = tuner.tuner_layer_cls.adapter_attr
    per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name, _ in targets}
    for key, value in tensors.items():
        core = key.removeprefix(PEFT_PREFIX)
        layer, sep, rest = core.partition(f".{attr}.")
        if not sep or layer not in per_layer:
            raise ValueError(f"{path}: tensor {key!r} belongs to no targeted layer of this model "
                             f"(targets: {sorted(per_layer)[:4]}...)")
        per_layer[layer][rest] = value
    return per_layer


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; any unreadable file raises ValueError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError on a damaged file
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None


# ------------------------------------------------------------------------------------------ transformers save
class _RefusingSave:
    """Stands in for a transformers model's ``save_pretrained`` while spectralkern layers are inside it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layers = [n for n, m in self.model.named_modules() if isinstance(m, SpectralTunerLayer)]
        if layers:
            raise ValueError(
                f"{type(self.model).__name__} holds spectralkern adapter layers ({layers[0]!r} and "
                f"{len(layers) - 1} more); its save_pretrained would write '{layers[0]}.base_layer.weight', which a "
                "plain model reloads as missing and re-initialises randomly. Save the adapter with "
                "peft_model.save_pretrained(dir) (reload: PeftModel.from_pretrained(base, dir)), or save "
                "peft_model.merge_and_unload() (mergeable methods) as a plain model. Nothing was written.")
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def _guard_transformers_save(model: nn.Module) -> None:
    if callable(getattr(type(model), "save_pretrained", None)) and not isinstance(
            model.__dict__.get("save_pretrained"), _RefusingSave):
        object.__setattr__(model, "save_pretrained", _RefusingSave(model))


# ------------------------------------------------------------------------------------------ registration, load
_REGISTERED: dict[str, type[SpectralTuner]] = {}


def register(tuner_cls: type[SpectralTuner]) -> None:
    """Put a method into peft's mappings (config, tuner, prefix), keyed by its string ``peft_type``.

    peft's ``register_peft_method`` insists on a member of its ``PeftType`` enum, which third-party methods cannot
    add; the mappings it fills are the public ``peft.mapping`` dicts, and peft ≥ 0.21 dispatches saving and loading
    through them for any key (string ``peft_type`` values are supported since peft 0.17).
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = tuner_cls.config_cls.PEFT_TYPE
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type, tuner_cls) is not tuner_cls:
        raise KeyError(f"peft already has a method called {peft_type!r}")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = tuner_cls.config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner_cls.prefix
    _REGISTERED[peft_type] = tuner_cls


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The JSON object in ``path/adapter_config.json``; a missing / unreadable / non-object file raises."""
    file = os.path.join(os.fspath(path), ADAPTER_CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file!r} does not exist (save adapters with peft_model.save_pretrained(dir))")
    try:
        with open(file, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file!r} must hold a JSON object, got {type(data).__name__}")
    return data


def load(model: nn.Module, path: str | os.PathLike, *, config_cls: type[SpectralPeftConfig] | None = None,
         adapter_name: str = "default", is_trainable: bool = False) -> nn.Module:
    """Load a spectralkern adapter folder into ``model``: validate everything, then apply.

    ``model``: a plain torch / transformers model (returns the ``PeftModel`` that wraps it) or a ``PeftModel``
    (the adapter is added under ``adapter_name``, or replaces that adapter's weights; returns ``model``).
    ``config_cls``: the method the folder must hold (None: any spectralkern method).

    Raises:
        ValueError / TypeError: the folder holds another method, an unknown config field or value, a tensor
            missing / extra / of the wrong shape or dtype / non-finite / out of range, or the model is merged.
        BaseWeightMismatchError (a ValueError): the base weights differ from those the adapter was trained on.
        FileNotFoundError: no adapter_config.json / adapter_model.safetensors in ``path``.
    On any error the model is left exactly as it was.
    """
    from peft import PeftModel

    path = os.fspath(path)
    data = read_adapter_config(path)
    peft_type = data.get("peft_type")
    if peft_type not in _REGISTERED:
        raise ValueError(f"{path!r} holds a {peft_type!r} adapter, not a spectralkern one "
                         f"({sorted(_REGISTERED)})")
    cls = _REGISTERED[peft_type].config_cls
    if config_cls is not None and cls is not config_cls:
        raise ValueError(f"{path!r} holds a {cls.__name__} adapter ({peft_type}); expected a {config_cls.__name__}")
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS_NAME)):
        raise FileNotFoundError(f"{os.path.join(path, ADAPTER_WEIGHTS_NAME)!r} does not exist")
    loaded = cls.from_pretrained(path)  # config errors surface here, before the model is looked at
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            # replacing an adapter's weights: peft loads into the existing layers after our checks
            _check_existing(model, path, adapter_name, loaded)
        model.load_adapter(path, adapter_name, is_trainable=is_trainable)
        return model
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable)


def _check_existing(model: nn.Module, path: str, adapter_name: str, loaded: SpectralPeftConfig) -> None:
    """Before weights are loaded into an existing adapter: not merged, same method, same base, intact file."""
    merged = [n for n, m in model.named_modules() if isinstance(m, SpectralTunerLayer) and m.merged]
    if merged:
        raise ValueError(f"the model has merged adapter layers {merged[:4]}; unmerge_adapter() before loading")
    config = model.peft_config[adapter_name]
    if type(loaded) is not type(config):
        raise ValueError(f"adapter {adapter_name!r} is a {type(config).__name__}; {path!r} holds a "
                         f"{type(loaded).__name__}")
    tuner_cls = _REGISTERED[loaded.PEFT_TYPE]
    tuner_cls._check_digest(loaded, read_safetensors(loaded._weights_file), loaded._weights_file)
    base = model.get_base_model()
    fingerprints = {name: tuner_cls.fingerprint(layer.get_base_layer())
                    for name, layer in layers_of(base, tuner_cls.tuner_layer_cls).items()
                    if adapter_name in layer.units}
    _check_fingerprints(loaded, fingerprints)


def layers_of(model: nn.Module, layer_cls: type[SpectralTunerLayer] = SpectralTunerLayer
              ) -> dict[str, SpectralTunerLayer]:
    """{full module name: tuner layer} of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, layer_cls)}


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The parameters of spectralkern adapter units in ``model`` (one adapter, or all), each once."""
    seen: dict[int, nn.Parameter] = {}
    for layer in layers_of(model).values():
        for name, unit in layer.units.items():
            if adapter_name is None or name == adapter_name:
                for p in unit.parameters():
                    seen.setdefault(id(p), p)
    return list(seen.values())



def parameter_count(model: nn.Module, adapter_name: str | None = None) -> int:
    """Trainable-kind parameters of the spectralkern adapters in ``model`` (one adapter, or all), each once."""
    return sum(p.numel() for p in adapter_parameters(model, adapter_name))


def apply(model: nn.Module, config: SpectralPeftConfig, *, adapter_name: str = "default") -> nn.Module:
    """Inject an adapter into ``model`` in place, without a ``PeftModel`` around it (like peft's
    ``inject_adapter_in_model``): only adapters train afterwards (adapters already there, e.g. LoRA, keep
    training). A ``PeftModel`` is adapted inside (its base model). Save adapters the peft way instead:
    ``get_peft_model(base, config)`` then ``save_pretrained``."""
    from peft import PeftModel

    if not isinstance(config, SpectralPeftConfig):
        raise TypeError(f"config must be a spectralkern adapter config, got {type(config).__name__}")
    target = model.get_base_model() if isinstance(model, PeftModel) else model
    # a model holding another method's layers carries that method's peft_config dict; keep ours out of it
    other = target.__dict__.pop("peft_config", None)
    try:
        _REGISTERED[config.PEFT_TYPE](target, config, adapter_name)
    finally:
        if other is not None:
            target.__dict__["peft_config"] = other
    return model
