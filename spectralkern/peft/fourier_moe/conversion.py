"""peft's FourierFT → spectralkern's FourierFT, reading the whole peft config (anything unknown raises).

peft computes ΔW = scaling · Re(ifft2(S, norm)) for a real spectrum S with entries s_j at ``indices`` (drawn with
``torch.randperm`` seeded by ``random_loc_seed``); that is

    ΔW[p, q] = scaling · a · Σ_j s_j · cos(2π(u_j p/M + v_j q/N)),   a = 1/(MN) ("backward", peft's default),
                                                                      1/√(MN) ("ortho"), 1 ("forward"),

i.e. our layer with real coefficients c_j = s_j (no ``coef_im``), amplitude a and the same positions (any
positions, mirrored pairs included: the op sums whatever it is given). ``ifft2_norm`` is read when the installed
peft has it (absent means "backward").
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .._patching import is_transposed, linear_features
from .config import FourierFTConfig
from .frequencies import FrequencyLayout
from .layer import FourierFTLinear, new_adapter

#: ifft2 normalisations and the amplitude each gives a coefficient of an M × N spectrum
IFFT2_AMPLITUDE = {"backward": lambda m, n: 1.0 / (m * n), "ortho": lambda m, n: 1.0 / math.sqrt(m * n),
                   "forward": lambda m, n: 1.0}
#: peft FourierFTConfig fields whose every value this conversion reproduces (or that only say which layers
#: were adapted, which the model itself shows)
_READ_FIELDS = {"n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out", "target_modules", "exclude_modules",
                "layers_to_transform", "layers_pattern", "init_weights", "ifft2_norm", "bias", "modules_to_save",
                "n_frequency_pattern"}
#: PeftConfig's own bookkeeping fields
_PEFT_BOOKKEEPING = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                     "revision", "inference_mode"}


def ifft2_amplitude(norm: str, out_features: int, in_features: int) -> float:
    """The amplitude of one spectrum entry in ``torch.fft.ifft2(·, norm=norm)`` of an out × in grid."""
    if norm not in IFFT2_AMPLITUDE:
        raise ValueError(f"ifft2_norm must be one of {sorted(IFFT2_AMPLITUDE)}, got {norm!r}")
    return IFFT2_AMPLITUDE[norm](out_features, in_features)


def _is_peft_fourierft(layer: nn.Module) -> bool:
    return all(hasattr(layer, attr) for attr in ("fourierft_spectrum", "indices", "fourierft_scaling",
                                                 "get_base_layer"))


def check_peft_config(config: object) -> str:
    """Check that every field of a peft ``FourierFTConfig`` is one this conversion reproduces; returns the
    ifft2 normalisation. Raises ValueError naming any unknown field (set to a non-default value) or value."""
    if not dataclasses.is_dataclass(config) or type(config).__name__ != "FourierFTConfig":
        raise TypeError(f"config must be peft's FourierFTConfig, got {type(config).__name__}")
    for f in dataclasses.fields(config):
        if f.name in _READ_FIELDS or f.name in _PEFT_BOOKKEEPING:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if getattr(config, f.name) != default:
            raise ValueError(f"peft FourierFTConfig field {f.name!r} = {getattr(config, f.name)!r} is unknown to "
                             "spectralkern's conversion; refusing to convert (the result could differ)")
    if config.bias != "none":
        raise ValueError(f"peft FourierFTConfig bias = {config.bias!r}: spectralkern's FourierFT has no trainable "
                         "biases, so saving the converted adapter would drop the trained biases; only 'none' converts")
    if config.modules_to_save:
        raise ValueError(f"peft FourierFTConfig modules_to_save = {config.modules_to_save!r}: fully trained modules "
                         "are not part of a spectralkern adapter; only None converts")
    if config.n_frequency_pattern and any(v != config.n_frequency for v in config.n_frequency_pattern.values()):
        raise ValueError(f"peft FourierFTConfig n_frequency_pattern = {config.n_frequency_pattern!r} gives layers "
                         "different n; spectralkern's FourierFT has one n_frequencies per adapter")
    norm = getattr(config, "ifft2_norm", None)
    norm = "backward" if norm is None else norm
    ifft2_amplitude(norm, 1, 1)  # validates the value
    return norm


def converted_tensors(layer: nn.Module, adapter_name: str, config: object) -> dict[str, torch.Tensor]:
    """The tensors of our FourierFT unit equivalent to one peft FourierFT layer's adapter (checked)."""
    norm = check_peft_config(config)
    if not _is_peft_fourierft(layer):
        raise TypeError(f"layer must be a peft FourierFTLinear, got {type(layer).__name__}")
    if adapter_name not in layer.fourierft_spectrum:
        raise ValueError(f"adapter_name must be one of the layer's adapters {list(layer.fourierft_spectrum)}, got "
                         f"{adapter_name!r}")
    if adapter_name in getattr(layer, "merged_adapters", []):
        raise ValueError("the peft FourierFT adapter is merged into its base weights; unmerge it first")
    base = layer.get_base_layer()
    if bool(getattr(layer, "fan_in_fan_out", False)) != is_transposed(base):
        stored = "(in, out)" if is_transposed(base) else "(out, in)"
        raise ValueError(f"fan_in_fan_out = {layer.fan_in_fan_out} does not match the base layer "
                         f"({type(base).__name__} stores its weight {stored})")
    in_features, out_features = linear_features(base)
    indices = layer.indices[adapter_name].to(torch.int64).cpu()
    n = indices.shape[1]
    seed = layer.fourierft_random_loc_seed[adapter_name]
    if seed != config.random_loc_seed:
        raise ValueError(f"the layer's random_loc_seed {seed} differs from the config's {config.random_loc_seed}")
    expected = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    if not torch.equal(indices[0] * in_features + indices[1], expected):
        raise ValueError(f"the layer's frequency indices are not the ones random_loc_seed = {seed} gives")
    scaling = float(layer.fourierft_scaling[adapter_name])
    if scaling != float(config.scaling):
        raise ValueError(f"the layer's scaling {scaling} differs from the config's {config.scaling}")
    spectrum = layer.fourierft_spectrum[adapter_name].detach()
    amplitude = ifft2_amplitude(norm, out_features, in_features)
    return {"rows": indices[0].to(torch.int32), "cols": indices[1].to(torch.int32),
            "expert_ptr": torch.tensor([0, n], dtype=torch.int32),
            "amplitude": torch.full((n,), amplitude, dtype=torch.float32),
            "coef_re": spectrum.to(torch.float32).cpu().clone()}


def from_peft_fourierft(layer: nn.Module, adapter_name: str | None = None, *, config: object | None = None,
                        impl: str = "fused") -> FourierFTLinear:
    """One peft ``FourierFTLinear`` as our ``FourierFTLinear`` (same outputs and gradients; the base layer is
    shared, the spectrum copied). ``config``: the peft FourierFTConfig it was made with (None: peft's defaults
    with the layer's own scaling, seed and n)."""
    if not _is_peft_fourierft(layer):
        raise TypeError(f"layer must be a peft FourierFTLinear, got {type(layer).__name__}")
    names = list(layer.fourierft_spectrum.keys())
    name = adapter_name if adapter_name is not None else next(
        (a for a in getattr(layer, "active_adapters", []) if a in names), names[0] if names else None)
    if config is None:
        from peft import FourierFTConfig as PeftFourierFTConfig

        config = PeftFourierFTConfig(n_frequency=layer.fourierft_n_frequency.get(name, 1000),
                                     scaling=layer.fourierft_scaling.get(name, 150.0),
                                     random_loc_seed=layer.fourierft_random_loc_seed.get(name, 777),
                                     fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)))
    tensors = converted_tensors(layer, name, config)
    base = layer.get_base_layer()
    unit = new_adapter(base, FrequencyLayout(tensors["rows"], tensors["cols"], tensors["expert_ptr"],
                                             tensors["amplitude"]),
                       scale=float(config.scaling), complex_coefficients=False, impl=impl)
    with torch.no_grad():
        unit.coef_re.copy_(tensors["coef_re"].to(unit.coef_re.device))
    unit.coef_re.requires_grad_(layer.fourierft_spectrum[name].requires_grad)
    return FourierFTLinear.wrap(base, "default", unit)


def from_peft_fourierft_model(peft_model: nn.Module, adapter_name: str | None = None, *,
                              impl: str = "fused") -> nn.Module:
    """A peft ``PeftModel`` with a FourierFT adapter → a ``PeftModel`` with spectralkern's FourierFT (same outputs).

    Everything is read and checked first (the whole peft config, every layer); then peft's layers are unloaded
    from the (shared) base model and ours injected with the converted tensors. Save the result with
    ``save_pretrained``; it reloads with ``PeftModel.from_pretrained``.
    """
    from peft import get_peft_model

    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise TypeError(f"peft_model must be a peft PeftModel, got {type(peft_model).__name__}")
    name = adapter_name if adapter_name is not None else peft_model.active_adapter
    if name not in configs:
        raise ValueError(f"adapter_name must be one of {list(configs)}, got {name!r}")
    if len(configs) != 1:
        raise ValueError(f"the model holds adapters {list(configs)}; convert a model with one adapter")
    config = configs[name]
    check_peft_config(config)
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if _is_peft_fourierft(m)}
    if not layers:
        raise ValueError(f"{type(peft_model).__name__} holds no peft FourierFT layer to convert")
    tensors = {n: converted_tensors(m, name, config) for n, m in layers.items()}
    sizes = {t["rows"].numel() for t in tensors.values()}
    ours = FourierFTConfig(n_frequencies=sizes.pop(), scale=float(config.scaling), init="zeros",
                           target_modules="|".join(n.replace(".", r"\.") for n in layers), impl=impl,
                           complex_coefficients=False, positions="saved", task_type=config.task_type)
    object.__setattr__(ours, "_initial_tensors", tensors)
    base = peft_model.unload()
    return get_peft_model(base, ours)
