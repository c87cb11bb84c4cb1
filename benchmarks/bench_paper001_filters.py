"""Per-step cost of the gradient filters of paper 001 at the demo's shapes (one CPU thread, medians and minima of
shuffled interleaved runs, same process).

    OMP_NUM_THREADS=1 python benchmarks/bench_paper001_filters.py [--repeats 30]

Per weight shape (MiniLM-L6: 384 × 384, 1536 × 384, 384 × 1536; blocks of 128 rows; kNN graph, knn = 8; k = 16;
heat g(λ) = exp(−2λ) on the normalized Laplacian): the time of ``FilterTarget.filter(grad)`` for
    basis h=0            U g(Λ) Uᵀ on the k lowest frequencies (the default)
    basis h=g(λ_k)       the same plus h·(I − U Uᵀ) with h = exp(−2·max λ_k)
    chebyshev K=10 / 16  g(L) on the whole spectrum (filter_method="chebyshev": g(L_b) materialised per block at
                         each refresh, one batched GEMM per step)
    cheb-op K=10         the same g(L) by ``sk.chebyshev_filter`` every step (K sparse products)
and the error of each against float64 g(L) from a dense eigendecomposition of every block.

``--optimizers``: one optimizer step per weight shape (gradient given, λ = 1e-3 regulariser in the loss or not):
torch AdamW, SpectralAdamW (fused path; with the regulariser: filter, then AdamW), SpectralAdamW(lowpass_update),
SpectralSGD, each with the basis filter.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

import spectralkern as sk

SHAPES = [(384, 384), (1536, 384), (384, 1536)]  # (out rows N, in columns d)


def build(n: int, d: int, **options) -> sk.SpectralGradientFilter:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, n))
    return sk.SpectralGradientFilter(model, ["0"], block_size=128, k=16, knn=8, refresh_every=0,
                                     gains=sk.heat(2.0), progress=False, **options)


def exact(target, grad: torch.Tensor) -> torch.Tensor:
    L = target.laplacian.to_dense().double()
    out = torch.empty_like(grad, dtype=torch.float64)
    ptr = target.laplacian.block_ptr.tolist()
    for start, stop in zip(ptr[:-1], ptr[1:]):
        values, vectors = torch.linalg.eigh(L[start:stop, start:stop])
        out[start:stop] = vectors @ (torch.exp(-2 * values)[:, None] * (vectors.T @ grad[start:stop].double()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--optimizers", action="store_true", help="time optimizer steps instead of filters")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.optimizers:
        optimizer_steps(args.repeats)
        return
    print(f"{'shape':>12} {'variant':>18} {'median ms':>10} {'min ms':>8} {'vs h=0':>8} {'rel err vs g(L)':>16}")
    for n, d in SHAPES:
        base = build(n, d)
        h = float(torch.exp(-2 * base.filter_targets[0].basis.eigenvalues.max()))
        variants = {"basis h=0": base, f"basis h=g(λk)={h:.2f}": build(n, d, passthrough=h),
                    "chebyshev K=10": build(n, d, filter_method="chebyshev", chebyshev_order=10),
                    "chebyshev K=16": build(n, d, filter_method="chebyshev", chebyshev_order=16)}
        grad = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
        reference = exact(base.filter_targets[0], grad)
        cheb = variants["chebyshev K=10"].filter_targets[0]
        runs = {name: filt.filter_targets[0].filter for name, filt in variants.items()}
        runs["cheb-op K=10"] = lambda x: sk.chebyshev_filter(x, cheb.laplacian, cheb.chebyshev_coeffs,
                                                             lambda_max=cheb.lambda_max)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(3):  # warm-up
            for run in runs.values():
                run(grad)
        order = list(runs)
        for repeat in range(args.repeats):  # interleaved, in a shuffled order: load and cache state hit all alike
            random.Random(repeat).shuffle(order)
            for name in order:
                run = runs[name]
                start = time.perf_counter()
                run(grad)
                times[name].append(time.perf_counter() - start)
        base_ms = statistics.median(times["basis h=0"]) * 1e3
        for name, run in runs.items():
            ms = statistics.median(times[name]) * 1e3
            y = run(grad).double()
            err = float((y - reference).norm() / reference.norm())
            print(f"{n:>5} x {d:<5} {name:>18} {ms:>10.3f} {min(times[name]) * 1e3:>8.3f} {ms / base_ms:>7.2f}x "
                  f"{err:>16.2e}")


def optimizer_steps(repeats: int) -> None:
    print(f"{'shape':>12} {'optimizer':>34} {'median ms':>10} {'min ms':>8}")
    for n, d in SHAPES:
        grad = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
        runs = {}
        for label, make, reg in (
                ("torch AdamW", lambda m, f: torch.optim.AdamW(m.parameters(), lr=1e-4), False),
                ("SpectralAdamW", lambda m, f: sk.SpectralAdamW(m.parameters(), lr=1e-4, spectral_filter=f), False),
                ("SpectralAdamW + regulariser", lambda m, f: sk.SpectralAdamW(m.parameters(), lr=1e-4,
                                                                              spectral_filter=f), True),
                ("SpectralAdamW(lowpass_update)", lambda m, f: sk.SpectralAdamW(
                    m.parameters(), lr=1e-4, spectral_filter=f, lowpass_update=True), False),
                ("SpectralSGD", lambda m, f: sk.SpectralSGD(m.parameters(), lr=1e-2, spectral_filter=f), False),
                ("SpectralSGD + regulariser", lambda m, f: sk.SpectralSGD(m.parameters(), lr=1e-2,
                                                                          spectral_filter=f), True)):
            filt = build(n, d, reg_weight=1e-3)
            model = nn.Sequential(nn.Linear(d, n))
            model[0].weight = filt.filter_targets[0].param
            opt = make(model, filt)

            def run(model=model, filt=filt, opt=opt, reg=reg) -> None:
                model[0].weight.grad = grad.clone()
                if reg:
                    filt.regularization().backward()
                opt.step()
            runs[label] = run
        times: dict[str, list[float]] = {name: [] for name in runs}
        order = list(runs)
        for repeat in range(repeats + 3):
            random.Random(repeat).shuffle(order)
            for name in order:
                start = time.perf_counter()
                runs[name]()
                if repeat >= 3:
                    times[name].append(time.perf_counter() - start)
        for name in runs:
            print(f"{n:>5} x {d:<5} {name:>34} {statistics.median(times[name]) * 1e3:>10.3f} "
                  f"{min(times[name]) * 1e3:>8.3f}")


if __name__ == "__main__":
    main()
