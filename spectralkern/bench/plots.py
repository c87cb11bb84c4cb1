"""Time-vs-size plots (matplotlib, Agg backend, PNG): one file per op, one panel per dtype, one line per
(provider, block layout), with the copy-bandwidth floor (bytes / measured copy GB/s) for reference."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .records import Record


def plot_op(records: Sequence[Record], path: Path) -> Path:
    """Write the plot of one op's records to ``path``; returns it. Needs matplotlib (the ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and GPU boxes have no display
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r.dtype for r in records))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = sorted((r for r in records if r.dtype == dtype), key=lambda r: r.bytes)
        series: dict[tuple[str, str], list[Record]] = {}
        for r in rows:
            label = f"{r.provider}[{r.backend}]" if r.provider == "spectralkern" else r.provider
            series.setdefault((label, r.layout), []).append(r)
        for (label, layout), points in series.items():
            mb = [p.bytes / 1e6 for p in points]
            ms = [p.median_ms for p in points]
            err = [[p.median_ms - p.p20_ms for p in points], [p.p80_ms - p.median_ms for p in points]]
            ax.errorbar(mb, ms, yerr=err, marker="o" if layout == "uniform" else "s",
                        linestyle="-" if layout == "uniform" else "--", capsize=2, label=f"{label} ({layout})")
        sizes = sorted({r.bytes for r in rows})
        ax.plot([b / 1e6 for b in sizes], [b / (rows[0].copy_gbps * 1e9) * 1e3 for b in sizes], "k:",
                label=f"copy floor ({rows[0].copy_gbps:.0f} GB/s)")
        ax.set(xscale="log", yscale="log", xlabel="minimum bytes moved (MB)", ylabel="median time (ms)",
               title=f"{records[0].op}, {dtype} on {records[0].device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
