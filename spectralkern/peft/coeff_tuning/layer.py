"""Coeff-Tuning (paper 004): recombine the H attention maps of a layer with H × H coefficients.

For an attention layer with heads h = 1..H and maps P_g = softmax(Q_g K_gᵀ · scale + mask):

    out_h = Σ_g C[h, g] · P_g V_h,     C = I + Σ_active dropout(ΔC_a)   (ΔC zero-initialised; dropout on ΔC)

so training starts from the pretrained model exactly, and each layer adds H² parameters per adapter.

The base model's attention-probability dropout is kept: it is applied to the mixed maps Σ_g C[h, g] P_g exactly
as the base applies it to its own maps (same shape, drawn first, so with ΔC = 0 and the same RNG state train-mode
outputs equal the unpatched eager model's when ΔC's own dropout is 0). While it is active the materialising
reference path runs; otherwise the fused ``coeff_attention`` op.

What gets wrapped:
* Hugging Face attention modules that dispatch through ``ALL_ATTENTION_FUNCTIONS`` (BERT, GPT-2, LLaMA and the
  many classes written like them): the owning model's attention implementation is switched to
  ``"spectralkern_coeff_tuning"`` (registered with transformers' ``AttentionInterface``, with flash-attention's
  mask preparation, so masks arrive as a (B, Nk) key padding mask and nothing N × N is built). Untargeted
  attention modules of the same model run the same op with C = I. ``unload`` switches back.
* ``torch.nn.MultiheadAttention``: its projections around head-mixed attention (returns no attention weights).

Not supported (raises): sliding-window / soft-capped / sink attention, packed sequences. Merging into the base
weights is impossible in general (see :meth:`CoeffTuningAttention.check_mergeable`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.coeff_attention import attention_probabilities, coeff_attention, coeff_attention_reference
from .._lifecycle import SpectralTunerLayer

HF_IMPLEMENTATION = "spectralkern_coeff_tuning"
_OWNER = "_spectralkern_coeff_layer"  # attribute on a wrapped HF attention module: its CoeffTuningAttention
_UNSUPPORTED_HF_KWARGS = ("sliding_window", "softcap", "s_aux", "cu_seq_lens_q", "cu_seq_lens_k")
MERGE_IMPOSSIBLE = (
    "Coeff-Tuning cannot be merged into the base weights: head h's output mixes the attention maps of other heads "
    "(Σ_g C[h, g] P_g V_h), and a sum of softmax maps is not the softmax of any one score matrix, so no change of "
    "the q/k/v/o projections reproduces it. Keep the adapted model, or unload() to get the base model back.")


class CoeffTuning(nn.Module):
    """One adapter's ΔC (H × H, fp32, zero-initialised); ``sample()`` is dropout(ΔC) (identity in eval mode)."""

    def __init__(self, num_heads: int, dropout: float, *, impl: str = "fused",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.num_heads, self.dropout, self.impl = num_heads, float(dropout), impl
        self.delta_c = nn.Parameter(torch.zeros(num_heads, num_heads, device=device))

    def sample(self) -> torch.Tensor:
        return F.dropout(self.delta_c, self.dropout, self.training)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, dropout={self.dropout:g}, impl={self.impl}"


def mixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coefficients, *, impl: str, causal: bool,
                    kv_mask: torch.Tensor | None, scale: float, attn_mask: torch.Tensor | None = None,
                    dropout: float = 0.0) -> torch.Tensor:
    """Head-mixed attention (B, H, Nq, D). ``coefficients``: a callable giving C (H, H) or None (C = I); called
    after the attention dropout mask is drawn. ``dropout``: the base's attention-probability dropout (> 0 only
    in training), applied to the mixed maps."""
    if dropout > 0:
        probs = attention_probabilities(q, k, kv_mask, causal, scale, attn_mask=attn_mask, dtype=q.dtype)
        keep = F.dropout(torch.ones_like(probs), dropout, training=True)  # drawn first, as the base draws it
        coeff = None if coefficients is None else coefficients()
        mixed = probs if coeff is None else torch.einsum("hg,bgqk->bhqk", coeff.to(probs.dtype), probs)
        value = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return torch.matmul(mixed * keep, value.to(mixed.dtype)).to(q.dtype)
    coeff = None if coefficients is None else coefficients()
    if attn_mask is not None or impl == "reference":
        return coeff_attention_reference(q, k, v, coeff, causal=causal, kv_mask=kv_mask, scale=scale,
                                         attn_mask=attn_mask)
    return coeff_attention(q, k, v, coeff, causal=causal, kv_mask=kv_mask, scale=scale)


# ------------------------------------------------------------------------------------------ Hugging Face
def is_hf_attention(module: nn.Module) -> bool:
    """True for a transformers attention module that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (checked by
    the attributes those classes share, so transformers stays optional)."""
    config = getattr(module, "config", None)
    return (type(module).__name__.endswith("Attention") and hasattr(config, "_attn_implementation")
            and hasattr(module, "is_causal") and hasattr(module, "scaling"))


def is_coeff_target(module: nn.Module) -> bool:
    """Modules Coeff-Tuning can wrap: HF attention (see :func:`is_hf_attention`) and nn.MultiheadAttention."""
    return isinstance(module, nn.MultiheadAttention) or is_hf_attention(module)


def num_heads_of(module: nn.Module) -> int:
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads
    for owner, name in ((module, "num_heads"), (module, "num_attention_heads"),
                        (module.config, "num_attention_heads")):
        value = getattr(owner, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the number of heads of {type(module).__name__}")


def hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: q (B, H, Nq, D), k / v (B, H_kv, Nk, D) -> ((B, Nq, H, D), None)."""
    unsupported = [name for name in _UNSUPPORTED_HF_KWARGS if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"Coeff-Tuning attention does not support {unsupported} ({type(module).__name__})")
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
    layer = module.__dict__.get(_OWNER)
    coefficients, impl = None, "fused"
    if layer is not None and layer.active_units():
        coefficients, impl = layer.coefficients, layer.impl
        if query.shape[1] != layer.num_heads:
            raise ValueError(f"the Coeff-Tuning layer has H = {layer.num_heads} heads, the attention has "
                             f"{query.shape[1]} (q of shape {tuple(query.shape)})")
    out = mixed_attention(query, key, value, coefficients, impl=impl, causal=causal, kv_mask=kv_mask, scale=scale,
                          attn_mask=dense, dropout=float(dropout) if module.training else 0.0)
    return out.transpose(1, 2), None


def register_hf_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(HF_IMPLEMENTATION, hf_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(HF_IMPLEMENTATION, flash_attention_mask)


# ------------------------------------------------------------------------------------------ the layer
class CoeffTuningAttention(SpectralTunerLayer):
    """An attention module with Coeff-Tuning adapters ``coeff_tuning_adapters[name]`` (each a ΔC)."""
    adapter_attr = "coeff_tuning_adapters"

    @classmethod
    def wrap(cls, base_layer: nn.Module, adapter_name: str, unit: nn.Module) -> CoeffTuningAttention:
        layer = super().wrap(base_layer, adapter_name, unit)
        layer.num_heads = unit.num_heads
        if not isinstance(base_layer, nn.MultiheadAttention):
            object.__setattr__(base_layer, _OWNER, layer)  # read by hf_attention; not a submodule (no cycle)
        elif base_layer.bias_k is not None or base_layer.add_zero_attn:
            raise ValueError("Coeff-Tuning does not support MultiheadAttention with add_bias_kv=True or "
                             f"add_zero_attn=True (got add_bias_kv={base_layer.bias_k is not None}, "
                             f"add_zero_attn={base_layer.add_zero_attn})")
        return layer

    @property
    def delta_c(self) -> nn.Parameter:
        """The active adapter's ΔC (single-adapter users)."""
        return self.units[self.active_adapters[0]].delta_c

    @property
    def impl(self) -> str:
        units = self.active_units()
        return units[0].impl if units else "fused"

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool = False,
                                           adapter_names: list[str] | None = None) -> nn.Module:
        """peft's unload hook: the base attention module (merging raises, see ``check_mergeable``)."""
        if merge:
            raise ValueError(MERGE_IMPOSSIBLE)
        return self.release()

    def release(self) -> nn.Module:
        """The base attention module with the link to this layer removed (on unload)."""
        self.base_layer.__dict__.pop(_OWNER, None)
        return self.base_layer

    def coefficients(self) -> torch.Tensor:
        """C (H, H) = I + Σ_active dropout(ΔC_a)."""
        units = self.active_units()
        eye = torch.eye(self.num_heads, dtype=units[0].delta_c.dtype, device=units[0].delta_c.device)
        return eye + sum(unit.sample() for unit in units)

    def check_mergeable(self, name: str) -> None:
        raise ValueError(f"layer {name!r}: {MERGE_IMPOSSIBLE}")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_IMPOSSIBLE)

    def unmerge(self) -> None:
        return None  # nothing is ever merged

    def forward(self, *args, **kwargs):
        if isinstance(self.base_layer, nn.MultiheadAttention):
            return self._multihead_forward(*args, **kwargs)
        return self.base_layer(*args, **kwargs)  # hf_attention finds this layer through the base module

    # nn.MultiheadAttention: its projections around head-mixed attention
    def _project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        base, e = self.base_layer, self.base_layer.embed_dim
        if base._qkv_same_embed_dim:
            weight = base.in_proj_weight[which * e:(which + 1) * e]
        else:
            weight = (base.q_proj_weight, base.k_proj_weight, base.v_proj_weight)[which]
        bias = None if base.in_proj_bias is None else base.in_proj_bias[which * e:(which + 1) * e]
        return F.linear(x, weight, bias)

    def _multihead_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                           attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                           is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """MultiheadAttention's arguments; returns ``(output, None)`` (the mixed maps are never materialised). A
        bool key_padding_mask (True = ignore) stays linear in memory; ``is_causal=True`` means causal; any other
        attn_mask goes to the dense reference."""
        base = self.base_layer
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif base.batch_first:  # work in (L, B, E) like MultiheadAttention
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        seq_q, batch, _ = query.shape
        seq_k, heads = key.shape[0], base.num_heads

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
        coefficients = self.coefficients if self.active_units() else None
        out = mixed_attention(q, k, v, coefficients, impl=self.impl, causal=bool(is_causal), kv_mask=kv_mask,
                              scale=q.shape[-1] ** -0.5, attn_mask=dense,
                              dropout=base.dropout if self.training else 0.0)
        out = base.out_proj(out.permute(2, 0, 1, 3).reshape(seq_q, batch, -1))
        if unbatched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if base.batch_first else out), None


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """MultiheadAttention's masks as additive fp32: bool True means *do not attend*."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.float()
