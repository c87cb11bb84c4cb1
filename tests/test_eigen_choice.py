"""The eigensolver's choice of solver per item is the registry's (op ``lowest_eigenpairs``), and it picks what the
rule it replaced picked (eigen/_auto.py, now _tuning.py, and eigen/_solve.py before the registry took the decision,
commit e192b81)."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import networkx as nx
import pytest
import torch

import spectralkern as sk
from spectralkern import _backend, _extensions
from spectralkern._backend import BackendUnavailable, backend_of
from spectralkern.eigen import _tuning
from spectralkern.eigen._choice import BACKENDS, SolverChoice
from test_eigen import networkx_laplacian

NATIVE_MAX_NODES = 16384


def old_rule(method: str, n: int, k: int, device: str, native_live: bool, ncv: int | None) -> str:
    """The solver the old code gave an item of n nodes (its dense_max, iterative_backend and _krylov_parts), frozen
    here as the reference the registry must reproduce."""
    cuda = device == "cuda"
    block = (min(k, 8) if k > 1 else 1) if cuda else min(k, 2)
    if ncv is not None:
        block = max(1, min(block, ncv - k))
    m = ncv if ncv is not None else max(2 * k + 4 * block, k + 32)
    if method == "dense":
        return "dense"
    if method == "auto" and not cuda and native_live:
        return "dense" if n <= max(48, 2 * k) else "native" if n <= NATIVE_MAX_NODES else "scipy"
    if method == "auto":
        dense_max = max(m + block, 32 if cuda else max(160, 4 * k))
        return "dense" if n <= dense_max else "lanczos" if cuda else "scipy"
    if method == "native":
        if n <= max(48, 2 * k):
            return "dense"
        return "refused" if n > NATIVE_MAX_NODES else "native"
    return "dense" if n <= m + block else method


def new_rule(method: str, n: int, k: int, device: str, ncv: int | None, dtype: torch.dtype) -> str:
    torch_device = torch.device(device)
    block = _tuning.block_size(k, torch_device)
    if ncv is not None:
        block = max(1, min(block, ncv - k))
    m = ncv if ncv is not None else _tuning.default_ncv(k, block)
    choice = SolverChoice(method, dtype, torch_device, k, krylov_basis=m + block)
    try:
        choice.check()
        return choice.solver(n)
    except BackendUnavailable:
        return "refused"


@pytest.fixture(params=[True, False], ids=["native-live", "native-off"])
def native_live(request, monkeypatch) -> bool:
    if request.param:
        if not _extensions.status("native").live:
            pytest.skip("the compiled module is not built here")
    else:
        off = _extensions.ExtensionStatus(False, "switched off by the test")
        real = _extensions.status
        monkeypatch.setattr(_extensions, "status", lambda name: off if name == "native" else real(name))
    return request.param


SIZES = [0, 1, 2, 5, 31, 32, 33, 47, 48, 49, 50, 51, 64, 65, 100, 128, 159, 160, 161, 200, 255, 256, 257, 400, 511,
         512, 513, 1000, 4096, 16383, 16384, 16385, 20000, 100000]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_registry_picks_what_the_old_rule_picked(native_live, dtype):
    """Every (method, nodes, k, device, ncv) of a grid around each threshold: the same solver (or the same refusal
    of a forced native solve above its node limit; off the CPU or without the module that refusal comes first)."""
    mismatches = []
    for method, k, device, ncv in itertools.product(BACKENDS, [1, 2, 8, 16, 24, 40, 64, 100, 300],
                                                    ["cpu", "cuda"], [None, 96]):
        if ncv is not None and ncv <= k:
            continue
        for n in SIZES:
            if method == "native" and (device == "cuda" or not native_live):
                expected = "refused"
            else:
                expected = old_rule(method, n, k, device, native_live, ncv)
            got = new_rule(method, n, k, device, ncv, dtype)
            if got != expected:
                mismatches.append((method, n, k, device, ncv, expected, got))
    assert not mismatches, mismatches[:10]


def test_the_table_lists_the_eigensolver_and_the_env_var_does_not_force_it(monkeypatch):
    rows = [row for row in _backend.table() if row["op"] == "lowest_eigenpairs"]
    assert [row["backend"] for row in rows] == ["native", "torch"]
    assert rows[0]["limits"] == f"nodes ≤ {NATIVE_MAX_NODES}" and rows[0]["algorithms"] == "dense, native"
    assert rows[1]["algorithms"] == "dense, lanczos, scipy, cupy"
    # SPECTRALKERN_BACKEND forces the kernels; the eigensolver takes its own backend= argument only
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")
    choice = backend_of("lowest_eigenpairs", dtype=torch.float64, device="cpu")
    assert not choice.forced and choice.backend in ("native", "torch")


def test_an_algorithm_preference_takes_the_first_that_can_run():
    facts = dict(dtype=torch.float64, device="cpu", backend="torch", nodes=10, k=2, device_type="cpu")
    prefer = ("lanczos", "dense")
    assert backend_of("lowest_eigenpairs", algorithm=prefer, krylov_fits=True, **facts).algorithm == "lanczos"
    assert backend_of("lowest_eigenpairs", algorithm=prefer, krylov_fits=False, **facts).algorithm == "dense"
    with pytest.raises(BackendUnavailable, match=r"none of the algorithms 'lanczos', 'scipy' can run here: lanczos "
                                                 r"needs krylov_fits \(the item has more nodes than the Krylov"):
        backend_of("lowest_eigenpairs", algorithm=("lanczos", "scipy"), krylov_fits=False, **facts)
    with pytest.raises(BackendUnavailable, match="has no algorithm 'arnoldi' on the torch backend"):
        backend_of("lowest_eigenpairs", algorithm=("arnoldi", "dense"), krylov_fits=False, **facts)


def test_forced_native_that_cannot_run_raises_with_the_reason(monkeypatch):
    with pytest.raises(BackendUnavailable, match="backend=native cannot run here: tensors are on cuda"):
        SolverChoice("native", torch.float64, torch.device("cuda"), 4, 40).check()
    off = _extensions.ExtensionStatus(False, "No module named 'spectralkern._native'")
    monkeypatch.setattr(_extensions, "status", lambda name: off)
    with pytest.raises(BackendUnavailable, match="backend=native cannot run here: No module named"):
        sk.lowest_eigenpairs(networkx_laplacian(nx.path_graph(60)), 3, backend="native")


@pytest.mark.parametrize("live", [True, False], ids=["native-live", "native-off"])
def test_the_scans_of_L_run_where_the_registry_says(monkeypatch, live):
    """prepare's one-pass summary and the plan's union-find run compiled exactly when the registry picks native."""
    from spectralkern.eigen import _native_csr, _plan, _problem

    if live and not _extensions.status("native").live:
        pytest.skip("the compiled module is not built here")
    if not live:
        off = _extensions.ExtensionStatus(False, "switched off by the test")
        real = _extensions.status
        monkeypatch.setattr(_extensions, "status", lambda name: off if name == "native" else real(name))
    ran: list[str] = []
    for module, name in ((_problem, "csr_summary"), (_plan, "connected_components")):
        compiled = getattr(_native_csr, name)
        monkeypatch.setattr(module, name, lambda *a, _f=compiled, _n=name: ran.append(_n) or _f(*a))
    L = networkx_laplacian(nx.disjoint_union(nx.path_graph(150), nx.cycle_graph(120)))   # one 270-node block
    for op in ("csr_summary", "connected_components"):
        assert backend_of(op, L.matrix.values()) == ("native" if live else "torch")
    basis = sk.lowest_eigenpairs(L, 3, tol=1e-9)
    assert ran == (["csr_summary", "connected_components"] if live else [])
    assert basis.info.num_converged == 3 and float(basis.eigenvalues[0, 1]) < 1e-8   # two components: λ = 0 twice


def test_lanczos_products_storage_is_the_registrys_and_the_old_threshold(monkeypatch):
    """Dense padded blocks up to 256 rows per item, one CSR above (the old operator_kind), on every device; the
    batched Lanczos builds its operator with the registry's answer."""
    from spectralkern.eigen import _operator

    for device in ("cpu", "cuda"):
        for n_pad in (1, 2, 255, 256, 257, 4096):
            choice = backend_of("lanczos_products", dtype=torch.float64, device=device, n_pad=n_pad)
            assert choice.algorithm == ("dense" if n_pad <= 256 else "csr"), (device, n_pad)
    built: list[tuple[int, str]] = []
    real = _operator.PaddedOperator.build.__func__
    monkeypatch.setattr(_operator.PaddedOperator, "build", classmethod(
        lambda cls, matrix, node_map, shift, kind: built.append((node_map.shape[1], kind))
        or real(cls, matrix, node_map, shift, kind)))
    for n, storage in ((100, "dense"), (300, "csr")):   # two blocks of n nodes: one batch of items of n rows
        L = networkx_laplacian(nx.disjoint_union(nx.path_graph(n), nx.cycle_graph(n)), [0, n, 2 * n])
        sk.lowest_eigenpairs(L, 2, tol=1e-8, backend="lanczos")
        assert built == [(n, storage)]
        built.clear()


@pytest.mark.parametrize("method", ["auto", "native", "lanczos", "scipy", "dense"])
def test_each_block_is_solved_by_the_solver_the_registry_names(native_live, method):
    """Blocks of 10, 100 and 300 nodes (paths) (k = 4): the solvers that ran (EigenInfo.backend) are the ones the
    registry names for their sizes, and the basis is right."""
    from spectralkern.eigen._solve import SOLVER_ORDER
    from test_eigen import check_basis, dense_of

    if method == "native" and not native_live:
        pytest.skip("covered by test_forced_native_that_cannot_run_raises_with_the_reason")
    sizes = [10, 100, 300]
    graphs = [nx.path_graph(n) for n in sizes]   # simple spectra: single-vector Lanczos needs no multiplicity
    ptr = [0, 10, 110, 410]
    L = networkx_laplacian(nx.disjoint_union_all(graphs), ptr)
    k = 4
    block = _tuning.block_size(k, torch.device("cpu"))
    choice = SolverChoice(method, torch.float64, torch.device("cpu"), k, _tuning.default_ncv(k, block) + block)
    named = [choice.solver(n) for n in sizes]
    krylov = sorted({s for s in named if s != "dense"}, key=SOLVER_ORDER.index)
    torch.manual_seed(0)
    basis = sk.lowest_eigenpairs(L, k, tol=1e-9, backend=method)
    assert basis.info.backend == "+".join(krylov + (["dense"] if "dense" in named else []))
    expected = {"auto": ["dense", "native", "native"] if native_live else ["dense", "dense", "scipy"],
                "native": ["dense", "native", "native"], "lanczos": ["dense", "lanczos", "lanczos"],
                "scipy": ["dense", "scipy", "scipy"], "dense": ["dense"] * 3}
    assert named == expected[method]
    check_basis(basis, dense_of(L), ptr, k, torch.float64)


def test_asking_the_eigensolver_entry_imports_no_other_runtime():
    """The decision reads the statuses of the op's own backends only: an eigensolver-only process never imports
    triton (≈ 70 MB and a few hundred ms) or probes the CUDA extension."""
    code = ("import sys, torch, spectralkern as sk\n"
            "L = sk.ParameterGraph.knn(torch.randn(400, 8, dtype=torch.float64), 8, block_size=200).laplacian()\n"
            "sk.lowest_eigenpairs(L, 4)\n"
            "print(sorted(m for m in ('triton', 'spectralkern._C') if m in sys.modules))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
