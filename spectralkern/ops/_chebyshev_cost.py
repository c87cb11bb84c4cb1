"""The torch backend's cost model for chebyshev_filter: predicted seconds of the recursion and the materialised form.

The registry (``_backend.OPS["chebyshev_filter"]``) calls :func:`seconds` for each torch algorithm and runs the
cheaper. Terms, for order K, x of N × d, nnz stored entries of L, and the block groups ((G, n), ...) of
``_chebyshev_dense.group_shapes``:

    recursion      K steps, each one CSR product (nnz·d multiply-adds, plus a cost per stored entry whatever d)
                   and ~3 elementwise passes over N × d (the recurrence's sum, the accumulation), plus a fixed cost
                   per step (op dispatches) and one per call
    materialized   build: K − 1 batched products per group (G·n³ multiply-adds, plus a cost per matrix element and
                   per call); apply: one batched product (G·n²·d) per group, plus the gather of x and scatter of y
                   (G·n·d each, plus a fixed cost per group) when the blocks are not every node in order, plus a
                   fixed cost per group

Each constant is seconds per unit on one thread (``torch.set_num_threads(1)``), fitted by :func:`calibrate`
(non-negative least squares on relative error over a sweep of K, n, d and block counts); ``MEASURED`` holds the
values measured on the CPU this package was tuned on (benchmarks/NOTES.md, "Chebyshev filter on the CPU"). Other
devices and dtypes reuse the CPU fp32 row: only the ratio between the two forms matters to the choice.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

ALGORITHMS = ("recursion", "materialized")


@dataclass(frozen=True)
class CostConstants:
    """Seconds per unit of each kind of work (see the module docstring)."""

    sparse_mac: float     # recursion: one multiply-add of the CSR product (per stored entry per column)
    sparse_entry: float   # recursion: one stored entry of one CSR product, whatever d
    step_element: float   # recursion: one element of N × d per step (the elementwise passes)
    step_call: float      # recursion: fixed cost of one step
    recursion_call: float  # recursion: fixed cost of one call (the CSR view, the output, T_0 in the acc dtype)
    build_mac: float      # materialized: one multiply-add of the build's batched n × n products
    dense_element: float  # materialized: one element of an n × n matrix per build step (small products' overhead,
                          # the diagonal updates) and per setup pass (Clenshaw's buffers, the padding mask)
    build_call: float     # materialized: fixed cost of one build product of one group
    apply_mac: float      # materialized: one multiply-add of the apply product (G·n²·d)
    gather_element: float  # materialized: one element of the gather of x and the scatter of y (ragged groups)
    group_call: float     # materialized: fixed cost per group (allocation, Clenshaw's setup, the apply call)
    gather_call: float    # materialized: fixed cost per group of the gather and scatter (ragged groups)


# Measured with ``python -m spectralkern.ops._chebyshev_cost`` (``calibrate()``, 7 rounds) on the 2-core dev machine
# (Xeon @ 2.8 GHz, AVX-512, torch 2.13 CPU), one thread; the sweep's rows: benchmarks/results/chebyshev-cpu-cost.json.
MEASURED: dict[tuple[str, torch.dtype], CostConstants] = {
    ("cpu", torch.float32): CostConstants(sparse_mac=5.89e-11, sparse_entry=1.58e-09, step_element=5.24e-10,
                                          step_call=1.09e-05, recursion_call=4.39e-05, build_mac=1.38e-11,
                                          dense_element=2.98e-10, build_call=1.08e-05, apply_mac=1.3e-11,
                                          gather_element=5.13e-10, group_call=5.3e-05, gather_call=5.3e-05),
}


def constants_for(device_type: str, acc: torch.dtype) -> CostConstants:
    return MEASURED.get((device_type, acc), MEASURED[("cpu", torch.float32)])


def _features(algorithm: str, facts: Mapping[str, object]) -> list[float]:
    """The work of ``algorithm`` in the units of ``CostConstants`` (same order as its fields; zero where unused)."""
    order, d, nodes = int(facts["order"]), float(facts["d"]), float(facts["nodes"])
    if algorithm == "recursion":
        nnz = float(facts["nnz"])
        return [order * nnz * d, order * nnz, order * nodes * d, float(order), 1.0, 0, 0, 0, 0, 0, 0, 0]
    groups = facts["groups"]
    products = max(order - 1, 0)
    cubes = sum(g * n ** 3 for g, n in groups)
    squares = sum(g * n * n for g, n in groups)
    in_order = len(groups) == 1 and groups[0][0] * groups[0][1] == nodes
    padded = sum(g * n for g, n in groups)
    return [0, 0, 0, 0, 0, products * cubes, (products + 3) * squares, products * len(groups), squares * d,
            0.0 if in_order else 2.0 * padded * d, float(len(groups)), 0.0 if in_order else float(len(groups))]


def seconds(algorithm: str, facts: Mapping[str, object]) -> float:
    """Predicted seconds of one pass of ``algorithm`` ("recursion" or "materialized") for the facts order, d,
    nodes, nnz, groups ((G, n), ...), device_type and acc (the accumulation dtype)."""
    c = constants_for(str(facts.get("device_type", "cpu")), facts.get("acc", torch.float32))
    return sum(getattr(c, f.name) * w for f, w in zip(fields(CostConstants), _features(algorithm, facts)))


# ------------------------------------------------------------------------------------------ calibration
def _sweep() -> list[tuple[int, int, int, int, bool]]:
    """(order K, block size n, d, blocks B, ragged) points around the crossover, each a few ms at most."""
    points = []
    for n in (1, 4, 8, 16, 48, 128, 256):
        for d in (1, 16, 128, 1024):
            for order in (2, 4, 8, 16):
                blocks = max(1, min(64, 8192 // max(n * d // 8, 1)))
                if n * blocks * d > 2**19:
                    continue
                points.append((order, n, d, blocks, False))
                if n >= 8 and order in (4, 16):
                    points.append((order, n, d, blocks, True))
    return points


def calibrate(rounds: int = 5, progress: bool = False) -> tuple[CostConstants, list[dict[str, object]]]:
    """Time both forms over ``_sweep()`` (thread CPU time, min of ``rounds`` interleaved rounds, one thread) and
    fit ``CostConstants``. Returns the constants and the rows (facts, measured and predicted seconds)."""
    import numpy as np
    import scipy.optimize

    from ..graph import ParameterGraph
    from . import _chebyshev_dense as dense
    from .chebyshev_filter import _torch_recursion

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    cases = []
    for order, n, d, blocks, ragged in _sweep():
        sizes = (torch.randint(max(1, n // 2), n + 1, (blocks,), generator=gen).tolist() if ragged
                 else [n] * blocks)
        ptr = [0]
        for size in sizes:
            ptr.append(ptr[-1] + size)
        rows = torch.randn(ptr[-1], 16, generator=gen)
        L = ParameterGraph.knn(rows, k=min(8, max(n - 1, 1)), block_ptr=ptr).laplacian()
        m = L.matrix
        crow, col, val = m.crow_indices(), m.col_indices(), m.values().float()
        groups, index = dense.dense_groups(L.block_ptr, crow, col, val)
        x = torch.randn(ptr[-1], d, generator=gen)
        coeffs = torch.randn(order + 1, generator=gen)
        facts = {"order": order, "d": d, "nodes": ptr[-1], "nnz": val.numel(),
                 "groups": dense.group_shapes(sizes)}
        runs = {"recursion": lambda x=x, c=coeffs, a=(crow, col, val): _torch_recursion(x, c, *a, None, True),
                "materialized": lambda x=x, c=coeffs, g=groups, i=index: dense.apply(x, g, i, c)}
        cases.append((facts, runs, {name: float("inf") for name in runs}))
    try:
        for r in range(rounds):
            for facts, runs, best in cases:
                for name, run in runs.items():
                    run()  # warm (first round) / keep caches comparable
                    start = time.thread_time()
                    run()
                    best[name] = min(best[name], time.thread_time() - start)
            if progress:
                print(f"round {r + 1}/{rounds}")
    finally:
        torch.set_num_threads(threads)
    matrix, target = [], []
    for facts, _, best in cases:
        for name in ALGORITHMS:
            features = _features(name, facts)
            matrix.append([f / best[name] for f in features])  # relative error: each row scaled by 1/measured
            target.append(1.0)
    solution, _ = scipy.optimize.nnls(np.asarray(matrix), np.asarray(target))
    constants = CostConstants(*map(float, solution))
    report = []
    for facts, _, best in cases:
        row = dict(facts)
        for name in ALGORITHMS:
            row[name] = best[name]
            row[f"{name}_predicted"] = sum(w * f for w, f in zip(solution, _features(name, facts)))
        report.append(row)
    return constants, report


def main(argv: list[str] | None = None) -> None:
    """``python -m spectralkern.ops._chebyshev_cost [--rounds R] [--out FILE.json]``: calibrate here and print the
    constants (paste them into ``MEASURED``); ``--out`` keeps every row (facts, measured, predicted)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    constants, rows = calibrate(args.rounds)
    print(constants)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"constants": {f.name: getattr(constants, f.name) for f in fields(CostConstants)},
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
