"""Boxes as CSV (``y0,x0,y1,x1`` in image pixels, half-open, with a header): npe2 reader/writer.

The file extension is ``.boxes.csv`` so that napari's own Shapes CSV (a vertex list) keeps
``.csv``. Segmentations need no writer here: napari saves Labels layers as ``.tif`` itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._layers import BOX_COLOUR, boxes_to_rectangles, snap_to_pixels
from .engine.boxio import read_boxes_csv, write_boxes_csv

__all__ = ["napari_get_reader", "read_boxes_csv", "write_boxes", "write_boxes_csv"]

EXTENSION = ".boxes.csv"


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
