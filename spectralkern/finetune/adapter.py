"""The Adapter baseline of paper 001's Table 1: Houlsby-style bottleneck adapters, a small module of our own (the
`adapters` package pins transformers 4.x).

An adapter maps h ↦ h + up(act(down(h))) (down: hidden → m, up: m → hidden, up zero-initialised so the network
starts as the pretrained one). As in Houlsby et al. (2019) one adapter follows the attention-output projection and
one the feed-forward output projection of every layer, before the residual sum and LayerNorm; in a Hugging Face
BERT-style encoder those are the Linear modules whose names end in ``output.dense``. The adapters are applied by
forward hooks on those modules, so the encoder's own parameter names (and the pretrained weights) are unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BottleneckAdapter", "add_adapters"]


class BottleneckAdapter(nn.Module):
    """h (..., hidden) ↦ h + up(gelu(down(h))); ``up`` starts at zero (identity map)."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


def add_adapters(encoder: nn.Module, bottleneck: int, *, suffix: str = "output.dense") -> nn.ModuleDict:
    """Insert a BottleneckAdapter after every ``nn.Linear`` of ``encoder`` whose name ends with ``suffix``.

    Returns the adapters (a ModuleDict keyed by the module name with '.' → '__'); register it on the model that is
    trained so that it moves with ``.to()`` and appears in ``parameters()`` / ``state_dict()``. Raises ValueError
    when no module matches."""
    adapters = nn.ModuleDict()
    for name, module in encoder.named_modules():
        if not (isinstance(module, nn.Linear) and (name == suffix or name.endswith("." + suffix))):
            continue
        adapter = BottleneckAdapter(module.out_features, bottleneck).to(module.weight.device, module.weight.dtype)
        adapters[name.replace(".", "__")] = adapter
        module.register_forward_hook(lambda _module, _inputs, output, adapter=adapter: adapter(output))
    if not adapters:
        raise ValueError(f"no nn.Linear module of the encoder has a name ending in {suffix!r}")
    return adapters
