"""npe2 readers and writers: boxes as CSV, segmentations (TIFF read as Labels, OME-Zarr written),
and whole slides (pyramidal or very large TIFF-family files) read lazily as multiscale images.

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

QuPath: ``*.geojson`` files (QuPath's *Export objects as GeoJSON*, or ``segthenseg-predict --geojson``)
open as a Shapes layer of rectangles (the rectangle annotations: boxes for the panel) and one of
polygons (every other area: detections, other annotations); Shapes layers save as GeoJSON
annotations (rectangles stay rectangles) and Labels layers as one detection per object, which
QuPath's *File > Import objects* reads (:mod:`..engine.geojson`).

Slides: napari's own reader decodes a whole TIFF into memory (a 20,000 px slide: 1.2 GB RGB), so
pyramidal OME-TIFF/SVS/NDPI/BigTIFF files and TIFFs over ``LAZY_MIN_PIXELS`` are read through the
engine's reader instead: a multiscale Image layer of dask arrays over the file's tiles. Small plain
TIFFs and ``*_mask.tif``/``*_labels.tif`` are left to the other readers (this one returns None).
OME-Zarr folders are napari-ome-zarr's (a dependency). Segmentations are saved as OME-Zarr label
images (``*.ome.zarr``), the format ``segthenseg-predict`` writes for slides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine import omezarr, reader
from ..engine.boxio import HEADER, read_boxes_csv, write_boxes_csv
from ..engine.geojson import (
    FeatureWriter,
    box_feature,
    boxes_from_features,
    is_rectangle,
    label_features,
    read_features,
    slide_features,
)
from ..engine.omezarr import save_label_image
from ..engine.reader import TIFF_EXTENSIONS, open_image, stem_of
from .layers import (
    BOX_COLOUR,
    BOXES_FILE_KEY,
    PIXEL_SIZE_KEY,
    STORE_KEY,
    VIEWPORT_KEY,
    Plane,
    boxes_to_rectangles,
    snap_to_pixels,
)
from .volume_session import BOX_ID, boxes3d_to_rectangles, layer_boxes3d

__all__ = ["LABEL_SUFFIXES", "napari_get_geojson_reader", "napari_get_label_reader", "napari_get_reader",
           "napari_get_slide_reader", "read_boxes_csv", "write_boxes", "write_boxes_csv",
           "write_labels_geojson", "write_labels_zarr", "write_shapes_geojson"]

EXTENSION = ".boxes.csv"
LAYER_BOXES_MAX = 2000  # larger boxes files are not drawn whole (a slide's: see _read_layer)
# the file names the Labels reader takes (napari.yaml lists the same as filename_patterns)
LABEL_SUFFIXES = ("_mask.tif", "_mask.tiff", "_labels.tif", "_labels.tiff")


def napari_get_reader(path: str | list[str]):
    """npe2 reader: a ``*.boxes.csv`` file -> an editable Shapes layer of rectangles."""
    if isinstance(path, list) or not str(path).lower().endswith(EXTENSION):
        return None
    return _read_layer


def _read_layer(path: str) -> list[tuple]:
    """The boxes as rectangles; a file with more than ``LAYER_BOXES_MAX`` (a slide's) gives an empty
    layer that names the file: picked as the boxes layer in the panel, all of them go into the slide's
    box table and the layer shows those near the view (napari would need minutes for them all)."""
    name = Path(path).name[: -len(EXTENSION)]
    metadata = {"segthenseg": "boxes"}
    rows = _rows(path)
    if rows > LAYER_BOXES_MAX and _first_line(path) == ",".join(HEADER):  # a slide's: read when picked
        metadata.update({BOXES_FILE_KEY: str(path), "segthenseg_n_boxes": rows})
        boxes = np.zeros((0, 4))
    else:
        boxes = read_boxes_csv(path)
    meta = {"name": name, "shape_type": "rectangle", "edge_color": BOX_COLOUR, "face_color": "transparent",
            "ndim": 2, "metadata": metadata}
    if boxes.shape[1] == 6:  # a volume's 3D boxes: a rectangle on every slice, its box as a feature
        plane = Plane(lead=(), scale=(1.0,) * 3, translate=(0.0,) * 3, affine=np.eye(4), hw=(0, 0), depth=1)
        rects, ids = boxes3d_to_rectangles(boxes, plane)
        meta.update(ndim=3, features={BOX_ID: ids}, feature_defaults={BOX_ID: -1})
        return [(rects, meta, "shapes")]
    plane = Plane(lead=(), scale=(1.0, 1.0), translate=(0.0, 0.0), affine=np.eye(3), hw=(0, 0))
    return [(boxes_to_rectangles(boxes, plane) if len(boxes) else None, meta, "shapes")]


def _rows(path: str) -> int:
    """Data rows of a CSV, counted without parsing (a million rows: a few hundredths of a second)."""
    with open(path, "rb") as fh:
        return max(0, sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b"")) - 1)


def _first_line(path: str) -> str:
    with open(path, newline="") as fh:
        return fh.readline().strip().replace(" ", "").lower()


def write_boxes(path: str, data: list, meta: dict) -> list[str]:
    """npe2 single-layer writer for Shapes: each shape's bounding box, snapped to pixels.

    Coordinates are the layer's own data coordinates (for the plugin's boxes layer: the image's
    pixels); leading axes of a stack's boxes layer are dropped. A volume's boxes layer (its
    rectangles carry the ``box`` feature) is written as 3D boxes ``z0,y0,x0,z1,y1,x1``. A slide's
    boxes layer, which shows only the boxes near the view, is refused: the panel's Save writes all of
    them.
    """
    if (meta.get("metadata") or {}).get(VIEWPORT_KEY):
        raise ValueError("this boxes layer shows only the boxes near the view of a slide; save all of them "
                         "with 'Save segmentation + boxes…' in the Segment-then-Segment panel")
    features = meta.get("features")
    if len(data) and features is not None and BOX_ID in features and np.asarray(data[0]).shape[1] >= 3:
        return [str(write_boxes_csv(path, layer_boxes3d(list(data), features[BOX_ID])))]
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


# -- slides -----------------------------------------------------------------------------------
VIRTUAL_LEVEL_MAX_SIDE = 2048  # a single-level slide gets strided views down to this size


def napari_get_slide_reader(path: str | list[str]):
    """npe2 reader: a pyramidal or very large TIFF-family file -> a lazy multiscale Image layer
    (a large z-stack: a lazy 3D Image layer, read slice by slice).

    Decided from the TIFF structure alone (nothing decoded): several pyramid levels, or more than
    ``LAZY_MIN_PIXELS`` pixels (a stack: voxels). Anything else returns None (napari's own reader
    does small TIFFs).
    """
    name = str(path).lower() if not isinstance(path, list) else ""
    if not name.endswith(TIFF_EXTENSIONS) or name.endswith(LABEL_SUFFIXES):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            n_levels = len(series.levels)
            counted = "YX" + reader.Z_AXES
            pixels = int(np.prod([n for a, n in zip(series.axes, series.shape, strict=True) if a in counted]))
    except (OSError, ValueError, IndexError, KeyError, tifffile.TiffFileError):
        return None
    if n_levels < 2 and pixels <= reader.LAZY_MIN_PIXELS:
        return None
    return _read_slide


def _read_slide(path: str) -> list[tuple]:
    opened = open_image(path, volume=True)  # ImageFileError (a time series, 2 channels, ...) says why
    levels = list(opened.levels)
    meta: dict = {"name": stem_of(path), "rgb": levels[0].ndim == (4 if opened.volume else 3),
                  "metadata": {"segthenseg_source": str(path), "segthenseg_kind": opened.describe(),
                               PIXEL_SIZE_KEY: opened.pixel_size}}
    if opened.volume:  # napari reads the slice on screen; the dtype's range saves reading them all
        levels = [lv for lv in levels if lv.shape[0] == levels[0].shape[0]]
        if np.dtype(levels[0].dtype).kind in "ui":
            info = np.iinfo(levels[0].dtype)
            meta["contrast_limits"] = (float(info.min), float(info.max))
    elif len(levels) == 1:  # one huge level: strided views so that zooming out never reads it all
        base, f = levels[0], 2
        while max(int(s) for s in base.shape[:2]) // f > VIRTUAL_LEVEL_MAX_SIDE // 2:
            levels.append(base[::f, ::f])
            f *= 2
        if np.dtype(base.dtype).kind in "ui":  # napari would read the smallest level for the range
            info = np.iinfo(base.dtype)
            meta["contrast_limits"] = (float(info.min), float(info.max))
    elif levels[0].ndim == 2 and np.dtype(levels[0].dtype).kind in "uif":
        # dim fluorescence shows black at the dtype's full range: stretch to the smallest level's
        # 0.1-99.9 % (a few MB read; napari alone would take its min-max)
        lo, hi = np.percentile(np.asarray(levels[-1]), [0.1, 99.9])
        if hi > lo:
            meta["contrast_limits"] = (float(lo), float(hi))
    meta["multiscale"] = len(levels) > 1
    return [(levels if len(levels) > 1 else levels[0], meta, "image")]


def write_labels_zarr(path: str, data: object, meta: dict) -> list[str]:
    """npe2 single-layer writer for Labels: an OME-Zarr label image with a pyramid.

    A slide's segmentation layer (backed by the plugin's session store) is copied as it is; any
    other 2D Labels layer is written block by block.
    """
    store = (meta.get("metadata") or {}).get(STORE_KEY)
    return [str(save_label_image(path, data, store))]


# -- QuPath GeoJSON ------------------------------------------------------------------------------
GEOJSON_EXTENSION = ".geojson"
LAYER_POLYGONS_MAX = 20000  # polygons drawn at most (napari's Shapes layer slows down far before 10^5)


def napari_get_geojson_reader(path: str | list[str]):
    """npe2 reader: a ``*.geojson`` file -> Shapes layers (boxes from rectangles, other polygons)."""
    if isinstance(path, list) or not str(path).lower().endswith(GEOJSON_EXTENSION):
        return None
    return _read_geojson


def _read_geojson(path: str) -> list[tuple]:
    """Rectangle annotations as a boxes layer, every other area as polygons (their outer rings; napari
    draws no holes). A bad file raises ``GeoJSONError`` naming it and what is wrong."""
    feats = read_features(path)
    name = Path(path).name[: -len(GEOJSON_EXTENSION)]
    rects = [f for f in feats if f["objectType"] != "detection" and is_rectangle(f["shape"])]
    areas = [f for f in feats if f["shape"].geom_type in ("Polygon", "MultiPolygon") and not any(
        f is r for r in rects)]
    layers: list[tuple] = []
    if rects or not areas:
        plane = Plane(lead=(), scale=(1.0, 1.0), translate=(0.0, 0.0), affine=np.eye(3), hw=(0, 0))
        boxes = boxes_from_features(rects)
        meta = {"name": name, "shape_type": "rectangle", "edge_color": BOX_COLOUR,
                "face_color": "transparent", "ndim": 2, "metadata": {"segthenseg": "boxes"}}
        layers.append((boxes_to_rectangles(boxes, plane) if len(boxes) else None, meta, "shapes"))
    if areas:
        rings = [np.asarray(p.exterior.coords)[:-1, ::-1] - 0.5 for f in areas
                 for p in getattr(f["shape"], "geoms", [f["shape"]])]
        label = f"{name} objects"
        if len(rings) > LAYER_POLYGONS_MAX:
            label = f"{name} objects (first {LAYER_POLYGONS_MAX} of {len(rings)})"
            rings = rings[:LAYER_POLYGONS_MAX]
        layers.append((rings, {"name": label, "shape_type": "polygon", "edge_color": "#2ee65c",
                               "face_color": "transparent", "ndim": 2}, "shapes"))
    return layers


def write_shapes_geojson(path: str, data: list, meta: dict) -> list[str]:
    """npe2 single-layer writer for Shapes -> GeoJSON annotations for QuPath: rectangles as rectangles
    snapped to pixels (the boxes, as the boxes CSV writer takes them), other shapes as polygons through
    their vertices (ellipses as their 4 corners' polygon: draw them as polygons to keep them)."""
    if (meta.get("metadata") or {}).get(VIEWPORT_KEY):
        raise ValueError("this boxes layer shows only the boxes near the view of a slide; save all of them "
                         "with 'Save segmentation + boxes…' in the Segment-then-Segment panel")
    import shapely

    types = meta.get("shape_type") or ["polygon"] * len(data)
    with FeatureWriter(path) as w:
        for verts, kind in zip(data, types, strict=True):
            if kind == "rectangle":
                w.append(box_feature(snap_to_pixels([verts])[0]))
                continue
            xy = np.asarray(verts, dtype=float)[:, -2:][:, ::-1] + 0.5  # napari (y, x) centres -> QuPath
            geom = shapely.Polygon(xy) if kind != "path" and len(xy) >= 3 else shapely.LineString(xy)
            w.append({"type": "Feature", "geometry": shapely.geometry.mapping(geom),
                      "properties": {"objectType": "annotation"}})
    return [str(path)]


def write_labels_geojson(path: str, data: object, meta: dict) -> list[str]:
    """npe2 single-layer writer for Labels -> GeoJSON, one QuPath detection per id (a slide's
    segmentation chunk by chunk from its store, so any size)."""
    base = data[0] if isinstance(data, (list, tuple)) else data
    if len(base.shape) != 2:
        raise ValueError(f"only 2D segmentations are saved as GeoJSON, this one is {tuple(base.shape)}")
    store = (meta.get("metadata") or {}).get(STORE_KEY)
    with FeatureWriter(path) as w:
        if store is not None:
            label = omezarr.open_label_image(store)
            for _ in slide_features(label.levels[0], int(label.levels[0].chunks[0]), w):
                pass
        else:
            for f in label_features(np.asarray(base)):
                w.append(f)
    return [str(path)]
