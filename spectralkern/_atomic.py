"""Atomic file replacement: a reader sees the previous file or the complete new one, never a torn one."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a fresh file in ``path``'s folder, fsync it, then ``os.replace`` it onto
    ``path``. If ``write`` (or anything before the replace) raises, the temporary file is removed and whatever was
    at ``path`` before is left untouched; the exception propagates."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb") as written:  # the bytes reach the disk before the name points at them
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
