"""Paper 001 as written: only the task gradient is filtered (the regulariser's gradient 2λLΔ is added once,
unfiltered, in every mode), the paper's gradient-descent update and a low-pass AdamW update stay in span(U), the
full-spectrum Chebyshev filter equals g(L), the regulariser's Laplacian kinds and their identities, the public
per-target protocol, and all-or-nothing state loading."""
from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import spectralkern as sk

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
LAM = 0.3


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("SPECTRALKERN_BACKEND", request.param)
    return request.param


def model_and_filter(seed: int, **kwargs) -> tuple[nn.Sequential, sk.SpectralGradientFilter]:
    """A 6 → 20 → 3 MLP whose first weight (20 rows: blocks 8, 8, 4) is targeted; the weights then move, so Δ ≠ 0."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3))
    options = dict(block_size=8, k=3, knn=3, refresh_every=0, reg_weight=LAM) | kwargs
    filt = sk.SpectralGradientFilter(model, ["0"], **options)
    with torch.no_grad():
        model[0].weight.add_(0.1 * torch.randn_like(model[0].weight))
    return model, filt


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(seed))


def reg_grad_dense(model: nn.Module, filt: sk.SpectralGradientFilter, theta0: torch.Tensor) -> torch.Tensor:
    """float64 2λ L_reg Δ of the targeted weight."""
    L = filt.filter_targets[0].reg_laplacian.to_dense().double()
    return 2 * LAM * L @ (model[0].weight.detach().double() - theta0.double())


def dense_filter(filt: sk.SpectralGradientFilter, x: torch.Tensor) -> torch.Tensor:
    """float64 F(x) = h·x + U diag(g − h) Uᵀ x of the targeted weight (block-diagonal U written out)."""
    t = filt.filter_targets[0]
    out = filt.passthrough * x.double()
    ptr = t.basis.block_ptr.tolist()
    for b, (start, stop) in enumerate(zip(ptr[:-1], ptr[1:])):
        U = t.basis.U[start:stop].double()
        out[start:stop] += U @ ((t.gains[b].double() - filt.passthrough)[:, None] * (U.T @ x[start:stop].double()))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def outside_span(update: torch.Tensor, basis: sk.SpectralBasis) -> float:
    """‖(I − U Uᵀ) update‖² / ‖update‖² per block, summed: the share of the update's energy outside span(U)."""
    x = update.double()
    inside = torch.zeros_like(x)
    ptr = basis.block_ptr.tolist()
    for start, stop in zip(ptr[:-1], ptr[1:]):
        U = basis.U[start:stop].double()
        inside[start:stop] = U @ (U.T @ x[start:stop])
    return float((x - inside).square().sum() / x.square().sum())


# ------------------------------------------------------------------- 1. only the task gradient is filtered
@pytest.mark.parametrize("mode", ["explicit", "hook"])
def test_zero_task_loss_leaves_exactly_the_regulariser_gradient(backend, seed, mode):
    model, filt = model_and_filter(seed, hook=mode == "hook", passthrough=0.0)
    theta0 = filt.filter_targets[0].theta0.clone()
    loss = 0.0 * model(inputs(seed)).sum() + filt.regularization()
    loss.backward()
    filt.step()
    expected = reg_grad_dense(model, filt, theta0)
    assert expected.norm() > 0 and outside_span(expected, filt.bases()["0.weight"]) > 0.05  # filtering would show
    assert rel(model[0].weight.grad, expected) <= 1e-5
    assert float(model[2].weight.grad.abs().max()) == 0.0  # untargeted weights get no regulariser


def test_task_gradient_filtered_and_regulariser_added_once(backend, seed):
    """Non-zero task loss, gradient accumulation over 2 micro-batches (loss / 2 each) and a regularization() call
    that is never backpropagated: .grad = F(Σ task grads) + 2λ L Δ, the regulariser counted once."""
    model, filt = model_and_filter(seed, passthrough=0.2, gains=sk.tikhonov(1.0))
    reference = copy.deepcopy(model)
    theta0 = filt.filter_targets[0].theta0.clone()
    filt.regularization()  # a logged value: no backward, no contribution
    for micro in range(2):
        loss = (model(inputs(seed + micro)).square().mean() + filt.regularization()) / 2
        loss.backward()
    for micro in range(2):
        (reference(inputs(seed + micro)).square().mean() / 2).backward()
    filt.step()
    expected = dense_filter(filt, reference[0].weight.grad) + reg_grad_dense(model, filt, theta0)
    assert rel(model[0].weight.grad, expected) <= 1e-5
    assert filt.steps == 1 and filt.filter_targets[0].regularizer_grad() is None  # the scale was consumed


def test_loss_scale_scales_the_regulariser_like_the_task_gradient(seed):
    """A loss scaled by S (what a GradScaler does) gives S times the unscaled step's gradient."""
    grads = []
    for scale in (1.0, 1024.0):
        model, filt = model_and_filter(seed)
        (scale * (model(inputs(seed)).square().mean() + filt.regularization())).backward()
        filt.step()
        grads.append(model[0].weight.grad.clone())
    assert rel(grads[1] / 1024.0, grads[0]) <= 1e-6


@pytest.mark.parametrize("lowpass_update", [False, True])
def test_zero_task_loss_spectral_adamw_applies_adamw_of_the_regulariser_gradient(backend, seed, lowpass_update):
    """The fused optimizer (torch backend, and Triton under the interpreter): its applied update equals torch's
    AdamW on 2λLΔ alone (lowpass_update: the AdamW direction of 2λLΔ, filtered)."""
    model, filt = model_and_filter(seed)
    theta0 = filt.filter_targets[0].theta0.clone()
    before = model[0].weight.detach().clone()
    expected_grad = reg_grad_dense(model, filt, theta0).float()
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, weight_decay=0.0, spectral_filter=filt,
                           lowpass_update=lowpass_update)
    (0.0 * model(inputs(seed)).sum() + filt.regularization()).backward()
    opt.step()
    applied = model[0].weight.detach() - before
    weight = before.clone().requires_grad_(True)
    torch_opt = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.0)
    weight.grad = expected_grad
    torch_opt.step()
    expected = weight.detach() - before
    if lowpass_update:
        expected = dense_filter(filt, expected)
    assert rel(applied, expected) <= 1e-4  # Adam's first step is ±lr·sign-like: relative error of Adam's ratio
    assert filt.steps == 1


def test_zero_task_loss_spectral_sgd_steps_along_the_regulariser_gradient(backend, seed):
    model, filt = model_and_filter(seed)
    theta0 = filt.filter_targets[0].theta0.clone()
    before = model[0].weight.detach().clone()
    expected = -0.5 * reg_grad_dense(model, filt, theta0)
    opt = sk.SpectralSGD(model.parameters(), lr=0.5, spectral_filter=filt)
    (0.0 * model(inputs(seed)).sum() + filt.regularization()).backward()
    opt.step()
    assert rel(model[0].weight.detach() - before, expected) <= 1e-5


def test_zero_grad_discards_the_regulariser_share_too(seed):
    """backward, zero_grad (a discarded batch), backward, step: the step sees one regulariser term, as .grad."""
    runs = []
    for discard in (False, True):
        model, filt = model_and_filter(seed)
        opt = sk.SpectralSGD(model.parameters(), lr=0.5, spectral_filter=filt)
        if discard:
            (model(inputs(seed)).square().mean() + filt.regularization()).backward()
            opt.zero_grad()
        (model(inputs(seed + 1)).square().mean() + filt.regularization()).backward()
        opt.step()
        runs.append(model)
    for p, q in zip(runs[1].parameters(), runs[0].parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- 2. the update rules and span(U)
def test_spectral_sgd_is_the_papers_rule_with_momentum_as_torch_sgd(seed):
    """θ ← θ − η(F g + 2λLΔ) with momentum: equals torch.optim.SGD fed those directions."""
    model, filt = model_and_filter(seed, passthrough=0.1)
    reference = copy.deepcopy(model)
    theta0 = filt.filter_targets[0].theta0.clone()
    opt = sk.SpectralSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, spectral_filter=filt)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for step in range(3):
        (model(inputs(step)).square().mean() + filt.regularization()).backward()
        reference(inputs(step)).square().mean().backward()
        reg = reg_grad_dense(reference, filt, theta0)
        reference[0].weight.grad = (dense_filter(filt, reference[0].weight.grad) + reg).float()
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert rel(p, q) <= 1e-6


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adamw_lowpass", "adamw_lowpass_reg"])
def test_updates_that_claim_the_band_stay_in_span_u(backend, seed, optimizer):
    """passthrough 0, no weight decay: the cumulative update of 3 steps has < 1e-6 of its energy outside span(U)
    (SGD: without the regulariser, whose gradient is outside the band by design; lowpass AdamW: with it)."""
    model, filt = model_and_filter(seed, reg_weight=LAM if optimizer == "adamw_lowpass_reg" else 0.0)
    before = model[0].weight.detach().clone()
    if optimizer.startswith("sgd"):
        opt = sk.SpectralSGD(model.parameters(), lr=0.1, momentum=0.9 if optimizer == "sgd_momentum" else 0.0,
                             spectral_filter=filt)
    else:
        opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, weight_decay=0.0, spectral_filter=filt,
                               lowpass_update=True)
    for step in range(3):
        (model(inputs(step)).square().mean() + filt.regularization()).backward()
        opt.step()
        opt.zero_grad()
    update = model[0].weight.detach() - before
    assert update.norm() > 0 and outside_span(update, filt.bases()["0.weight"]) < 1e-6
    outside, total = filt.filter_targets[0].band_energy(update)
    assert float(outside) <= 1e-6 * float(total)


def test_plain_spectral_adamw_leaves_the_band(seed):
    """The default AdamW mode makes no band claim: Adam's per-element normalisation mixes frequencies."""
    model, filt = model_and_filter(seed, reg_weight=0.0)
    before = model[0].weight.detach().clone()
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, weight_decay=0.0, spectral_filter=filt)
    for step in range(3):
        model(inputs(step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    update = model[0].weight.detach() - before
    share = outside_span(update, filt.bases()["0.weight"])
    assert share > 1e-3
    outside, total = filt.filter_targets[0].band_energy(update)
    assert abs(float(outside / total) - share) <= 1e-4 * share


# ---------------------------------------------------------------------------- 3. full-spectrum filter g(L)
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("form", ["materialized ragged", "materialized uniform", "recursion"])
def test_chebyshev_filter_method_applies_g_to_the_whole_spectrum(backend, seed, normalized, form, monkeypatch):
    """g(L) of every block (ragged 8, 8, 4 or uniform 10, 10), as materialised per block or as the per-step
    recursion (blocks above MATERIALIZE_MAX_BLOCK), against float64 eigendecompositions."""
    if form == "recursion":
        monkeypatch.setattr(sk.optim.gradient_filter, "MATERIALIZE_MAX_BLOCK", 0)
    model, filt = model_and_filter(seed, filter_method="chebyshev", gains=sk.heat(1.0), chebyshev_order=24,
                                   normalized=normalized, block_size=10 if form == "materialized uniform" else 8)
    assert (filt.filter_targets[0].block_operator is None) == (form == "recursion")
    grad = torch.randn(20, 6, generator=torch.Generator().manual_seed(seed))
    t = filt.filter_targets[0]
    # float64 g(L) = V exp(−Λ) Vᵀ by a dense eigendecomposition of each block
    L = t.laplacian.to_dense().double()
    expected = torch.empty(20, 6, dtype=torch.float64)
    ptr = t.laplacian.block_ptr.tolist()
    for start, stop in zip(ptr[:-1], ptr[1:]):
        values, vectors = torch.linalg.eigh(L[start:stop, start:stop])
        expected[start:stop] = vectors @ (torch.exp(-values)[:, None] * (vectors.T @ grad[start:stop].double()))
    assert rel(t.filter(grad), expected) <= 1e-5
    model[0].weight.grad = grad.clone()
    filt.step()  # explicit mode through the same path, regulariser not in the loss
    assert rel(model[0].weight.grad, expected) <= 1e-5


def test_chebyshev_filter_method_needs_a_gain_function(seed):
    with pytest.raises(ValueError, match="gains must be a function"):
        model_and_filter(seed, filter_method="chebyshev", gains=torch.ones(3))
    with pytest.raises(ValueError, match="passthrough must be 0 with filter_method='chebyshev'"):
        model_and_filter(seed, filter_method="chebyshev", passthrough=0.5)
    with pytest.raises(ValueError, match="filter_method must be one of basis, chebyshev, got 'eigh'"):
        model_and_filter(seed, filter_method="eigh")


# ------------------------------------------------------------------------------ 4. the regulariser's Laplacian
@pytest.mark.parametrize("reg_normalized", [None, False, True])
def test_regulariser_laplacian_kinds_and_their_identities(seed, reg_normalized):
    """combinatorial: tr(ΔᵀLΔ) = ½ Σ W_ij ‖Δ_i − Δ_j‖²; normalized: ½ Σ W_ij ‖Δ_i/√d_i − Δ_j/√d_j‖²."""
    model, filt = model_and_filter(seed, reg_normalized=reg_normalized)
    t = filt.filter_targets[0]
    normalized = True if reg_normalized is None else reg_normalized
    assert t.reg_laplacian.normalized is normalized and t.laplacian.normalized is True
    W = t.graph.to_dense().double()
    x = model[0].weight.detach().double() - t.theta0.double()
    if normalized:
        deg = W.sum(1)
        x = torch.where(deg[:, None] > 0, x / deg.clamp_min(1e-300).sqrt()[:, None], torch.zeros_like(x))
    pairwise = 0.5 * (W * (x[:, None, :] - x[None, :, :]).square().sum(-1)).sum()
    assert abs(filt.regularization().item() - LAM * float(pairwise)) <= 1e-5 * LAM * float(pairwise)


def test_laplacian_matmul_equals_the_dense_product(backend, seed):
    graph = sk.ParameterGraph.knn(torch.randn(13, 5), k=3, block_size=6)
    x = torch.randn(13, 4)
    for normalized in (True, False):
        L = graph.laplacian(normalized=normalized)
        expected = 0.7 * L.to_dense().double() @ x.double()
        assert rel(sk.laplacian_matmul(x, L, 0.7), expected) <= 1e-6
        assert rel(sk.laplacian_matmul(x[:, 0], L, torch.tensor(0.7)), expected[:, 0]) <= 1e-6


def test_laplacian_matmul_gradcheck(seed):
    L = sk.ParameterGraph.knn(torch.randn(7, 3, dtype=torch.float64), k=2, block_size=4).laplacian()
    x = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: sk.laplacian_matmul(x, L, s), (x, scale))


# ------------------------------------------------------------------------------ 5. protocol and atomic loading
def test_targets_for_update_refuses_filtered_gradients_and_hook_mode(seed):
    model, filt = model_and_filter(seed)
    model(inputs(seed)).sum().backward()
    filt.step()
    with pytest.raises(RuntimeError, match="already filtered and would be filtered twice"):
        filt.targets_for_update()
    _, hooked = model_and_filter(seed, hook=True)
    with pytest.raises(ValueError, match="hook mode"):
        hooked.targets_for_update()
    model[0].weight.grad = None  # a new backward (here: none) makes the gradients fresh again
    (target,) = filt.targets_for_update()
    assert target.name == "0.weight" and target.param is model[0].weight and target.basis.k == 3


def test_failed_load_leaves_the_filter_unchanged(seed):
    """The second target's saved basis is wrong: the load raises and the first target keeps its state."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 12))
    filt = sk.SpectralGradientFilter(model, ["0", "2"], block_size=8, k=3, knn=3, reg_weight=0.1)
    saved = filt.state_dict()
    other = sk.SpectralGradientFilter(copy.deepcopy(model).apply(_perturb), ["0", "2"], block_size=8, k=3, knn=3,
                                      reg_weight=0.1, refresh_every=0)
    broken = other.state_dict()
    broken["targets"]["2.weight"] = dict(broken["targets"]["2.weight"], U=torch.zeros(11, 3))
    before = {t.name: t.state() for t in filt.filter_targets}
    with pytest.raises(ValueError, match="basis of 2.weight has shape \\(11, 3\\)"):
        filt.load_state_dict(broken)
    assert unchanged(filt, before)
    broken = other.state_dict()
    broken["targets"]["2.weight"] = dict(broken["targets"]["2.weight"], theta0=torch.zeros(12, 7))
    with pytest.raises(ValueError, match="saved W₀ of 2.weight is torch.float32 of shape \\(12, 7\\)"):
        filt.load_state_dict(broken)
    assert unchanged(filt, before)
    broken = other.state_dict()
    entry = broken["targets"]["2.weight"]
    broken["targets"]["2.weight"] = dict(entry, U=entry["U"].double(), eigenvalues=entry["eigenvalues"].double())
    with pytest.raises(ValueError, match="the basis of 2.weight is torch.float64, its graph torch.float32"):
        filt.load_state_dict(broken)
    broken = other.state_dict() | {"version": 99}
    with pytest.raises(ValueError, match="version 3\\), got dict with version 99"):
        filt.load_state_dict(broken)
    assert unchanged(filt, before) and filt.steps == 0
    filt.load_state_dict(saved)  # a good state still loads


def unchanged(filt: sk.SpectralGradientFilter, before: dict) -> bool:
    """Every target still holds the very objects it held (nothing was assigned)."""
    return all(getattr(t.state(), field) is getattr(before[t.name], field)
               for t in filt.filter_targets for field in ("graph", "basis", "theta0", "correlation"))


def _perturb(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            module.weight.add_(torch.randn_like(module.weight))


def test_theta0_of_another_width_is_refused(seed):
    """W₀ of Linear(1, 48) loaded into a filter over Linear(16, 48): same rows, other width."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 1-column weight may give edgeless blocks
        narrow = sk.SpectralGradientFilter(nn.Sequential(nn.Linear(1, 48)), ["0"], block_size=16, k=2,
                                           reg_weight=0.1)
    wide = sk.SpectralGradientFilter(nn.Sequential(nn.Linear(16, 48)), ["0"], block_size=16, k=2, reg_weight=0.1)
    before = {"0.weight": wide.filter_targets[0].state()}
    with pytest.raises(ValueError, match=r"saved W₀ of 0.weight is torch.float32 of shape \(48, 1\), the weight "
                                         r"here is torch.float32 of shape \(48, 16\)"):
        wide.load_state_dict(narrow.state_dict())
    assert unchanged(wide, before)


def test_construction_logs_each_target(seed):
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("spectralkern.optim.gradient_filter")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        model_and_filter(seed, progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (record,) = [r for r in records if "spectral basis of 0.weight" in r.getMessage()]
    assert "20 rows in 3 blocks, k=3, eigensolver" in record.getMessage()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_grad_scaler_step_unscales_the_regulariser_too_and_skips_inf_steps(seed, optimizer):
    """scaler.step(opt) with a loss scale of 2^10 gives the unscaled run's parameters; an inf step is skipped
    without counting and without leaving its regulariser scale behind for the next step."""
    def make(model, filt):
        if optimizer == "adamw":
            return sk.SpectralAdamW(model.parameters(), lr=1e-2, spectral_filter=filt)
        return sk.SpectralSGD(model.parameters(), lr=0.1, momentum=0.5, spectral_filter=filt)

    runs = []
    for scaled in (False, True):
        model, filt = model_and_filter(seed)
        opt = make(model, filt)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000) if scaled else None
        for step in range(3):
            loss = model(inputs(step)).square().mean() + filt.regularization()
            if scaled:
                scaler.scale(loss).backward()
                if step == 1:  # poison one step: the scaler must skip it
                    model[2].bias.grad[0] = float("inf")
                scaler.step(opt)
                scaler.update()
            elif step != 1:
                loss.backward()
                opt.step()
            opt.zero_grad()
        runs.append((model, filt))
    (plain, plain_filt), (scaled_model, scaled_filt) = runs
    assert scaled_filt.steps == plain_filt.steps == 2
    for p, q in zip(scaled_model.parameters(), plain.parameters()):
        assert rel(p, q) <= 1e-6


def test_unscaled_gradients_with_a_pending_regulariser_are_refused(seed):
    model, filt = model_and_filter(seed)
    opt = sk.SpectralAdamW(model.parameters(), lr=1e-2, spectral_filter=filt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(inputs(seed)).square().mean() + filt.regularization()).backward()
    scaler.unscale_(opt)  # e.g. for gradient clipping
    with pytest.raises(RuntimeError, match="scaler.unscale_\\(optimizer\\) ran before scaler.step\\(optimizer\\)"):
        scaler.step(opt)


def test_unscale_regularizer_after_an_explicit_unscale(seed):
    """scaler.unscale_ (for clipping) + filt.unscale_regularizer_(1/S), then scaler.step: the unscaled run's step."""
    runs = []
    for scaled in (False, True):
        model, filt = model_and_filter(seed)
        opt = sk.SpectralSGD(model.parameters(), lr=0.1, spectral_filter=filt)
        loss = model(inputs(seed)).square().mean() + filt.regularization()
        if scaled:
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            filt.unscale_regularizer_(1 / scaler.get_scale())
            scaler.step(opt)
        else:
            loss.backward()
            opt.step()
        runs.append(model)
    for p, q in zip(runs[1].parameters(), runs[0].parameters()):
        assert rel(p, q) <= 1e-6
