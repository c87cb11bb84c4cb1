"""Model-patching helpers shared by every adapter in ``spectralkern.peft``.

An adapter method (SMoA, FourierMoE, ...) uses these to

1. find the layers to adapt: :func:`find_target_modules` (peft's name-suffix rule, or a regex);
2. treat ``nn.Linear`` and HF GPT-2's ``Conv1D`` (weight stored in × out) alike: :func:`is_linear_like`,
   :func:`linear_features`, :func:`linear_weight` (always an (out, in) *view*, so in-place merges write
   through to the stored weight);
3. swap a module for its adapted wrapper: :func:`replace_module`;
4. train only the adapter: :func:`freeze_all_except`, then report with :func:`trainable_parameters`;
5. save / load the adapter state with safetensors, tagged with a fingerprint of the base weights it was
   trained on (:func:`fingerprint_tensors`, :func:`save_adapter_file`, :func:`load_adapter_file`), so that
   loading onto a different base model fails loudly instead of silently producing garbage.

Nothing here knows about a particular adapter; the metadata keys below are the file format.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# safetensors metadata keys (string → string). FORMAT_VERSION changes when the layout of a file changes.
META_METHOD = "spectralkern.method"
META_FINGERPRINT = "spectralkern.base_fingerprint"
META_CONFIG = "spectralkern.config"
META_FORMAT = "spectralkern.format_version"
FORMAT_VERSION = "1"


class BaseWeightMismatchError(ValueError):
    """The adapter file was trained on other base weights than the model it is being loaded into."""


# ------------------------------------------------------------------------------------------ Linear-like layers
def _is_hf_conv1d(module: nn.Module) -> bool:
    # Checked by class name and attributes so transformers stays an optional dependency.
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and subclasses) and HF ``Conv1D`` (GPT-2's Linear with a transposed weight)."""
    return isinstance(module, nn.Linear) or _is_hf_conv1d(module)


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as (in, out) — HF ``Conv1D`` (peft calls it fan_in_fan_out)."""
    return _is_hf_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_hf_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"module must be nn.Linear or transformers Conv1D, got {type(module).__name__}")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear-like module as an (out, in) tensor that shares storage with the parameter.

    For ``Conv1D`` this is ``weight.T`` (a view): ``linear_weight(m).add_(delta)`` updates the stored weight.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_hf_conv1d(module):
        return module.weight.T
    raise TypeError(f"module must be nn.Linear or transformers Conv1D, got {type(module).__name__}")


# ------------------------------------------------------------------------------------------ finding targets
def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):  # peft: a single string is a regex over the full module name
        return re.fullmatch(targets, name) is not None
    return any(name == key or name.endswith("." + key) for key in targets)


def linear_like_names(model: nn.Module) -> list[str]:
    """Full names of every Linear-like module in ``model``."""
    return [name for name, module in model.named_modules() if name and is_linear_like(module)]


def find_target_modules(model: nn.Module, target_modules: str | Sequence[str], *,
                        accept: Callable[[nn.Module], bool] = is_linear_like,
                        what: str = "nn.Linear or transformers Conv1D",
                        skip: Callable[[nn.Module], bool] | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` selected by ``target_modules``, in ``named_modules`` order.

    Args:
        model: any torch module (an HF transformers model included).
        target_modules: a list of names, each matching a module whose full name equals it or ends with
            ``"." + name`` (``["query", "value"]``, ``["attn.c_attn"]``), or one string used as a regex that
            must match the full name (``r".*\\.layer\\.0\\..*query"``) — peft's rule.
        accept: modules the adapter can wrap; a selected module it rejects raises TypeError.
        what: how to name the accepted kinds in that error.
        skip: modules to leave out silently (e.g. ones already wrapped, whose inner layer also matches).
    Raises:
        ValueError: nothing matched (the message lists the Linear-like module names that exist).
        TypeError: a matched module is not accepted.
    """
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules must be a non-empty regex or list of names, got ''")
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {exc}") from None
    else:
        if (not isinstance(target_modules, Sequence) or len(target_modules) == 0
                or not all(isinstance(t, str) and t for t in target_modules)):
            raise TypeError("target_modules must be a regex string or a non-empty list of module-name suffixes, "
                            f"got {target_modules!r}")
    found = []
    for name, module in model.named_modules():
        if not name or not _matches(name, target_modules):
            continue
        if skip is not None and skip(module):
            continue
        if not accept(module):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; expected {what}. "
                            "Choose Linear-like targets (see spectralkern.peft.linear_like_names(model))")
        found.append((name, module))
    if not found:
        available = linear_like_names(model)
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in available})
        shown = ", ".join(available[:12]) + (f", ... ({len(available)} in all)" if len(available) > 12 else "")
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}. "
                         f"Linear-like name suffixes available: {suffixes}; full names: [{shown}]")
    return found


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` where the submodule called ``name`` (dotted path) is; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new_module)  # works for ModuleList / Sequential children ("0", "1", ...) too
    return old


# ------------------------------------------------------------------------------------------ trainability
def freeze_all_except(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> None:
    """Set ``requires_grad`` to ``keep(name, parameter)`` for every parameter of ``model``."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(keep(name, parameter)))


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable and total parameters (shared parameters counted once, like peft)."""
    trainable = total = 0
    for parameter in model.parameters():  # parameters() already de-duplicates tied weights
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return ParameterReport(trainable, total)


# ------------------------------------------------------------------------------------------ fingerprints
def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the names, shapes, dtypes and exact bytes of ``tensors`` (order-independent).

    Meant for the base weights an adapter was built on. Independent of device and strides; a different dtype
    (the same model loaded in bf16 instead of fp32) gives a different fingerprint, which is intended: anchors
    and adapters built on rounded weights differ. Costs one pass over the bytes (a copy to CPU for GPU tensors).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        header = f"{name}|{tuple(t.shape)}|{str(t.dtype).removeprefix('torch.')}\n"
        digest.update(header.encode())
        # view as bytes: dtypes without a numpy equivalent (bf16) hash fine this way.
        digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def combine_fingerprints(fingerprints: Mapping[str, str]) -> str:
    """One sha256 (hex) for several named fingerprints (e.g. one per adapted layer), order-independent.

    Lets an adapter fingerprint each layer once, when it wraps it, and combine them later (after merges the
    stored weights no longer match, but the cached per-layer fingerprints still describe the base).
    """
    digest = hashlib.sha256()
    for name in sorted(fingerprints):
        digest.update(f"{name}={fingerprints[name]}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ safetensors I/O
def save_adapter_file(path: str | Path, tensors: Mapping[str, torch.Tensor], *, method: str, fingerprint: str,
                      config: Mapping[str, object]) -> Path:
    """Write adapter tensors to a safetensors file with method name, base fingerprint and config (JSON) metadata.

    Tensors are copied to CPU and made contiguous; ``config`` must be JSON-serialisable.
    """
    from safetensors.torch import save_file

    path = Path(path)
    try:
        config_json = json.dumps(dict(config), sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"config must be JSON-serialisable, got {dict(config)!r}: {exc}") from None
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {META_METHOD: method, META_FINGERPRINT: fingerprint, META_CONFIG: config_json,
                META_FORMAT: FORMAT_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(cpu, str(path), metadata=metadata)
    return path


def read_adapter_metadata(path: str | Path) -> tuple[str, str, dict]:
    """(method, base fingerprint, config dict) stored in an adapter file, without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    missing = [key for key in (META_METHOD, META_FINGERPRINT, META_CONFIG) if key not in metadata]
    if missing:
        raise ValueError(f"{str(path)!r} is not a spectralkern adapter file: metadata lacks {missing}")
    if metadata.get(META_FORMAT) != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has adapter format version {metadata.get(META_FORMAT)!r}; "
                         f"this spectralkern reads version {FORMAT_VERSION!r}")
    return metadata[META_METHOD], metadata[META_FINGERPRINT], json.loads(metadata[META_CONFIG])


def load_adapter_file(path: str | Path, *, method: str, expected_fingerprint: str | None,
                      device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read an adapter file written by :func:`save_adapter_file`. Returns (tensors, config).

    Raises:
        ValueError: the file was written for another adapter method.
        BaseWeightMismatchError: ``expected_fingerprint`` (the fingerprint of the base weights in hand) differs
            from the one stored. Pass None to skip the check (only when you know why).
    """
    from safetensors.torch import load_file

    stored_method, stored_fingerprint, config = read_adapter_metadata(path)
    if stored_method != method:
        raise ValueError(f"{str(path)!r} holds a {stored_method!r} adapter, expected {method!r}")
    if expected_fingerprint is not None and stored_fingerprint != expected_fingerprint:
        raise BaseWeightMismatchError(
            f"{str(path)!r} was trained on base weights with fingerprint {stored_fingerprint[:16]}..., but the "
            f"targeted base weights of this model have fingerprint {expected_fingerprint[:16]}...; load it into "
            "the same base model (same checkpoint, same dtype, adapters unmerged)")
    return load_file(str(path), device=str(device)), config
