"""argparse ``type=`` validators for the command line: every argument is checked when it is parsed, before any
work starts, and a bad one is answered by argparse in one line with exit code 2
(``spectralkern demo: error: argument --k: expected a positive integer, got '0'``).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

MIN_CLASSES = 2          # a classification needs two classes
MIN_DOCUMENTS = 2        # per class: one to train on and one to hold out


def positive_int(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _finite(text)


def fractions(text: str) -> tuple[float, ...]:
    """Comma-separated shares, each in (0, 1]."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}")
    bad = [part for part, value in zip(parts, values) if not 0 < value <= 1]   # NaN fails this too
    if bad:
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {', '.join(bad)}")
    return values


def seeds(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    values = tuple(_int(part) for part in parts)
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected seeds >= 0, got {text!r}")
    return values


def device(text: str) -> str:
    """A torch device that exists here: cpu, or cuda / cuda:N with that GPU visible. ``meta`` (no data) is not
    a place to run anything."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    if parsed.type == "cpu":
        return text
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here")
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return text
    raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r} (device type {parsed.type!r} cannot "
                                     f"run this)")


def data_dir(text: str) -> str:
    """A folder with at least two class sub-folders, each holding at least two .txt documents."""
    root = Path(text)
    if not root.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    classes = sorted(child for child in root.iterdir() if child.is_dir())
    counts = {child.name: sum(1 for f in child.glob("*.txt") if f.is_file()) for child in classes}
    usable = [name for name, count in counts.items() if count >= MIN_DOCUMENTS]
    if len(usable) < MIN_CLASSES:
        found = ", ".join(f"{name}: {count}" for name, count in counts.items()) or "no sub-folders"
        raise argparse.ArgumentTypeError(
            f"{text!r} needs >= {MIN_CLASSES} class sub-folders with >= {MIN_DOCUMENTS} .txt documents each "
            f"(found {found})")
    short = [name for name, count in counts.items() if count < MIN_DOCUMENTS]
    if short:
        raise argparse.ArgumentTypeError(
            f"{text!r}: class folder(s) {', '.join(short)} hold fewer than {MIN_DOCUMENTS} .txt documents")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
