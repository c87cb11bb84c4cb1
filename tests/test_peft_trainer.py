"""spectralkern adapters inside the Hugging Face training stack: Trainer (checkpoints of the adapter only,
load_best_model_at_end reloading the best one) and TRL's SFTTrainer(peft_config=SMoAConfig(...))."""
from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import spectralkern as sk  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_causal_lm():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, rows: int, length: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 32, (rows, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def smoa_config(**kwargs):
    return sk.peft.SMoAConfig(r=4, alpha=8, num_blocks=2, target_modules=["q_proj", "v_proj"], **kwargs)


def test_trainer_checkpoints_the_adapter_and_reloads_the_best_one(tmp_path):
    base = tiny_causal_lm()
    model = peft.get_peft_model(copy.deepcopy(base), smoa_config(task_type="CAUSAL_LM"))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=0.05,
        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=False, report_to=[], use_cpu=True, logging_steps=1,
        save_total_limit=None, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenRows(16, 8, 1),
                                   eval_dataset=TokenRows(8, 8, 2))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(best))
    assert "model.safetensors" not in os.listdir(best)  # the adapter only, never a base with lost weights
    # the trainer's model now holds the best checkpoint's adapter: the same outputs as loading it afresh
    ids = TokenRows(2, 8, 3).ids
    trained = trainer.model.eval()
    reloaded = sk.peft.load(copy.deepcopy(base), best).eval()
    with torch.no_grad():
        torch.testing.assert_close(trained(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=0, atol=0)
    last = os.path.join(str(tmp_path), "checkpoint-4")
    if os.path.realpath(last) != os.path.realpath(best):  # the best is not the last: a different adapter
        other = sk.peft.load(copy.deepcopy(base), last).eval()
        with torch.no_grad():
            assert not torch.equal(other(input_ids=ids).logits, trained(input_ids=ids).logits)


def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def test_trl_sft_trainer_with_an_smoa_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    generator = torch.Generator().manual_seed(4)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 32, (8,), generator=generator)) for _ in range(8)]
    base = tiny_causal_lm()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=0.05,
                         report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                         max_length=16)
    trainer = trl.SFTTrainer(model=copy.deepcopy(base), args=args,
                             train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=_word_tokenizer(), peft_config=smoa_config())
    assert isinstance(trainer.model, peft.PeftModel)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all(".smoa_adapters." in n for n in before)
    trainer.train()
    assert trainer.state.global_step == 2
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the factors trained
    trainer.save_model(str(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "final"))
    # the saved adapter is exactly the trained one (compared as tensors: TRL leaves its training model configured
    # for training, so its forward is not a clean reference)
    reloaded = sk.peft.load(copy.deepcopy(base), tmp_path / "final").eval()
    trained = {n.replace(".default.", "."): p for n, p in trainer.model.named_parameters() if p.requires_grad}
    loaded = {n.replace(".default.", "."): p for n, p in reloaded.named_parameters() if ".smoa_adapters." in n}
    assert trained.keys() == loaded.keys()
    for name in trained:
        assert torch.equal(trained[name].detach(), loaded[name].detach()), name
    ids = torch.randint(3, 32, (2, 6), generator=generator)
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=ids).logits).all()
