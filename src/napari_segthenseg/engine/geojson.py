"""QuPath in and out: objects as GeoJSON detections, boxes from GeoJSON rectangles.

QuPath's *File > Import objects* (and drag and drop) reads a GeoJSON FeatureCollection (or a bare list
of features) whose features carry ``properties.objectType`` ("detection", "annotation", ...) and
optional ``measurements`` (name -> number). Coordinates are ``[x, y]`` in full-resolution pixels of the
image, pixel ``(row, col)`` covering ``[col, col + 1] x [row, row + 1]``: an object's outline follows
its pixels' edges, so it rasterises back to exactly its pixels (a pixel is inside when its centre is).
A label id is one feature (8-connected objects are one id in this project's label images; an object
whose pixels touch only at corners is a MultiPolygon, holes are interior rings).

Slides are written chunk by chunk from an instance-label array with global ids (``labels.py``): an
object inside a chunk is written from that chunk; one that crosses a chunk border is read whole once,
from a window grown until it holds the object, when it is first met.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import mapping, shape

from .atomic import atomic_write
from .grid import Region, tiles
from .progress import Progress, Steps

DETECTION = "detection"
ANNOTATION = "annotation"
OBJECT_MARGIN = 64  # px first read around a chunk's piece of an object that crosses the chunk border


class GeoJSONError(ValueError):
    """A file that is not GeoJSON QuPath could have written (the message names the file and why)."""


# -- out ----------------------------------------------------------------------------------------
def pixels_outline(mask: np.ndarray, y0: int = 0, x0: int = 0) -> shapely.Geometry:
    """The outline along the pixel edges of the True pixels of ``mask`` whose top-left pixel is at
    ``(y0, x0)``: the union of its row runs, without collinear vertices."""
    m = np.asarray(mask, dtype=bool)
    padded = np.zeros((m.shape[0], m.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = m
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # row-major order: the ends pair with the starts
    runs = shapely.box(starts + x0, rows + y0, ends + x0, rows + 1 + y0)
    return shapely.simplify(shapely.union_all(runs), 0)


def object_feature(geom: shapely.Geometry, object_id: int, area_px: int,
                   pixel_size: float | None = None) -> dict:
    """One QuPath detection with its measurements (in µm too when the pixel size is known)."""
    c = geom.centroid
    m: dict[str, float] = {"Object ID": int(object_id), "Area px^2": int(area_px),
                           "Perimeter px": round(float(geom.length), 3),
                           "Centroid X px": round(float(c.x), 3), "Centroid Y px": round(float(c.y), 3)}
    if pixel_size:
        m.update({"Area µm^2": round(area_px * pixel_size**2, 4),
                  "Perimeter µm": round(float(geom.length) * pixel_size, 4)})
    return {"type": "Feature", "geometry": mapping(geom),
            "properties": {"objectType": DETECTION, "measurements": m}}


def label_features(labels: np.ndarray, y0: int = 0, x0: int = 0, pixel_size: float | None = None,
                   skip: Iterable[int] = ()) -> Iterator[dict]:
    """One detection per id (> 0) of an instance-label block whose top-left is at ``(y0, x0)``."""
    labels = np.asarray(labels)
    skip = set(skip)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or i in skip:
            continue
        m = labels[sl] == i
        yield object_feature(pixels_outline(m, sl[0].start + y0, sl[1].start + x0), i, int(m.sum()),
                             pixel_size)


def slide_features(array: object, chunk: int, sink: object, pixel_size: float | None = None) -> Steps[int]:
    """Detections of an on-disk instance-label array with global ids, chunk by chunk, handed to
    ``sink.append`` (a list, or a :class:`FeatureWriter`); returns their number."""
    hw = (int(array.shape[0]), int(array.shape[1]))
    grid = tiles(hw, chunk)
    crossing_done: set[int] = set()  # objects across chunk borders written already
    n = 0
    for k, (y0, x0, y1, x1) in enumerate(grid):
        yield Progress(f"GeoJSON: {k}/{len(grid)} chunks", k, len(grid))
        block = np.asarray(array[y0:y1, x0:x1]).astype(np.int64)
        if not block.any():
            continue
        edge = np.zeros(block.shape, bool)  # chunk borders inside the image
        edge[0, :] |= y0 > 0
        edge[-1, :] |= y1 < hw[0]
        edge[:, 0] |= x0 > 0
        edge[:, -1] |= x1 < hw[1]
        crossing = set(np.unique(block[edge]).tolist()) - {0}
        ids, inverse = np.unique(block, return_inverse=True)
        if ids[0] != 0:  # no background in this chunk: keep local id 0 for background all the same
            ids, inverse = np.concatenate([[0], ids]), inverse + 1
        local = inverse.reshape(block.shape)  # ids 1.. within the block, ``ids[local]`` the global ones
        for j, sl in enumerate(ndimage.find_objects(local), start=1):
            oid = int(ids[j])
            if oid in crossing:
                if oid not in crossing_done:
                    crossing_done.add(oid)
                    sink.append(_whole_object(array, hw, oid, (sl[0].start + y0, sl[1].start + x0,
                                                               sl[0].stop + y0, sl[1].stop + x0), pixel_size))
                    n += 1
                continue
            m = block[sl] == oid
            sink.append(object_feature(pixels_outline(m, sl[0].start + y0, sl[1].start + x0), oid,
                                       int(m.sum()), pixel_size))
            n += 1
    yield Progress("GeoJSON", len(grid), len(grid))
    return n


def _whole_object(array: object, hw: tuple[int, int], oid: int, part: Region,
                  pixel_size: float | None) -> dict:
    """The detection of an object seen in part: read a window around it, grown until no pixel of the
    object touches the window's edge (inside the image)."""
    by = OBJECT_MARGIN
    while True:
        y0, x0 = max(0, part[0] - by), max(0, part[1] - by)
        y1, x1 = min(hw[0], part[2] + by), min(hw[1], part[3] + by)
        m = np.asarray(array[y0:y1, x0:x1]) == oid
        edge = np.zeros(m.shape, bool)
        edge[0, :] |= y0 > 0
        edge[-1, :] |= y1 < hw[0]
        edge[:, 0] |= x0 > 0
        edge[:, -1] |= x1 < hw[1]
        if not m[edge].any():
            return object_feature(pixels_outline(m, y0, x0), oid, int(m.sum()), pixel_size)
        by *= 2


class FeatureWriter:
    """A FeatureCollection written feature by feature (memory stays flat), atomically: the file
    appears complete or not at all."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0
        self._ctx = atomic_write(self.path, "w")

    def __enter__(self) -> FeatureWriter:
        self._fh = self._ctx.__enter__()
        self._fh.write('{"type": "FeatureCollection", "features": [\n')
        return self

    def append(self, feature: dict) -> None:
        self._fh.write((",\n" if self.count else "") + json.dumps(feature, separators=(",", ":")))
        self.count += 1

    def __exit__(self, *exc) -> bool | None:
        if exc[0] is None:
            self._fh.write("\n]}\n")
        return self._ctx.__exit__(*exc)


def write_features(path: str | os.PathLike, features: Iterable[dict]) -> int:
    """Write ``features`` as one FeatureCollection; returns how many."""
    with FeatureWriter(path) as w:
        for f in features:
            w.append(f)
    return w.count


def box_feature(box: np.ndarray) -> dict:
    """A box ``(y0, x0, y1, x1)`` as a QuPath rectangle annotation."""
    y0, x0, y1, x1 = (int(v) for v in box)
    return {"type": "Feature", "geometry": mapping(shapely.box(x0, y0, x1, y1)),
            "properties": {"objectType": ANNOTATION}}


# -- in -----------------------------------------------------------------------------------------
def read_features(path: str | os.PathLike) -> list[dict]:
    """The features of a GeoJSON file (a FeatureCollection, a Feature, or a list of features as
    QuPath exports them), each with a valid ``shapely`` geometry in ``"shape"``; ``GeoJSONError``
    naming the file and what is wrong otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise GeoJSONError(f"{path}: not a GeoJSON file (not text: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise GeoJSONError(f"{path}: not a GeoJSON file (invalid JSON at line {exc.lineno}: "
                           f"{exc.msg})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, list):
        feats = data
    else:
        raise GeoJSONError(f"{path}: not a GeoJSON FeatureCollection, Feature or list of features")
    if not isinstance(feats, list):
        raise GeoJSONError(f"{path}: 'features' is not a list")
    out = []
    for k, f in enumerate(feats):
        where = f"{path}, feature {k + 1}"
        if not isinstance(f, dict) or f.get("type") != "Feature" or not isinstance(f.get("geometry"), dict):
            raise GeoJSONError(f"{where}: not a GeoJSON Feature with a geometry")
        try:
            geom = shape(f["geometry"])
        except (ValueError, TypeError, KeyError, AttributeError, IndexError,
                shapely.errors.GEOSException) as exc:
            raise GeoJSONError(f"{where}: bad geometry ({exc})") from None
        if geom.is_empty or not np.isfinite(geom.bounds).all():
            raise GeoJSONError(f"{where}: empty geometry or coordinates that are not numbers")
        props = f.get("properties") if isinstance(f.get("properties"), dict) else {}
        out.append({"shape": geom, "objectType": str(props.get("objectType", ANNOTATION)),
                    "properties": props})
    return out


def is_rectangle(geom: shapely.Geometry) -> bool:
    """An axis-aligned rectangle (what QuPath's rectangle tool draws)."""
    return geom.geom_type == "Polygon" and not geom.interiors and math.isclose(
        geom.area, shapely.envelope(geom).area, rel_tol=1e-9, abs_tol=1e-9)


def boxes_from_features(features: list[dict]) -> np.ndarray:
    """Boxes ``(y0, x0, y1, x1)`` (float, image pixels) of the area features: a rectangle is its
    box, any other polygon its bounding box. Points and lines are no boxes and are left out."""
    rows = []
    for f in features:
        g = f["shape"]
        if g.geom_type in ("Polygon", "MultiPolygon"):
            minx, miny, maxx, maxy = g.bounds
            rows.append((miny, minx, maxy, maxx))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def read_geojson_boxes(path: str | os.PathLike) -> np.ndarray:
    """Boxes from a GeoJSON file of QuPath rectangles (or other polygons: their bounding boxes);
    ``GeoJSONError`` when it holds none."""
    boxes = boxes_from_features(read_features(path))
    if len(boxes) == 0:
        raise GeoJSONError(f"{path}: no rectangles or polygons to take as boxes")
    return boxes


def rasterize(features: Iterable[dict | shapely.Geometry], hw: tuple[int, int]) -> np.ndarray:
    """Instance labels (uint32, 1.. in order) of polygons: a pixel belongs to a polygon when its
    centre lies inside (holes excluded). Later polygons win where they overlap."""
    out = np.zeros(hw, dtype=np.uint32)
    for i, f in enumerate(features, start=1):
        g = f["shape"] if isinstance(f, dict) else f
        minx, miny, maxx, maxy = g.bounds
        y0, x0 = max(0, math.floor(miny)), max(0, math.floor(minx))
        y1, x1 = min(hw[0], math.ceil(maxy)), min(hw[1], math.ceil(maxx))
        if y1 <= y0 or x1 <= x0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        inside = shapely.contains_xy(g, xs + 0.5, ys + 0.5)
        out[y0:y1, x0:x1][inside] = i
    return out
