"""Writes a comparison's results: results.json, table.md (Table 1 + Figure 2 numbers), figure2.png, figure3.png.

Plots use matplotlib's Agg backend (no display needed); without matplotlib the JSON and the table are still
written and the missing plots are named in the returned notes.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["budget_lines", "markdown_table", "write_report"]


def _pm(value: tuple[float, float], seeds: int, scale: float = 100.0, digits: int = 2) -> str:
    mean, std = value
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if seeds > 1 else text


def _pm_or_dash(value, seeds: int, scale: float, digits: int) -> str:
    """As _pm; '—' when the metric is undefined (NaN: the method did not change the filtered weights)."""
    return "—" if value[0] != value[0] else _pm(tuple(value), seeds, scale, digits)


def budget_lines(results: dict) -> list[str]:
    """The budget choices of the run, in words (printed, and written at the top of table.md)."""
    cfg, data = results["config"], results["data"]
    m = cfg["method"]
    steps = {r["method"]: r["steps"] for r in results["runs"] if r["fraction"] == 1.0}
    any_steps = next(iter(steps.values()), 0)
    lines = [
        f"Data: {data['name']}, {data['documents']} documents in {len(data['classes'])} classes; fixed stratified "
        f"held-out split of {data['held_out']} documents (split_seed {cfg['split_seed']}); training on "
        f"{data['train_documents'].get('1.0', '?')} documents of the {data['train_pool']}-document training pool "
        f"(train_size {cfg['train_size']}).",
        f"Budget (same for every method): max_length {cfg['max_length']} tokens "
        f"({data['truncated_share']:.0%} of documents truncated), batch {cfg['batch_size']}, {cfg['epochs']} epoch(s) "
        f"= {any_steps} steps, linear warm-up {cfg['warmup_fraction']:.0%} then linear decay; seeds {cfg['seeds']}.",
        f"Optimiser: AdamW, encoder lr {m['lr']:g} (full FT and ours with AdamW), LoRA lr {m['lora_lr']:g}, adapter "
        f"lr {m['adapter_lr']:g}, head lr {m['head_lr']:g}, weight decay {m['weight_decay']:g}; the paper's rule "
        f"(SpectralSGD): lr {m['sgd_lr']:g}, head lr {m['sgd_head_lr']:g}, momentum {m['sgd_momentum']:g}, no weight "
        f"decay; word-embedding table {'frozen' if m['freeze_word_embeddings'] else 'trained'} in every method.",
        f"Ours: {m['graph']} graph ({m['knn']} neighbours) over the rows of every {', '.join(m['spectral_targets'])} "
        f"weight, blocks of {m['block_size']} rows, heat gains g(λ) = exp(-{m['heat']:g} λ) of the normalized L, "
        + (f"applied to the whole spectrum (Chebyshev order {m['chebyshev_order']})"
           if m['filter_method'] == 'chebyshev' else
           f"k = {m['k']} lowest frequencies per block, passthrough {m['passthrough']:g}")
        + f"; only the task gradient is filtered; regulariser λ·tr(ΔᵀLΔ), λ = {m['reg_weight']:g}, L = "
        f"{'normalized' if m['reg_normalized'] else 'D − W'}, its gradient unfiltered; graphs and bases refreshed "
        f"every {m['refresh_every']} steps; AdamW variant: "
        f"{'SpectralAdamW' if m['fused'] else 'filt.step() + AdamW'}"
        f"{', lowpass_update (the Adam direction filtered again)' if m['lowpass_update'] else ''}.",
        f"Adapter: bottleneck m = {m['adapter_bottleneck']} after every attention-output and FFN-output projection.",
        f"LoRA: r = {m['lora_r']}, alpha = {m['lora_alpha']}, dropout {m['lora_dropout']:g}, on "
        f"{', '.join(m['lora_targets'])}.",
    ]
    timing, env = results.get("timing", {}), results.get("environment", {})
    if "wall_seconds" in timing:
        lines.append(f"Update metrics: Δ = W − W₀ of the filtered weights, in the spectrum of the pretrained weights' "
                     f"graphs (the same U₀, k = {m['k']}, and normalized L for every method); train time as CPU "
                     f"time per step, relative to full FT.")
        lines.append(f"Time: {timing['wall_seconds']:.0f} s wall, {timing.get('cpu_seconds', float('nan')):.0f} s CPU "
                     f"(all threads) on {env.get('device', '?')} with {env.get('torch_threads', '?')} torch threads; "
                     f"{len(results['runs'])} runs.")
    return lines


def markdown_table(results: dict) -> str:
    """Table 1 (accuracy, macro precision, macro recall in %, mean ± std over seeds) and Figure 2's numbers."""
    table, methods = results["table1"], results["methods"]
    lines = ["| Method | Accuracy (%) | Macro precision (%) | Macro recall (%) | Trainable params "
             "| Energy outside span(U₀) (%) | tr(ΔᵀLΔ)/‖Δ‖² | CPU s / step | Step cost vs full FT |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in table.items():
        seeds = row["seeds"]
        cost = row.get("step_cost_vs_full")
        lines.append(f"| {methods[name]['label']} | {_pm(row['accuracy'], seeds)} | "
                     f"{_pm(row['macro_precision'], seeds)} | {_pm(row['macro_recall'], seeds)} | "
                     f"{row['trainable_parameters'] / 1e6:.2f} M | {_pm_or_dash(row['outside_span'], seeds, 100.0, 1)} | "
                     f"{_pm_or_dash(row['dirichlet'], seeds, 1.0, 3)} | "
                     f"{_pm(row['cpu_seconds_per_step'], seeds, 1.0, 2)} | "
                     f"{_pm(tuple(cost), seeds, 1.0, 2) + '×' if cost else '—'} |")
    figure2 = {name: points for name, points in results["figure2"].items() if len(points) > 1}
    if figure2:
        fractions = sorted({float(f) for points in figure2.values() for f in points})
        lines += ["", "Accuracy (%) by share of the training set (Figure 2):", "",
                  "| Method | " + " | ".join(f"{f:.0%} ({results['data']['train_documents'][str(f)]} docs)"
                                             for f in fractions) + " |",
                  "| --- |" + " ---: |" * len(fractions)]
        for name, points in figure2.items():
            seeds = table.get(name, {}).get("seeds", 1)
            cells = [_pm(tuple(points[str(f)]), seeds) if str(f) in points else "—" for f in fractions]
            lines.append(f"| {methods[name]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_figure2(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in results["figure2"].items():
        fractions = sorted(float(f) for f in points)
        means = [100 * points[str(f)][0] for f in fractions]
        stds = [100 * points[str(f)][1] for f in fractions]
        ax.errorbar([100 * f for f in fractions], means, yerr=stds, marker="o", capsize=3,
                    label=results["methods"][name]["label"])
    ax.set_xlabel("share of the training set (%)")
    ax.set_ylabel("held-out accuracy (%)")
    seeds = len(results["config"]["seeds"])
    ax.set_title(f"Accuracy vs training data ({seeds} seed{'s' if seeds > 1 else ''})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _plot_figure3(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["figure3"]
    labels = {"spectral_sgd_task": "task loss only", "spectral_sgd_reg_only": "regulariser only (from a perturbed Δ)",
              "spectral_sgd": "joint loss"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.0))
    window = max(1, len(next(iter(curves.values()))["step"]) // 10) if curves else 1
    for name, curve in curves.items():
        label = labels.get(name, name)
        if "task" in curve:
            left.plot(curve["step"], _smooth(curve["task"], window), label=label)
        if "spec" in curve:
            right.plot(curve["step"], curve["spec"], label=label)
    left.set_title("task loss (cross-entropy" + (f", moving mean of {window} steps)" if window > 1 else ")"))
    right.set_title("λ·tr(ΔᵀLΔ) (regulariser value)")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    right.set_yscale("symlog", linthresh=1e-6)
    fig.suptitle("Objective: task only vs regulariser only vs joint (the paper's update rule, SpectralSGD)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir: str | Path) -> list[str]:
    """Write results.json, table.md and the plots into ``out_dir`` (created); returns notes on what was skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = ["# Fine-tuning comparison", "", *[f"- {line}" for line in budget_lines(results)], "",
            markdown_table(results), ""]
    notes = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        notes.append("matplotlib is not installed: figure2.png and figure3.png were not drawn")
    else:
        if any(len(points) > 1 for points in results["figure2"].values()):
            _plot_figure2(results, out / "figure2.png")
            text.append("![Figure 2](figure2.png)")
        if results["figure3"]:
            _plot_figure3(results, out / "figure3.png")
            text.append("![Figure 3](figure3.png)")
    (out / "table.md").write_text("\n".join(text) + "\n")
    return notes
