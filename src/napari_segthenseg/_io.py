"""npe2 readers and writer: boxes as CSV, and segmentations written as TIFF opened as Labels.

Boxes: ``y0,x0,y1,x1`` in image pixels, half-open, with a header. The file extension is
``.boxes.csv`` so that napari's own Shapes CSV (a vertex list) keeps ``.csv``.

Segmentations: ``segthenseg-predict`` writes ``<stem>_mask.tif`` (uint8 0/1) and, with ``--labels``,
``<stem>_labels.tif`` (uint16/uint32 instance labels); napari's own reader would show them as Image
layers, ours gives Labels layers. (They need no writer here: napari saves Labels layers as ``.tif``.)

napari 0.9 picks a reader like this: ``viewer.open(path)`` uses napari's built-in reader unless
``plugin=`` names another; the GUI (File > Open, drag and drop) asks which reader to use when several
plugins claim a file name (napari's own claims ``*.csv`` and ``*.tif``) unless the preferences map
the name to one (Preferences > Plugins, or ``settings.plugins.extension2reader``). So open these
files with ``viewer.open(path, plugin="napari-segthenseg")``, or see docs/PLUGIN.md for the preference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._layers import BOX_COLOUR, boxes_to_rectangles, snap_to_pixels
from .engine.boxio import read_boxes_csv, write_boxes_csv

__all__ = ["LABEL_SUFFIXES", "napari_get_label_reader", "napari_get_reader", "read_boxes_csv",
           "write_boxes", "write_boxes_csv"]

EXTENSION = ".boxes.csv"
# the file names the Labels reader takes (napari.yaml lists the same as filename_patterns)
LABEL_SUFFIXES = ("_mask.tif", "_mask.tiff", "_labels.tif", "_labels.tiff")


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


def napari_get_label_reader(path: str | list[str]):
    """npe2 reader: ``*_mask.tif`` / ``*_labels.tif`` holding one integer 2D+ image -> a Labels layer.

    Anything else (another name, an RGB or float TIFF, a file tifffile cannot parse) is refused.
    """
    if isinstance(path, list) or not str(path).lower().endswith(LABEL_SUFFIXES):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            dtype, shape, axes = np.dtype(series.dtype), series.shape, series.axes
    except (OSError, ValueError, IndexError, tifffile.TiffFileError):
        return None
    if dtype.kind not in "biu" or len(shape) < 2 or "S" in axes:  # S: colour samples
        return None
    return _read_label_layer


def _read_label_layer(path: str) -> list[tuple]:
    import tifffile

    data = tifffile.imread(path)
    if data.dtype == bool:
        data = data.view(np.uint8)
    return [(data, {"name": Path(path).stem}, "labels")]
