"""chebyshev_filter's two torch algorithms — the recursion and the materialised P_b = p(Ã_b) — and the registry's
choice between them: both against float64, gradcheck, the choice equals what runs, forced algorithms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectralkern as sk
from spectralkern import _backend
from spectralkern.ops import _chebyshev_cost, _chebyshev_dense
from spectralkern.ops import chebyshev_filter as cheb_module
from spectralkern.ops.chebyshev_filter import chebyshev_filter_choice, chebyshev_filter_reference
from _numerics import relative_error  # noqa: E402

ALGORITHMS = ("recursion", "materialized")
RAGGED = [5, 1, 0, 23, 2, 17, 0, 1, 40]  # one-node and empty blocks, sizes padded to 8, 32, 2 and 40


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """One thread (tiny shapes on a shared 2-core machine) and the torch backend, whatever the environment says."""
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def laplacian(sizes: list[int], *, cross_block: bool = False, dtype: torch.dtype = torch.float64,
              normalized: bool = True) -> sk.GraphLaplacian:
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    graph = sk.ParameterGraph.knn(torch.randn(ptr[-1], 6, dtype=torch.float64), k=3, block_ptr=ptr)
    if cross_block:
        links = sk.ParameterGraph.chain(ptr[-1], block_ptr=ptr, link_blocks=True, dtype=torch.float64)
        graph = sk.ParameterGraph.from_scipy(graph.to_scipy() + links.to_scipy(), block_ptr=ptr)
    return graph.to(dtype=dtype).laplacian(normalized=normalized)


class Spy:
    """Records which torch algorithm ran, by wrapping the two functions ``_forward`` dispatches to."""

    def __init__(self, monkeypatch):
        self.ran: list[str] = []
        real_apply, real_recursion = _chebyshev_dense.apply, cheb_module._torch_recursion

        def apply(*args, **kwargs):
            self.ran.append("materialized")
            return real_apply(*args, **kwargs)

        def recursion(*args, **kwargs):
            self.ran.append("recursion")
            return real_recursion(*args, **kwargs)
        monkeypatch.setattr(_chebyshev_dense, "apply", apply)
        monkeypatch.setattr(cheb_module, "_torch_recursion", recursion)


# ------------------------------------------------------------------------------------------ correctness
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("normalized", [True, False])
def test_both_algorithms_match_float64_on_ragged_blocks(seed, algorithm, dtype, normalized):
    L = laplacian(RAGGED, dtype=torch.float64 if dtype == torch.float64 else torch.float32, normalized=normalized)
    lam = sk.estimate_lambda_max(L)
    x = torch.randn(L.num_nodes, 13, dtype=torch.float64).to(dtype)
    for order in (1, 2, 7):
        coeffs = torch.randn(order + 1, dtype=torch.float64)
        y = sk.chebyshev_filter(x, L, coeffs.to(dtype), lambda_max=lam, algorithm=algorithm)
        expected = chebyshev_filter_reference(x.double(), L.to(dtype=torch.float64), coeffs.to(dtype).double(), lam)
        assert y.dtype == dtype and y.shape == x.shape
        assert relative_error(y, expected) <= TOLERANCE[dtype]


def test_uniform_blocks_use_views_and_match(seed):
    L = laplacian([16, 16, 16], dtype=torch.float32)
    blocks, rows = _chebyshev_dense.dense_groups(L.block_ptr, *cheb_module._prepared(L, 2.0, torch.float32, False)[:3])
    assert [tuple(b.shape) for b in blocks] == [(3, 16, 16)] and rows[0].numel() == 0  # no gather
    x = torch.randn(16, 48).T  # non-contiguous
    coeffs = torch.randn(6)
    y = sk.chebyshev_filter(x, L, coeffs, lambda_max=2.0, algorithm="materialized")
    assert relative_error(y, chebyshev_filter_reference(x.double(), L, coeffs.double(), 2.0)) <= 1e-5


def test_dense_groups_pad_ragged_blocks_into_few_groups():
    assert [_chebyshev_dense.bucket(n) for n in (1, 2, 3, 5, 17, 32, 33, 40, 41, 100, 129, 256)] == \
        [1, 2, 4, 8, 32, 32, 40, 40, 48, 112, 160, 256]
    L = laplacian(RAGGED)
    crow, col, val, _, _ = cheb_module._prepared(L, 2.0, torch.float64, False)
    blocks, rows = _chebyshev_dense.dense_groups(L.block_ptr, crow, col, val)
    assert [tuple(b.shape) for b in blocks] == [(2, 1, 1), (1, 2, 2), (1, 8, 8), (2, 32, 32), (1, 40, 40)]
    every = torch.cat(rows)
    assert every.unique().numel() == every.numel()  # padding positions land on distinct scratch rows
    assert torch.equal(every[every < L.num_nodes].sort().values, torch.arange(L.num_nodes))


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
       d=st.integers(1, 20), order=st.integers(0, 6), algorithm=st.sampled_from(ALGORITHMS),
       data_seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes(sizes, d, order, algorithm, data_seed):
    torch.manual_seed(data_seed)
    L = laplacian(sizes, dtype=torch.float32)
    x = torch.randn(L.num_nodes, d)
    coeffs = torch.randn(order + 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRALKERN_BACKEND", "torch")
        y = sk.chebyshev_filter(x, L, coeffs, lambda_max=2.0, algorithm=algorithm)
    assert relative_error(y, chebyshev_filter_reference(x.double(), L, coeffs.double(), 2.0)) <= 1e-5


# ------------------------------------------------------------------------------------------ autograd
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradcheck_both_algorithms(seed, monkeypatch, algorithm):
    L = laplacian([4, 1, 0, 6, 3])
    x = torch.randn(14, 3, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(5, dtype=torch.float64, requires_grad=True)
    spy = Spy(monkeypatch)
    run = lambda x_, c_: sk.chebyshev_filter(x_, L, c_, lambda_max=2.0, algorithm=algorithm)  # noqa: E731
    assert torch.autograd.gradcheck(run, (x, coeffs))
    assert torch.autograd.gradcheck(lambda x_: run(x_, coeffs.detach()), (x,))  # x only: P reused as Pᵀ
    assert algorithm in spy.ran
    spy.ran.clear()
    sk.chebyshev_filter(x, L, coeffs.detach(), lambda_max=2.0, algorithm=algorithm).sum().backward()
    assert spy.ran == [algorithm, algorithm]  # the x-only backward runs the forced form too
    spy.ran.clear()
    sk.chebyshev_filter(x, L, coeffs, lambda_max=2.0, algorithm=algorithm).sum().backward()
    assert spy.ran == [algorithm, "recursion"]  # ⟨T_m grad_y, x⟩ needs every T_m grad_y


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_opcheck_both_algorithms(seed, algorithm):
    L = laplacian([3, 0, 5, 1], dtype=torch.float32)
    crow, col, val, block_ptr, blocks = cheb_module._prepared(L, 2.0, torch.float32, with_blocks=False)
    dense = (cheb_module._prepared_dense(L, 2.0, torch.float32) if algorithm == "materialized" else ([], []))
    x = torch.randn(9, 4, requires_grad=True)
    coeffs = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.spectralkern.chebyshev_filter.default,
                          (x, coeffs, crow, col, val, block_ptr, blocks, *dense, algorithm))


def test_torch_compile_materialized_with_backward(seed):
    L = laplacian([4, 7, 1], dtype=torch.float32)
    sk.estimate_lambda_max(L)  # cached before tracing
    x = torch.randn(12, 6, requires_grad=True)
    coeffs = torch.randn(4)
    run = lambda x_: sk.chebyshev_filter(x_, L, coeffs, algorithm="materialized").square().sum()  # noqa: E731
    torch.compile(run, fullgraph=True, backend="aot_eager")(x).backward()
    grad = x.grad.clone()
    x.grad = None
    run(x).backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the choice
CHOICE_CASES = [  # (block sizes, cross-block edges, d, K): both outcomes of the cost model appear
    ([4] * 12, False, 256, 8),     # small blocks, wide x: materialized
    ([24, 30, 9, 1], False, 128, 16),
    ([200, 180], False, 1, 2),     # big blocks, one column: the recursion
    ([6, 5, 7], True, 256, 8),     # cross-block edges: only the recursion can run
    ([30, 1], False, 64, 0),       # order 0: c_0·x, no graph work
]


@pytest.mark.parametrize("sizes, cross_block, d, order", CHOICE_CASES)
def test_registry_choice_is_what_runs(seed, monkeypatch, sizes, cross_block, d, order):
    L = laplacian(sizes, cross_block=cross_block, dtype=torch.float32)
    x = torch.randn(L.num_nodes, d)
    choice = chebyshev_filter_choice(x, L, order)
    spy = Spy(monkeypatch)
    sk.chebyshev_filter(x, L, torch.randn(order + 1), lambda_max=2.0)
    assert choice.backend == "torch"
    assert spy.ran == ([] if order == 0 else [choice.algorithm])
    assert cheb_module.chebyshev_filter_path(x, L, order) == ("torch" if order == 0 else f"torch-{choice.algorithm}")


def test_choice_cases_cover_both_algorithms():
    chosen = {chebyshev_filter_choice(torch.randn(sum(s), d), laplacian(s, cross_block=c, dtype=torch.float32),
                                      k).algorithm for s, c, d, k in CHOICE_CASES if k > 0}
    assert chosen == set(ALGORITHMS)


def test_cost_model_crossover_in_d():
    """Per the measured constants: at blocks of 128 (kNN-like nnz ≈ 12 per node) the recursion wins for one column
    and the materialised form for 1024 columns; the choice flips once as d grows."""
    def pick(d: int) -> str:
        facts = {"order": 8, "d": d, "nodes": 1024, "nnz": 12 * 1024, "groups": ((8, 128),), "dense_blocks": True,
                 "forward": True, "device_type": "cpu", "acc": torch.float32}
        return _backend.algorithm_of("chebyshev_filter", "torch", **facts)
    picks = [pick(d) for d in (1, 4, 16, 64, 256, 1024, 4096)]
    assert picks[0] == "recursion" and picks[-1] == "materialized"
    flips = sum(a != b for a, b in zip(picks, picks[1:]))
    assert flips == 1, picks


def test_cost_model_is_linear_in_its_units():
    facts = {"order": 4, "d": 32, "nodes": 64, "nnz": 640, "groups": ((4, 16),)}
    base = {name: _chebyshev_cost.seconds(name, facts) for name in ALGORITHMS}
    doubled = {name: _chebyshev_cost.seconds(name, {**facts, "d": 64}) for name in ALGORITHMS}
    assert all(base[n] < doubled[n] < 2 * base[n] for n in ALGORITHMS)  # fixed costs + work linear in d


def test_cost_constants_per_accumulation_dtype():
    measured = _chebyshev_cost.MEASURED
    assert _chebyshev_cost.constants_for("cpu", torch.float64) is measured[("cpu", torch.float64)]
    assert _chebyshev_cost.constants_for("cuda", torch.float64) is measured[("cpu", torch.float64)]
    assert _chebyshev_cost.constants_for("cuda", torch.float32) is measured[("cpu", torch.float32)]


# ------------------------------------------------------------------------------------------ forcing
def test_forced_algorithm_that_cannot_run_raises(seed, monkeypatch):
    x = torch.randn(18, 4)
    cross = laplacian([6, 5, 7], cross_block=True, dtype=torch.float32)
    with pytest.raises(_backend.BackendUnavailable, match="algorithm 'materialized' cannot run here: needs "
                                                          "dense_blocks \\(no cross-block edges"):
        sk.chebyshev_filter(x, cross, [1.0, 0.5, 0.2], lambda_max=2.0, algorithm="materialized")
    with pytest.raises(_backend.BackendUnavailable, match="no algorithm 'csr' on the torch backend \\(it has "
                                                          "recursion, materialized\\)"):
        sk.chebyshev_filter(x, cross, [1.0, 0.5], lambda_max=2.0, algorithm="csr")
    with pytest.raises(ValueError, match="algorithm must be None or one of .*materialized.*, got 'dense'"):
        sk.chebyshev_filter(x, cross, [1.0, 0.5], lambda_max=2.0, algorithm="dense")
    big = laplacian([20, 30], dtype=torch.float32)
    monkeypatch.setattr(_chebyshev_dense, "DENSE_MAX_BYTES", 32 * 32 * 4)  # one 32-padded block's worth: two don't fit
    y50 = torch.randn(50, 3)
    with pytest.raises(_backend.BackendUnavailable, match="needs dense_blocks"):
        sk.chebyshev_filter(y50, big, [1.0, 0.5], lambda_max=2.0, algorithm="materialized")
    assert chebyshev_filter_choice(y50, big, 4).algorithm == "recursion"


def test_info_table_lists_both_torch_algorithms():
    row = next(r for r in _backend.table() if r["op"] == "chebyshev_filter" and r["backend"] == "torch")
    assert row["algorithms"] == "recursion, materialized"
