"""One segmentation session: an image plane, its three result layers and the per-box cache.

Results are tied to the image: the layers are named after it and share its scale, translate,
rotate, shear and affine. For a 3D/time stack they keep the leading axes with length 1, placed at the slice
that was segmented, so they appear only on that slice; running another slice moves them there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._jobs import Box, JobResult, box_key
from ._layers import (
    BOX_COLOUR,
    Plane,
    ShapeBoxes,
    boxes_to_rectangles,
    rectangles_to_boxes,
    shapes_in_image_pixels,
)
from .engine import NormStats

# Three layers that must not be mistaken for one another at a glance: the rough mask is one blue
# (a coarse blob map, not instances), the boxes are yellow (BOX_COLOUR), and the segmentation cycles
# through reds, oranges, pinks and greens only, so that no nucleus is blue like the rough mask or
# yellow like a box edge.
ROUGH_COLOUR = "#3d8bff"
ROUGH_OPACITY = 0.6
SEG_COLOURS = ("#ff3b30", "#2ee65c", "#ff4fd8", "#ff9500", "#00c98d", "#ff6f91", "#7ee787", "#e0301e",
               "#ffa36c", "#1fa84f", "#ff2e97")
SEG_OPACITY = 0.7
KIND = "segthenseg"  # metadata key marking the layers this plugin made
STORE_KEY = "segthenseg_store"  # metadata key: the OME-Zarr folder behind a slide's segmentation
NO_BOXES = np.zeros((0, 4), dtype=np.int64)


@dataclass
class SlideState:
    """A slide's segmentation lives on disk: the store, and which boxes it reflects."""

    label: object = None  # engine.omezarr.LabelImage behind the segmentation layer
    boxes: np.ndarray = field(default_factory=lambda: NO_BOXES)  # the boxes fused into ``label``
    pending: np.ndarray = field(default_factory=lambda: NO_BOXES)  # footprints that may be stale


def slide_edge_width(boxes: np.ndarray) -> float:
    """Box edges about 1/16 of a typical box side (image px): thin on a slide, seen when zoomed in."""
    if len(boxes) == 0:
        return 2.0
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return float(np.clip(np.median(sides) / 16, 1.5, 8.0))


def _rough_colormap():
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: ROUGH_COLOUR})


def _seg_colormap():
    """Label 0 transparent, labels 1, 2, ... cycling through SEG_COLOURS."""
    from napari.utils.colormaps import CyclicLabelColormap

    return CyclicLabelColormap(colors=["transparent", *SEG_COLOURS], name="segthenseg segmentation")


@dataclass
class Session:
    """State of the last result on one image plane; the widget owns one at a time."""

    viewer: object
    image_layer: object
    plane: Plane
    data: object  # the 2D (or 2D + colour) plane the engine reads
    model_key: str
    stats: NormStats | None = None
    cache: dict[Box, np.ndarray] = field(default_factory=dict)
    rough_layer: object = None
    boxes_layer: object = None
    seg_layer: object = None
    slide: SlideState | None = None  # set for slides: the segmentation is an on-disk pyramid

    def matches(self, image_layer: object, plane: Plane, model_key: str) -> bool:
        return (self.image_layer is image_layer and self.plane.lead == plane.lead
                and self.plane.hw == plane.hw and self.model_key == model_key)

    def _alive(self, layer: object) -> bool:
        return layer is not None and layer in self.viewer.layers

    # -- layers ----------------------------------------------------------------------------
    def _name(self, what: str) -> str:
        return f"{self.image_layer.name} {what}"

    def _place(self, layer: object, zoom: tuple[float, float] = (1.0, 1.0)) -> None:
        for key, value in self.plane.layer_kwargs(zoom).items():
            setattr(layer, key, value)

    def adopt_boxes_layer(self, layer: object) -> None:
        """Use an existing Shapes layer as the boxes; one of ours (e.g. read from a boxes CSV, whose
        coordinates are image pixels) is moved into the image's frame, any other keeps its own."""
        self.boxes_layer = layer
        if layer.metadata.get(KIND) == "boxes" and layer.ndim == self.plane.ndim:
            self._place(layer)

    def ensure_boxes_layer(self, edge_width: float | None = None) -> object:
        """The editable boxes layer (created empty, in the image's frame, if needed)."""
        if self._alive(self.boxes_layer):
            self.adopt_boxes_layer(self.boxes_layer)
            return self.boxes_layer
        width = edge_width or max(1.5, min(self.plane.hw) / 250)
        layer = self.viewer.add_shapes(
            None, ndim=self.plane.ndim, shape_type="rectangle", edge_color=BOX_COLOUR,
            face_color="transparent", edge_width=width, name=self._name("boxes"),
            metadata={KIND: "boxes"}, **self.plane.layer_kwargs())
        layer.current_edge_color = BOX_COLOUR
        layer.current_face_color = "transparent"
        layer.current_edge_width = width
        self.boxes_layer = layer
        return layer

    def ensure_seg_layer(self) -> object:
        data = self.plane.expand(np.zeros(self.plane.hw, dtype=np.uint16))
        if self._alive(self.seg_layer):
            self._place(self.seg_layer)
            if self.seg_layer.data.shape != data.shape:
                self.seg_layer.data = data
            return self.seg_layer
        self.seg_layer = self.viewer.add_labels(
            data, name=self._name("segmentation"), opacity=SEG_OPACITY, colormap=_seg_colormap(),
            metadata={KIND: "segmentation"}, **self.plane.layer_kwargs())
        return self.seg_layer

    def show_rough(self, rough_mask: np.ndarray, zoom: tuple[float, float] | None = None) -> None:
        """The rough mask, scaled (not upsampled) over the image: the S x S mask covers the image
        extent exactly; a tiled rough pass's mask has ``zoom`` image px per rough px."""
        s_h, s_w = rough_mask.shape
        if zoom is None:
            zoom = (self.plane.hw[0] / s_h, self.plane.hw[1] / s_w)
        data = self.plane.expand(np.asarray(rough_mask, dtype=np.uint8))
        if self._alive(self.rough_layer):
            self.rough_layer.data = data
            self._place(self.rough_layer, zoom)
            return
        self.rough_layer = self.viewer.add_labels(
            data, name=self._name("rough"), opacity=ROUGH_OPACITY, colormap=_rough_colormap(),
            metadata={KIND: "rough"}, **self.plane.layer_kwargs(zoom))

    def set_boxes(self, boxes: np.ndarray) -> None:
        layer = self.ensure_boxes_layer()
        layer.data = []
        if len(boxes):
            layer.add_rectangles(boxes_to_rectangles(boxes, self.plane), edge_color=BOX_COLOUR,
                                 face_color="transparent", edge_width=layer.current_edge_width)

    def read_boxes(self) -> ShapeBoxes:
        """The boxes currently drawn, in image pixels, clipped to the image."""
        layer = self.boxes_layer
        verts = shapes_in_image_pixels(layer, self.image_layer, self.plane)
        return rectangles_to_boxes(verts, list(layer.shape_type), self.plane.hw)

    def show_result(self, result: JobResult) -> None:
        """Cache the new per-box results (only for boxes still in use) and show the labels."""
        merged = {**self.cache, **result.new_probs}
        self.cache = {k: merged[k] for k in map(box_key, result.boxes) if k in merged}
        self.stats = result.stats
        seg = self.ensure_seg_layer()
        seg.data = self.plane.expand(result.labels)

    # -- slides: lazy multiscale layers -----------------------------------------------------
    def _replace(self, old: object, new: object) -> object:
        """Put ``new`` where ``old`` is in the layer list (or on top), in one step."""
        layers = self.viewer.layers
        if self._alive(old):
            index = layers.index(old)
            layers.remove(old)
            layers.insert(index, new)
        else:
            layers.append(new)
        return new

    def build_boxes_layer(self, boxes: np.ndarray) -> object:
        """A Shapes layer of ``boxes``, not yet in the viewer: safe to build in a worker thread
        (napari needs seconds for 15,000 rectangles; adding the built layer is quick)."""
        from napari.layers import Shapes

        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        width = slide_edge_width(boxes)
        y0, x0, y1, x1 = (boxes.astype(float) - 0.5).T
        rects = np.stack([np.stack([y0, x0], 1), np.stack([y0, x1], 1), np.stack([y1, x1], 1),
                          np.stack([y1, x0], 1)], 1) if len(boxes) else None
        layer = Shapes(rects, ndim=2, shape_type="rectangle", edge_color=BOX_COLOUR,
                       face_color="transparent", edge_width=width, name=self._name("boxes"),
                       metadata={KIND: "boxes"}, **self.plane.layer_kwargs())
        layer.current_edge_color = BOX_COLOUR
        layer.current_face_color = "transparent"
        layer.current_edge_width = width
        return layer

    def make_rough_layer(self, levels: list, zoom: tuple[float, float]) -> object:
        """A slide's rough mask as a (multiscale) Labels layer, ``zoom`` image px per rough px; not
        yet in the viewer (built in the worker)."""
        from napari.layers import Labels

        multiscale = len(levels) > 1
        return Labels(levels if multiscale else levels[0], multiscale=multiscale, name=self._name("rough"),
                      opacity=ROUGH_OPACITY, colormap=_rough_colormap(), metadata={KIND: "rough"},
                      **self.plane.layer_kwargs(zoom))

    def make_seg_layer(self, label: object) -> object:
        """The segmentation as a multiscale Labels layer whose levels are the store's zarr arrays
        (never a dense full-resolution array); not yet in the viewer."""
        from napari.layers import Labels

        levels = list(label.levels)
        meta = {KIND: "segmentation", STORE_KEY: str(label.path)}
        return Labels(levels if len(levels) > 1 else levels[0], multiscale=len(levels) > 1,
                      name=self._name("segmentation"), opacity=SEG_OPACITY, colormap=_seg_colormap(),
                      metadata=meta, **self.plane.layer_kwargs())

    def install(self, rough: object = None, seg: object = None, boxes: object = None) -> None:
        """Put prebuilt layers in place of the current ones (same places in the layer list), in one
        go on the UI thread: only napari's insertion is left to do there."""
        if rough is not None:
            old, self.rough_layer = self.rough_layer, None
            self.rough_layer = self._replace(old, rough)
        if seg is not None:
            old, self.seg_layer = self.seg_layer, None
            self.seg_layer = self._replace(old, seg)
        if boxes is not None:
            old, self.boxes_layer = self.boxes_layer, None
            self.boxes_layer = self._replace(old, boxes)

    def show_slide_seg(self, label: object, replace: bool = False) -> object:
        """Show the store ``label`` (``replace``: a new layer in place of the current one, e.g. one
        napari-ome-zarr read)."""
        old = self.seg_layer
        if not replace and self._alive(old) and old.multiscale and len(label.levels) > 1:
            old.metadata = {**old.metadata, KIND: "segmentation", STORE_KEY: str(label.path)}
            old.data = list(label.levels)
            self._place(old)
            return old
        self.install(seg=self.make_seg_layer(label))
        return self.seg_layer

    def refresh_seg(self) -> None:
        """Show what the store holds now (napari reads the tiles on screen again)."""
        if self._alive(self.seg_layer):
            self.seg_layer.refresh()
