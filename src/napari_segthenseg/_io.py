"""Boxes as CSV (``y0,x0,y1,x1`` in image pixels, half-open, with a header): npe2 reader/writer.

The file extension is ``.boxes.csv`` so that napari's own Shapes CSV (a vertex list) keeps
``.csv``. Segmentations need no writer here: napari saves Labels layers as ``.tif`` itself.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np

from ._layers import BOX_COLOUR, boxes_to_rectangles, snap_to_pixels

HEADER = ["y0", "x0", "y1", "x1"]
EXTENSION = ".boxes.csv"


def write_boxes_csv(path: str | os.PathLike, boxes: np.ndarray) -> Path:
    """Write ``(N, 4)`` boxes atomically (temp file renamed into place)."""
    path = Path(path)
    boxes = np.asarray(boxes).reshape(-1, 4).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(HEADER)
            writer.writerows(boxes.tolist())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def napari_get_reader(path: str | list[str]):
    """npe2 reader: a ``*.boxes.csv`` file -> an editable Shapes layer of rectangles."""
    if isinstance(path, list) or not str(path).lower().endswith(EXTENSION):
        return None
    return _read_layer


def _read_layer(path: str) -> list[tuple]:
    from ._layers import Plane

    boxes = read_boxes_csv(path)
    plane = Plane(lead=(), scale=(1.0, 1.0), translate=(0.0, 0.0), affine=np.eye(3), hw=(0, 0))
    name = Path(path).name[: -len(EXTENSION)]
    meta = {"name": name, "shape_type": "rectangle", "edge_color": BOX_COLOUR, "face_color": "transparent",
            "ndim": 2, "metadata": {"segthenseg": "boxes"}}
    return [(boxes_to_rectangles(boxes, plane), meta, "shapes")]


def write_boxes(path: str, data: list, meta: dict) -> list[str]:
    """npe2 single-layer writer for Shapes: each shape's bounding box, snapped to pixels.

    Coordinates are the layer's own data coordinates (for the plugin's boxes layer: the image's
    pixels); leading axes of a stack's boxes layer are dropped.
    """
    return [str(write_boxes_csv(path, snap_to_pixels(list(data))))]
