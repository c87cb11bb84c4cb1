"""The spectral filter's state inside a checkpoint folder (a Trainer's ``checkpoint-N/``), and its restore.

One file per folder: ``spectral_filter.pt`` when every process holds the whole filter (one process, DDP), or
``spectral_filter-rank{r}-of-{w}.pt`` per rank when the targets are FSDP2 row shards (each rank's rows; resume on
the same world size). It is a ``torch.save`` of plain containers and tensors only, so
``torch.load(path, weights_only=True)`` reads it::

    {"format": 1,
     "global_step": N,                                   # the Trainer's step the folder was written at
     "fingerprints": {name: sha256 hex of the bytes of the targeted weight (this rank's rows)},
     "filter": filt.state_dict()}                        # step count, graphs, bases, W₀, correlation EMA

The fingerprints tie the file to the weights saved beside it: a restore first checks that the weights the model now
holds (loaded from the same folder) are those, so a filter state from another run, step or folder is refused
before anything is loaded.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time

import torch

from .._atomic import write_atomically
from ..distributed.shards import local_tensor, row_shard
from ..optim import SpectralGradientFilter

logger = logging.getLogger(__name__)

FILTER_STATE_NAME = "spectral_filter.pt"
_FORMAT = 1
_KEYS = {"format", "global_step", "fingerprints", "filter"}


def filter_state_path(folder: str, spectral_filter: SpectralGradientFilter, rank: int = 0,
                      world_size: int = 1) -> str:
    """Where ``save_filter_state`` writes in ``folder``: one shared file, or this rank's under FSDP2 row shards."""
    if any(row_shard(param, name) is not None for name, param in spectral_filter.targets):
        return os.path.join(folder, f"spectral_filter-rank{rank}-of-{world_size}.pt")
    return os.path.join(folder, FILTER_STATE_NAME)


def weight_fingerprints(spectral_filter: SpectralGradientFilter) -> dict[str, str]:
    """sha256 of the bytes of every targeted weight (the local rows of a DTensor), by parameter name."""
    fingerprints = {}
    for name, param in spectral_filter.targets:
        data = local_tensor(param).detach().to("cpu").contiguous()
        fingerprints[name] = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy()).hexdigest()
    return fingerprints


def save_filter_state(spectral_filter: SpectralGradientFilter, folder: str, *, global_step: int, rank: int = 0,
                      world_size: int = 1) -> str:
    """Write the filter's state and the fingerprints of its weights into ``folder`` (which must exist); returns the
    file's path. Written atomically (a temporary file in ``folder``, fsync, rename): a failure half-way leaves the
    previous file, if any, as it was and nothing partial under the real name."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist; the filter state goes beside the "
                                "model's weights in the folder the Trainer has just written")
    started = time.perf_counter()
    path = filter_state_path(folder, spectral_filter, rank, world_size)
    payload = {"format": _FORMAT, "global_step": int(global_step),
               "fingerprints": weight_fingerprints(spectral_filter), "filter": spectral_filter.state_dict()}
    write_atomically(path, lambda temp: torch.save(payload, temp))
    logger.info("saved the spectral filter's state (%d steps) to %s in %.2f s", spectral_filter.steps, path,
                time.perf_counter() - started)
    return path


def read_filter_state(spectral_filter: SpectralGradientFilter, folder: str, *, global_step: int, rank: int = 0,
                      world_size: int = 1) -> dict:
    """The filter state saved in ``folder`` for this filter, checked against the model's weights and ``global_step``
    without changing anything. Raises FileNotFoundError when the folder holds no filter state, ValueError when the
    file is not one ``save_filter_state`` wrote or belongs to other weights or another step."""
    path = filter_state_path(folder, spectral_filter, rank, world_size)
    if not os.path.isfile(path):
        present = sorted(f for f in os.listdir(folder) if f.startswith("spectral_filter")) \
            if os.path.isdir(folder) else []
        raise FileNotFoundError(f"{path} does not exist" + (f" (the folder holds {', '.join(present)}: saved on "
                                                             "another world size)" if present else ""))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:  # truncated, corrupted, or not torch.save's
        raise ValueError(f"{path} cannot be read as a spectral filter state: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT or not _KEYS <= payload.keys():
        got = (f"format {payload.get('format')!r} with keys {sorted(payload)}" if isinstance(payload, dict)
               else type(payload).__name__)
        raise ValueError(f"{path} is not a spectral filter state of format {_FORMAT} with keys {sorted(_KEYS)} "
                         f"(got {got})")
    if payload["global_step"] != global_step:
        raise ValueError(f"{path} was saved at global step {payload['global_step']}, but the Trainer resumed at "
                         f"step {global_step}")
    saved, now = payload["fingerprints"], weight_fingerprints(spectral_filter)
    if sorted(saved) != sorted(now):
        raise ValueError(f"{path} holds the filter state of targets {sorted(saved)}, this filter targets "
                         f"{sorted(now)}")
    differing = [name for name in now if saved[name] != now[name]]
    if differing:
        raise ValueError(f"{path} was saved with other weights than the model holds now ({', '.join(differing)} "
                         "differ): it is not the filter state of the checkpoint the model was loaded from")
    return payload["filter"]


def load_filter_state(spectral_filter: SpectralGradientFilter, folder: str, *, global_step: int, rank: int = 0,
                      world_size: int = 1) -> None:
    """Restore the filter from ``folder`` after checking the file (``read_filter_state``, which raises before
    anything changes)."""
    started = time.perf_counter()
    state = read_filter_state(spectral_filter, folder, global_step=global_step, rank=rank, world_size=world_size)
    spectral_filter.load_state_dict(state)
    logger.info("restored the spectral filter's state (%d steps) from %s in %.2f s", spectral_filter.steps, folder,
                time.perf_counter() - started)


__all__ = ["FILTER_STATE_NAME", "filter_state_path", "load_filter_state", "read_filter_state", "save_filter_state",
           "weight_fingerprints"]
