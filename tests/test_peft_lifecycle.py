"""Every spectralkern adapter as a peft method, end to end, on a tiny BERT and a tiny LLaMA built from configs:
get_peft_model → train-shaped update → disable_adapter → save_pretrained → PeftModel.from_pretrained / sk.peft.load
→ same outputs; two named adapters; merge / merge_and_unload / unload; saving the underlying transformers model
(refused before anything is written while adapter layers are inside it; a merged-and-unloaded model saves and
reloads as a plain model with the same outputs); every kind of bad file refused with the model left as it was."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import spectralkern as sk  # noqa: E402
from spectralkern.peft import BaseWeightMismatchError  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


ARCHS = {"bert": (tiny_bert, ["query", "value"]), "llama": (tiny_llama, ["q_proj", "v_proj"])}
METHODS = {
    "smoa": lambda targets: sk.peft.SMoAConfig(r=4, alpha=8, num_blocks=2, target_modules=targets),
    "fourierft": lambda targets: sk.peft.FourierFTConfig(n_frequencies=24, scale=40.0, target_modules=targets),
    "fourier_moe": lambda targets: sk.peft.FourierMoEConfig(num_experts=2, top_k=1, n_frequencies=24, scale=40.0,
                                                            target_modules=targets),
    "fourier_moe_static": lambda targets: sk.peft.FourierMoEConfig(num_experts=2, router=None, n_frequencies=24,
                                                                   scale=40.0, target_modules=targets),
}
METHODS["coeff_tuning"] = lambda targets: sk.peft.CoeffTuningConfig(dropout=0.1)
MERGEABLE = {"smoa", "fourierft", "fourier_moe_static"}
#: methods whose disabled / unloaded model runs our attention op instead of the base's (equal to rounding)
ROUNDING = {"coeff_tuning": 1e-5}


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    torch.manual_seed(0)
    build, targets = ARCHS[request.param]
    return build(), targets


def outputs(model, ids):
    """Eval-mode outputs: peft 0.22's get_peft_model hands the model back in train mode, where Coeff-Tuning's ΔC
    dropout draws fresh masks on every call."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids)
    finally:
        model.train(was_training)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def perturb(model, adapter_name=None, std=0.2):
    """Give every adapter parameter (of one adapter, or all) a random value, as training would."""
    with torch.no_grad():
        for p in sk.peft.adapter_parameters(model, adapter_name):
            p.add_(torch.randn_like(p) * std)


def snapshot(model):
    """Everything a failed load must leave alone: module tree, tensors (values and requires_grad), peft_config."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            "peft_config" in model.__dict__ or hasattr(model, "peft_config"))


def assert_same_state(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for key in before[1]:
        assert torch.equal(before[1][key], after[1][key]), key
    assert before[2] == after[2] and before[3] == after[3]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_round_trip(method, arch, tmp_path, capsys):
    base, targets = arch
    ids = torch.randint(0, 64, (2, 7))
    reference = outputs(base, ids)
    model = peft.get_peft_model(copy.deepcopy(base), METHODS[method](targets))
    model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sk.peft.parameter_count(model) > 0
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    torch.testing.assert_close(outputs(model, ids), reference, rtol=0, atol=1e-5)  # starts at the base model
    perturb(model)
    adapted = outputs(model, ids)
    assert (adapted - reference).abs().max() > 1e-4
    with model.disable_adapter():
        torch.testing.assert_close(outputs(model, ids), reference, rtol=0, atol=ROUNDING.get(method, 0))

    model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"].startswith("SPECTRALKERN_") and saved["base_fingerprints"]
    for loader in (lambda m: peft.PeftModel.from_pretrained(m, tmp_path / "adapter"),
                   lambda m: sk.peft.load(m, tmp_path / "adapter")):
        reloaded = loader(copy.deepcopy(base)).eval()
        torch.testing.assert_close(outputs(reloaded, ids), adapted, rtol=0, atol=0)

    # The transformers model inside: its own save_pretrained refuses before writing anything.
    with pytest.raises(ValueError, match="Nothing was written"):
        model.get_base_model().save_pretrained(tmp_path / "inner")
    assert not (tmp_path / "inner").exists()

    if method in MERGEABLE:
        model.merge_adapter()
        torch.testing.assert_close(outputs(model, ids), adapted, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="Nothing was written"):
            model.get_base_model().save_pretrained(tmp_path / "inner")
        model.save_pretrained(tmp_path / "from_merged")  # the adapter tensors, not the merged weights
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_merged")
        torch.testing.assert_close(outputs(reloaded, ids), adapted, rtol=0, atol=0)
        before = snapshot(model)
        with pytest.raises(ValueError, match="merged adapter layers"):  # a merged model refuses a load
            sk.peft.load(model, tmp_path / "adapter", adapter_name="other")
        with pytest.raises(ValueError, match="merged adapter layers"):  # also through peft's own load_adapter
            model.load_adapter(tmp_path / "adapter", "default")
        assert_same_state(before, snapshot(model))
        model.unmerge_adapter()
        torch.testing.assert_close(outputs(model, ids), adapted, rtol=1e-4, atol=1e-5)
        merged = copy.deepcopy(model).merge_and_unload()
        assert not sk.peft.layers_of(merged)
        merged.save_pretrained(tmp_path / "plain")
        plain = type(base).from_pretrained(tmp_path / "plain").eval()
        torch.testing.assert_close(outputs(plain, ids), adapted, rtol=1e-4, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge_and_unload()
        torch.testing.assert_close(outputs(model, ids), adapted, rtol=0, atol=0)

    unloaded = model.unload()
    assert not sk.peft.layers_of(unloaded)
    # exact unless a merge / unmerge round trip rounded the base weights
    torch.testing.assert_close(outputs(unloaded, ids), reference, rtol=0, atol=1e-5 if method in MERGEABLE else 0)
    unloaded.save_pretrained(tmp_path / "unloaded")  # a plain model again: saving is allowed


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_named_adapters(method, tmp_path):
    torch.manual_seed(1)
    base, targets = tiny_bert(), ["query", "value"]
    ids = torch.randint(0, 64, (2, 5))
    model = peft.get_peft_model(copy.deepcopy(base), METHODS[method](targets))
    model.add_adapter("second", METHODS[method](targets))
    assert not any(p.requires_grad for p in sk.peft.adapter_parameters(model, "second"))  # inactive: frozen
    perturb(model, "default")
    perturb(model, "second")
    first = outputs(model, ids)
    model.set_adapter("second")
    assert all(p.requires_grad for p in sk.peft.adapter_parameters(model, "second"))
    assert not any(p.requires_grad for p in sk.peft.adapter_parameters(model, "default"))
    second = outputs(model, ids)
    assert (first - second).abs().max() > 1e-4
    model.save_pretrained(tmp_path)  # default at the top, "second" in a subfolder
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    sk.peft.load(reloaded, tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(outputs(reloaded, ids), first, rtol=0, atol=0)
    reloaded.set_adapter("second")
    torch.testing.assert_close(outputs(reloaded, ids), second, rtol=0, atol=0)
    # loading into an existing adapter replaces its weights
    sk.peft.load(reloaded, tmp_path, adapter_name="second")
    torch.testing.assert_close(outputs(reloaded, ids), first, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ bad files
def _saved(tmp_path, method, std=0.2):
    torch.manual_seed(2)
    base, targets = tiny_bert(), ["query", "value"]
    model = peft.get_peft_model(copy.deepcopy(base), METHODS[method](targets))
    perturb(model, std=std)
    model.save_pretrained(tmp_path / "good")
    return base, tmp_path / "good"


def _edit(src, dst, *, tensors=None, config=None, raw=None):
    """A copy of the adapter folder ``src`` at ``dst`` with its tensors / config edited."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    data = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(config(data) if config else data))
    weights = load_file(src / "adapter_model.safetensors")
    if tensors:
        weights = tensors(weights)
    save_file(weights, dst / "adapter_model.safetensors")
    if raw:
        payload = bytearray((dst / "adapter_model.safetensors").read_bytes())
        raw(payload)
        (dst / "adapter_model.safetensors").write_bytes(bytes(payload))
    return dst


def _first(weights, suffix):
    return next(k for k in sorted(weights) if k.endswith(suffix))


def _nan(weights, suffix):
    key = _first(weights, suffix)
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    return weights


def _drop(weights, suffix):
    del weights[_first(weights, suffix)]
    return weights


def _reshape(weights, suffix):
    key = _first(weights, suffix)
    weights[key] = torch.zeros(weights[key].numel() + 1, dtype=weights[key].dtype)
    return weights


def _retype(weights, suffix):
    key = _first(weights, suffix)
    weights[key] = weights[key].double()
    return weights


def _flip_payload(payload):
    payload[-3] ^= 0x40  # a byte inside the last tensor's data


def _unsigned(config):  # an edited file whose config no longer carries the digest: checks still apply
    config["weights_sha256"] = None
    return config


COMMON_BAD_FILES = {  # (edit, what the error must say)
    "flipped payload bytes": (dict(raw=_flip_payload), "weights_sha256"),
    "unknown config field": (dict(config=lambda c: {**c, "frobnicate": 3}), r"does not know: \['frobnicate'\]"),
    "other method": (dict(config=lambda c: {**c, "peft_type": "LORA"}), "'LORA' adapter, not a spectralkern"),
}
BAD_FILES = {
    "smoa": {
        **COMMON_BAD_FILES,
        "missing tensor": (dict(tensors=lambda w: _drop(w, "lora_B.1"), config=_unsigned), r"lacks 1 tensor"),
        "wrong shape": (dict(tensors=lambda w: _reshape(w, "lora_A.0"), config=_unsigned), r"lora_A.0 has shape"),
        "wrong dtype": (dict(tensors=lambda w: _retype(w, "lora_A.0"), config=_unsigned), "dtype float64"),
        "NaN factor": (dict(tensors=lambda w: _nan(w, "lora_B.0"), config=_unsigned), "lora_B.0 holds 1 NaN"),
        "not a permutation": (dict(tensors=lambda w: {**w, _first(w, "row_perm"): torch.zeros_like(
            w[_first(w, "row_perm")])}, config=_unsigned), "row_perm is not a permutation of range"),
        "bad config value": (dict(config=lambda c: {**c, "num_blocks": -1}), "num_blocks must be >= 1, got -1"),
        "extra tensor": (dict(tensors=lambda w: {**w, "base_model.model.pooler.dense.smoa_adapters.x":
                                                 torch.zeros(2)}, config=_unsigned), "pooler.dense.smoa_adapters.x"),
    },
}
FOURIER_BAD_FILES = {
    **COMMON_BAD_FILES,
    "frequency row out of range": (dict(tensors=lambda w: {**w, _first(w, "rows"): torch.full_like(
        w[_first(w, "rows")], 16)}, config=_unsigned), r"rows holds frequency indices outside \[0, 16\)"),
    "broken expert_ptr": (dict(tensors=lambda w: {**w, _first(w, "expert_ptr"): torch.zeros_like(
        w[_first(w, "expert_ptr")])}, config=_unsigned), "expert_ptr must rise from 0"),
    "missing coefficients": (dict(tensors=lambda w: _drop(w, "coef_im"), config=_unsigned), "lacks 1 tensor"),
    "NaN coefficient": (dict(tensors=lambda w: _nan(w, "coef_re"), config=_unsigned), "coef_re holds 1 NaN"),
    "bad config value": (dict(config=lambda c: {**c, "scale": "big"}), "scale must be a finite number"),
}
BAD_FILES["fourierft"] = FOURIER_BAD_FILES
BAD_FILES["fourier_moe"] = {**FOURIER_BAD_FILES, "router weight shape": (dict(
    tensors=lambda w: _reshape(w, "router.weight"), config=_unsigned), "router.weight has shape")}
BAD_FILES["coeff_tuning"] = {
    **COMMON_BAD_FILES,
    "missing ΔC": (dict(tensors=lambda w: _drop(w, "delta_c"), config=_unsigned), "lacks 1 tensor"),
    "wrong shape": (dict(tensors=lambda w: _reshape(w, "delta_c"), config=_unsigned), "delta_c has shape"),
    "NaN ΔC": (dict(tensors=lambda w: _nan(w, "delta_c"), config=_unsigned), "delta_c holds 1 NaN"),
    "bad config value": (dict(config=lambda c: {**c, "dropout": 1.5}), r"dropout must be a float in \[0, 1\)"),
}
BAD_CASES = [(m, case) for m in sorted(METHODS) for case in sorted(BAD_FILES.get(m, {}))]


@pytest.mark.parametrize("method, case", BAD_CASES)
def test_bad_adapter_file_is_refused_and_the_model_is_left_alone(method, case, tmp_path):
    base, good = _saved(tmp_path, method)
    edit, message = BAD_FILES[method][case]
    bad = _edit(good, tmp_path / "bad", **edit)
    # into a plain model (PeftModel.from_pretrained's path) and into a PeftModel holding another adapter
    for target in (copy.deepcopy(base), peft.PeftModel.from_pretrained(copy.deepcopy(base), good)):
        before = snapshot(target)
        with pytest.raises((ValueError, TypeError), match=message):
            sk.peft.load(target, bad, adapter_name="incoming")
        assert_same_state(before, snapshot(target))
    # replacing an existing adapter's weights
    target = peft.PeftModel.from_pretrained(copy.deepcopy(base), good)
    before = snapshot(target)
    with pytest.raises((ValueError, TypeError), match=message):
        sk.peft.load(target, bad)
    assert_same_state(before, snapshot(target))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_other_base_weights_are_refused_naming_the_layer(method, tmp_path):
    base, good = _saved(tmp_path, method)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.encoder.layer[1].attention.self.value.weight[0, 0] += 1e-3
    before = snapshot(other)
    # (Coeff-Tuning adapts the attention module itself)
    with pytest.raises(BaseWeightMismatchError, match=r"layer 'encoder\.layer\.1\.attention\.self(\.value)?'"):
        peft.PeftModel.from_pretrained(other, good)
    assert_same_state(before, snapshot(other))


def test_a_lora_folder_is_not_a_spectralkern_adapter(tmp_path):
    base = tiny_bert()
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"]))
    lora.save_pretrained(tmp_path)
    before = snapshot(base)
    with pytest.raises(ValueError, match="not a spectralkern one"):
        sk.peft.load(base, tmp_path)
    assert_same_state(before, snapshot(base))


def test_setup_logs_its_duration_and_the_in_place_path_also_refuses_a_lossy_save(tmp_path, caplog):
    import logging

    base = tiny_bert()
    with caplog.at_level(logging.INFO, logger="spectralkern.peft._lifecycle"):
        model = sk.peft.apply_smoa(copy.deepcopy(base), sk.peft.SMoAConfig(r=2, target_modules=["query"],
                                                                            progress=False))
    assert any(r.name == "spectralkern.peft._lifecycle" and "SMoAModel: 2 layers set up in" in r.getMessage()
               for r in caplog.records)
    assert sk.peft.parameter_count(model) == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    with pytest.raises(ValueError, match="Nothing was written"):
        model.save_pretrained(tmp_path / "lossy")
    assert not (tmp_path / "lossy").exists()
    base.save_pretrained(tmp_path / "plain")  # models without adapter layers save as usual


def test_targets_follow_the_one_rule(tmp_path):
    """Suffix lists and a full-name regex select the same layers as spectralkern._targets.matches (peft's rule)."""
    from spectralkern._targets import matches

    base = tiny_bert()
    for targets in (["query"], ["self.value"], r"encoder\.layer\.1\..*(query|key)"):
        model = peft.get_peft_model(copy.deepcopy(base), sk.peft.SMoAConfig(r=2, target_modules=targets))
        wrapped = sorted(n.removeprefix("base_model.model.") for n in sk.peft.layers_of(model))
        assert wrapped == sorted(n for n, m in base.named_modules() if n and matches(n, targets)
                                 and isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match=r"matched no module of BertModel.*suffixes available"):
        peft.get_peft_model(copy.deepcopy(base), sk.peft.SMoAConfig(r=2, target_modules=["q_proj"]))
