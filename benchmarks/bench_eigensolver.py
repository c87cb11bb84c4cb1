"""Benchmark the partial eigensolver: ``python benchmarks/bench_eigensolver.py [--quick] [--out DIR] ...``.

A thin wrapper over the harness in ``spectralkern.bench`` (same options as ``spectralkern bench``, with
``--ops eigensolver``). After the run it also writes ``<out>/eigensolver_matvecs.jsonl``: the products by L of
each provider's checked call, one line per (case, provider) — the harness's records hold times, not counts.
Works from a checkout that is not pip-installed: the repository root is put on sys.path when needed.
"""
import json
import sys
from pathlib import Path

try:
    import spectralkern  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectralkern.bench import main
from spectralkern.bench.cases import eigensolver
from spectralkern.bench.records import utc_timestamp
from spectralkern.bench.runner import build_parser, default_out_dir


def write_matvecs(out: Path) -> Path:
    path = out / "eigensolver_matvecs.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    stamp = utc_timestamp()
    with path.open("a", encoding="utf-8") as handle:
        for (case, provider), products in eigensolver.MATVECS.items():
            handle.write(json.dumps({"case": case, "provider": provider, "matvecs": products,
                                     "timestamp": stamp}, sort_keys=True) + "\n")
    return path


if __name__ == "__main__":
    argv = ["--ops", "eigensolver", *sys.argv[1:]]
    status = main(argv)
    out = build_parser().parse_args(argv).out or default_out_dir()
    print(f"products by L per provider: {write_matvecs(out)}")
    sys.exit(status)
