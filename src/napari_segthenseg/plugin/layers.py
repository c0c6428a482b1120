"""Layer <-> engine conversions: which plane of an image to segment, where result layers go,
boxes as napari rectangles, label images, and how the three result layers look. Pure functions
on arrays and public layer attributes, no Qt (napari layers are made here, never added).

Coordinates: napari centres data pixel ``j`` at ``j`` and lets it cover ``[j - 0.5, j + 0.5]``.
An engine box ``(y0, x0, y1, x1)`` (half-open pixel indices) is therefore drawn as the
rectangle with corners ``(y0 - 0.5, x0 - 0.5)`` and ``(y1 - 0.5, x1 - 0.5)``: its edge runs
exactly along the outer pixel borders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.boxes import clip_boxes, label_objects
from ..engine.limits import LARGE_IMAGE_PX
from ..engine.omezarr import MASK_COLOUR

RECTANGLE = "rectangle"
# Three layers that must not be mistaken for one another at a glance: the rough mask is one blue
# (a coarse blob map, not instances), nearly opaque under a half-transparent segmentation so that
# it shows through; the boxes are yellow (their edges stand out on dark fluorescence, grey and H&E
# images), and the segmentation cycles through reds, oranges, pinks and greens only, so that no
# nucleus is blue like the rough mask or yellow like a box edge. Its first colour is the red that
# predict's and the plugin's OME-Zarr label images store for label 1 (engine.omezarr.MASK_COLOUR).
BOX_COLOUR = "#ffe600"
ROUGH_COLOUR = "#3d8bff"
ROUGH_OPACITY = 0.9
SEG_COLOURS = ("#{:02x}{:02x}{:02x}".format(*MASK_COLOUR[:3]), "#2ee65c", "#ff4fd8", "#ff9500", "#00c98d",
               "#ff6f91", "#7ee787", "#e0301e", "#ffa36c", "#1fa84f", "#ff2e97")
SEG_OPACITY = 0.55
KIND = "segthenseg"  # metadata key marking the layers this plugin made
STORE_KEY = "segthenseg_store"  # metadata key: the OME-Zarr folder behind a slide's segmentation
BOXES_FILE_KEY = "segthenseg_boxes_file"  # metadata key: a boxes file too large to draw whole
VIEWPORT_KEY = "segthenseg_viewport"  # metadata key: a boxes layer showing only the boxes near the view
PIXEL_SIZE_KEY = "segthenseg_pixel_size"  # metadata key: µm per pixel a slide's file records


@dataclass(frozen=True)
class Plane:
    """A 2D plane of an nD image layer (or, with ``depth``, a whole volume: its last three
    spatial axes) and where its pixels lie in the world.

    ``lead`` holds the indices of the leading axes that are not segmented (a stack's slice, a
    time point); result layers keep those axes with length 1, translated to the plane, so they
    show only on the slice they belong to. A volume's result layers span its ``depth`` slices.
    """

    lead: tuple[int, ...]
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    affine: np.ndarray  # (ndim + 1, ndim + 1) homogeneous matrix of the image layer
    hw: tuple[int, int]
    rotate: np.ndarray | None = None  # the image layer's rotate matrix and shear (None: none)
    shear: np.ndarray | None = None
    depth: int = 0  # slices of a volume segmented whole (0: one 2D plane)

    @property
    def ndim(self) -> int:
        return len(self.lead) + (3 if self.depth else 2)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(H, W)``, or ``(Z, H, W)`` for a volume."""
        return (self.depth, *self.hw) if self.depth else self.hw

    def expand(self, plane: np.ndarray) -> np.ndarray:
        """A 2D array (a volume: 3D) as a layer array with the leading axes of length 1."""
        return plane.reshape((1,) * len(self.lead) + plane.shape)

    def layer_kwargs(self, zoom: tuple[float, float] = (1.0, 1.0)) -> dict:
        """``scale``/``translate``/``rotate``/``shear``/``affine`` for a layer covering this plane.

        ``zoom`` is the size of one layer pixel in image pixels (``H/S, W/S`` for the rough
        mask); the layer is shifted so that its pixels tile the image extent exactly. The shift
        (slice index, half-pixel offset) is in image data units, so it goes through the image's
        scale, shear and rotation before it is added to the translation.
        """
        from napari.utils.transforms import Affine

        k = len(self.lead)
        scale = np.asarray(self.scale, dtype=float)
        z = np.asarray(([1.0] if self.depth else []) + list(zoom), dtype=float)  # slices are not zoomed
        shift = np.concatenate([np.asarray(self.lead, dtype=float), z / 2.0 - 0.5])
        out: dict = {"affine": self.affine.copy()}
        linear = np.eye(self.ndim)
        if self.rotate is not None:
            out["rotate"], out["shear"] = self.rotate, self.shear
            linear = Affine(rotate=self.rotate, shear=self.shear, ndim=self.ndim).linear_matrix
        out["translate"] = tuple(np.asarray(self.translate, dtype=float) + linear @ (scale * shift))
        out["scale"] = tuple(np.concatenate([scale[:k], scale[k:] * z]))
        return out


def image_plane(layer, world_point: tuple[float, ...] | None = None, volume: bool = False
                ) -> tuple[object, Plane]:
    """The 2D (or 2D + colour) data the user is looking at, and its :class:`Plane`.

    The last two spatial axes are the plane; leading axes (z, t, ...) are taken at
    ``world_point`` (the viewer's current position), rounded to the nearest slice.
    Multiscale layers give the same plane of every level (a pyramid the engine reads lazily).
    With ``volume`` the last three spatial axes are taken whole (``Plane.depth`` slices).
    """
    rgb = bool(getattr(layer, "rgb", False))
    levels = list(layer.data) if layer.multiscale else [layer.data]
    shape = tuple(int(s) for s in levels[0].shape)
    spatial = shape[:-1] if rgb else shape
    need = 3 if volume else 2
    if len(spatial) < need:
        raise ValueError(f"layer {layer.name!r} has shape {shape}: need at least {need} spatial axes")
    k = len(spatial) - need
    lead: tuple[int, ...] = ()
    if k:
        if world_point is None:
            raise ValueError("an nD image needs the viewer position to pick a slice")
        pos = np.asarray(layer.world_to_data(tuple(world_point)), dtype=float)[-len(spatial):]
        lead = tuple(int(np.clip(np.round(p), 0, n - 1)) for p, n in zip(pos[:k], spatial[:k], strict=True))
    planes = [lv[lead] if k else lv for lv in levels]
    plane = Plane(lead=lead, scale=tuple(float(s) for s in layer.scale),
                  translate=tuple(float(t) for t in layer.translate),
                  affine=np.asarray(layer.affine.affine_matrix, dtype=float),
                  hw=(int(spatial[-2]), int(spatial[-1])),
                  rotate=np.asarray(layer.rotate, dtype=float), shear=np.asarray(layer.shear, dtype=float),
                  depth=int(spatial[-3]) if volume else 0)
    return (planes if layer.multiscale else planes[0]), plane


def boxes_to_rectangles(boxes: np.ndarray, plane: Plane) -> list[np.ndarray]:
    """Engine boxes -> napari rectangles (4 corners each, in the plane's layer coordinates)."""
    y0, x0, y1, x1 = (np.asarray(boxes, dtype=float).reshape(-1, 4) - 0.5).T
    corners = np.stack([np.stack(c, 1) for c in ((y0, x0), (y0, x1), (y1, x1), (y1, x0))], 1)
    lead = np.zeros((len(corners), 4, len(plane.lead)))
    return list(np.concatenate([lead, corners], axis=2))


def shape_bounds(shapes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per shape (last two columns y, x): lowest and highest corner, and whether every vertex lies
    on those bounds (an axis-aligned rectangle). Shapes with the same number of vertices are done
    at once: 15,000 boxes take milliseconds, not the seconds of a per-shape loop."""
    n = len(shapes)
    lo, hi, aligned = np.zeros((n, 2)), np.zeros((n, 2)), np.zeros(n, dtype=bool)
    groups: dict[int, list[int]] = {}
    for i, verts in enumerate(shapes):
        groups.setdefault(len(verts), []).append(i)
    for idx in groups.values():
        v = np.asarray([shapes[i] for i in idx], dtype=float)[..., -2:]  # (m, vertices, 2)
        low, high = v.min(axis=1), v.max(axis=1)
        lo[idx], hi[idx] = low, high
        aligned[idx] = np.all(np.isclose(v, low[:, None]) | np.isclose(v, high[:, None]), axis=(1, 2))
    return lo, hi, aligned


def snap_to_pixels(shapes: list[np.ndarray]) -> np.ndarray:
    """Bounding box of each shape (last two columns y, x) snapped to pixel borders: float (N, 4).

    A corner at pixel border ``j - 0.5`` becomes index ``j``; nothing is clipped here.
    """
    lo, hi, _ = shape_bounds(shapes)
    return np.round(np.concatenate([lo, hi], axis=1) + 0.5)


@dataclass
class ShapeBoxes:
    """Boxes read from a Shapes layer, with what had to be adjusted (for the user's notice)."""

    boxes: np.ndarray  # (N, 4) int64 inside the image, one per usable shape
    rows: np.ndarray | None = None  # which shape of the layer each box came from
    not_rectangles: int = 0  # shapes that are not axis-aligned rectangles (bounding box used)
    clipped: int = 0  # boxes that reached outside the image
    dropped: int = 0  # boxes entirely outside the image (or empty)


def rectangles_to_boxes(shapes: list[np.ndarray], shape_types: list[str], hw: tuple[int, int]
                        ) -> ShapeBoxes:
    """napari shapes (vertices in image pixel coordinates, last two columns y, x) -> boxes.

    Any shape counts as its bounding box; edges are snapped to the nearest pixel border and the
    box is clipped to the image (:func:`clip_boxes`, the engine's rule for hand boxes).
    """
    if len(shapes) != len(shape_types):
        raise ValueError(f"{len(shapes)} shapes but {len(shape_types)} shape types")
    lo, hi, aligned = shape_bounds(shapes)
    raw = np.round(np.concatenate([lo, hi], axis=1) + 0.5)
    odd = int(np.sum((np.asarray(shape_types, dtype=object) != RECTANGLE) | ~aligned)) if len(shapes) else 0
    inside = (raw[:, 0] >= 0) & (raw[:, 1] >= 0) & (raw[:, 2] <= hw[0]) & (raw[:, 3] <= hw[1])
    boxes = clip_boxes(raw, hw)
    limits = np.array([hw[0], hw[1], hw[0], hw[1]])
    kept = np.clip(raw, 0, limits)
    rows = np.flatnonzero((kept[:, 2] > kept[:, 0]) & (kept[:, 3] > kept[:, 1]))  # those clip_boxes keeps
    dropped = len(raw) - len(boxes)
    return ShapeBoxes(boxes, rows, odd, int((~inside).sum()) - dropped, dropped)


def shapes_in_image_pixels(shapes_layer, image_layer, plane: Plane, axes: int = 2) -> list[np.ndarray]:
    """Vertices of every shape in the image's data coordinates (the last ``axes`` axes: y, x; or
    z, y, x for a volume).

    A boxes layer made by this plugin shares the image's transform (fast path); any other
    Shapes layer (e.g. boxes read from a CSV) is mapped through world coordinates.
    """
    data = list(shapes_layer.data)
    same = (np.allclose(shapes_layer.scale[-2:], plane.scale[-2:])
            and np.allclose(shapes_layer.translate[-2:], plane.translate[-2:])
            and shapes_layer.ndim == plane.ndim
            and np.allclose(np.asarray(shapes_layer.affine.affine_matrix), plane.affine)
            and (plane.rotate is None or (np.allclose(shapes_layer.rotate, plane.rotate)
                                          and np.allclose(shapes_layer.shear, plane.shear))))
    if same:
        return [np.asarray(v, dtype=float)[:, -axes:] for v in data]
    out = []
    for verts in data:
        pts = []
        for v in np.asarray(verts, dtype=float):
            world = np.asarray(shapes_layer.data_to_world(tuple(v)), dtype=float)
            if image_layer.ndim > len(world):  # a 2D boxes layer over an nD image: same plane
                world = np.concatenate([np.zeros(image_layer.ndim - len(world)), world])
            pts.append(np.asarray(image_layer.world_to_data(tuple(world)), dtype=float)[-axes:])
        out.append(np.array(pts))
    return out


LABEL_OBJECTS_MAX_PIXELS = LARGE_IMAGE_PX  # above this, labelling every edit costs seconds


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
    """Fused bool mask -> label image: one id per 8-connected object, as ``segthenseg-predict
    --labels`` writes (:func:`~napari_segthenseg.engine.boxes.label_objects`).

    Larger images get a binary (0/1) label image: relabelling 8000 x 8000 px took about 2 s per
    edit on a 2-core CPU, while the mask itself is ready in a fraction of that.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.size > LABEL_OBJECTS_MAX_PIXELS:
        return mask.astype(np.uint8)
    return label_objects(mask)


# -- the result layers ---------------------------------------------------------------------------
def rough_colormap():
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: ROUGH_COLOUR})


def seg_colormap():
    """Label 0 transparent, labels 1, 2, ... cycling through SEG_COLOURS."""
    from napari.utils.colormaps import CyclicLabelColormap

    return CyclicLabelColormap(colors=["transparent", *SEG_COLOURS], name="segthenseg segmentation")


def rough_layer(data: object, name: str, plane: Plane, zoom: tuple[float, float]):
    """The rough mask (an array, or a pyramid: a list of arrays) as a Labels layer over the image,
    ``zoom`` image px per rough px."""
    from napari.layers import Labels

    multiscale = isinstance(data, list) and len(data) > 1
    data = data if multiscale else (data[0] if isinstance(data, list) else data)
    return Labels(data, multiscale=multiscale, name=name, opacity=ROUGH_OPACITY, colormap=rough_colormap(),
                  metadata={KIND: "rough"}, **plane.layer_kwargs(zoom))


def seg_layer(data: object, name: str, plane: Plane, store: str | None = None):
    """The segmentation (an array, or the levels of a store: never dense at full resolution for a
    slide) as a Labels layer over the image; ``store`` is the OME-Zarr folder behind it."""
    from napari.layers import Labels

    multiscale = isinstance(data, list) and len(data) > 1
    data = data if multiscale else (data[0] if isinstance(data, list) else data)
    meta = {KIND: "segmentation", **({STORE_KEY: str(store)} if store is not None else {})}
    return Labels(data, multiscale=multiscale, name=name, opacity=SEG_OPACITY, colormap=seg_colormap(),
                  metadata=meta, **plane.layer_kwargs())


def boxes_layer(boxes: np.ndarray, name: str, plane: Plane, edge_width: float):
    """An editable Shapes layer of ``boxes`` over the image (safe to build in a worker thread:
    napari needs seconds for 15,000 rectangles, adding the built layer is quick)."""
    from napari.layers import Shapes

    rects = boxes_to_rectangles(boxes, plane) if len(boxes) else None
    layer = Shapes(rects, ndim=plane.ndim, shape_type=RECTANGLE, edge_color=BOX_COLOUR,
                   face_color="transparent", edge_width=edge_width, name=name, metadata={KIND: "boxes"},
                   **plane.layer_kwargs())
    layer.current_edge_color = BOX_COLOUR
    layer.current_face_color = "transparent"
    layer.current_edge_width = edge_width
    return layer
