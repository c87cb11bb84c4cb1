"""Out-of-sample check of the Chebyshev torch cost model (``spectralkern/ops/_chebyshev_cost.py``): 40 random
shapes (not the calibration sweep's), both forms timed through the public API (thread CPU time, min of 3
interleaved rounds, one thread), the registry's pick against the faster one.

Run: ``OMP_NUM_THREADS=1 python benchmarks/check_chebyshev_cost.py`` (~15 s).
"""
import math
import random
import time
import warnings

import torch

import spectralkern as sk
from spectralkern.ops.chebyshev_filter import chebyshev_filter_choice
warnings.simplefilter("ignore")
torch.set_num_threads(1)
rng = random.Random(1)
points = []
for i in range(40):
    n = int(math.exp(rng.uniform(0, math.log(300))))
    d = int(math.exp(rng.uniform(0, math.log(3000))))
    K = rng.randint(1, 20)
    blocks = max(1, min(96, int(2**21 / max(n * d, 1))))
    ragged = rng.random() < 0.5
    sizes = [rng.randint(max(1, n // 3), n) for _ in range(blocks)] if ragged else [n] * blocks
    ptr = [0]
    for size in sizes:
        ptr.append(ptr[-1] + size)
    L = sk.ParameterGraph.knn(torch.randn(ptr[-1], 16), k=min(8, max(1, n - 1)), block_ptr=ptr).laplacian()
    lam = sk.estimate_lambda_max(L)
    x, c = torch.randn(ptr[-1], d), torch.randn(K + 1)
    pick = chebyshev_filter_choice(x, L, K).algorithm
    points.append((n, d, K, blocks, ragged, L, lam, x, c, pick, {}))
for r in range(3):
    for n, d, K, B, rag, L, lam, x, c, pick, best in points:
        for a in ("recursion", "materialized"):
            if r == 0:
                sk.chebyshev_filter(x, L, c, lambda_max=lam, algorithm=a)  # warm
            start = time.thread_time()
            sk.chebyshev_filter(x, L, c, lambda_max=lam, algorithm=a)
            best[a] = min(best.get(a, 1e9), time.thread_time() - start)
losses = []
for n, d, K, B, rag, L, lam, x, c, pick, best in points:
    fast = min(best, key=best.get)
    loss = best[pick] / best[fast]
    losses.append(loss)
    verdict = "ok" if pick == fast else f"WRONG x{loss:.2f}"
    print(f"n{n:4d} d{d:5d} K{K:2d} B{B:3d} {'ragged ' if rag else 'uniform'} "
          f"rec {best['recursion'] * 1e3:8.2f} ms  mat {best['materialized'] * 1e3:8.2f} ms  pick {pick:12s} {verdict}")
geo_mean = math.exp(sum(map(math.log, losses)) / len(losses))
print(f"agree {sum(loss == 1 for loss in losses)}/{len(losses)}, geo-mean loss {geo_mean:.3f}, "
      f"max loss {max(losses):.2f}")
