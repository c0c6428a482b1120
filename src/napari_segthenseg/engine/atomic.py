"""Atomic file writes: readers see the old file or the new one, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync it and rename it into place.

    On any error the temp file is removed and ``path`` is left as it was (an interrupted
    training run or a full disk never leaves a truncated model, checkpoint or CSV).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as fh:
        fh.write(data)
    return Path(path)


def output_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why ``path`` could not be written as a file (or made as a folder), or None when it can.

    Checked before long work starts, so that a bad output path is reported at once instead of
    after the work (and nothing is created here: a refused run leaves no trace).
    """
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            return f"{path} is a file, not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder, not a file"
        if not os.access(path if folder else path.parent, os.W_OK):
            return f"{path if folder else path.parent} is not writable"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing folder above
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder, so {path} cannot be made"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable, so {path} cannot be made"
    return None
