"""Coeff-Tuning (paper 004): tune attention by recombining the H attention maps of a layer with H × H coefficients.

For an attention layer with heads h = 1..H and maps P_g = softmax(Q_g K_gᵀ · scale + mask):

    out_h = Σ_g C[h, g] · P_g V_h,     C = I + dropout(ΔC)   (ΔC zero-initialised; dropout on ΔC, training only)

so training starts from the pretrained model exactly, and each layer adds H² parameters (one shared ΔC for every
targeted layer with ``per_layer=False``). It composes with LoRA: apply LoRA first, then
``apply_coeff_tuning(model, config, freeze_others=False)``.

What gets patched:
* Hugging Face attention modules that dispatch through ``ALL_ATTENTION_FUNCTIONS`` (GPT-2's ``GPT2Attention``,
  BERT's ``BertSelfAttention``, LLaMA's ``LlamaAttention`` and the many classes written like them): the model's
  attention implementation is switched to ``"spectralkern_coeff_tuning"``, registered with transformers'
  ``AttentionInterface``, with flash-attention's mask preparation, so masks arrive as a (B, Nk) key padding mask
  plus the module's ``is_causal`` and nothing N × N is built. Untargeted attention modules of the same model run the
  same op with C = I (plain attention).
* ``torch.nn.MultiheadAttention``: replaced by :class:`CoeffMultiheadAttention`, which reuses its projections.

Not supported (raises): sliding-window / soft-capped / sink attention, packed sequences. The model's dropout on
attention *probabilities* is not applied by the patched attention (the paper regularises with dropout on ΔC).
Merging into the base weights is impossible in general (see :func:`merge_coeff_tuning`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.coeff_attention import coeff_attention, coeff_attention_reference
from ._patching import (combine_fingerprints, find_target_modules, fingerprint_tensors, freeze_all_except,
                        load_adapter_file, read_adapter_metadata, replace_module, save_adapter_file)

METHOD = "coeff_tuning"
HF_IMPLEMENTATION = "spectralkern_coeff_tuning"
IMPLS = ("fused", "reference")
SHARED_KEY = "shared.delta_c"


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class CoeffTuningConfig:
    """Coeff-Tuning hyperparameters.

    Attributes:
        dropout: probability of dropping each entry of ΔC in training mode (the paper's best: about 0.2).
        target_modules: attention modules to tune: a list of name suffixes or one regex over full names (peft's
            rule, see ``find_target_modules``); None: every supported attention module of the model.
        per_layer: one ΔC per targeted layer (True) or one ΔC shared by all of them (False; needs equal H).
        impl: "fused" (the ``coeff_attention`` op: Triton on a GPU, the torch reference elsewhere) or
            "reference" (eager, all H maps materialised).
    """
    dropout: float = 0.2
    target_modules: str | tuple[str, ...] | None = None
    per_layer: bool = True
    impl: str = "fused"

    def __post_init__(self) -> None:
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not math.isfinite(self.dropout) or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if targets is not None and not isinstance(targets, str):
            if (not isinstance(targets, Sequence) or not targets
                    or not all(isinstance(t, str) and t for t in targets)):
                raise TypeError("target_modules must be None, a regex string or a non-empty list of module-name "
                                f"suffixes, got {targets!r}")
            object.__setattr__(self, "target_modules", tuple(targets))
        if targets == "":
            raise ValueError("target_modules must be None, a non-empty regex or a list of names, got ''")
        if not isinstance(self.per_layer, bool):
            raise TypeError(f"per_layer must be a bool, got {self.per_layer!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        return data

    @staticmethod
    def from_dict(data: Mapping[str, object]) -> CoeffTuningConfig:
        return CoeffTuningConfig(**dict(data))


# ------------------------------------------------------------------------------------------ the coefficients
class CoeffTuning(nn.Module):
    """ΔC (H × H, fp32, zero-initialised) and C = I + dropout(ΔC) (dropout only in training mode)."""

    def __init__(self, num_heads: int, dropout: float, *, impl: str = "fused",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.num_heads, self.dropout, self.impl = num_heads, float(dropout), impl
        self.delta_c = nn.Parameter(torch.zeros(num_heads, num_heads, device=device))

    def coefficients(self) -> torch.Tensor:
        """C (H, H) = I + dropout(ΔC); dropout is the identity in eval mode."""
        eye = torch.eye(self.num_heads, dtype=self.delta_c.dtype, device=self.delta_c.device)
        return eye + F.dropout(self.delta_c, self.dropout, self.training)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               kv_mask: torch.Tensor | None, scale: float, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Head-mixed attention (B, H, Nq, D) with this layer's C. A dense ``attn_mask`` needs the reference."""
        if q.shape[1] != self.num_heads:
            raise ValueError(f"this Coeff-Tuning layer has H = {self.num_heads} heads, the attention has "
                             f"{q.shape[1]} (q of shape {tuple(q.shape)})")
        return _attend(q, k, v, self.coefficients(), self.impl, causal, kv_mask, scale, attn_mask)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, dropout={self.dropout:g}, impl={self.impl}"


def _attend(q, k, v, coeff, impl, causal, kv_mask, scale, attn_mask):
    if attn_mask is not None or impl == "reference":
        return coeff_attention_reference(q, k, v, coeff, causal=causal, kv_mask=kv_mask, scale=scale,
                                         attn_mask=attn_mask)
    return coeff_attention(q, k, v, coeff, causal=causal, kv_mask=kv_mask, scale=scale)


# ------------------------------------------------------------------------------------------ Hugging Face
_UNSUPPORTED_HF_KWARGS = ("sliding_window", "softcap", "s_aux", "cu_seq_lens_q", "cu_seq_lens_k")


def is_hf_attention(module: nn.Module) -> bool:
    """True for a transformers attention module that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (checked by
    the attributes those classes share, so transformers stays optional)."""
    config = getattr(module, "config", None)
    return (type(module).__name__.endswith("Attention") and hasattr(config, "_attn_implementation")
            and hasattr(module, "is_causal") and hasattr(module, "scaling"))


def is_coeff_target(module: nn.Module) -> bool:
    """Modules Coeff-Tuning can patch: HF attention (see :func:`is_hf_attention`) and nn.MultiheadAttention."""
    return isinstance(module, nn.MultiheadAttention) or is_hf_attention(module)


def _hf_heads(module: nn.Module) -> int:
    for owner, name in ((module, "num_heads"), (module, "num_attention_heads"), (module.config, "num_attention_heads")):
        value = getattr(owner, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the number of heads of {type(module).__name__}")


def _hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: q (B, H, Nq, D), k / v (B, H_kv, Nk, D) -> ((B, Nq, H, D), None)."""
    unsupported = [name for name in _UNSUPPORTED_HF_KWARGS if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"Coeff-Tuning attention does not support {unsupported} ({type(module).__name__})")
    if dropout > 0:
        warnings.warn(f"{type(module).__name__}: attention-probability dropout p={dropout:g} is not applied by "
                      "Coeff-Tuning's attention (ΔC dropout regularises instead)", stacklevel=2)
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    kv_mask = dense = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:   # flash-attention mask preparation: (B, Nk), True / 1 = attend
            kv_mask = attention_mask.to(torch.bool)
        elif attention_mask.dim() == 4:  # a mask the caller built (B, 1|H, Nq, Nk): dense, reference path
            dense, causal = attention_mask, False
        else:
            raise ValueError(f"attention_mask must be (B, Nk) or (B, 1|H, Nq, Nk), got {tuple(attention_mask.shape)}")
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    coeff_module = getattr(module, "coeff_tuning", None)
    if isinstance(coeff_module, CoeffTuning):
        out = coeff_module.attend(query, key, value, causal=causal, kv_mask=kv_mask, scale=scale, attn_mask=dense)
    else:  # an untargeted layer of a patched model: plain attention (C = I) through the same op
        out = _attend(query, key, value, None, "fused", causal, kv_mask, scale, dense)
    return out.transpose(1, 2), None


def _register_hf() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(HF_IMPLEMENTATION, _hf_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(HF_IMPLEMENTATION, flash_attention_mask)


def _switch_hf_models(model: nn.Module, targets: list[nn.Module]) -> None:
    """Point every transformers model that owns a targeted attention module at the Coeff-Tuning implementation."""
    _register_hf()
    configs = {id(t.config): t.config for t in targets}
    for module in model.modules():
        if id(getattr(module, "config", None)) in configs and hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation(HF_IMPLEMENTATION)
            configs.pop(id(module.config))
    if configs:
        names = [type(c).__name__ for c in configs.values()]
        raise ValueError(f"the attention modules with configs {names} belong to no transformers PreTrainedModel "
                         "inside the model given; pass the model that owns them")


# ------------------------------------------------------------------------------------------ MultiheadAttention
class CoeffMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with Coeff-Tuning: its projections (``base``, frozen by ``apply_coeff_tuning``)
    around head-mixed attention.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` takes MultiheadAttention's arguments and returns
    ``(output, None)``: the mixed maps are never materialised, so no weights are returned. A bool
    key_padding_mask (True = ignore) stays linear in memory; ``is_causal=True`` means causal (attn_mask is then
    taken to be the causal mask, as MultiheadAttention documents); any other attn_mask goes to the dense
    reference. The module's attention dropout is not applied (ΔC dropout regularises instead).
    """

    def __init__(self, base: nn.MultiheadAttention, coeff: CoeffTuning) -> None:
        super().__init__()
        if base.bias_k is not None or base.add_zero_attn:
            raise ValueError("Coeff-Tuning does not support MultiheadAttention with add_bias_kv=True or "
                             f"add_zero_attn=True (got add_bias_kv={base.bias_k is not None}, "
                             f"add_zero_attn={base.add_zero_attn})")
        if coeff.num_heads != base.num_heads:
            raise ValueError(f"coeff has {coeff.num_heads} heads, the MultiheadAttention {base.num_heads}")
        self.base, self.coeff_tuning = base, coeff
        self.batch_first = base.batch_first

    def _project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        base, e = self.base, self.base.embed_dim
        if base._qkv_same_embed_dim:
            weight = base.in_proj_weight[which * e:(which + 1) * e]
        else:
            weight = (base.q_proj_weight, base.k_proj_weight, base.v_proj_weight)[which]
        bias = None if base.in_proj_bias is None else base.in_proj_bias[which * e:(which + 1) * e]
        return F.linear(x, weight, bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # work in (L, B, E) like MultiheadAttention
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        seq_q, batch, _ = query.shape
        seq_k, heads = key.shape[0], self.base.num_heads

        def split(x: torch.Tensor, length: int) -> torch.Tensor:  # (L, B, E) -> (B, H, L, D)
            return x.reshape(length, batch, heads, -1).permute(1, 2, 0, 3)

        q, k, v = split(self._project(query, 0), seq_q), split(self._project(key, 1), seq_k), \
            split(self._project(value, 2), seq_k)
        kv_mask = dense = None
        if attn_mask is not None and not is_causal:
            dense = _additive(attn_mask)
            dense = dense.reshape(-1, heads, seq_q, seq_k) if dense.dim() == 3 else dense[None, None]
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool and dense is None:
                kv_mask = ~key_padding_mask  # stays a (B, Nk) mask: linear memory
            else:
                padding = _additive(key_padding_mask)[:, None, None, :]
                dense = padding if dense is None else dense + padding
        out = self.coeff_tuning.attend(q, k, v, causal=bool(is_causal), kv_mask=kv_mask,
                                       scale=q.shape[-1] ** -0.5, attn_mask=dense)
        out = self.base.out_proj(out.permute(2, 0, 1, 3).reshape(seq_q, batch, -1))
        if unbatched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """MultiheadAttention's masks as additive fp32: bool True means *do not attend*."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.float()


# ------------------------------------------------------------------------------------------ model level
def coeff_tuning_layers(model: nn.Module) -> dict[str, CoeffTuning]:
    """{full name of the patched attention module: its CoeffTuning} (one shared object when per_layer=False)."""
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):
        coeff = getattr(module, "coeff_tuning", None)
        if isinstance(coeff, CoeffTuning) and not isinstance(module, CoeffTuning):
            found[name] = coeff
    return found


def _base_fingerprint(module: nn.Module) -> str:
    """Fingerprint of an attention module's own weights: no Coeff-Tuning or LoRA tensors, peft's ``base_layer``
    naming undone, so the same base gives the same fingerprint with or without LoRA wrapped around it."""
    tensors = {}
    for pname, p in module.named_parameters():
        if "coeff_tuning." in pname or "lora_" in pname:
            continue
        tensors[pname.replace(".base_layer", "")] = p
    return fingerprint_tensors(tensors)


def apply_coeff_tuning(model: nn.Module, config: CoeffTuningConfig, *, freeze_others: bool = True) -> nn.Module:
    """Patch the target attention modules of ``model`` (in place) with Coeff-Tuning and return ``model``.

    Args:
        model: a transformers model (GPT-2 / BERT / LLaMA style attention), a model holding
            ``nn.MultiheadAttention`` layers, or a peft-wrapped model.
        config: the ``CoeffTuningConfig``.
        freeze_others: freeze every parameter except the ΔC matrices (False keeps what is trainable, e.g. LoRA).
    Raises:
        ValueError: nothing to patch, the model is already patched, or per_layer=False with differing head counts.
        TypeError: a selected module is not an attention module Coeff-Tuning supports.
    """
    if not isinstance(config, CoeffTuningConfig):
        raise TypeError(f"config must be a CoeffTuningConfig, got {type(config).__name__}")
    existing = coeff_tuning_layers(model)
    if existing:
        raise ValueError(f"model already has Coeff-Tuning at {sorted(existing)}; apply it once per model")
    available = [name for name, m in model.named_modules() if name and is_coeff_target(m)]
    if config.target_modules is None:
        targets = [(name, model.get_submodule(name)) for name in available]
        if not targets:
            raise ValueError(f"{type(model).__name__} has no attention module Coeff-Tuning supports (transformers "
                             "attention dispatching through ALL_ATTENTION_FUNCTIONS, or nn.MultiheadAttention)")
    else:
        try:
            targets = find_target_modules(model, config.target_modules, accept=is_coeff_target,
                                          what="transformers attention or nn.MultiheadAttention")
        except ValueError:
            raise ValueError(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}"
                             f"; attention modules available: {available}") from None
    heads = {name: (m.num_heads if isinstance(m, nn.MultiheadAttention) else _hf_heads(m)) for name, m in targets}
    shared = None
    if not config.per_layer:
        if len(set(heads.values())) != 1:
            raise ValueError(f"per_layer=False shares one ΔC, so every target needs the same number of heads; got "
                             f"{heads}")
        device = next(targets[0][1].parameters()).device
        shared = CoeffTuning(next(iter(heads.values())), config.dropout, impl=config.impl, device=device)
    hf_targets = []
    fingerprints = {}
    for name, module in targets:
        device = next(module.parameters()).device
        coeff = shared or CoeffTuning(heads[name], config.dropout, impl=config.impl, device=device)
        coeff.train(module.training)  # a new module starts in training mode; follow the model's (no dropout in eval)
        fingerprints[name] = _base_fingerprint(module)
        if isinstance(module, nn.MultiheadAttention):
            replace_module(model, name, CoeffMultiheadAttention(module, coeff))
        else:
            module.coeff_tuning = coeff
            hf_targets.append(module)
    if hf_targets:
        _switch_hf_models(model, hf_targets)
    if freeze_others:
        keep = {id(c.delta_c) for c in coeff_tuning_layers(model).values()}
        freeze_all_except(model, lambda _, p: id(p) in keep)
    model.coeff_tuning_config = config              # read by save_coeff_tuning
    model.coeff_tuning_fingerprints = fingerprints  # base weights as found when patched
    return model


def coeff_tuning_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the base attention weights Coeff-Tuning was applied to (taken when it was applied)."""
    fingerprints = getattr(model, "coeff_tuning_fingerprints", None)
    if fingerprints is None:
        raise ValueError("model has no Coeff-Tuning fingerprints; it was not prepared by apply_coeff_tuning")
    return combine_fingerprints(fingerprints)


def merge_coeff_tuning(model: nn.Module) -> None:
    """Always raises: Coeff-Tuning cannot be folded into the base weights in general.

    out_h = Σ_g C[h, g] softmax(S_g) V_h feeds the attention maps of *other* heads into head h; a sum of several
    softmax maps is not the softmax of any one score matrix, so no change of W_q, W_k, W_v or W_o reproduces it
    (only a diagonal C, a per-head rescaling of V_h, could be merged). Keep the patched model for inference.
    """
    raise NotImplementedError(
        "Coeff-Tuning cannot be merged into the base weights: head h's output mixes the attention maps of other "
        "heads (Σ_g C[h, g] P_g V_h), and a sum of softmax maps is not the softmax of any one score matrix, so no "
        "change of the q/k/v/o projections reproduces it. Run the patched model instead.")


def save_coeff_tuning(model: nn.Module, path: str | Path) -> Path:
    """Save every ΔC (safetensors) with the config, the patched layer names and the base fingerprint."""
    layers = coeff_tuning_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Coeff-Tuning layers to save; call apply_coeff_tuning first")
    config = getattr(model, "coeff_tuning_config", None)
    if not isinstance(config, CoeffTuningConfig):
        raise ValueError("model.coeff_tuning_config is missing; save_coeff_tuning needs a model prepared by "
                         "apply_coeff_tuning")
    if config.per_layer:
        tensors = {f"{name}.delta_c": layer.delta_c for name, layer in layers.items()}
    else:
        tensors = {SHARED_KEY: next(iter(layers.values())).delta_c}
    meta = {"config": config.to_dict(), "layers": {name: layer.num_heads for name, layer in layers.items()}}
    return save_adapter_file(path, tensors, method=METHOD, fingerprint=coeff_tuning_fingerprint(model), config=meta)


def load_coeff_tuning(model: nn.Module, path: str | Path, *, freeze_others: bool = True) -> nn.Module:
    """Load ΔC saved by ``save_coeff_tuning`` into ``model`` (in place), patching it first when it is not yet.

    Raises:
        BaseWeightMismatchError: the attention weights differ from those ΔC was trained on (checked before the
            model is modified).
        ValueError: the file is not a Coeff-Tuning adapter, or its layers / head counts do not match the model.
    """
    _, _, meta = read_adapter_metadata(path)
    config = CoeffTuningConfig.from_dict(meta["config"])
    saved_layers: dict[str, int] = meta["layers"]
    layers = coeff_tuning_layers(model)
    if layers:
        if set(layers) != set(saved_layers):
            raise ValueError(f"the adapter file has Coeff-Tuning layers {sorted(saved_layers)}, the model has "
                             f"{sorted(layers)}")
        fingerprint = coeff_tuning_fingerprint(model)
    else:
        modules = dict(model.named_modules())
        missing = [name for name in saved_layers if name not in modules or not is_coeff_target(modules[name])]
        if missing:
            raise ValueError(f"the adapter file targets attention modules {missing} that {type(model).__name__} "
                             "lacks")
        fingerprint = combine_fingerprints({name: _base_fingerprint(modules[name]) for name in saved_layers})
    tensors, _ = load_adapter_file(path, method=METHOD, expected_fingerprint=fingerprint)
    if not layers:
        # The saved layer names, as a regex matching exactly them: the same modules are patched again.
        exact = "|".join(name.replace(".", r"\.") for name in saved_layers)
        apply_coeff_tuning(model, CoeffTuningConfig(**{**config.to_dict(), "target_modules": exact}),
                           freeze_others=freeze_others)
        model.coeff_tuning_config = config
        layers = coeff_tuning_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            key = f"{name}.delta_c" if config.per_layer else SHARED_KEY
            if key not in tensors:
                raise ValueError(f"the adapter file lacks {key!r}")
            if tuple(tensors[key].shape) != tuple(layer.delta_c.shape):
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)} in the file, the layer expects "
                                 f"{tuple(layer.delta_c.shape)}")
            layer.delta_c.copy_(tensors[key])
    return model


def coeff_tuning_parameter_count(model: nn.Module) -> int:
    """Trainable Coeff-Tuning parameters of ``model``: Σ H² over distinct ΔC matrices."""
    return sum(p.numel() for p in {id(c.delta_c): c.delta_c for c in coeff_tuning_layers(model).values()}.values())


__all__ = ["CoeffMultiheadAttention", "CoeffTuning", "CoeffTuningConfig", "HF_IMPLEMENTATION", "apply_coeff_tuning",
           "coeff_tuning_fingerprint", "coeff_tuning_layers", "coeff_tuning_parameter_count", "is_coeff_target",
           "is_hf_attention", "load_coeff_tuning", "merge_coeff_tuning", "save_coeff_tuning"]
