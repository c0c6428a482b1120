"""Boxes as CSV: ``y0,x0,y1,x1`` in full-resolution pixels, half-open, with a header.

One format for the plugin's reader/writer and ``segthenseg-predict``. A slide's file holds 10^5-10^6
rows, so both directions are vectorised (a million rows in about a second each way on this project's
CPU); a bad file is then read again line by line for a message that names the line.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np

from .atomic import atomic_write

HEADER = ["y0", "x0", "y1", "x1"]


def write_boxes_csv(path: str | os.PathLike, boxes: np.ndarray) -> Path:
    """Write ``(N, 4)`` boxes atomically (temp file renamed into place)."""
    path = Path(path)
    boxes = np.asarray(boxes).reshape(-1, 4).astype(np.int64)
    rows = "\n".join(map("{},{},{},{}".format, *boxes.T.tolist())) if len(boxes) else ""
    with atomic_write(path, "w", newline="") as fh:
        fh.write(",".join(HEADER) + "\n" + (rows + "\n" if rows else ""))
    return path


def read_boxes_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a boxes CSV; a wrong header or a bad row raises ``ValueError`` naming the line."""
    path = Path(path)
    with open(path, newline="") as fh:
        first = fh.readline()
    if [c.strip().lower() for c in first.strip().split(",")] == HEADER:
        try:
            with warnings.catch_warnings():  # a file with no boxes is fine ("input contained no data")
                warnings.simplefilter("ignore", UserWarning)
                out = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
        except ValueError:
            out = None  # read again line by line, for the message
        if out is not None and out.shape[1:] in ((4,), (0,)):
            out = out.reshape(-1, 4)
            if np.isfinite(out).all() and (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all():
                return out
    return _read_slowly(path)


def _read_slowly(path: Path) -> np.ndarray:
    """The same file, row by row: raises the ``ValueError`` that names what is wrong and where."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip().lower() for c in rows[0]] != HEADER:
        raise ValueError(f"{path}: not a boxes file (the first line must be {','.join(HEADER)})")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            y0, x0, y1, x1 = (float(c) for c in row)
        except ValueError:
            raise ValueError(f"{path}, line {line}: expected 4 numbers, got {row}") from None
        if not (y1 > y0 and x1 > x0) or not np.all(np.isfinite([y0, x0, y1, x1])):
            raise ValueError(f"{path}, line {line}: need y1 > y0 and x1 > x0, got {row}")
        out.append((y0, x0, y1, x1))
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)
