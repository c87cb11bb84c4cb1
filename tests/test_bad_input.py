"""Property-based bad-input sweep of the public graph / basis / eigensolver / op functions.

Each probe draws arguments a hostile but realistic user could pass — wrong shapes and dtypes (complex, integer,
half), the ``meta`` device, NaN/Inf, rows scaled by 1e±30, empty and stride-0 (expanded) tensors, out-of-range
scalars — and classifies the call:

    correct   a result that passes the probe's own check (finite, matches an independent reference)
    clear     a ValueError/TypeError whose message names the offending argument
    unclear   any other exception, or a ValueError/TypeError that does not name the argument
    wrong     a result that fails the check (a silent wrong answer)
    lost      an input the call must not touch was modified

The tests assert "correct or clear" for every draw. With ``SPECTRALKERN_SWEEP_COUNTS=<file>`` they only count
(every draw runs, nothing fails) and write the tallies per probe as JSON lines: how the before/after numbers of
docs/reliability.md were made.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spectralkern as sk

COUNT_FILE = os.environ.get("SPECTRALKERN_SWEEP_COUNTS")
settings.register_profile("bad-input", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SWEEP = settings.get_profile("bad-input")
TALLY: dict[str, Counter] = {}
EXAMPLES: dict[str, list[str]] = {}   # the draws that were neither correct nor clear, per probe

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.int64, torch.bool]


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    if COUNT_FILE:
        with open(COUNT_FILE, "a") as out:
            for probe, tally in TALLY.items():
                out.write(json.dumps({"probe": probe, **tally, "bad": EXAMPLES.get(probe, [])[:8]}) + "\n")


# ----------------------------------------------------------------------------------------- strategies
@st.composite
def tensors(draw, shape: tuple[int, ...], *, float_only: bool = False, nonnegative: bool = False,
            hostile: bool = True) -> tuple[torch.Tensor, str]:
    """A tensor meant to have ``shape``, and a note of what was done to it (for failure messages). With
    ``hostile`` it may get another dtype, the meta device, non-finite values, a huge/tiny scale, an empty or
    wrong shape, or stride 0."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kinds = ["plain"] if not hostile else ["plain", "plain", "scaled", "nonfinite", "dtype", "meta", "empty",
                                           "stride0", "ndim"]
    kind = draw(st.sampled_from(kinds))
    dtype = torch.float64 if draw(st.booleans()) else torch.float32
    note = kind
    if kind == "ndim":
        shape = shape + (2,) if draw(st.booleans()) or len(shape) == 1 else shape[:1]
    if kind == "empty":
        shape = (0,) + shape[1:]
    if kind == "stride0" and shape:
        x = torch.rand(shape[1:] if len(shape) > 1 else (1,), generator=gen, dtype=torch.float64)
        x = x.expand(shape) if len(shape) > 1 else x.expand(shape[0])
    else:
        x = torch.rand(shape, generator=gen, dtype=torch.float64)
    if not nonnegative:
        x = x * 2 - 1
    if kind == "scaled":
        exponent = draw(st.sampled_from([-30, -23, 20, 30]))
        x = x * 10.0**exponent
        note += f" 1e{exponent}"
    if kind == "nonfinite" and x.numel():
        x = x.clone()
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in DTYPES if not (float_only and d.is_floating_point)] or DTYPES))
        note += f" {dtype}"
    x = x.to(dtype) if dtype != torch.bool else x > 0
    if kind == "meta":
        x = x.to("meta")
    return x, note


def classify(call: Callable[[], object], names: tuple[str, ...], check: Callable[[object], bool],
             inputs: tuple[torch.Tensor, ...] = ()) -> str:
    """What happened: correct / clear / unclear / wrong / lost (see the module docstring)."""
    before = [t.clone() for t in inputs if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    try:
        out = call()
    except (ValueError, TypeError) as exc:
        return "clear" if any(name in str(exc) for name in names) else "unclear"
    except Exception:  # noqa: BLE001 - the sweep classifies every failure
        return "unclear"
    after = [t for t in inputs if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    if any(not torch.equal(a, b) for a, b in zip(after, before) if not (a.isnan().any() or b.isnan().any())):
        return "lost"
    try:
        return "correct" if check(out) else "wrong"
    except Exception:  # noqa: BLE001 - a result the check cannot even read is a wrong one
        return "wrong"


def record(probe: str, outcome: str, note: str) -> None:
    TALLY.setdefault(probe, Counter())[outcome] += 1
    TALLY[probe]["tried"] += 1
    if outcome not in ("correct", "clear"):
        EXAMPLES.setdefault(probe, []).append(f"{outcome}: {note}")
    if not COUNT_FILE:
        assert outcome in ("correct", "clear"), f"{probe}: {outcome} on {note}"


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------------------- graph layer
def _knn_reference(rows: torch.Tensor, k: int, block_size: int) -> set[tuple[int, int]]:
    """The kNN edge set from rows normalised in float64 (scale-free by construction)."""
    x = rows.double()
    x = x / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    x = torch.nn.functional.normalize(x, dim=1)
    edges = set()
    for start in range(0, x.shape[0], block_size):
        block = x[start:start + block_size]
        n = block.shape[0]
        sim = block @ block.T
        sim.fill_diagonal_(-math.inf)
        for i in range(n):
            for j in torch.sort(-sim[i], stable=True).indices[:min(k, n - 1)].tolist():
                if sim[i, j] > 1e-6:   # clamped-to-zero weights are not edges
                    edges.add((i + start, j + start))
                    edges.add((j + start, i + start))
    return edges


@SWEEP
@given(data=st.data(), k=st.sampled_from([-1, 0, 1, 3, 2.5]))
def test_knn(data, k):
    weight, note = data.draw(tensors((12, 5)))
    block_size = data.draw(st.sampled_from([4, 12, 0]))

    def check(graph):
        if not (finite(graph.weight) and bool((graph.weight >= 0).all()) and bool((graph.weight <= 1).all())):
            return False
        if weight.dtype not in (torch.float32, torch.float64) or weight.shape[0] == 0:
            return True
        got = set(zip(graph.row.tolist(), graph.col.tolist()))
        want = _knn_reference(weight, int(k), block_size)
        return want <= got   # ties at the cut may add edges, never lose a clearly positive one

    outcome = classify(lambda: sk.ParameterGraph.knn(weight, int(k) if k != 2.5 else k, block_size=block_size),
                       ("weight", "k", "block_size"), check, (weight,))
    record("ParameterGraph.knn", outcome, note)


def _symmetric(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.shape[0] == x.shape[1] and x.device.type != "meta" and x.dtype != torch.bool:
        return (x + x.mT).abs() if not x.is_complex() else x + x.mT
    return x


@SWEEP
@given(data=st.data())
def test_from_dense_and_laplacian(data):
    adjacency, note = data.draw(tensors((7, 7), nonnegative=True))
    adjacency = _symmetric(adjacency)

    def check(graph):
        L = graph.laplacian()
        dense = L.to_dense().double()
        ok = finite(dense) and torch.allclose(dense, dense.T)
        if adjacency.dtype in (torch.float32, torch.float64) and finite(adjacency):
            ref = scipy.sparse.csgraph.laplacian(adjacency.double().fill_diagonal_(0).numpy(), normed=True)
            ok = ok and np.allclose(dense.numpy(), ref, atol=1e-5)
        return ok

    outcome = classify(lambda: sk.ParameterGraph.from_dense(adjacency), ("adjacency",), check, (adjacency,))
    record("ParameterGraph.from_dense+laplacian", outcome, note)


@SWEEP
@given(scale=st.sampled_from([1.0, 1e30, 1e300, 1e-300, math.inf, math.nan, -1.0]),
       dtype=st.sampled_from([None, torch.float32, torch.float64, torch.complex64, torch.int64]))
def test_from_scipy(scale, dtype):
    W = scipy.sparse.random_array((9, 9), density=0.4, random_state=0, format="csr")
    W = (W + W.T) * scale

    def check(graph):
        return finite(graph.weight) and bool((graph.weight > 0).all())

    outcome = classify(lambda: sk.ParameterGraph.from_scipy(W, dtype=dtype), ("matrix", "dtype"), check)
    record("ParameterGraph.from_scipy", outcome, f"scale {scale} dtype {dtype}")


# ----------------------------------------------------------------------------------------- eigensolver
def _laplacian(n: int, blocks: int, dtype=torch.float64) -> sk.GraphLaplacian:
    gen = torch.Generator().manual_seed(n)
    return sk.ParameterGraph.knn(torch.randn(n, 4, generator=gen, dtype=dtype), 3,
                                 block_size=n // blocks).laplacian()


@SWEEP
@given(data=st.data(), hostile=st.sampled_from(["L", "L", "k", "tol", "backend", "none"]))
def test_lowest_eigenpairs(data, hostile):
    """One argument at a time is hostile, the others valid (so every draw probes that argument)."""
    L = _laplacian(24, 2)
    dense, note = data.draw(tensors((24, 24)))
    given_L = _symmetric(dense) if hostile == "L" else L
    k = data.draw(st.sampled_from([-2, 0, 40, 1.5, True])) if hostile == "k" else data.draw(st.sampled_from([1, 3]))
    tol = data.draw(st.sampled_from([-1.0, math.nan, math.inf, "1e-6"])) if hostile == "tol" else 1e-6
    backend = data.draw(st.sampled_from(["nope", "", None])) if hostile == "backend" else data.draw(
        st.sampled_from(["auto", "dense", "native", "scipy", "lanczos"]))

    def check(basis):
        U, values = basis.U.double(), basis.eigenvalues.double()
        M = given_L.to_dense().double() if isinstance(given_L, sk.GraphLaplacian) else given_L.double()
        if M.shape[0] == 0:
            return U.numel() == 0
        ptr = basis.block_ptr.tolist()
        for b in range(len(ptr) - 1):
            kb = min(basis.k, ptr[b + 1] - ptr[b])
            Mb = M[ptr[b]:ptr[b + 1], ptr[b]:ptr[b + 1]]
            Ub, vb = U[ptr[b]:ptr[b + 1], :kb], values[b, :kb]
            scale = max(float(Mb.abs().max()), 1e-300)
            if not torch.allclose(vb, torch.linalg.eigvalsh(Mb)[:kb], rtol=0, atol=1e-4 * scale):
                return False
            if float((Mb @ Ub - Ub * vb).norm()) > 1e-3 * scale:
                return False
        return True

    outcome = classify(lambda: sk.lowest_eigenpairs(given_L, k, tol=tol, backend=backend),
                       ("L", "k", "tol", "backend"), check, (dense,))
    record("lowest_eigenpairs", outcome, f"{hostile}: {note if hostile == 'L' else ''} k={k} tol={tol} "
                                         f"backend={backend}")


@SWEEP
@given(data=st.data())
def test_laplacian_quadratic(data):
    L = _laplacian(12, 3)
    delta, note = data.draw(tensors((12, 3)))

    def check(value):
        if not finite(delta.double()):
            return not finite(value)   # NaN/Inf in, NaN/Inf out: torch's own contract
        ref = sk.laplacian_quadratic_reference(delta.double(), L)
        return finite(value) and math.isclose(float(value), float(ref), rel_tol=1e-2, abs_tol=1e-6 * (
            1 + float(delta.double().abs().max()) ** 2))

    outcome = classify(lambda: sk.laplacian_quadratic(delta, L), ("delta", "L"), check, (delta,))
    record("laplacian_quadratic", outcome, note)


@SWEEP
@given(data=st.data(), nan_padding=st.booleans())
def test_spectral_filter(data, nan_padding):
    L = _laplacian(10, 2)
    basis = sk.SpectralBasis.from_laplacian(L, 6)      # blocks of 5 nodes: column 5 is padding
    x, note = data.draw(tensors((10, 2)))
    gains, gains_note = data.draw(tensors((2, 6), hostile=not nan_padding))
    if nan_padding:
        gains = gains.clone()
        gains[:, 5] = math.nan
        gains_note = "nan padding"

    def check(y):
        valid = gains.clone()
        valid[:, 5] = 0
        ref = sk.spectral_filter_reference(x.double().reshape(10, -1), basis.U.double(), basis.block_ptr,
                                           valid.double()).reshape(y.shape)
        scale = 1 + float(ref.nan_to_num(0, 0, 0).abs().max())
        if scale > torch.finfo(y.dtype).max:   # beyond the dtype's range: overflow to inf, as torch's matmul does
            return not finite(y)
        return torch.allclose(y.double(), ref, rtol=1e-2, atol=1e-2 * scale, equal_nan=True)

    outcome = classify(lambda: sk.spectral_filter(x, basis, gains), ("x", "gains"), check, (x, gains))
    record("spectral_filter", outcome, f"x {note}, gains {gains_note}")


@SWEEP
@given(factory=st.sampled_from(["low_pass", "heat", "tikhonov"]),
       value=st.sampled_from([-1.0, 0.0, 0.5, 2.0, math.nan, math.inf, "1", True]))
def test_gain_factories(factory, value):
    names = {"low_pass": ("cutoff",), "heat": ("t",), "tikhonov": ("tau",)}[factory]

    def check(gain):
        g = gain(torch.linspace(0, 2, 9, dtype=torch.float64))
        return finite(g) and bool((g >= 0).all()) and bool((g <= 1).all()) and float(g.max()) > 0

    outcome = classify(lambda: getattr(sk, factory)(value), names, check)
    record(factory, outcome, repr(value))


@SWEEP
@given(data=st.data(), which=st.sampled_from(["U", "eigenvalues"]))
def test_spectral_basis(data, which):
    U = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64)).Q
    eigenvalues = torch.rand(2, 4, dtype=torch.float64)
    hostile, note = data.draw(tensors(tuple((U if which == "U" else eigenvalues).shape)))
    args = {"U": U, "eigenvalues": eigenvalues, which: hostile}

    def check(basis):
        return finite(basis.U) and finite(basis.eigenvalues) and basis.U.shape == (10, 4)

    outcome = classify(lambda: sk.SpectralBasis(args["U"], args["eigenvalues"], [0, 5, 10]), (which,), check,
                       (hostile,))
    record("SpectralBasis", outcome, f"{which}: {note}")
