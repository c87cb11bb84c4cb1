"""The Hugging Face Trainer integration: SpectralTrainer, SpectralFilterCallback and the filter in checkpoints.

A tiny BERT built from a config (no download), a few steps, on the torch backend (the kernels have their own
tests). The resume tests compare an interrupted-and-resumed run with the uninterrupted one bit for bit.
"""
from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

import spectralkern as sk  # noqa: E402
from spectralkern.integrations.filter_checkpoint import FILTER_STATE_NAME  # noqa: E402
from spectralkern.integrations.hf import SpectralFilterCallback, SpectralTrainer  # noqa: E402

STEPS, SAVE_AT = 6, 4
FILTER = dict(target_modules=["query", "value"], block_size=16, k=4, knn=4, refresh_every=3, reg_weight=1.0)


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")


def tiny_bert() -> BertForSequenceClassification:
    """2 layers, hidden 32 (query/value: 32 × 32, two blocks of 16 rows), dropout 0.1: training draws from the
    global RNG, so a resume is only bit-identical if the Trainer restores it."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
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


def make_trainer(way: str, source: str, output_dir: str, callbacks=(), args_overrides=None, **trainer_kwargs):
    """(trainer, get_filter) for way in {"SpectralTrainer", "callback"} and source in {"factory", "built"};
    ``trainer_kwargs`` go to SpectralTrainer or SpectralFilterCallback."""
    model = tiny_bert()
    factory = functools.partial(sk.SpectralGradientFilter, **FILTER)
    spectral_filter = factory if source == "factory" else factory(model)
    kwargs = dict(model=model, args=training_args(output_dir, **(args_overrides or {})), train_dataset=dataset(), callbacks=list(callbacks))
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


@pytest.mark.parametrize("way,source", [("SpectralTrainer", "factory"), ("SpectralTrainer", "built"),
                                        ("callback", "factory"), ("callback", "built")])
def test_interrupted_and_resumed_run_ends_bit_identical(way, source, tmp_path):
    """6 steps straight vs 4 steps, interruption, and a new process state (new model, filter and Trainer; the
    global RNG elsewhere) resuming from checkpoint-4: the same weights, filter steps, bases and regulariser. The
    bases are refreshed at steps 3 and 6, so the last refresh happens after the checkpoint."""
    trainer, get_filter = make_trainer(way, source, str(tmp_path / "straight"))
    trainer.train()
    uninterrupted = outcome(trainer, get_filter())
    assert uninterrupted["bases"] != {}

    trainer, get_filter = make_trainer(way, source, str(tmp_path / "interrupted"), callbacks=[StopAt(SAVE_AT)])
    trainer.train()
    assert trainer.state.global_step == SAVE_AT and get_filter().steps == SAVE_AT
    checkpoint = tmp_path / "interrupted" / f"checkpoint-{SAVE_AT}"

    torch.manual_seed(12345)  # whatever the RNG holds now, the Trainer restores the checkpoint's
    trainer, get_filter = make_trainer(way, source, str(tmp_path / "interrupted"))
    trainer.train(resume_from_checkpoint=str(checkpoint))
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
