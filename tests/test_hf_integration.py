"""The Hugging Face Trainer integration: SpectralTrainer, SpectralFilterCallback and the filter in checkpoints.

A tiny BERT built from a config (no download), a few steps, on the torch backend (the kernels have their own
tests). The resume tests compare an interrupted-and-resumed run with the uninterrupted one bit for bit.
"""
from __future__ import annotations

import functools
import os
import shutil
import types

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

import spectralkern as sk  # noqa: E402
from spectralkern.integrations.filter_checkpoint import FILTER_STATE_NAME  # noqa: E402
from spectralkern.integrations.hf import SpectralFilterCallback, SpectralTrainer  # noqa: E402

STEPS, SAVE_AT = 6, 4
# Blocks of 64 rows: above the CPU's dense-eigh limit, so every basis solve draws its start from torch's global RNG
# (at a different RNG state the bases come out with other signs): the resume must restore that stream too.
FILTER = dict(target_modules=["query", "value"], block_size=64, k=4, knn=4, refresh_every=3, reg_weight=1.0)


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")


def tiny_bert() -> BertForSequenceClassification:
    """2 layers, hidden 128 (query/value: 128 × 128, two blocks of 64 rows), dropout 0.1: training draws from the
    global RNG, so a resume is only bit-identical if the Trainer restores it."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config)


def dataset(size: int = 16) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (size, 8), generator=gen)
    labels = torch.randint(0, 3, (size,), generator=gen)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.int64), "labels": labels[i]}
            for i in range(size)]


def training_args(output_dir: str, **overrides) -> TrainingArguments:
    """Batches of 2 from a shuffled dataset of 16 (8 steps per epoch: the checkpoint at step 4 lies mid-epoch, so
    the resumed run skips batches and restores the RNG after them), checkpoints every SAVE_AT steps."""
    kwargs = dict(output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
                  save_strategy="steps", save_steps=SAVE_AT, report_to=[], use_cpu=True, disable_tqdm=True,
                  logging_strategy="no", dataloader_num_workers=0, seed=3)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class StopAt(TrainerCallback):
    """Interrupts training after the checkpoint of step ``step`` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def lora_bert():
    """tiny_bert with peft LoRA adapters on query and value (the filter then targets lora_A / lora_B)."""
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))


def make_trainer(way: str, source: str, output_dir: str, callbacks=(), args_overrides=None, lora: bool = False,
                 **trainer_kwargs):
    """(trainer, get_filter) for way in {"SpectralTrainer", "callback"} and source in {"factory", "built"};
    ``trainer_kwargs`` go to SpectralTrainer or SpectralFilterCallback."""
    model = lora_bert() if lora else tiny_bert()
    factory = functools.partial(sk.SpectralGradientFilter, **FILTER)
    spectral_filter = factory if source == "factory" else factory(model)
    kwargs = dict(model=model, args=training_args(output_dir, **(args_overrides or {})), train_dataset=dataset(),
                  callbacks=list(callbacks))
    if way == "SpectralTrainer":
        trainer = SpectralTrainer(**kwargs, spectral_filter=spectral_filter, **trainer_kwargs)
        return trainer, lambda: trainer.spectral_filter
    callback = SpectralFilterCallback(spectral_filter, **trainer_kwargs)
    kwargs["callbacks"].append(callback)
    return Trainer(**kwargs), lambda: callback.spectral_filter


def outcome(trainer: Trainer, filt: sk.SpectralGradientFilter) -> dict:
    return {"weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "steps": filt.steps,
            "bases": {n: (b.U.clone(), b.eigenvalues.clone()) for n, b in filt.bases().items()},
            "regularization": filt.regularization().detach().clone()}


def assert_identical(resumed: dict, uninterrupted: dict) -> None:
    assert (resumed["steps"], float(resumed["regularization"])) == (
        uninterrupted["steps"], float(uninterrupted["regularization"]))
    assert resumed["steps"] == STEPS
    for name, weight in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name
    for name, (U, eigenvalues) in uninterrupted["bases"].items():
        assert torch.equal(resumed["bases"][name][0], U) and torch.equal(resumed["bases"][name][1], eigenvalues), name
    assert torch.equal(resumed["regularization"], uninterrupted["regularization"])
    assert float(uninterrupted["regularization"]) > 0


@pytest.mark.parametrize("way,source,lora,resume", [
    ("SpectralTrainer", "factory", False, "path"), ("SpectralTrainer", "built", False, "last"),
    ("callback", "factory", False, "last"), ("callback", "built", False, "path"),
    ("SpectralTrainer", "factory", True, "path")])
@pytest.mark.filterwarnings("ignore:the kNN graphs of .* have no edges")  # LoRA B starts at zero
def test_interrupted_and_resumed_run_ends_bit_identical(way, source, lora, resume, tmp_path):
    """6 steps straight vs 4 steps, interruption, and a new process state (new model, filter and Trainer; the
    global RNG elsewhere) resuming from checkpoint-4 (its path, or True: the last one in output_dir): the same
    weights, filter steps, bases and regulariser. The bases are refreshed at steps 3 and 6, so the last refresh
    happens after the checkpoint. With peft LoRA the checkpoint holds the adapters only."""
    trainer, get_filter = make_trainer(way, source, str(tmp_path / "straight"), lora=lora)
    trainer.train()
    uninterrupted = outcome(trainer, get_filter())
    assert uninterrupted["bases"] != {}

    trainer, get_filter = make_trainer(way, source, str(tmp_path / "interrupted"), callbacks=[StopAt(SAVE_AT)],
                                       lora=lora)
    trainer.train()
    assert trainer.state.global_step == SAVE_AT and get_filter().steps == SAVE_AT
    checkpoint = tmp_path / "interrupted" / f"checkpoint-{SAVE_AT}"

    torch.manual_seed(12345)  # whatever the RNG holds now, the Trainer restores the checkpoint's
    trainer, get_filter = make_trainer(way, source, str(tmp_path / "interrupted"), lora=lora)
    trainer.train(resume_from_checkpoint=str(checkpoint) if resume == "path" else True)
    assert_identical(outcome(trainer, get_filter()), uninterrupted)
    saved = torch.load(checkpoint / FILTER_STATE_NAME, weights_only=True)  # plain containers and tensors
    assert saved["global_step"] == SAVE_AT and saved["filter"]["steps"] == SAVE_AT


def test_every_checkpoint_holds_the_filter_state_of_its_step(tmp_path):
    trainer, get_filter = make_trainer("SpectralTrainer", "built", str(tmp_path), args_overrides={"save_steps": 2})
    trainer.train()
    steps = []
    for step in (2, 4, 6):
        saved = torch.load(tmp_path / f"checkpoint-{step}" / FILTER_STATE_NAME, weights_only=True)
        steps.append((saved["global_step"], saved["filter"]["steps"]))
        assert set(saved["fingerprints"]) == {name for name, _ in get_filter().targets}
    assert steps == [(2, 2), (4, 4), (6, 6)]
    assert not any(f.endswith(".partial") for f in os.listdir(tmp_path / "checkpoint-6"))


# ------------------------------------------------------------------------------------------------ resume errors
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> str:
    """A SpectralTrainer run (built filter) with checkpoints at steps 2, 4 and 6."""
    output_dir = str(tmp_path_factory.mktemp("finished"))
    trainer, _ = make_trainer("SpectralTrainer", "built", output_dir, args_overrides={"save_steps": 2})
    trainer.train()
    return output_dir


def copy_checkpoint(finished_run: str, step: int, destination) -> str:
    folder = str(destination / f"checkpoint-{step}")
    shutil.copytree(os.path.join(finished_run, f"checkpoint-{step}"), folder)
    return folder


def filter_state(filt: sk.SpectralGradientFilter) -> dict:
    state = filt.state_dict()
    return {"steps": state["steps"], **{f"{name}.{key}": value.clone() for name, entry in state["targets"].items()
                                        for key, value in entry.items()}}


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value, key


@pytest.mark.parametrize("way", ["SpectralTrainer", "callback"])
def test_a_checkpoint_without_the_filter_state_is_refused_unless_opted_out(way, finished_run, tmp_path):
    folder = copy_checkpoint(finished_run, 4, tmp_path)
    os.remove(os.path.join(folder, FILTER_STATE_NAME))
    trainer, get_filter = make_trainer(way, "built", str(tmp_path))
    before = filter_state(get_filter())
    with pytest.raises(FileNotFoundError, match="resumed training at global step 4, but the checkpoint holds no "
                                                "filter state.*resume_without_filter_state=True"):
        trainer.train(resume_from_checkpoint=folder)
    assert_same_state(before, filter_state(get_filter()))

    trainer, get_filter = make_trainer(way, "built", str(tmp_path), resume_without_filter_state=True)
    with pytest.warns(UserWarning, match="the filter restarts"):
        trainer.train(resume_from_checkpoint=folder)
    assert get_filter().steps == STEPS - SAVE_AT  # restarted at the resume, as asked


def test_a_filter_state_of_another_step_or_run_is_refused_before_anything_changes(finished_run, tmp_path):
    folder = copy_checkpoint(finished_run, 4, tmp_path)
    shutil.copy(os.path.join(finished_run, "checkpoint-2", FILTER_STATE_NAME), folder)
    trainer, get_filter = make_trainer("SpectralTrainer", "built", str(tmp_path))
    before = filter_state(get_filter())
    with pytest.raises(ValueError, match="saved at global step 2, but the Trainer resumed at step 4"):
        trainer.train(resume_from_checkpoint=folder)
    assert_same_state(before, filter_state(get_filter()))

    # The file of checkpoint-4 of another run (other weights): the fingerprints differ.
    other = tmp_path / "other"
    trainer, _ = make_trainer("SpectralTrainer", "built", str(other), args_overrides={"seed": 4, "max_steps": 4})
    trainer.train()
    shutil.copy(other / "checkpoint-4" / FILTER_STATE_NAME, folder)
    trainer, get_filter = make_trainer("SpectralTrainer", "built", str(tmp_path))
    with pytest.raises(ValueError, match="saved with other weights than the model holds now"):
        trainer.train(resume_from_checkpoint=folder)
    assert_same_state(before, filter_state(get_filter()))


def test_callback_finds_a_checkpoint_outside_output_dir_through_training_arguments(finished_run, tmp_path):
    """The callback cannot see train()'s argument: it looks in output_dir and in args.resume_from_checkpoint."""
    folder = copy_checkpoint(finished_run, 4, tmp_path / "elsewhere")
    trainer, _ = make_trainer("callback", "factory", str(tmp_path / "new"))
    with pytest.raises(FileNotFoundError, match=r"also set TrainingArguments\(resume_from_checkpoint="):
        trainer.train(resume_from_checkpoint=folder)
    trainer, get_filter = make_trainer("callback", "factory", str(tmp_path / "new"),
                                       args_overrides={"resume_from_checkpoint": folder})
    trainer.train(resume_from_checkpoint=folder)
    assert get_filter().steps == STEPS


# ------------------------------------------------------------------------------------------------ joint loss
class QueryValue(torch.nn.Module):
    """Two targetable Linears; the loss reads the target from ``target`` or ``labels`` (none: no loss, as when a
    compute_loss_func takes the labels). forward takes **kwargs: the Trainer treats it as accepting loss kwargs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.query, self.value = torch.nn.Linear(6, 32), torch.nn.Linear(32, 4)

    def forward(self, x, target=None, labels=None, **kwargs):
        out = self.value(torch.tanh(self.query(x)))
        target = target if target is not None else labels
        if target is None:
            return {"logits": out}
        return {"loss": torch.nn.functional.mse_loss(out, target), "logits": out}


def summed_squares(outputs, labels, num_items_in_batch):
    return ((outputs["logits"] - labels) ** 2).sum() / num_items_in_batch


@pytest.mark.parametrize("trainer_divides", [True, False])
def test_the_regulariser_counts_once_per_optimizer_step_under_gradient_accumulation(trainer_divides, tmp_path):
    """Two micro-batches give the step the gradient of mean task loss + regulariser, whether the Trainer divides
    each micro-batch loss by the accumulation steps (no num_items_in_batch) or the loss function normalised it.
    The filter's step() completes the gradient (the regulariser's part is added there, after filtering)."""
    model = QueryValue()
    filt = sk.SpectralGradientFilter(model, target_modules=["query", "value"], block_size=16, k=4, knn=4,
                                     reg_weight=3.0, refresh_every=0)
    with torch.no_grad():  # move away from W₀, so that the regulariser has a gradient
        for _, param in filt.targets:
            param.add_(0.1 * torch.randn_like(param))
    key = "target" if trainer_divides else "labels"
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 4, generator=gen)

    def step_gradient(backward) -> dict[str, torch.Tensor]:
        model.zero_grad()
        backward()
        filt.step()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    task_only = step_gradient(lambda: torch.nn.functional.mse_loss(model(x)["logits"], y).backward())
    joint = step_gradient(lambda: (torch.nn.functional.mse_loss(model(x)["logits"], y)
                                   + filt.regularization()).backward())
    assert all(float((joint[n] - task_only[n]).norm()) > 0.01 * float(joint[n].norm()) for n, _ in filt.targets)

    trainer = SpectralTrainer(model=model, args=training_args(str(tmp_path), gradient_accumulation_steps=2),
                              train_dataset=dataset(), spectral_filter=filt,
                              compute_loss_func=None if trainer_divides else summed_squares)
    trainer.current_gradient_accumulation_steps = 2

    def accumulate():
        for batch in ({"x": x[:2], key: y[:2]}, {"x": x[2:], key: y[2:]}):
            trainer.training_step(model, batch, None if trainer_divides else torch.tensor(y.numel()))

    accumulated = step_gradient(accumulate)
    for name, grad in joint.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("way", ["SpectralTrainer", "callback"])
def test_fp16_loss_scale_reaches_the_regulariser_as_the_trainer_unscales_gradients(way, tmp_path):
    """fp16 training (no GradScaler on the CPU: one is planted) in the Trainer's order — scaled backward,
    scaler.unscale_ (the Trainer's clipping / norm), on_pre_optimizer_step, scaler.step — updates exactly as the
    unscaled step does (S = 2⁸ scales exactly). The callback's user adds the regulariser to the loss; without the
    hooks the filter would see .grad unscaled and the regulariser's scale not (SpectralAdamW refuses that step)."""
    def make():
        model = QueryValue()
        filt = sk.SpectralGradientFilter(model, target_modules=["query", "value"], block_size=16, k=4, knn=4,
                                         reg_weight=3.0, refresh_every=0)
        with torch.no_grad():
            for _, param in filt.targets:
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
        if way == "SpectralTrainer":
            trainer = SpectralTrainer(model=model, args=training_args(str(tmp_path)), train_dataset=dataset(),
                                      spectral_filter=filt)
            return model, filt, trainer, sk.SpectralAdamW(model.parameters(), lr=1e-2, spectral_filter=filt)
        trainer = Trainer(model=model, args=training_args(str(tmp_path)), train_dataset=dataset(),
                          callbacks=[SpectralFilterCallback(filt)])
        return model, filt, trainer, torch.optim.AdamW(model.parameters(), lr=1e-2)

    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 4, generator=gen)
    model, filt, _, opt = make()
    (model(x, y)["loss"] + filt.regularization()).backward()
    if way == "callback":
        filt.step()
    opt.step()
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, filt, trainer, opt = make()
    scaler = trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(model(x, y)["loss"] + filt.regularization()).backward()
    scaler.unscale_(opt)
    # what the Trainer hands callbacks under fp16: accelerate's optimizer wrapper, with its scaler
    trainer.callback_handler.optimizer = types.SimpleNamespace(optimizer=opt, scaler=scaler)
    trainer.callback_handler.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)
    scaler.step(opt)
    scaler.update()
    assert filt.steps == 1
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), expected[name]), name
    if way == "SpectralTrainer":  # the same step without the hook is refused by SpectralAdamW
        model, filt, trainer, opt = make()
        scaler.scale(model(x, y)["loss"] + filt.regularization()).backward()
        scaler.unscale_(opt)
        with pytest.raises(RuntimeError, match="filt.unscale_regularizer_"):
            scaler.step(opt)


# ------------------------------------------------------------------------------------------------ the three ways in
# (moved here from tests/test_finetune.py and tests/test_distributed.py, on the tiny BERT instead of MiniLM)
def batch_of(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def test_callback_filters_before_the_optimizer_step(tmp_path):
    """Trainer + SGD + SpectralFilterCallback: the update of a targeted weight lies in its low-frequency band; an
    untargeted weight's does not."""
    model = tiny_bert()
    model.get_input_embeddings().weight.requires_grad_(False)
    filt = sk.SpectralGradientFilter(model, target_modules=["query"], block_size=64, k=4, knn=4, refresh_every=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # A large SGD step, so that Δ = W_after − W_before stands far above the float32 rounding of W.
    args = training_args(str(tmp_path), max_steps=2, optim="sgd", learning_rate=20.0, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[SpectralFilterCallback(filt)])
    trainer.train()
    assert filt.steps == 2
    bases = filt.bases()
    key = "bert.encoder.layer.0.attention.self.key.weight"
    key_basis = sk.SpectralBasis.from_laplacian(sk.ParameterGraph.knn(before[key], k=4, block_size=64).laplacian(), 4)
    for name, basis in list(bases.items()) + [(key, key_basis)]:
        delta = model.get_parameter(name).detach() - before[name]
        residual = float((delta - basis.reconstruct(basis.project(delta))).norm())
        assert float(delta.norm()) > 0, name
        if name in bases:
            assert residual <= 1e-4 * float(delta.norm()), name
        else:
            assert residual > 0.5 * float(delta.norm()), name  # an unfiltered update is not in the band


def test_spectral_trainer_uses_spectral_adamw_and_the_joint_loss(tmp_path):
    from spectralkern.integrations.hf import spectral_adamw

    model = tiny_bert()
    filt = sk.SpectralGradientFilter(model, target_modules=["value"], block_size=64, k=4, knn=4, reg_weight=10.0)
    args = training_args(str(tmp_path), max_steps=2, learning_rate=1e-3, save_strategy="no")
    trainer = SpectralTrainer(model=model, args=args, train_dataset=dataset(), spectral_filter=filt)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, sk.SpectralAdamW) and optimizer.spectral_filter is filt
    assert filt.steps == 2 and float(filt.regularization().detach()) > 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the Trainer's linear schedule ran
    # compute_loss in training mode is the task loss plus the regulariser; in eval mode the task loss alone.
    batch = batch_of(dataset()[:4])
    model.eval()
    with torch.no_grad():
        task = model(**batch)["loss"]
        assert float(trainer.compute_loss(model, dict(batch))) == pytest.approx(float(task), rel=1e-6)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)  # the same dropout masks for both forward passes
        joint = trainer.compute_loss(model, dict(batch))
        torch.manual_seed(0)
        task = model(**batch)["loss"]
        assert float(joint) == pytest.approx(float(task + filt.regularization()), rel=1e-5)
    cls, kwargs = spectral_adamw(filt, args, lr=5e-4)
    assert cls is sk.SpectralAdamW and kwargs["lr"] == 5e-4 and kwargs["spectral_filter"] is filt
    with pytest.raises(TypeError, match="spectral_filter must be a spectralkern.SpectralGradientFilter"):
        spectral_adamw(object())


def test_peft_lora_model_with_the_filter_on_its_adapters():
    from spectralkern.integrations.hf import lora_targets

    model = lora_bert()
    # LoRA B starts at zero, so its kNN graph is edgeless until a refresh: the filter warns about that.
    with pytest.warns(UserWarning, match="have no edges"):
        filt = sk.SpectralGradientFilter(model, target_modules=["query", "value"], block_size=64, k=4, knn=4)
    names = [name for name, _ in filt.targets]
    assert len(names) == 2 * 2 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(lora_targets(model)) == 4
    with pytest.raises(ValueError, match="no peft LoRA layers"):
        lora_targets(tiny_bert())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_of(dataset()[:8])
    for _ in range(2):  # the second step has non-zero lora_A gradients (B has moved)
        optimizer.zero_grad()
        model(**batch)["loss"].backward()
        raw = {n: p.grad.clone() for n, p in filt.targets}
        filt.step()
        for name, param in filt.targets:
            basis = filt.bases()[name]
            gains = sk.heat(2.0)(basis.eigenvalues).float()
            expected = sk.spectral_filter_reference(raw[name], basis.U, basis.block_ptr, gains)
            torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7, msg=name)
        optimizer.step()
    assert any(float(p.detach().abs().max()) > 0 for n, p in filt.targets if ".lora_B." in n)


def test_filter_factory_is_called_on_the_trained_model_and_bad_sources_are_refused(tmp_path):
    """The factory is called when train() starts, on the trained model, and its filter joins SpectralAdamW; bad
    factories and combinations are refused with the fix."""
    model = tiny_bert()
    seen = []
    factory = functools.partial(sk.SpectralGradientFilter, **FILTER)
    args = training_args(str(tmp_path), max_steps=2, save_strategy="no")
    trainer = SpectralTrainer(model=model, args=args, train_dataset=dataset(),
                              spectral_filter=lambda m: seen.append(m) or factory(m))
    assert trainer.spectral_filter is None and not seen
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert seen == [model] and optimizer.spectral_filter is trainer.spectral_filter
    assert trainer.spectral_filter.steps == 2

    kwargs = dict(model=model, args=args, train_dataset=dataset())
    with pytest.raises(ValueError, match="spectral_filter is a factory.*an optimizer was passed through optimizers="):
        SpectralTrainer(**kwargs, spectral_filter=factory, optimizers=(torch.optim.SGD(model.parameters()), None))
    with pytest.raises(TypeError, match="spectral_filter must be a spectralkern.SpectralGradientFilter or a "
                                        "factory model -> SpectralGradientFilter .*got BertForSequenceClassification"):
        SpectralTrainer(**kwargs, spectral_filter=model)
    with pytest.raises(TypeError, match="got object"):
        SpectralFilterCallback(object())
    with pytest.raises(TypeError, match="resume_without_filter_state must be a bool, got 'yes'"):
        SpectralFilterCallback(factory, resume_without_filter_state="yes")
    with pytest.raises(TypeError, match="the spectral_filter factory must return a spectralkern."
                                        "SpectralGradientFilter, got NoneType"):
        Trainer(**kwargs, callbacks=[SpectralFilterCallback(lambda m: None)]).train()


# ------------------------------------------------------------------------------------------------ the file itself
def test_row_sharded_filters_write_one_file_per_rank(tmp_path):
    """Under FSDP2 (here a one-process gloo mesh) every rank saves its rows' state in its own file; another world
    size finds none of its own and says what is there."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from spectralkern.integrations.filter_checkpoint import load_filter_state, save_filter_state

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        filt = sk.SpectralGradientFilter(model, ["0"], block_size=16, k=4, knn=3, reg_weight=0.1)
        path = save_filter_state(filt, str(tmp_path), global_step=3)
        assert os.path.basename(path) == "spectral_filter-rank0-of-1.pt"
        before = filter_state(filt)
        load_filter_state(filt, str(tmp_path), global_step=3)
        assert_same_state(before, filter_state(filt))
        with pytest.raises(FileNotFoundError, match="rank1-of-2.pt does not exist .the folder holds "
                                                    "spectral_filter-rank0-of-1.pt: saved on another world size"):
            load_filter_state(filt, str(tmp_path), global_step=3, rank=1, world_size=2)
    finally:
        dist.destroy_process_group()


def test_a_damaged_file_is_refused_with_its_path(finished_run, tmp_path):
    from spectralkern.integrations.filter_checkpoint import read_filter_state

    folder = copy_checkpoint(finished_run, 4, tmp_path)
    trainer, get_filter = make_trainer("SpectralTrainer", "built", str(tmp_path))
    path = os.path.join(folder, FILTER_STATE_NAME)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="spectral_filter.pt cannot be read as a spectral filter state"):
        read_filter_state(get_filter(), folder, global_step=SAVE_AT)
    torch.save({"format": 1, "filter": {}}, path)
    with pytest.raises(ValueError, match=r"is not a spectral filter state of format 1 with keys \['filter', "
                                         r"'fingerprints', 'format', 'global_step'\] \(got format 1 with keys"):
        read_filter_state(get_filter(), folder, global_step=SAVE_AT)


# ------------------------------------------------------------------------------------------------ FSDP2, 2 ranks
def _fsdp2_resume_worker(rank: int, world: int, port: int, workdir: str) -> None:
    """Straight, interrupted and resumed runs of SpectralTrainer with a factory under FSDP2 on 2 CPU ranks (the
    distributed tests' Regressor, data and relabelled process state); rank 0 saves what the parent compares."""
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from test_distributed import TRAINER_STEPS, Regressor, params_of, trainer_dataset, trainer_filter

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))

    def run(output_dir, callbacks=(), resume=None):
        args = TrainingArguments(output_dir=output_dir, max_steps=TRAINER_STEPS, per_device_train_batch_size=8 // world,
                                 train_sampling_strategy="sequential", learning_rate=1e-2, report_to=[],
                                 save_strategy="steps", save_steps=SAVE_AT, use_cpu=True, disable_tqdm=True,
                                 logging_strategy="no", dataloader_num_workers=0, fsdp=True,
                                 fsdp_config={"fsdp_version": 2})
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # FSDP2 on gloo
        trainer = SpectralTrainer(model=Regressor(), args=args, train_dataset=trainer_dataset(),
                                  spectral_filter=trainer_filter, callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        filt = trainer.spectral_filter
        return {"params": params_of(trainer.model), "steps": filt.steps, "reg": filt.regularization().detach()}

    results: dict = {}
    try:
        results["straight"] = run(os.path.join(workdir, "straight"))
        run(os.path.join(workdir, "interrupted"), [StopAt(SAVE_AT)])
        checkpoint = os.path.join(workdir, "interrupted", f"checkpoint-{SAVE_AT}")
        results["files"] = sorted(f for f in os.listdir(checkpoint) if f.startswith("spectral_filter"))
        results["resumed"] = run(os.path.join(workdir, "interrupted"), resume=checkpoint)
        if rank == 0:
            torch.save(results, os.path.join(workdir, "results.pt"))
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fsdp2_trainer_resumes_bit_identical_from_per_rank_filter_files(tmp_path):
    """2 ranks, FSDP2 (accelerate's fully_shard inside train()), the factory's filter on the sharded model: each
    rank writes its rows' filter state, and the resumed run ends where the straight one does."""
    test_distributed = pytest.importorskip("test_distributed")
    pytest.importorskip("accelerate")
    results = test_distributed._spawn(str(tmp_path), _fsdp2_resume_worker)
    assert results["files"] == ["spectral_filter-rank0-of-2.pt", "spectral_filter-rank1-of-2.pt"]
    straight, resumed = results["straight"], results["resumed"]
    assert resumed["steps"] == straight["steps"] == test_distributed.TRAINER_STEPS
    assert torch.equal(resumed["reg"], straight["reg"]) and float(straight["reg"]) > 0
    for name, param in straight["params"].items():
        assert torch.equal(resumed["params"][name], param), name
