"""Fine-tuning methods of the comparison, in a registry so later issues can add theirs (SMoA, FourierFT, ...).

A method turns a fresh ``SentenceClassifier`` into a ``TrainSetup``: the model to train (maybe peft-wrapped),
its optimizer, and the objective. Built in:

    full               full fine-tuning with torch.optim.AdamW (word-embedding table frozen, see MethodConfig)
    adapter            paper 001's Adapter baseline: Houlsby bottleneck adapters after every attention-output and
                       feed-forward-output projection (adapter.py) + LayerNorms + head; encoder frozen
    lora               LoRA adapters (peft) on the attention query/value projections + the classification head
    smoa               SMoA adapters (spectralkern.peft, paper 002) on the same targets with LoRA's budget + head
    fourierft          FourierFT (spectralkern.peft, paper 003, one expert) on the same targets, LoRA's budget + head
    fourier_moe        FourierMoE (paper 003): radial-band experts, top-k router, load-balancing loss in the objective
    coeff_tuning       Coeff-Tuning (paper 004): an H × H head-mixing ΔC per attention layer (dropout on ΔC) + head
    coeff_tuning_lora  Coeff-Tuning + LoRA (the paper's plug-in use): LoRA on query/value, then ΔC on every layer
    spectral_sgd       ours as paper 001 writes it: joint loss L_task + λ·tr(Δᵀ L Δ) (L = D − W), the task gradient
                       filtered by g(L) on the whole spectrum, the regulariser's gradient unfiltered, plain gradient
                       descent (SpectralSGD)
    spectral_reg       ours with AdamW: the same filter and joint loss, SpectralAdamW (lowpass_update: the applied
                       Adam direction filtered again)
    spectral           ours with AdamW, task loss only
    spectral_sgd_task      Figure 3 ablation (not in Table 1): spectral_sgd with the task loss only
    spectral_sgd_reg_only  Figure 3 ablation: spectral_sgd with the regulariser alone, from a perturbed Δ (a Δ = 0
                           start has zero regulariser gradient, so it would never move)

Register another with ``register_method(Method(name, label, build, description))``; ``build(model, config)``
returns a TrainSetup. The runner seeds torch before calling it, so random initialisations are reproducible.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .model import SentenceClassifier

__all__ = ["METHODS", "Method", "MethodConfig", "TrainSetup", "get_method", "register_method", "table_methods"]


@dataclass
class MethodConfig:
    """Hyperparameters shared by the methods (one budget for all: same data, steps, seeds, schedule).

    lr is the encoder learning rate of full fine-tuning and of the spectral methods (the same AdamW; ours only
    changes the gradient, or adds the regulariser); LoRA adapters use lora_lr, as usual for adapters. The head is
    new, so it gets head_lr in every method. Biases and LayerNorm weights get no weight decay (BERT convention).
    """
    lr: float = 1e-4
    head_lr: float = 1e-2
    lora_lr: float = 1e-3
    weight_decay: float = 0.01
    freeze_word_embeddings: bool = True   # the 30522×384 table is half of MiniLM; its dense update dominates a step
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("query", "value")
    smoa_blocks: int = 2                   # SMoA: K spectral blocks; rank K·lora_r keeps LoRA's parameter budget
    spectral_targets: tuple[str, ...] = ("query", "key", "value", "output.dense", "intermediate.dense")
    graph: str = "knn"
    block_size: int = 128
    k: int = 16
    knn: int = 8
    heat: float = 2.0
    passthrough: float = 0.0
    filter_method: str = "chebyshev"       # g(L) on the whole spectrum (paper 001); "basis": U g(Λ) Uᵀ, k lowest only
    chebyshev_order: int = 16
    refresh_every: int = 10                # graphs and bases rebuilt from the current weights (2 refreshes in 25 steps)
    reg_weight: float = 0.1
    reg_normalized: bool = False           # the regulariser's L: the paper's D − W
    fused: bool = True                     # SpectralAdamW (filter inside the step) vs filt.step() + AdamW
    lowpass_update: bool = True            # SpectralAdamW filters its Adam direction again (update stays low-pass)
    # The paper's update rule (SpectralSGD): plain gradient descent, its own learning rates (picked, like the
    # others, from short training losses only).
    sgd_lr: float = 0.03                   # from the default budget's 25-step training losses (docs/demo.md)
    sgd_head_lr: float = 1.0
    sgd_momentum: float = 0.0
    reg_only_perturbation: float = 0.01    # Figure 3's regulariser-only run starts at Δ = this · rms(W) · N(0, 1)
    # The Adapter baseline: bottleneck m = 8 gives 2 adapters × 6 layers × (2·8·384 + 392) ≈ LoRA r = 8's budget.
    adapter_bottleneck: int = 8
    adapter_lr: float = 1e-2               # 10-step training losses: 1e-3, 3e-3, 1e-2 → 1e-2 (docs/demo.md)
    # FourierFT / FourierMoE (paper 003). fourier_n None: LoRA's budget, 2n reals = lora_r·(in + out) per layer.
    # scale and lr follow the FourierFT paper's RoBERTa settings (scaling 150, spectrum lr ~5e-2); untuned here.
    fourier_n: int | None = None
    fourier_scale: float = 150.0
    fourier_lr: float = 5e-2
    fourier_experts: int = 4
    fourier_top_k: int = 2
    fourier_aux_weight: float = 0.01       # weight of the FourierMoE load-balancing loss in the objective
    # Coeff-Tuning (paper 004): dropout on ΔC is the paper's best (~0.2); coeff_lr is untuned here.
    coeff_dropout: float = 0.2
    coeff_lr: float = 1e-2

    def to_dict(self) -> dict:
        return {name: (list(v) if isinstance(v, tuple) else v) for name, v in self.__dict__.items()}


@dataclass
class TrainSetup:
    """What the training loop needs from a method.

    Attributes:
        model: the classifier to train (its encoder may be wrapped by peft).
        optimizer: steps the trainable parameters.
        spectral_filter: the SpectralGradientFilter, when the method has one (also used to log tr(ΔᵀLΔ)).
        filter_in_optimizer: the optimizer filters (SpectralAdamW); otherwise ``before_step`` calls filt.step().
        task_weight: weight of the task loss in the objective (0: the regulariser-only ablation).
        use_regularizer: add filt.regularization() to the objective.
        aux_loss / aux_weight: add aux_weight · aux_loss() (evaluated after the forward) to the objective.
    """
    model: SentenceClassifier
    optimizer: torch.optim.Optimizer
    spectral_filter: object | None = None
    filter_in_optimizer: bool = False
    task_weight: float = 1.0
    use_regularizer: bool = False
    notes: dict = field(default_factory=dict)
    aux_loss: Callable[[], torch.Tensor] | None = None   # e.g. FourierMoE's load balancing, read after forward
    aux_weight: float = 0.0

    def objective(self, task_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to backpropagate, logged parts). ``spec`` is reg_weight·Σ tr(ΔᵀLΔ), logged whenever there is a
        filter with a non-zero reg_weight, whether or not it is part of the objective."""
        parts = {"task": float(task_loss.detach())}
        loss = self.task_weight * task_loss
        filt = self.spectral_filter
        if filt is not None and filt.reg_weight != 0:
            if self.use_regularizer:
                spec = filt.regularization()
                loss = loss + spec
            else:
                with torch.no_grad():
                    spec = filt.regularization()
            parts["spec"] = float(spec.detach())
        if self.aux_loss is not None and self.aux_weight != 0:
            aux = self.aux_loss().to(loss.device)
            loss = loss + self.aux_weight * aux
            parts["aux"] = float(aux.detach())
        parts["total"] = float(loss.detach())
        return loss, parts

    def before_step(self) -> None:
        """Call between backward() and optimizer.step()."""
        if self.spectral_filter is not None and not self.filter_in_optimizer:
            self.spectral_filter.step()

    def trainable_parameters(self) -> int:
        return sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    build: Callable[[SentenceClassifier, MethodConfig], TrainSetup]
    description: str
    in_table: bool = True       # Table 1 / Figure 2 method (False: an ablation run only for Figure 3)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if not isinstance(method, Method):
        raise TypeError(f"method must be a spectralkern.finetune.Method, got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def table_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.in_table]


# ------------------------------------------------------------------------------------------------ builders
def _freeze_word_embeddings(model: SentenceClassifier, config: MethodConfig) -> None:
    if config.freeze_word_embeddings:
        embeddings = model.encoder.get_input_embeddings()
        embeddings.weight.requires_grad_(False)


def _param_groups(model: SentenceClassifier, encoder_lr: float, config: MethodConfig) -> list[dict]:
    """Head at head_lr; trainable encoder parameters at encoder_lr, no weight decay on biases / LayerNorm."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    decay, no_decay = [], []
    for name, p in model.encoder.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": head, "lr": config.head_lr, "weight_decay": config.weight_decay},
              {"params": decay, "lr": encoder_lr, "weight_decay": config.weight_decay},
              {"params": no_decay, "lr": encoder_lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_full(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    _freeze_word_embeddings(model, config)
    optimizer = torch.optim.AdamW(_param_groups(model, config.lr, config))
    return TrainSetup(model, optimizer)


def build_adapter(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    """Bottleneck adapters (adapter.py) + every LayerNorm + the head train; the rest of the encoder is frozen."""
    from .adapter import add_adapters
    for name, p in model.encoder.named_parameters():
        p.requires_grad_("LayerNorm" in name or "layer_norm" in name)
    model.adapters = add_adapters(model.encoder, config.adapter_bottleneck)
    head = [p for p in model.head.parameters() if p.requires_grad]
    adapters = list(model.adapters.parameters())
    norms = [p for p in model.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": head, "lr": config.head_lr, "weight_decay": config.weight_decay},
                                   {"params": adapters, "lr": config.adapter_lr, "weight_decay": config.weight_decay},
                                   {"params": norms, "lr": config.adapter_lr, "weight_decay": 0.0}])
    return TrainSetup(model, optimizer, notes={"adapter_parameters": sum(p.numel() for p in adapters)})


def build_lora(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ModuleNotFoundError("the LoRA baseline needs peft: pip install -e '.[finetune]'") from exc
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets), bias="none")
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model.encoder = get_peft_model(model.encoder, lora)   # freezes every encoder weight except the adapters
    optimizer = torch.optim.AdamW(_param_groups(model, config.lora_lr, config))
    return TrainSetup(model, optimizer)


def build_smoa(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    """SMoA (paper 002) on LoRA's targets with LoRA's trainable budget: rank K·lora_r split over K blocks gives
    K·lora_r·(in + out)/K = lora_r·(in + out) parameters per layer; alpha scaled alike (same alpha / r)."""
    from ..peft import SMoAConfig, apply_smoa, trainable_parameters
    blocks = config.smoa_blocks
    smoa = SMoAConfig(r=config.lora_r * blocks, alpha=config.lora_alpha * blocks, num_blocks=blocks,
                      dropout=config.lora_dropout, target_modules=list(config.lora_targets))
    apply_smoa(model.encoder, smoa)   # freezes every encoder weight except the SMoA factors
    optimizer = torch.optim.AdamW(_param_groups(model, config.lora_lr, config))
    return TrainSetup(model, optimizer, notes={"smoa_trainable": trainable_parameters(model.encoder).trainable})


def _build_fourier(model: SentenceClassifier, config: MethodConfig, *, experts: int) -> TrainSetup:
    """FourierFT (experts = 1) or FourierMoE (paper 003) on LoRA's targets with LoRA's budget of real parameters
    (2 per complex coefficient; FourierMoE adds its router, E·in per layer). Coefficients at fourier_lr without
    weight decay, the router at lora_lr, the head at head_lr."""
    from ..peft import (FourierFTConfig, FourierMoEConfig, apply_fourier_moe, find_target_modules,
                        fourier_moe_aux_loss, fourier_moe_layers, linear_features, trainable_parameters)
    targets = list(config.lora_targets)
    n = config.fourier_n
    if n is None:
        in_features, out_features = linear_features(find_target_modules(model.encoder, targets)[0][1])
        n = config.lora_r * (in_features + out_features) // 2
    if experts == 1:
        adapter = FourierFTConfig(n_frequencies=n, scale=config.fourier_scale, target_modules=targets)
    else:
        adapter = FourierMoEConfig(num_experts=experts, top_k=config.fourier_top_k, n_frequencies=n,
                                   scale=config.fourier_scale, target_modules=targets)
    apply_fourier_moe(model.encoder, adapter)   # freezes every encoder weight except coefficients and routers
    layers = fourier_moe_layers(model.encoder).values()
    coefficients = [p for layer in layers for p in (layer.coef_re, layer.coef_im) if p is not None]
    routers = [layer.router.weight for layer in layers if layer.router is not None]
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": config.head_lr,
               "weight_decay": config.weight_decay},
              {"params": coefficients, "lr": config.fourier_lr, "weight_decay": 0.0},
              {"params": routers, "lr": config.lora_lr, "weight_decay": config.weight_decay}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
    routed = experts > 1
    return TrainSetup(model, optimizer, aux_loss=(lambda: fourier_moe_aux_loss(model.encoder)) if routed else None,
                      aux_weight=config.fourier_aux_weight if routed else 0.0,
                      notes={"fourier_n": n, "fourier_trainable": trainable_parameters(model.encoder).trainable})


def build_fourierft(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    return _build_fourier(model, config, experts=1)


def build_fourier_moe(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    return _build_fourier(model, config, experts=config.fourier_experts)


def _build_coeff_tuning(model: SentenceClassifier, config: MethodConfig, *, with_lora: bool) -> TrainSetup:
    """Coeff-Tuning on every attention layer (H² = 144 parameters per MiniLM layer), ΔC at coeff_lr without weight
    decay; with LoRA, peft's adapters are applied first (their lora_lr) and ΔC is added on top."""
    from ..peft import CoeffTuningConfig, apply_coeff_tuning, coeff_tuning_layers, coeff_tuning_parameter_count
    if with_lora:
        groups = list(build_lora(model, config).optimizer.param_groups)
        apply_coeff_tuning(model.encoder, CoeffTuningConfig(dropout=config.coeff_dropout), freeze_others=False)
    else:
        apply_coeff_tuning(model.encoder, CoeffTuningConfig(dropout=config.coeff_dropout))
        groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": config.head_lr,
                   "weight_decay": config.weight_decay}]
    deltas = list({id(c.delta_c): c.delta_c for c in coeff_tuning_layers(model.encoder).values()}.values())
    groups.append({"params": deltas, "lr": config.coeff_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                                   for g in groups])
    return TrainSetup(model, optimizer, notes={"coeff_parameters": coeff_tuning_parameter_count(model.encoder)})


def build_coeff_tuning(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    return _build_coeff_tuning(model, config, with_lora=False)


def build_coeff_tuning_lora(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    return _build_coeff_tuning(model, config, with_lora=True)


def make_spectral_filter(model: nn.Module, config: MethodConfig, target_modules: tuple[str, ...] | None = None):
    """The SpectralGradientFilter the spectral methods use, from ``config``."""
    from ..filters import heat
    from ..optim import SpectralGradientFilter
    return SpectralGradientFilter(model, target_modules=list(target_modules or config.spectral_targets),
                                  graph=config.graph, block_size=config.block_size, k=config.k,
                                  gains=heat(config.heat), passthrough=config.passthrough,
                                  filter_method=config.filter_method, chebyshev_order=config.chebyshev_order,
                                  refresh_every=config.refresh_every, reg_weight=config.reg_weight, knn=config.knn,
                                  reg_normalized=config.reg_normalized)


def _build_spectral(model: SentenceClassifier, config: MethodConfig, *, task_weight: float,
                    use_regularizer: bool) -> TrainSetup:
    from ..optim import SpectralAdamW
    _freeze_word_embeddings(model, config)
    filt = make_spectral_filter(model, config)
    groups = _param_groups(model, config.lr, config)
    if config.fused:
        optimizer = SpectralAdamW(groups, spectral_filter=filt, lowpass_update=config.lowpass_update)
    else:
        if config.lowpass_update:
            raise ValueError("lowpass_update needs the fused SpectralAdamW (fused=True): filt.step() + torch AdamW "
                             "cannot filter the Adam direction")
        optimizer = torch.optim.AdamW(groups)
    return TrainSetup(model, optimizer, spectral_filter=filt, filter_in_optimizer=config.fused,
                      task_weight=task_weight, use_regularizer=use_regularizer, notes=_filter_notes(filt))


def _filter_notes(filt) -> dict:
    return {"filtered_weights": len(filt.targets), "filtered_parameters": sum(p.numel() for _, p in filt.targets)}


def _build_spectral_sgd(model: SentenceClassifier, config: MethodConfig, *, task_weight: float,
                        use_regularizer: bool, perturb: float = 0.0) -> TrainSetup:
    """Paper 001's update: θ ← θ − η·(F(∇L_task) + 2λ L_reg Δ) (SpectralSGD, no weight decay). ``perturb`` > 0
    moves every targeted weight by perturb · rms(W) · N(0, 1) after the filter is built (W₀ stays the pretrained
    weight), so the run starts at Δ ≠ 0."""
    from ..optim import SpectralSGD
    _freeze_word_embeddings(model, config)
    filt = make_spectral_filter(model, config)
    if perturb > 0:
        with torch.no_grad():
            for _, p in filt.targets:
                p.add_(torch.randn_like(p) * (perturb * float(p.square().mean().sqrt())))
    head = [p for p in model.head.parameters() if p.requires_grad]
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    optimizer = SpectralSGD([{"params": head, "lr": config.sgd_head_lr}, {"params": encoder, "lr": config.sgd_lr}],
                            momentum=config.sgd_momentum, spectral_filter=filt)
    return TrainSetup(model, optimizer, spectral_filter=filt, filter_in_optimizer=True, task_weight=task_weight,
                      use_regularizer=use_regularizer, notes=_filter_notes(filt))


def build_spectral_sgd(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    return _build_spectral_sgd(model, config, task_weight=1.0, use_regularizer=True)


def build_spectral_sgd_task(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    return _build_spectral_sgd(model, config, task_weight=1.0, use_regularizer=False)


def build_spectral_sgd_reg_only(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    return _build_spectral_sgd(model, config, task_weight=0.0, use_regularizer=True,
                               perturb=config.reg_only_perturbation)


def build_spectral(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    return _build_spectral(model, config, task_weight=1.0, use_regularizer=False)


def build_spectral_reg(model: SentenceClassifier, config: MethodConfig) -> TrainSetup:
    return _build_spectral(model, config, task_weight=1.0, use_regularizer=True)


register_method(Method("full", "Full FT (AdamW)", build_full,
                       "all encoder weights (word-embedding table frozen) + head, torch.optim.AdamW"))
register_method(Method("adapter", "Adapter (Houlsby bottleneck)", build_adapter,
                       "bottleneck adapters after attention-output and FFN-output projections + LayerNorms + head"))
register_method(Method("lora", "LoRA (peft)", build_lora,
                       "LoRA r=8 on query/value (peft) + head; encoder frozen"))
register_method(Method("smoa", "SMoA (fused)", build_smoa,
                       "SMoA, K=2 spectral blocks, rank 2·lora_r on query/value (LoRA's budget) + head"))
register_method(Method("spectral_sgd", "Ours, paper's rule (SpectralSGD)", build_spectral_sgd,
                       "filtered task gradient + unfiltered regulariser gradient, plain gradient descent"))
register_method(Method("spectral_reg", "Ours, AdamW (SpectralAdamW)", build_spectral_reg,
                       "the same filter and joint loss, SpectralAdamW (lowpass_update per config)"))
register_method(Method("spectral", "Ours, AdamW, task loss only", build_spectral,
                       "the spectral filter with SpectralAdamW, objective = task loss (no regulariser)"))
register_method(Method("spectral_sgd_task", "Paper's rule, task loss only", build_spectral_sgd_task,
                       "Figure 3 ablation: spectral_sgd without the regulariser in the objective", in_table=False))
register_method(Method("spectral_sgd_reg_only", "Paper's rule, regulariser only", build_spectral_sgd_reg_only,
                       "Figure 3 ablation: spectral_sgd with λ·tr(ΔᵀLΔ) alone, from a perturbed Δ", in_table=False))
register_method(Method("fourierft", "FourierFT (fused)", build_fourierft,
                       "FourierFT: complex conjugate-symmetric spectrum on query/value (LoRA's budget) + head"))
register_method(Method("fourier_moe", "FourierMoE (fused)", build_fourier_moe,
                       "FourierMoE: 4 radial-band experts, top-2 router, LoRA's budget on query/value + head"))
register_method(Method("coeff_tuning", "Coeff-Tuning (fused)", build_coeff_tuning,
                       "Coeff-Tuning: H × H head-mixing ΔC per attention layer, dropout 0.2 on ΔC + head"))
register_method(Method("coeff_tuning_lora", "Coeff-Tuning + LoRA", build_coeff_tuning_lora,
                       "LoRA r=8 on query/value (peft) + Coeff-Tuning ΔC on every attention layer + head"))
