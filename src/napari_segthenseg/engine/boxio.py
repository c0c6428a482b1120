"""Boxes as CSV: ``y0,x0,y1,x1`` in full-resolution pixels, half-open, with a header.

One format for the plugin's reader/writer and ``segthenseg-predict``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write

HEADER = ["y0", "x0", "y1", "x1"]


def write_boxes_csv(path: str | os.PathLike, boxes: np.ndarray) -> Path:
    """Write ``(N, 4)`` boxes atomically (temp file renamed into place)."""
    path = Path(path)
    boxes = np.asarray(boxes).reshape(-1, 4).astype(np.int64)
    with atomic_write(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(boxes.tolist())
    return path


def read_boxes_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a boxes CSV; a wrong header or a bad row raises ``ValueError`` naming the line."""
    path = Path(path)
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
