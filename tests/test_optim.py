"""SpectralGradientFilter and SpectralAdamW: filtered gradients against a float64 dense formula, hook ≡ explicit,
the regulariser, SpectralAdamW ≡ torch.optim.AdamW on filtered gradients, state_dict round trips and resumption,
peft adapters, bad input."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import spectralkern as sk
from spectralkern.ops.spectral_filter import spectral_filter_reference
from spectralkern.optim.gradient_filter import _block_gram

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("SPECTRALKERN_BACKEND", request.param)
    return request.param


def tiny_model(seed: int, hidden: int = 20, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


def batch(step: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 6, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def task_loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)


def dense_filtered(grad: torch.Tensor, basis: sk.SpectralBasis, gains: torch.Tensor, h: float) -> torch.Tensor:
    """float64 h·g + U_bd diag(gains − h) U_bdᵀ g with U_bd the explicit block-diagonal (N × B·k) matrix."""
    num_blocks, k = basis.num_blocks, basis.k
    block_diag = torch.zeros(basis.num_nodes, num_blocks * k, dtype=torch.float64)
    for b in range(num_blocks):
        start, stop = int(basis.block_ptr[b]), int(basis.block_ptr[b + 1])
        block_diag[start:stop, b * k:(b + 1) * k] = basis.U[start:stop].double()
    g = grad.double()
    return h * g + block_diag @ ((gains.double().reshape(-1) - h)[:, None] * (block_diag.T @ g))


def pairwise_form(delta: torch.Tensor, graph: sk.ParameterGraph) -> torch.Tensor:
    """float64 ½ Σ W_ij ‖Δ_i/√d_i − Δ_j/√d_j‖² (the normalized Laplacian's quadratic form)."""
    W = graph.to_dense().double()
    deg = W.sum(1)
    x = delta.double()
    x = torch.where(deg[:, None] > 0, x / deg.clamp_min(1e-300).sqrt()[:, None], torch.zeros_like(x))
    return 0.5 * (W * (x[:, None, :] - x[None, :, :]).square().sum(-1)).sum()


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------------------ targets
def test_targets_are_suffix_matched_linears(seed):
    model = nn.Sequential()
    model.add_module("attn", nn.ModuleDict({"query": nn.Linear(4, 8), "key": nn.Linear(4, 8),
                                            "value": nn.Linear(4, 8)}))
    model.add_module("my_query", nn.Linear(8, 4))  # "query" is not a dotted suffix of "my_query"
    filt = sk.SpectralGradientFilter(model, ["query", "value"], block_size=4, k=2, knn=2)
    assert [name for name, _ in filt.targets] == ["attn.query.weight", "attn.value.weight"]
    assert filt.targets[0][1] is model.attn.query.weight


def test_peft_lora_adapters_are_targeted(seed):
    peft = pytest.importorskip("peft")
    base = tiny_model(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    with pytest.warns(UserWarning, match="lora_B.default.weight"):  # LoRA B starts at zero: an edgeless graph
        filt = sk.SpectralGradientFilter(model, ["0"], block_size=8, k=2, knn=2, refresh_every=2)
    names = [name for name, _ in filt.targets]
    assert names == ["base_model.model.0.lora_A.default.weight", "base_model.model.0.lora_B.default.weight"]
    with pytest.warns(UserWarning):  # the adapters' ModuleDicts can be named directly too
        direct = sk.SpectralGradientFilter(model, ["lora_A", "lora_B"], block_size=8, k=2, knn=2)
    assert [name for name, _ in direct.targets] == names
    opt = sk.SpectralAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, spectral_filter=filt)
    before = [p.detach().clone() for _, p in filt.targets]
    lora_B = dict(filt.targets)["base_model.model.0.lora_B.default.weight"]
    for step in range(2):
        opt.zero_grad()
        task_loss(model, step).backward()
        opt.step()
    at_refresh = lora_B.detach().clone()   # SpectralAdamW refreshes at the end of step 2, after its update
    assert all(not torch.equal(b, p) for b, (_, p) in zip(before, filt.targets))
    # The refresh rebuilt lora_B's graph from its trained rows (no longer all zero). Whether that graph has edges
    # depends on the signs of one AdamW step (cosine kNN keeps positive similarities only; seeds 11 and 2 give
    # none), so it is compared with the graph of those rows instead of asking for edges.
    assert bool(at_refresh.abs().sum(dim=1).gt(0).any())
    expected = sk.ParameterGraph.knn(at_refresh, k=2, block_size=8).laplacian()
    got = filt.laplacians()["base_model.model.0.lora_B.default.weight"]
    torch.testing.assert_close(got.to_dense(), expected.to_dense(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ filter
@pytest.mark.parametrize("passthrough", [0.0, 0.25])
def test_step_filters_targeted_grads_like_the_dense_formula(backend, seed, passthrough):
    model = tiny_model(seed)
    filt = sk.SpectralGradientFilter(model, ["0"], block_size=8, k=3, knn=3, gains=sk.heat(1.5),
                                     passthrough=passthrough, refresh_every=0)
    task_loss(model, 0).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    filt.step()
    basis = filt.bases()["0.weight"]
    assert basis.num_blocks == 3  # 20 rows in blocks of 8, 8, 4
    expected = dense_filtered(raw[0], basis, torch.exp(-1.5 * basis.eigenvalues), passthrough)
    torch.testing.assert_close(model[0].weight.grad.double(), expected, rtol=1e-5, atol=1e-7)
    for before, p in list(zip(raw, model.parameters()))[1:]:
        assert torch.equal(before, p.grad)  # untargeted gradients untouched
    assert filt.steps == 1


@pytest.mark.filterwarnings("ignore:the kNN graphs of 2.weight have no edges")  # 3 rows, may all be obtuse
@pytest.mark.parametrize("graph", ["knn", "gradient_correlation"])
def test_hook_mode_equals_explicit_mode_bit_for_bit(backend, seed, graph):
    runs = []
    for hook in (False, True):
        model = tiny_model(seed)
        filt = sk.SpectralGradientFilter(model, ["0", "2"], graph=graph, block_size=8, k=3, knn=3, hook=hook,
                                         refresh_every=2, passthrough=0.1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(4):
            opt.zero_grad()
            task_loss(model, step).backward()
            filt.step()
            opt.step()
        runs.append(model)
    assert_same(*runs)


def test_refresh_rebuilds_graph_and_basis_from_current_weights(seed):
    model = tiny_model(seed)
    filt = sk.SpectralGradientFilter(model, ["0"], block_size=8, k=3, knn=3, refresh_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = filt.bases()["0.weight"]
    for step in range(2):
        opt.zero_grad()
        task_loss(model, step).backward()
        weights = model[0].weight.detach().clone()
        filt.step()
        if step == 0:
            assert filt.bases()["0.weight"] is first
        opt.step()
    # The refresh ran inside the second filt.step(), on the weights of that moment (before that step's update).
    fresh = sk.ParameterGraph.knn(weights, k=3, block_size=8).laplacian()
    refreshed = filt.bases()["0.weight"]
    expected = sk.SpectralBasis.from_laplacian(fresh, 3)
    torch.testing.assert_close(refreshed.eigenvalues, expected.eigenvalues, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(refreshed.eigenvalues, first.eigenvalues)  # the weights moved in step 1


def test_refresh_warm_starts_the_eigensolver(seed, monkeypatch):
    import spectralkern.optim.gradient_filter as gradient_filter

    calls = []

    def spy(L, k, *, v0=None, generator=None):
        calls.append(v0)
        return sk.lowest_eigenpairs(L, k, v0=v0, generator=generator)
    monkeypatch.setattr(gradient_filter, "lowest_eigenpairs", spy)
    model = tiny_model(seed)
    filt = sk.SpectralGradientFilter(model, ["0"], block_size=8, k=3, knn=3, refresh_every=1)
    first = filt.bases()["0.weight"]
    task_loss(model, 0).backward()
    filt.step()
    assert calls == [None, first]  # cold at construction, warm-started from the last basis at the refresh


def test_gradient_correlation_graph_is_the_top_knn_of_the_ema(seed):
    model = tiny_model(seed, hidden=10)
    filt = sk.SpectralGradientFilter(model, ["0"], graph="gradient_correlation", block_size=4, k=2, knn=2,
                                     refresh_every=3, correlation_decay=0.5)
    ema = torch.zeros(3, 4, 4)
    for step in range(3):
        model.zero_grad()
        task_loss(model, step).backward()
        grad = model[0].weight.grad.clone()
        rows = torch.zeros(3, 4, 6)
        rows.view(-1, 6)[:10] = grad  # blocks 4, 4, 2 zero-padded to 4 rows
        ema = 0.5 * ema + 0.5 * (rows @ rows.transpose(1, 2)).abs()
        filt.step()
    W = torch.zeros(10, 10)
    for b, (start, stop) in enumerate([(0, 4), (4, 8), (8, 10)]):
        block = ema[b, :stop - start, :stop - start].clone().fill_diagonal_(-1.0)
        top = block.topk(min(2, stop - start - 1), dim=1)
        for i in range(stop - start):
            for value, j in zip(top.values[i], top.indices[i]):
                W[start + i, start + j] = max(W[start + i, start + j], value)
                W[start + j, start + i] = max(W[start + j, start + i], value)
    torch.testing.assert_close(filt.filter_targets[0].graph.to_dense(), W, rtol=1e-6, atol=1e-9)


def test_block_gram_of_ragged_blocks(seed):
    grad = torch.randn(7, 3)
    gram = _block_gram(grad, torch.tensor([0, 3, 3, 7]), 4)
    torch.testing.assert_close(gram[0, :3, :3], grad[:3] @ grad[:3].T)
    torch.testing.assert_close(gram[2], grad[3:] @ grad[3:].T)
    assert not gram[1].any() and not gram[0, 3].any()


# --------------------------------------------------------------------------------------------- regulariser
def test_regularization_and_its_gradient_match_the_dense_formula(backend, seed):
    model = tiny_model(seed)
    filt = sk.SpectralGradientFilter(model, ["0", "2"], block_size=8, k=2, knn=3, reg_weight=0.3)
    theta0 = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    assert float(filt.regularization().detach()) == 0.0  # Δ = 0 at construction
    with torch.no_grad():
        for p in (model[0].weight, model[2].weight):
            p.add_(0.1 * torch.randn_like(p))
    reg = filt.regularization()
    graphs = [t.graph for t in filt.filter_targets]
    deltas = [model[0].weight.detach() - theta0[0], model[2].weight.detach() - theta0[1]]
    expected = 0.3 * sum(pairwise_form(d, g) for d, g in zip(deltas, graphs))
    torch.testing.assert_close(reg.double(), expected, rtol=1e-5, atol=1e-9)
    reg.backward()
    assert model[0].weight.grad is None and model[2].weight.grad is None  # the filter adds it, in step()
    filt.step()
    for p, d, name in zip((model[0].weight, model[2].weight), deltas, ("0.weight", "2.weight")):
        L = filt.laplacians()[name].to_dense().double()
        torch.testing.assert_close(p.grad.double(), 0.6 * L @ d.double(), rtol=1e-5, atol=1e-8)


def test_regularization_without_reg_weight_is_zero_and_keeps_no_copy(seed):
    filt = sk.SpectralGradientFilter(tiny_model(seed), ["0"], block_size=8, k=2, knn=2)
    assert filt.filter_targets[0].theta0 is None
    assert float(filt.regularization()) == 0.0
    with pytest.raises(ValueError, match="reg_weight was 0 when the filter was built"):
        filt.reg_weight = 0.5


# ------------------------------------------------------------------------------------------- SpectralAdamW
@pytest.mark.parametrize("passthrough", [0.0, 0.3])
def test_spectral_adamw_equals_torch_adamw_on_filtered_gradients(backend, seed, passthrough):
    """100 steps with an LR schedule; fp32: 1e-6 relative (the torch backend filters in batched GEMMs and updates
    the filtered weight with torch's fused AdamW, whose roundings differ from the loop reference and the
    single-tensor step in the last bit; two param groups, the unfiltered ones bitwise — see
    tests/test_backend_registry.py), and on Triton (one group: the fused kernel for the weight, the plain kernel
    for its bias — the interpreter is slow)."""
    if backend == "triton" and passthrough == 0.0:
        pytest.skip("the h = 0 fused path is exercised under Triton by the resume and hook tests")
    steps = 100
    models, opts, filts, scheds = [], [], [], []
    for ours in (True, False):
        model = tiny_model(seed, hidden=12)
        filt = sk.SpectralGradientFilter(model, ["0"], block_size=5, k=3, knn=2, refresh_every=0,
                                         passthrough=passthrough, gains=sk.tikhonov(2.0))
        groups = [{"params": [model[0].weight, model[0].bias]}]
        if backend == "torch":
            groups.append({"params": [model[2].weight, model[2].bias], "lr": 3e-3, "weight_decay": 0.1})
        else:
            model[2].requires_grad_(False)
        opt = (sk.SpectralAdamW(groups, lr=1e-2, weight_decay=0.01, spectral_filter=filt) if ours
               else torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.01))
        models.append(model), opts.append(opt), filts.append(filt)
        scheds.append(torch.optim.lr_scheduler.StepLR(opt, step_size=15, gamma=0.5))
    basis = filts[1].bases()["0.weight"]
    gains = filts[1].filter_targets[0].gains
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model in models:
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone() if p.requires_grad else None
        models[1][0].weight.grad = spectral_filter_reference(grads[0], basis.U, basis.block_ptr, gains, passthrough)
        for opt, sched in zip(opts, scheds):
            opt.step()
            sched.step()
    assert filts[0].steps == steps
    tolerance = 1e-6
    for (name, ours), theirs in zip(models[0].named_parameters(), models[1].parameters()):
        if not ours.requires_grad:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opts[0].state[ours][key], opts[1].state[theirs][key]
            assert (a - b).norm() <= tolerance * b.norm(), (name, key)
        assert (ours - theirs).norm() <= tolerance * theirs.norm(), name
        assert float(opts[0].state[ours]["step"]) == steps


def test_spectral_adamw_without_a_filter_is_torch_adamw(seed, monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    runs = []
    for cls in (sk.SpectralAdamW, torch.optim.AdamW):
        model = tiny_model(seed)
        opt = cls(model.parameters(), lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
        for step in range(5):
            opt.zero_grad()
            task_loss(model, step).backward()
            opt.step()
        runs.append(model)
    assert_same(*runs)  # the torch backend replays torch's single-tensor AdamW exactly


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dict_is_interchangeable_with_torch_adamw(seed, monkeypatch, direction):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    first, second = ((torch.optim.AdamW, sk.SpectralAdamW) if direction == "torch->ours"
                     else (sk.SpectralAdamW, torch.optim.AdamW))
    model = tiny_model(seed)
    opt = first(model.parameters(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        task_loss(model, step).backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    runs = []
    for cls in (first, second):
        clone = copy.deepcopy(model)
        opt2 = cls(clone.parameters(), lr=1e-2)
        opt2.load_state_dict(copy.deepcopy(saved))  # torch keeps the loaded 'step' tensors (no copy)
        for step in range(3, 6):
            opt2.zero_grad()
            task_loss(clone, step).backward()
            opt2.step()
        runs.append(clone)
    assert_same(*runs)


def test_bf16_parameters_keep_fp32_moments(seed, monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    model = tiny_model(seed, dtype=torch.bfloat16)
    reference = copy.deepcopy(model).float()
    filt = sk.SpectralGradientFilter(model, ["0"], block_size=8, k=3, knn=3, refresh_every=0)
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, spectral_filter=filt)
    task_loss(model, 0).backward()
    grads = [p.grad.float() for p in model.parameters()]
    opt.step()
    state = opt.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16
    # One step from zero moments, in fp32, then one rounding to bf16.
    t = filt.filter_targets[0]
    grads[0] = spectral_filter_reference(grads[0], t.basis.U, t.basis.block_ptr, t.gains, 0.0)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for p, g in zip(reference.parameters(), grads):
        p.grad = g
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16))
    # A bf16 round trip through state_dict keeps the fp32 moments exactly.
    opt2 = sk.SpectralAdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state[model[0].weight]["exp_avg_sq"], state["exp_avg_sq"])


def test_bf16_states_on_request(seed, monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    model = tiny_model(seed, dtype=torch.bfloat16)
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    task_loss(model, 0).backward()
    grad = model[0].weight.grad.float()
    opt.step()
    state = opt.state[model[0].weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    # fp32 arithmetic, one rounding of each moment.
    expected_m = torch.zeros_like(grad).lerp_(grad, 0.1).to(torch.bfloat16)
    assert torch.equal(state["exp_avg"], expected_m)
    with pytest.raises(ValueError, match="state_dtype must be torch.float32 or torch.bfloat16"):
        sk.SpectralAdamW(model.parameters(), state_dtype=torch.float16)


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.filterwarnings("ignore:the kNN graphs of 2.weight have no edges")  # 3 rows, may all be obtuse
@pytest.mark.parametrize("mode", ["spectral_adamw", "explicit+adamw"])
def test_resume_from_state_dicts_is_bit_identical(backend, seed, mode):
    """Train 2 steps, save model + filter + optimizer, train 3 more; a fresh set of objects loaded from the save
    and trained 3 steps ends bit-identical. Refreshes (every 2 steps) and the correlation EMA are in the window."""
    def build(init_seed: int):
        model = tiny_model(init_seed)
        filt = sk.SpectralGradientFilter(model, ["0", "2"], graph="gradient_correlation", block_size=8, k=3, knn=2,
                                         refresh_every=2, reg_weight=0.05)
        params = model.parameters()
        opt = (sk.SpectralAdamW(params, lr=1e-2, spectral_filter=filt) if mode == "spectral_adamw"
               else torch.optim.AdamW(params, lr=1e-2))
        return model, filt, opt

    def train(model, filt, opt, steps):
        for step in steps:
            opt.zero_grad()
            (task_loss(model, step) + filt.regularization()).backward()
            if mode != "spectral_adamw":
                filt.step()
            opt.step()

    model, filt, opt = build(seed)
    train(model, filt, opt, range(2))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "filter": filt.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, filt, opt, range(2, 5))

    buffer.seek(0)
    saved = torch.load(buffer)
    model2, filt2, opt2 = build(seed + 1)  # different initial weights: everything must come from the save
    model2.load_state_dict(saved["model"])
    filt2.load_state_dict(saved["filter"])
    opt2.load_state_dict(saved["opt"])
    assert filt2.steps == 2
    train(model2, filt2, opt2, range(2, 5))
    assert_same(model, model2)
    assert filt2.steps == filt.steps == 5


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.filterwarnings("ignore:the kNN graphs of 2.weight have no edges")  # 3 rows, may all be obtuse
@pytest.mark.parametrize("mode", ["explicit", "hook", "spectral_adamw"])
def test_tiny_model_trains_with_filter_and_regulariser(seed, monkeypatch, mode):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")  # the Triton paths are covered above, at fewer steps
    model = tiny_model(seed, hidden=24)
    filt = sk.SpectralGradientFilter(model, ["0", "2"], block_size=8, k=4, knn=3, refresh_every=10, reg_weight=1e-3,
                                     hook=mode == "hook", passthrough=0.1)
    opt = (sk.SpectralAdamW(model.parameters(), lr=2e-2, spectral_filter=filt) if mode == "spectral_adamw"
           else torch.optim.AdamW(model.parameters(), lr=2e-2))
    x, y = batch(0, n=128)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        (loss + filt.regularization()).backward()
        if mode != "spectral_adamw":
            filt.step()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    assert float(filt.regularization().detach()) > 0.0


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_filter_inputs_name_the_argument(seed):
    model = tiny_model(seed)
    with pytest.raises(ValueError, match=r"matched no module.*full names: \[0, 2\]"):
        sk.SpectralGradientFilter(model, ["query"])
    with pytest.raises(TypeError, match="target module '1' is a Tanh; expected an nn.Linear"):
        sk.SpectralGradientFilter(model, ["1"])
    for k in (0, -3):
        with pytest.raises(ValueError, match=f"k must be positive, got {k}"):
            sk.SpectralGradientFilter(model, ["0"], k=k)
    with pytest.raises(TypeError, match="target_modules must be a regex string or a non-empty list"):
        sk.SpectralGradientFilter(model, [])
    assert [name for name, _ in sk.SpectralGradientFilter(model, "0|2", k=2).targets] == ["0.weight", "2.weight"]
    with pytest.raises(ValueError, match="graph must be one of knn, gradient_correlation, got 'spectral'"):
        sk.SpectralGradientFilter(model, ["0"], graph="spectral")
    with pytest.raises(ValueError, match=r"gains of shape \(k,\) must have k = 4 entries"):
        sk.SpectralGradientFilter(model, ["0"], k=4, gains=torch.ones(3))
    with pytest.raises(TypeError, match="gains must be a gain function"):
        sk.SpectralGradientFilter(model, ["0"], gains="heat")
    with pytest.raises(ValueError, match="refresh_every must be a non-negative int"):
        sk.SpectralGradientFilter(model, ["0"], refresh_every=-1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sk.SpectralGradientFilter(model.state_dict(), ["0"])
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"matched only frozen weights \(0\)"):
        sk.SpectralGradientFilter(model, ["0"])


def test_bad_optimizer_use_is_refused(seed):
    model = tiny_model(seed)
    filt = sk.SpectralGradientFilter(model, ["0"], block_size=8, k=2, knn=2)
    with pytest.raises(ValueError, match="amsgrad=True is not implemented"):
        sk.SpectralAdamW(model.parameters(), amsgrad=True)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        sk.SpectralAdamW(model.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="spectral_filter targets 0.weight, which this optimizer does not update"):
        sk.SpectralAdamW(model[2].parameters(), spectral_filter=filt)
    with pytest.raises(TypeError, match="spectral_filter must be a SpectralGradientFilter"):
        sk.SpectralAdamW(model.parameters(), spectral_filter=object())
    opt = sk.SpectralAdamW(model.parameters(), spectral_filter=filt)
    task_loss(model, 0).backward()
    filt.step()
    with pytest.raises(RuntimeError, match="would be filtered twice"):
        opt.step()
    hooked = sk.SpectralGradientFilter(model, ["0"], block_size=8, k=2, knn=2, hook=True)
    with pytest.raises(ValueError, match="hook mode"):
        sk.SpectralAdamW(model.parameters(), spectral_filter=hooked)
    hooked.remove_hooks()
    sk.SpectralAdamW(model.parameters(), spectral_filter=hooked)  # fine once the hooks are gone
    opt.zero_grad()  # the filtered gradients stay refused until a new backward (or zero_grad)
    opt.param_groups[0]["amsgrad"] = True  # e.g. from a torch AdamW state_dict
    with pytest.raises(ValueError, match="does not implement amsgrad"):
        opt.step()


def test_filter_attached_later_and_parameters_swapped_under_it(seed):
    """set_spectral_filter attaches a filter built after the optimizer; parameters swapped after construction (as
    accelerate's FSDP2 prepare does) make step() raise instead of silently skipping the filter."""
    model = tiny_model(seed)
    reference = copy.deepcopy(model)
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-2)
    filt = sk.SpectralGradientFilter(model, ["0"], block_size=8, k=2, knn=2)
    opt.set_spectral_filter(filt)
    ref_filt = sk.SpectralGradientFilter(reference, ["0"], block_size=8, k=2, knn=2)
    ref_opt = sk.SpectralAdamW(reference.parameters(), lr=1e-2, spectral_filter=ref_filt)
    for m, o in ((model, opt), (reference, ref_opt)):
        task_loss(m, 0).backward()
        o.step()
    assert filt.steps == 1 and torch.equal(model[0].weight, reference[0].weight)
    with pytest.raises(ValueError, match="spectral_filter targets 0.weight, which this optimizer does not update"):
        sk.SpectralAdamW(model[2].parameters()).set_spectral_filter(filt)

    swapped = [nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    opt.param_groups[0]["params"] = swapped
    swapped[0].grad = torch.zeros_like(swapped[0])
    with pytest.raises(ValueError, match=r"targets 0.weight, which this optimizer does not update: its parameters "
                                         r"are other tensors.*build the filter after the model is wrapped"):
        opt.step()
    opt.set_spectral_filter(None)
    opt.step()  # plain AdamW


def test_filter_state_dict_mismatch_is_refused(seed):
    filt = sk.SpectralGradientFilter(tiny_model(seed), ["0"], block_size=8, k=2, knn=2)
    other = sk.SpectralGradientFilter(tiny_model(seed), ["2"], block_size=8, k=2, knn=2)
    with pytest.raises(ValueError, match=r"saved targets \['2.weight'\] differ"):
        filt.load_state_dict(other.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_reg = sk.SpectralGradientFilter(tiny_model(seed), ["0"], block_size=8, k=2, knn=2, reg_weight=1.0)
    with pytest.raises(ValueError, match="has W₀ for 0.weight"):
        filt.load_state_dict(with_reg.state_dict())
    with pytest.raises(ValueError, match="state_dict has k=2 but this filter has k=3"):
        sk.SpectralGradientFilter(tiny_model(seed), ["0"], block_size=8, k=3, knn=2).load_state_dict(
            filt.state_dict())


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_bf16_spectral_adamw_tracks_fp32_reference(seed):
    model = tiny_model(seed, hidden=300).cuda().to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    filt = sk.SpectralGradientFilter(model, ["0", "2"], block_size=128, k=16, refresh_every=0)
    ref_filt = sk.SpectralGradientFilter(reference, ["0", "2"], block_size=128, k=16, refresh_every=0)
    for t, r in zip(filt.filter_targets, ref_filt.filter_targets):  # same bases on both sides
        r.basis, r.gains = t.basis, t.gains
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-3, spectral_filter=filt)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for step in range(10):
        x, y = batch(step)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x.cuda().to(next(m.parameters()).dtype)).float(), y.cuda()).backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            q.grad = p.grad.float()  # same gradients: the test is about the update, not the forward
        ref_filt.step()
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference.parameters()):
                q.copy_(p.float())  # re-sync: bf16 rounding of p is the only expected difference per step
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].dtype == torch.float32
    for ours, theirs in zip(opt.state.values(), ref_opt.state.values()):
        assert (ours["exp_avg"] - theirs["exp_avg"]).norm() <= 1e-2 * theirs["exp_avg"].norm()
