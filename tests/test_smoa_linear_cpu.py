"""smoa_linear's CPU (torch) backend: the W_eff / masked-Gram formulation against the materialising float64
reference for every gradient combination and both factor-gradient routes, the eager entry against the custom op,
and the torch.compile route."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralkern.ops import smoa_linear as op_module
from spectralkern.ops.smoa_linear import SMoALayout, smoa_linear, smoa_linear_reference
from _numerics import relative_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")


def layout_of(sizes_out, sizes_in, generator) -> SMoALayout:
    rows = torch.randperm(sum(sizes_out), generator=generator)
    cols = torch.randperm(sum(sizes_in), generator=generator)
    return SMoALayout.from_blocks([b.sort().values for b in rows.split(sizes_out)],
                                  [b.sort().values for b in cols.split(sizes_in)])


def inputs(sizes_out, sizes_in, rank, tokens, dtype, generator):
    """Dense packed factors (every block uses all R columns: the op's general semantics, not only SMoA's
    block-diagonal packing)."""
    layout = layout_of(sizes_out, sizes_in, generator)
    out, inn = sum(sizes_out), sum(sizes_in)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    return layout, draw(tokens, inn), draw(out, inn), draw(out), draw(out, rank), draw(rank, inn), draw(tokens, out)


# K = 1 and 2 take the masked whole-weight Gram, K = 4 the per-block route; empty and one-wide blocks included.
BLOCKS = [([7], [5]), ([3, 6], [4, 5]), ([1, 9, 0, 6], [5, 1, 0, 7])]


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"K{len(b[0])}")
@pytest.mark.parametrize("include_base", [True, False])
@pytest.mark.parametrize("needs", [(True, False, True), (True, True, True), (False, False, True), (True, False, False),
                                   (False, True, False)])
def test_backward_matches_the_float64_reference(blocks, include_base, needs, seed):
    gen = torch.Generator().manual_seed(seed)
    layout, x, weight, _, b, a, grad_y = inputs(*blocks, 3, 6, torch.float64, gen)
    need_x, need_w, need_factors = needs
    args = (grad_y, x, weight, b, a, layout.index, layout.block_sizes, 0.7, include_base, need_x, need_w,
            need_factors)
    got = op_module._backward_torch(*args)
    expected = op_module._backward_reference(*args)
    for name, g, e, needed in zip(("x", "weight", "B", "A"), got, expected, (need_x, need_w, need_factors,
                                                                           need_factors)):
        assert (g is None) == (not needed), name
        if needed:
            assert relative_error(g, e) <= 1e-12, name


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"K{len(b[0])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_the_float64_reference(blocks, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    layout, x, weight, bias, b, a, _ = inputs(*blocks, 2, 5, dtype, gen)
    y = smoa_linear(x, weight, bias, b, a, layout, 1.3)
    expected = smoa_linear_reference(*(t.double() for t in (x, weight, bias, b, a)), layout, 1.3)
    assert y.dtype == dtype
    assert relative_error(y, expected) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_eager_entry_and_custom_op_agree(seed):
    gen = torch.Generator().manual_seed(seed)
    layout, x, weight, bias, b, a, grad_y = inputs([4, 5], [3, 6], 2, 7, torch.float64, gen)
    results = []
    for entry in ("eager", "op"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, b, a)]
        if entry == "eager":
            y = smoa_linear(*leaves, layout, 0.9)
        else:
            y = torch.ops.spectralkern.smoa_linear(*leaves, layout.index, layout.block_sizes, 0.9, True)
        results.append([y, *torch.autograd.grad(y, leaves, grad_y)])
    for eager, op in zip(*results):
        assert torch.equal(eager, op)


def test_torch_compile_goes_through_the_custom_op(seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    layout, x, weight, bias, b, a, _ = inputs([4, 5], [3, 6], 2, 7, torch.float32, gen)
    eager_calls = []
    monkeypatch.setattr(op_module, "_eager_smoa_linear",
                        lambda *args: eager_calls.append(1) or pytest.fail("eager entry used under compile"))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def compiled(x, b, a):
        return smoa_linear(x, weight, bias, b, a, layout, 0.9)
    y = compiled(x, b, a)
    expected = smoa_linear_reference(x.double(), weight.double(), bias.double(), b.double(), a.double(), layout, 0.9)
    assert relative_error(y, expected) <= 1e-5 and not eager_calls


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=4),
       rank=st.integers(0, 4), tokens=st.integers(0, 5), include_base=st.booleans(), data_seed=st.integers(0, 2**31))
def test_hypothesis_shapes_torch_backend(sizes, rank, tokens, include_base, data_seed):
    sizes_out, sizes_in = [s[0] for s in sizes], [s[1] for s in sizes]
    if sum(sizes_out) == 0 or sum(sizes_in) == 0:
        sizes_out[0], sizes_in[0] = sizes_out[0] + 1, sizes_in[0] + 1
    gen = torch.Generator().manual_seed(data_seed)
    layout, x, weight, bias, b, a, grad_y = inputs(sizes_out, sizes_in, rank, tokens, torch.float64, gen)
    leaves = [t.requires_grad_() for t in (x, b, a)]
    y = smoa_linear(leaves[0], weight, bias, leaves[1], leaves[2], layout, 0.5, include_base)
    expected = smoa_linear_reference(x, weight, bias, b, a, layout, 0.5, include_base)
    assert relative_error(y, expected) <= 1e-12
    got = torch.autograd.grad(y, leaves, grad_y)
    want = op_module._backward_reference(grad_y, x, weight, b, a, layout.index, layout.block_sizes, 0.5, include_base,
                                         True, False, True)
    for g, e in zip(got, (want[0], want[2], want[3])):
        assert relative_error(g, e) <= 1e-12
