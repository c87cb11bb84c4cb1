"""Spectral fine-tuning in a plain PyTorch loop: MiniLM-L6 on a slice of BBC News, about a minute on a CPU.

    python examples/plain_loop.py [--steps 30] [--explicit]

The three lines that differ from an ordinary AdamW loop are marked "spectral". By default the fused
SpectralAdamW filters the gradients inside its step; --explicit shows the other form: filt.step() between
backward() and a stock torch.optim.AdamW. Both give the same update.
"""
from __future__ import annotations

import argparse

import torch

import spectralkern as sk
from spectralkern.finetune.data import encode, load_bbc_news, nested_fraction, stratified_split
from spectralkern.finetune.model import SentenceClassifier, load_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--explicit", action="store_true", help="filt.step() + torch AdamW instead of SpectralAdamW")
    args = parser.parse_args()
    torch.manual_seed(0)

    data = load_bbc_news()
    train_idx, test_idx = stratified_split(data.labels, 0.2, seed=0)
    train_idx = nested_fraction(train_idx, data.labels, 1.0, cap=args.steps * args.batch_size)
    test_idx = nested_fraction(test_idx, data.labels, 1.0, cap=200)
    tokenizer, encoder = load_encoder()
    tokens = {name: torch.zeros(len(data), args.max_length, dtype=torch.int64) for name in ("input_ids", "attention_mask")}
    for idx in (train_idx, test_idx):
        encoded = encode(tokenizer, [data.texts[i] for i in idx.tolist()], args.max_length)
        for name in tokens:
            tokens[name][idx] = encoded[name]

    model = SentenceClassifier(encoder, num_classes=len(data.classes))
    model.encoder.get_input_embeddings().weight.requires_grad_(False)
    # spectral: a graph over the rows of every attention/MLP weight, its 16 lowest frequencies per 128-row block
    filt = sk.SpectralGradientFilter(model, target_modules=["query", "key", "value", "output.dense", "intermediate.dense"],
                                     block_size=128, k=16, gains=sk.heat(2.0), reg_weight=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.explicit:
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    else:
        optimizer = sk.SpectralAdamW(params, lr=1e-4, weight_decay=0.01, spectral_filter=filt)  # spectral: fused

    model.train()
    order = train_idx[torch.randperm(train_idx.numel())]
    for step in range(args.steps):
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        out = model(tokens["input_ids"][batch], tokens["attention_mask"][batch], labels=data.labels[batch])
        loss = out["loss"] + filt.regularization()          # spectral: joint loss L_task + λ·tr(ΔᵀLΔ)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.explicit:
            filt.step()                                       # spectral: filter .grad in place, then AdamW
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  task loss {out['loss'].item():.4f}  joint loss {loss.item():.4f}")

    model.eval()
    with torch.inference_mode():
        logits = model(tokens["input_ids"][test_idx], tokens["attention_mask"][test_idx])["logits"]
    accuracy = (logits.argmax(-1) == data.labels[test_idx]).float().mean().item()
    print(f"held-out accuracy on {test_idx.numel()} documents: {accuracy:.1%}")


if __name__ == "__main__":
    main()
