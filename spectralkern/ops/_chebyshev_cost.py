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

Both have a second price for the elements they stream once their working set (recursion: T_{m−1}, T_m, T_{m+1}
and y, 4·N·d elements; materialized: x and y plus the gathered copies) outgrows the cache: each streamed unit
costs extra in proportion to max(0, 1 − cache_bytes / working set) (measured: 3.5× the in-cache time of the
recursion at N·d = 16M).

Each constant is seconds per unit on one thread (``torch.set_num_threads(1)``), fitted by :func:`calibrate`
(non-negative least squares on relative error over a sweep of K, n, d and block counts); ``MEASURED`` holds the
values measured on the CPU this package was tuned on (benchmarks/NOTES.md, "Chebyshev filter", "On the CPU"), for
float32 and float64 accumulation. Other devices reuse the CPU row of the dtype: only the ratio between the two
forms matters to the choice.
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
    sparse_mac_dram: float     # recursion: extra per CSR multiply-add, × the out-of-cache fraction
    step_element_dram: float   # recursion: extra per element pass, × the out-of-cache fraction
    stream_element_dram: float  # materialized: extra per element of x, y and the gathered copies, × that fraction
    cache_bytes: float = 8 * 2**20  # the working set that still runs at in-cache speed (not a linear term)


_LINEAR = [f.name for f in fields(CostConstants) if f.name != "cache_bytes"]


# Measured with ``python -m spectralkern.ops._chebyshev_cost`` (``calibrate()``, 5 rounds) on the 2-core dev machine
# (Xeon @ 2.8 GHz, AVX-512, torch 2.13 CPU), one thread, ``--dtype float32`` / ``float64``; the sweeps' rows:
# benchmarks/results/chebyshev-cpu-cost.json and chebyshev-cpu-cost-float64.json.
MEASURED: dict[tuple[str, torch.dtype], CostConstants] = {
    ("cpu", torch.float32): CostConstants(sparse_mac=6.03e-11, sparse_entry=1.78e-09, step_element=6.38e-10,
                                          step_call=1.07e-05, recursion_call=4.89e-05, build_mac=1.35e-11,
                                          dense_element=3.2e-10, build_call=1.06e-05, apply_mac=1.59e-11,
                                          gather_element=5.36e-10, group_call=6.27e-05, gather_call=5.77e-05,
                                          sparse_mac_dram=7.49e-11, step_element_dram=1.55e-09,
                                          stream_element_dram=2.78e-10, cache_bytes=16 * 2**20),
    ("cpu", torch.float64): CostConstants(sparse_mac=1.08e-10, sparse_entry=1.78e-09, step_element=1.58e-09,
                                          step_call=7.67e-06, recursion_call=5.2e-05, build_mac=2.83e-11,
                                          dense_element=4.64e-10, build_call=1.07e-05, apply_mac=3.2e-11,
                                          gather_element=1.15e-09, group_call=6.37e-05, gather_call=5.01e-05,
                                          sparse_mac_dram=3.39e-11, step_element_dram=5.5e-09,
                                          stream_element_dram=6.31e-10, cache_bytes=32 * 2**20),
}


def constants_for(device_type: str, acc: torch.dtype) -> CostConstants:
    return MEASURED.get((device_type, acc), MEASURED.get(("cpu", acc), MEASURED[("cpu", torch.float32)]))


def _features(algorithm: str, facts: Mapping[str, object], cache_bytes: float) -> list[float]:
    """The work of ``algorithm`` in the linear units of ``CostConstants`` (the order of ``_LINEAR``; zero where
    unused)."""
    order, d, nodes = int(facts["order"]), float(facts["d"]), float(facts["nodes"])
    element = torch.empty(0, dtype=facts.get("acc", torch.float32)).element_size()

    def out_of_cache(elements: float) -> float:
        return max(0.0, 1.0 - cache_bytes / max(elements * element, 1.0))
    if algorithm == "recursion":
        nnz = float(facts["nnz"])
        dram = out_of_cache(4 * nodes * d)
        return [order * nnz * d, order * nnz, order * nodes * d, float(order), 1.0, 0, 0, 0, 0, 0, 0, 0,
                dram * order * nnz * d, dram * order * nodes * d, 0]
    groups = facts["groups"]
    products = max(order - 1, 0)
    cubes = sum(g * n ** 3 for g, n in groups)
    squares = sum(g * n * n for g, n in groups)
    in_order = len(groups) == 1 and groups[0][0] * groups[0][1] == nodes
    padded = sum(g * n for g, n in groups)
    streamed = 2 * nodes * d + (0.0 if in_order else 2.0 * padded * d)
    return [0, 0, 0, 0, 0, products * cubes, (products + 3) * squares, products * len(groups), squares * d,
            0.0 if in_order else 2.0 * padded * d, float(len(groups)), 0.0 if in_order else float(len(groups)),
            0, 0, out_of_cache(streamed) * streamed]


def seconds(algorithm: str, facts: Mapping[str, object], constants: CostConstants | None = None) -> float:
    """Predicted seconds of one pass of ``algorithm`` ("recursion" or "materialized") for the facts order, d,
    nodes, nnz, groups ((G, n), ...), device_type and acc (the accumulation dtype); ``constants`` default to the
    measured ones of that device and dtype."""
    c = constants or constants_for(str(facts.get("device_type", "cpu")), facts.get("acc", torch.float32))
    return sum(getattr(c, name) * w for name, w in zip(_LINEAR, _features(algorithm, facts, c.cache_bytes)))


# ------------------------------------------------------------------------------------------ calibration
def _sweep() -> list[tuple[int, int, int, int, bool]]:
    """(order K, block size n, d, blocks B, ragged) points around the crossover, each a few ms at most, plus a few
    with x of 4M–16M elements (out of cache; up to ~0.5 s)."""
    points = [(order, n, d, blocks, False) for order in (2, 8)
              for n, d, blocks in ((16, 4096, 64), (32, 2048, 64), (64, 512, 256), (128, 4096, 32), (256, 1024, 16))]
    points += [(8, 128, 2048, 32, True), (8, 256, 1024, 32, True)]
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


def calibrate(rounds: int = 5, progress: bool = False,
              dtype: torch.dtype = torch.float32) -> tuple[CostConstants, list[dict[str, object]]]:
    """Time both forms over ``_sweep()`` in ``dtype`` (the accumulation dtype: float32 or float64; thread CPU time,
    min of ``rounds`` interleaved rounds, one thread) and fit ``CostConstants``. Returns the constants and the rows
    (facts, measured and predicted seconds)."""
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
        crow, col, val = m.crow_indices(), m.col_indices(), m.values().to(dtype)
        groups, index = dense.dense_groups(L.block_ptr, crow, col, val)
        x = torch.randn(ptr[-1], d, generator=gen, dtype=dtype)
        coeffs = torch.randn(order + 1, generator=gen, dtype=dtype)
        facts = {"order": order, "d": d, "nodes": ptr[-1], "nnz": val.numel(),
                 "groups": dense.group_shapes(sizes), "acc": dtype}
        runs = {"recursion": lambda x=x, c=coeffs, a=(crow, col, val): _torch_recursion(x, c, *a, None, True),
                "materialized": lambda x=x, c=coeffs, g=groups, i=index: dense.apply(x, g, i, c)}
        cases.append((facts, runs, {name: float("inf") for name in runs}))
    try:
        for r in range(rounds):
            for facts, runs, best in cases:
                for name, run in runs.items():
                    if r == 0:
                        run()  # warm: first-call allocations
                    start = time.thread_time()
                    run()
                    best[name] = min(best[name], time.thread_time() - start)
            if progress:
                print(f"round {r + 1}/{rounds}")
    finally:
        torch.set_num_threads(threads)
    fits = []
    for cache_bytes in (2**20 * m for m in (1, 2, 4, 8, 16, 32)):  # the cache size: the best fit of a few
        matrix = [[f / best[name] for f in _features(name, facts, cache_bytes)]  # relative error: rows / measured
                  for facts, _, best in cases for name in ALGORITHMS]
        solution, residual = scipy.optimize.nnls(np.asarray(matrix), np.ones(len(matrix)))
        fits.append((residual, cache_bytes, solution))
    _, cache_bytes, solution = min(fits, key=lambda fit: fit[0])
    constants = CostConstants(*map(float, solution), cache_bytes=float(cache_bytes))
    report = []
    for facts, _, best in cases:
        row = dict(facts)
        for name in ALGORITHMS:
            row[name] = best[name]
            row[f"{name}_predicted"] = seconds(name, facts, constants)
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
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args(argv)
    constants, rows = calibrate(args.rounds, dtype=getattr(torch, args.dtype))
    print(constants)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"constants": {f.name: getattr(constants, f.name) for f in fields(CostConstants)},
                       "rows": [{**row, "acc": str(row["acc"])} for row in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
