"""The ``spectralkern`` logger's handler, set up by the command line only.

The library logs through ``logging.getLogger(__name__)`` in each module (INFO for what a user waits on, with the
elapsed time) and installs no handler but the NullHandler of ``spectralkern/__init__.py``: an application decides
where log lines go (``logging.basicConfig(level=logging.INFO)`` shows them). The ``spectralkern`` command calls
``configure`` for its ``-v`` / ``--log-level`` flags.
"""
from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER_NAME = "spectralkern"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "spectralkern-cli"


def level_from_flags(log_level: str | None, verbose: int) -> int:
    """``--log-level`` when given, else WARNING lowered one step per ``-v`` (``-v``: INFO, ``-vv``: DEBUG)."""
    if log_level is not None:
        if log_level.upper() not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {log_level!r}")
        return getattr(logging, log_level.upper())
    if verbose < 0:
        raise ValueError(f"verbose must be >= 0, got {verbose}")
    return max(logging.DEBUG, logging.WARNING - 10 * verbose)


def configure(level: int, stream: TextIO | None = None) -> logging.Handler:
    """Send the ``spectralkern`` logger's records at ``level`` and above to ``stream`` (default: stderr).

    Idempotent: a second call replaces the handler of the first instead of adding another. Only the
    ``spectralkern`` logger is touched, not the root logger, so other libraries' logging stays as it was.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
