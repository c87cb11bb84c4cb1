"""Plain-text results table: one row per (case, dtype, provider), one speed-ratio column per peer provider."""
from __future__ import annotations

from collections.abc import Sequence

from .records import Record


def _label(record: Record) -> str:
    return f"{record.provider}[{record.backend}]" if record.provider == "spectralkern" else record.provider


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value >= 0.01 else f"{value:.1e}x"  # the interpreter can be 1000x slower


def format_table(records: Sequence[Record]) -> str:
    """Rows grouped by op (a banner line each). Column "vs P" holds P's median / this row's median: > 1 means this
    row's provider is that many times faster than P in the same case."""
    blocks = []
    for op in dict.fromkeys(r.op for r in records):
        rows = [r for r in records if r.op == op]
        peers = list(dict.fromkeys(r.provider for r in rows))
        header = ["case", "dtype", "provider", "ms", "p20-p80 ms", "GB/s", "%copy", "TFLOP/s", "%mm",
                  *[f"vs {p}" for p in peers]]
        table = [header]
        for r in rows:
            table.append([r.case, r.dtype, _label(r), f"{r.median_ms:.4g}", f"{r.p20_ms:.4g}-{r.p80_ms:.4g}",
                          f"{r.gbps:.1f}", f"{r.pct_copy:.1f}", f"{r.tflops:.3g}", f"{r.pct_matmul:.1f}",
                          *[_ratio(r.ratios[p]) if p in r.ratios else "" for p in peers]])
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        first = rows[0]
        matmul = {r.dtype: f"{r.dtype}: {r.matmul_peak} = {r.matmul_tflops:.3g} TFLOP/s" for r in rows}
        lines = [f"== {op} on {first.device} | torch {first.torch_version}, triton {first.triton_version}, "
                 f"git {first.git_sha[:12]}{'-dirty' if first.git_dirty else ''}",
                 f"   ceilings: copy {first.copy_gbps:.1f} GB/s; matmul {'; '.join(matmul.values())}"]
        for i, row in enumerate(table):
            lines.append("  ".join(cell.ljust(w) if j < 3 else cell.rjust(w)
                                   for j, (cell, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("vs P = P's median / this row's median (> 1: this row is faster). %copy: of the measured copy "
                     "bandwidth; %mm: of the matmul ceiling above for the row's dtype.")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
