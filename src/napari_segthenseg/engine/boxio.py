"""Boxes as CSV: ``y0,x0,y1,x1`` in full-resolution pixels, half-open, with a header; a volume's
3D boxes as ``z0,y0,x0,z1,y1,x1`` (slices z0 to z1 - 1), told apart by the header.

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
HEADER_3D = ["z0", "y0", "x0", "z1", "y1", "x1"]


def write_boxes_csv(path: str | os.PathLike, boxes: np.ndarray) -> Path:
    """Write ``(N, 4)`` boxes, or ``(N, 6)`` 3D boxes, atomically (temp file renamed into place)."""
    path = Path(path)
    boxes = np.asarray(boxes)
    header = HEADER_3D if boxes.ndim == 2 and boxes.shape[1] == 6 else HEADER
    boxes = boxes.reshape(-1, len(header)).astype(np.int64)
    row = ",".join(["{}"] * len(header)).format
    rows = "\n".join(map(row, *boxes.T.tolist())) if len(boxes) else ""
    with atomic_write(path, "w", newline="") as fh:
        fh.write(",".join(header) + "\n" + (rows + "\n" if rows else ""))
    return path


def read_boxes_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a boxes CSV: ``(N, 4)``, or ``(N, 6)`` for the 3D header; a wrong header or a bad row
    raises ``ValueError`` naming the line."""
    path = Path(path)
    with open(path, newline="") as fh:
        first = [c.strip().lower() for c in fh.readline().strip().split(",")]
    if first in (HEADER, HEADER_3D):
        n = len(first)
        try:
            with warnings.catch_warnings():  # a file with no boxes is fine ("input contained no data")
                warnings.simplefilter("ignore", UserWarning)
                out = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
        except ValueError:
            out = None  # read again line by line, for the message
        if out is not None and out.shape[1:] in ((n,), (0,)):
            out = out.reshape(-1, n)
            if np.isfinite(out).all() and (out[:, n // 2:] > out[:, :n // 2]).all():
                return out
    return _read_slowly(path)


def _read_slowly(path: Path) -> np.ndarray:
    """The same file, row by row: raises the ``ValueError`` that names what is wrong and where."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if header not in (HEADER, HEADER_3D):
        raise ValueError(f"{path}: not a boxes file (the first line must be {','.join(HEADER)}, or "
                         f"{','.join(HEADER_3D)} for a volume)")
    n = len(header)
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            values = [float(c) for c in row]
        except ValueError:
            raise ValueError(f"{path}, line {line}: expected {n} numbers, got {row}") from None
        if len(values) != n:
            raise ValueError(f"{path}, line {line}: expected {n} numbers, got {row}")
        lo, hi = values[:n // 2], values[n // 2:]
        if not all(b > a for a, b in zip(lo, hi, strict=True)) or not np.all(np.isfinite(values)):
            need = "z1 > z0, y1 > y0 and x1 > x0" if n == 6 else "y1 > y0 and x1 > x0"
            raise ValueError(f"{path}, line {line}: need {need}, got {row}")
        out.append(values)
    return np.asarray(out, dtype=np.float64).reshape(-1, n)
