"""Fault injection for the training loop's filter: a non-finite gradient at a random step, a state dict from another
model, a fuzzed filter state (hypothesis mutations of a valid one), and an exception in the middle of a checkpoint
write — each must give a clear error or a correct result and never leave the filter half-loaded, poisoned, or its
previous checkpoint file damaged."""
from __future__ import annotations

import copy
import io
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from spectralkern import SpectralGradientFilter

FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _filter(rows: int = 32, **kwargs) -> tuple[nn.Module, SpectralGradientFilter]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, rows))
    options = {"block_size": 16, "k": 4, "knn": 4, "refresh_every": 2, "reg_weight": 0.1, **kwargs}
    return model, SpectralGradientFilter(model, ["0"], **options)


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name, entry in state["targets"].items()
            for key, value in entry.items() if isinstance(value, torch.Tensor)}


def _same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.filterwarnings("ignore:the gradient of 0.weight holds inf/NaN")
@pytest.mark.parametrize("bad_step", [0, 1, 3])
def test_non_finite_gradient_never_enters_the_filter_state(bad_step):
    model, filt = _filter(graph="gradient_correlation")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 8)
    for step in range(6):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step == bad_step:
            model[0].weight.grad[3, 2] = math.inf
        try:
            filt.step()
        except (ValueError, RuntimeError):
            pass   # refusing the step is allowed; poisoning the state is not
        opt.zero_grad()   # the scaler-style skip: no optimizer step on a bad gradient
    state = _tensors(filt.state_dict())
    assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
    graph_rows = state["0.weight.row"]
    assert bool((graph_rows == 3).any()), "node 3 lost its edges for good"


def test_state_dict_from_another_model_leaves_the_filter_untouched():
    _, mine = _filter(rows=32)
    _, other = _filter(rows=48)
    before = _tensors(mine.state_dict())
    with pytest.raises(ValueError):
        mine.load_state_dict(other.state_dict())
    assert _same(before, _tensors(mine.state_dict()))


_MUTATIONS = ["drop_key", "nan", "shape", "dtype", "meta", "not_a_tensor", "drop_target", "steps", "version"]


# Found by this fuzzing on the filter side (load_state_dict/restore), fixed since (regression tests): a saved basis
# or W₀ on the meta device reached .to(device) unchecked (raw NotImplementedError); NaN in W₀ loaded silently;
# float16 eigenvalues loaded beside a float32 U (the basis changed dtype); a W₀ that is a list raised AttributeError.
_FOUND = {("meta", "U"), ("meta", "eigenvalues"), ("meta", "theta0"), ("nan", "theta0"), ("dtype", "eigenvalues"),
          ("not_a_tensor", "theta0")}


@pytest.mark.parametrize("mutation, key", sorted(_FOUND))
def test_open_state_load_findings(mutation, key):
    _, probe = _filter()
    bad = copy.deepcopy(probe.state_dict())
    value = bad["targets"]["0.weight"][key]
    bad["targets"]["0.weight"][key] = {"meta": lambda: value.to("meta"), "nan": lambda: value.clone().fill_(math.nan),
                                       "dtype": lambda: value.half(), "not_a_tensor": value.tolist}[mutation]()
    before = _tensors(probe.state_dict())
    with pytest.raises((ValueError, TypeError)):
        probe.load_state_dict(bad)
    assert _same(before, _tensors(probe.state_dict()))


@FUZZ
@given(mutation=st.sampled_from(_MUTATIONS), which=st.integers(0, 6), data=st.data())
def test_fuzzed_filter_state_gives_a_clear_error_and_changes_nothing(mutation, which, data):
    """Any mutation of a valid state: either it still loads (harmlessly: finite, the filter's own shapes and
    dtypes) or it raises ValueError/TypeError and the filter is exactly as it was."""
    _, filt = _filter()
    good = filt.state_dict()
    bad = copy.deepcopy(good)
    entry = bad["targets"]["0.weight"]
    keys = sorted(k for k, v in entry.items() if isinstance(v, torch.Tensor))
    key = keys[which % len(keys)]
    if mutation == "drop_key":
        del entry[key]
    elif mutation == "nan" and entry[key].is_floating_point():
        entry[key] = entry[key].clone().view(-1).index_fill(0, torch.tensor([0]), math.nan).view_as(entry[key])
    elif mutation == "shape":
        entry[key] = entry[key][:max(entry[key].shape[0] - 1, 0)]
    elif mutation == "dtype":
        entry[key] = entry[key].to(data.draw(st.sampled_from([torch.int32, torch.float16, torch.complex64])))
    elif mutation == "meta":
        entry[key] = entry[key].to("meta")
    elif mutation == "not_a_tensor":
        entry[key] = entry[key].tolist()
    elif mutation == "drop_target":
        bad["targets"] = {}
    elif mutation == "steps":
        bad["steps"] = data.draw(st.sampled_from([-1, 1.5, "3", None]))
    elif mutation == "version":
        bad["version"] = 999
    _, probe = _filter()
    before = _tensors(probe.state_dict())
    try:
        probe.load_state_dict(bad)
    except (ValueError, TypeError):
        assert _same(before, _tensors(probe.state_dict()))
        return
    # accepted: it must have been harmless — everything finite and of the filter's own shapes
    after = _tensors(probe.state_dict())
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert value.shape == before[name].shape and value.dtype == before[name].dtype, name
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), name


# ------------------------------------------------------------------ an exception in the middle of a checkpoint write
def _torn_torch_save(real_save):
    """A torch.save that writes half of the file, then fails like a full disk."""
    def torn(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as handle:
            handle.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")
    return torn


def test_a_filter_state_write_failing_half_way_keeps_the_previous_file(tmp_path, monkeypatch):
    from spectralkern.integrations.filter_checkpoint import read_filter_state, save_filter_state

    _, filt = _filter()
    path = save_filter_state(filt, str(tmp_path), global_step=1)
    saved = open(path, "rb").read()
    monkeypatch.setattr(torch, "save", _torn_torch_save(torch.save))
    with pytest.raises(OSError, match="No space left"):
        save_filter_state(filt, str(tmp_path), global_step=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [os.path.basename(path)], "a partial file was left behind"
    assert open(path, "rb").read() == saved
    state = read_filter_state(filt, str(tmp_path), global_step=1)   # intact and loadable
    assert _same(_tensors(state), _tensors(filt.state_dict()))


def test_an_adapter_config_write_failing_half_way_keeps_the_previous_config(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    import spectralkern as sk

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    model = peft.get_peft_model(base, sk.peft.SMoAConfig(r=2, alpha=4, num_blocks=2, target_modules=["0"]))
    model.save_pretrained(tmp_path)
    previous = (tmp_path / "adapter_config.json").read_bytes()
    config = model.peft_config["default"]

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("peft.config.json.dumps", fail)   # peft opens the file for writing, then serialises
    with pytest.raises(OSError, match="No space left"):
        config.save_pretrained(str(tmp_path))
    monkeypatch.undo()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "a partial file was left behind"
    assert (tmp_path / "adapter_config.json").read_bytes() == previous
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    sk.peft.load(fresh, tmp_path)   # intact and loadable


# ------------------------------------------------------------------ fuzzed adapter files
def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A valid SMoA adapter folder (trained-looking weights) for a tiny BERT, and the bytes of its two files."""
    peft = pytest.importorskip("peft")
    import spectralkern as sk

    folder = tmp_path_factory.mktemp("adapter")
    model = peft.get_peft_model(_tiny_bert(), sk.peft.SMoAConfig(r=2, alpha=4, num_blocks=2,
                                                                 target_modules=["query", "value"]))
    with torch.no_grad():
        for p in sk.peft.adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def _model_state(model: nn.Module):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, hasattr(model, "peft_config"))


def _mutate(good: bytes, how: str, data) -> bytes:
    if how == "arbitrary":
        return data.draw(st.binary(max_size=256))
    if how == "truncated":
        return good[:data.draw(st.integers(0, len(good) - 1))]
    flipped = bytearray(good)
    for _ in range(data.draw(st.integers(1, 3))):
        flipped[data.draw(st.integers(0, len(good) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(flipped)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]),
       how=st.sampled_from(["arbitrary", "truncated", "bit_flip"]), loader=st.sampled_from(["sk", "peft"]),
       data=st.data())
def test_fuzzed_adapter_files_give_a_clear_error_and_leave_the_model_alone(saved_adapter, tmp_path_factory, file,
                                                                          how, loader, data):
    """Arbitrary, truncated or bit-flipped adapter files: a ValueError/TypeError/FileNotFoundError with the model
    exactly as it was, or (when the bytes are still a valid adapter) a successful load."""
    peft = pytest.importorskip("peft")
    import spectralkern as sk

    folder = tmp_path_factory.mktemp("fuzzed")
    for name, content in saved_adapter.items():
        (folder / name).write_bytes(_mutate(content, how, data) if name == file else content)
    model = _tiny_bert()
    before = _model_state(model)
    try:
        if loader == "sk":
            sk.peft.load(model, folder)
        else:
            peft.PeftModel.from_pretrained(model, str(folder))
    except (ValueError, TypeError, FileNotFoundError):
        after = _model_state(model)
        assert before[0] == after[0] and before[2:] == after[2:]
        assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


# Found by the fuzzing above: a bit flip that upper-cases one hex digit of a stored digest was refused as "its base
# weight differs ... (fingerprint d965d7a1a2be… vs d965D7a1a2be…)", blaming the base model for a damaged config.
@pytest.mark.parametrize("field", ["base_fingerprints", "weights_sha256"])
def test_a_damaged_digest_in_the_adapter_config_is_named_as_such(saved_adapter, tmp_path, field):
    import json

    import spectralkern as sk

    config = json.loads(saved_adapter["adapter_config.json"])
    if field == "base_fingerprints":
        name = sorted(config[field])[0]
        config[field][name] = config[field][name].upper()
    else:
        config[field] = config[field][:-1] + "g"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes(saved_adapter["adapter_model.safetensors"])
    model = _tiny_bert()
    before = _model_state(model)
    with pytest.raises(ValueError, match=f"{field}.* is not a sha256 digest"):
        sk.peft.load(model, tmp_path)
    after = _model_state(model)
    assert before[0] == after[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
