"""peft's FourierFT → spectralkern's FourierFT reads the whole peft config: outputs and gradients equal peft's own
layers for every field it supports (fan_in_fan_out on GPT-2's Conv1D, random_loc_seed, n_frequency, scaling,
bias="none"), the ifft2 normalisations' amplitudes (backward / ortho / forward, checked against torch.fft.ifft2
directly since the installed peft may lack ``ifft2_norm``), and anything it cannot reproduce raises naming it."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from spectralkern.peft.fourier_moe import (FourierFTLinear, check_peft_config, from_peft_fourierft,  # noqa: E402
                                           from_peft_fourierft_model, ifft2_amplitude)


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    return transformers.GPT2Model(config).eval()


def peft_fourierft(model, **fields):
    config = peft.FourierFTConfig(init_weights=False, **fields)  # a random spectrum, not zeros
    return peft.get_peft_model(copy.deepcopy(model), config)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def outputs_and_grads(model, ids):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds).last_hidden_state
    # a fixed random projection: well-conditioned gradients (a mean of squares cancels to ~1e-5 and shows fp32
    # rounding of the two ΔW constructions as large relative errors)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weights).sum().backward()
    spectra = sorted((n.replace(".fourierft_spectrum.default", "").replace(".sk_fourierft_adapters.default.coef_re",
                                                                            ""), p.grad)
                     for n, p in model.named_parameters() if p.requires_grad)
    return out.detach(), embeds.grad, spectra


@pytest.mark.parametrize("fields", [
    dict(n_frequency=40, scaling=90.0, random_loc_seed=3, target_modules=["c_attn"], fan_in_fan_out=True),
    dict(n_frequency=25, scaling=150.0, random_loc_seed=777, target_modules=["c_proj"], fan_in_fan_out=True),
    dict(n_frequency=30, scaling=60.0, random_loc_seed=11, target_modules=r".*\.0\.mlp\.c_fc", fan_in_fan_out=True,
         layers_to_transform=None, bias="none"),
], ids=["c_attn-seed3", "c_proj-default-seed", "regex-c_fc"])
def test_conversion_matches_peft_on_gpt2_conv1d(fields, tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2()
    theirs = peft_fourierft(base, **fields)
    ours = from_peft_fourierft_model(copy.deepcopy(theirs))
    peft_layers = sorted(n for n, m in theirs.named_modules() if type(m).__name__ == "FourierFTLinear")
    assert peft_layers and peft_layers == sorted(n for n, m in ours.named_modules() if isinstance(m, FourierFTLinear))
    ids = torch.randint(0, 32, (2, 7))
    y_peft, gx_peft, gs_peft = outputs_and_grads(theirs, ids)
    y_ours, gx_ours, gs_ours = outputs_and_grads(ours, ids)
    assert relative_error(y_ours, y_peft) <= 1e-5
    assert relative_error(gx_ours, gx_peft) <= 1e-5
    assert [n for n, _ in gs_ours] == [n for n, _ in gs_peft]
    for (_, a), (_, b) in zip(gs_ours, gs_peft):
        assert relative_error(a, b) <= 1e-5
    # the converted adapter saves and reloads through peft (positions and amplitudes are in its file)
    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).last_hidden_state, y_peft, rtol=1e-5, atol=1e-6)
    # merging ours (Conv1D: the (out, in) update written through the transposed weight) keeps the outputs
    ours.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, y_peft, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["backward", "ortho", "forward"])
def test_ifft2_amplitude_matches_torch_ifft2(norm):
    """ΔW = scaling · Re(ifft2(S, norm)) for a real spectrum S: each entry contributes amplitude · cos(...)."""
    m, n = 12, 20  # not square, so 1/(MN) and 1/√(MN) cannot be confused
    generator = torch.Generator().manual_seed(5)
    index = torch.randperm(m * n, generator=generator)[:17]
    rows, cols = index // n, index % n
    values = torch.randn(17, dtype=torch.float64, generator=generator)
    spectrum = torch.zeros(m, n, dtype=torch.float64)
    spectrum[rows, cols] = values
    expected = torch.fft.ifft2(spectrum, norm=norm).real
    p, q = torch.arange(m, dtype=torch.float64)[:, None, None], torch.arange(n, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (rows.double() / m * p + cols.double() / n * q)
    ours = ifft2_amplitude(norm, m, n) * (values * torch.cos(phase)).sum(-1)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    assert ifft2_amplitude("ortho", 64, 96) / ifft2_amplitude("backward", 64, 96) == pytest.approx(math.sqrt(64 * 96))


def _peft_config_with(**extra):
    """A peft FourierFTConfig carrying fields the installed peft may not have (a newer peft's, simulated)."""
    fields = [(name, type(value), dataclasses.field(default=None)) for name, value in extra.items()]
    newer = dataclasses.make_dataclass("FourierFTConfig", fields, bases=(peft.FourierFTConfig,))
    return newer(target_modules=["0"], n_frequency=10, **extra)


@pytest.mark.parametrize("norm, amplitude", [(None, 1 / 48), ("backward", 1 / 48), ("ortho", 1 / math.sqrt(48)),
                                             ("forward", 1.0)])
def test_ifft2_norm_field_sets_the_amplitude(norm, amplitude):
    layer = peft_fourierft(nn.Sequential(nn.Linear(8, 6)), n_frequency=10, target_modules=["0"]).base_model.model[0]
    converted = from_peft_fourierft(layer, config=_peft_config_with(ifft2_norm=norm))
    torch.testing.assert_close(converted.active_unit.amplitude, torch.full((10,), amplitude))
    # backward: the peft layer's own output (the installed peft computes ifft2 with its default norm)
    if norm in (None, "backward"):
        x = torch.randn(5, 8)
        assert relative_error(converted(x), layer(x)) <= 1e-5


@pytest.mark.parametrize("config, error, match", [
    (lambda: _peft_config_with(ifft2_norm="unitary"), ValueError, r"ifft2_norm must be one of .* got 'unitary'"),
    (lambda: _peft_config_with(frequency_dropout=0.1), ValueError, r"field 'frequency_dropout' = 0.1 is unknown"),
    (lambda: peft.FourierFTConfig(target_modules=["0"], bias="all"), ValueError, r"bias = 'all'"),
    (lambda: peft.FourierFTConfig(target_modules=["0"], modules_to_save=["1"]), ValueError, "modules_to_save"),
    (lambda: peft.FourierFTConfig(target_modules=["0"], n_frequency=10, n_frequency_pattern={"0": 20}), ValueError,
     "n_frequency_pattern"),
    (lambda: peft.LoraConfig(target_modules=["0"]), TypeError, "peft's FourierFTConfig, got LoraConfig"),
])
def test_unknown_or_unsupported_config_raises_naming_it(config, error, match):
    with pytest.raises(error, match=match):
        check_peft_config(config())


def test_inconsistent_layers_raise_before_the_model_is_touched():
    model = peft_fourierft(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), n_frequency=10,
                           target_modules=["0", "2"], random_loc_seed=5)
    layer = model.base_model.model[2]
    layer.indices["default"] = layer.indices["default"].flip(1)  # no longer what random_loc_seed gives
    before = [(n, type(m).__name__) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="not the ones random_loc_seed = 5 gives"):
        from_peft_fourierft_model(model)
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == before
    layer.fan_in_fan_out = True
    with pytest.raises(ValueError, match="fan_in_fan_out = True does not match the base layer"):
        from_peft_fourierft(layer, config=model.peft_config["default"])
