"""``segthenseg-predict``'s QuPath side: boxes by hand from a file (``--boxes``) and the objects as
GeoJSON detections (``--geojson``), for images and slides (:mod:`..engine.geojson`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..engine.boxes import label_objects
from ..engine.boxio import read_boxes_csv
from ..engine.geojson import FeatureWriter, GeoJSONError, label_features, read_geojson_boxes, slide_features
from ..engine.labels import LABEL_DTYPE, relabel_chunked
from ..engine.progress import Progress, drive
from .common import CliError

GEOJSON_SUFFIXES = (".geojson", ".json")


def geojson_path(out: Path, stem: str) -> Path:
    """Where one image's detections go (QuPath: drag the file onto the image, or File > Import objects)."""
    return out / f"{stem}.geojson"


def read_boxes_file(path: Path) -> np.ndarray:
    """Boxes drawn by hand: a boxes CSV (``y0,x0,y1,x1``) or a GeoJSON file of QuPath rectangle
    annotations (other polygons give their bounding boxes); a clear :class:`CliError` otherwise."""
    if not path.is_file():
        raise CliError(f"--boxes: {path}: no such file")
    try:
        if path.name.lower().endswith(GEOJSON_SUFFIXES):
            return read_geojson_boxes(path)
        return read_boxes_csv(path)
    except (GeoJSONError, ValueError, OSError) as exc:
        raise CliError(f"--boxes: {exc}") from None


def write_image_geojson(labels_or_mask: np.ndarray, path: Path, pixel_size: float | None = None) -> int:
    """One detection per 8-connected object of an in-memory mask (or per id of instance labels)."""
    a = np.asarray(labels_or_mask)
    labels = a if a.dtype.kind in "iu" and a.max(initial=0) > 1 else label_objects(a)
    with FeatureWriter(path) as w:
        for f in label_features(labels, pixel_size=pixel_size):
            w.append(f)
    return w.count


def write_slide_geojson(array: object, chunk: int, path: Path, scratch: Path, has_ids: bool,
                        on_step: Callable[[Progress], None] | None = None,
                        pixel_size: float | None = None) -> int:
    """Detections of a slide's segmentation, chunk by chunk: from its ids (``--labels``), or from a
    numbered copy of its 0/1 mask in ``scratch`` (removed after)."""
    import zarr

    ids = array
    if not has_ids:
        ids = zarr.open_array(str(scratch / "geojson_ids.zarr"), mode="w", shape=array.shape,
                              chunks=(chunk, chunk), dtype=LABEL_DTYPE, fill_value=0)
        h, w = (int(s) for s in array.shape)
        for y in range(0, h, chunk):
            for x in range(0, w, chunk):
                block = np.asarray(array[y:y + chunk, x:x + chunk])
                if block.any():
                    ids[y:y + chunk, x:x + chunk] = block > 0
        drive(relabel_chunked(ids, chunk), on_step)
    with FeatureWriter(path) as writer:
        drive(slide_features(ids, chunk, writer, pixel_size), on_step)
    return writer.count
