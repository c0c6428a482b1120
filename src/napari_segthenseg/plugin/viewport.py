"""The editable boxes of a slide: a napari Shapes layer that holds only the boxes near the view.

napari's Shapes layer needs about a millisecond of the UI thread per rectangle to add and a second
for a thousand to replace (docs/PLUGIN.md), while a slide has 10^5-10^6 boxes. So the boxes live in a
:class:`~.boxtable.BoxTable` and :class:`BoxesView` keeps an ordinary Shapes layer in step with the
camera: zoomed in, the boxes in and around the view are rectangles the user edits with napari's own
tools (each carries its table id as the feature ``box_id``; one drawn by hand has ``-1``); zoomed out
past ``VIEW_BOXES`` boxes the layer is emptied and the segmentation alone shows where objects are.
Rectangles come and go in batches, one batch per event-loop turn, so no turn is long. No Qt here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from ..engine.boxes import NO_BOXES
from ..engine.grid import Region
from .boxtable import NO_IDS, BoxTable, Edit
from .layers import BOX_COLOUR, VIEWPORT_KEY, Plane, ShapeBoxes, boxes_to_rectangles

VIEW_BOXES = 2000  # at most this many boxes in view are rectangles; more: zoom in to edit
ADD_BATCH = 100  # rectangles added per event-loop turn (~0.1 s of napari's time on this CPU)
VIEW_MARGIN = 0.15  # share of the view's size added on each side (short pans show boxes at once)
ID = "box_id"
NEW = -1  # the id of a rectangle drawn by hand, until the table gives it one


def view_region(viewer: object, layer: object, hw: tuple[int, int]) -> Region | None:
    """The part of ``layer``'s image on screen (level-0 px).

    From the camera (centre and zoom) and the canvas size (``viewer.canvas.size``, napari >= 0.9),
    each screen corner taken to the image's pixels. Older napari: the layer's ``corner_pixels``
    (for a multiscale layer only the loaded tiles' extent). None before the canvas has a size.
    """
    size = getattr(getattr(viewer, "canvas", None), "size", None)
    if size is None:
        corners = np.asarray(layer.corner_pixels, dtype=float)[:, -2:]
        if not corners.any():
            return None
        corners[1] += 1  # the last pixel, included
        if getattr(layer, "multiscale", False):  # corner pixels are in the level on screen
            corners = corners * np.asarray(layer.downsample_factors[layer.data_level], dtype=float)[-2:]
    else:
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
        half = np.asarray(size[-2:], dtype=float) / camera.zoom / 2
        centre = np.asarray(camera.center, dtype=float)[-2:]
        point = np.asarray(viewer.dims.point, dtype=float)[-layer.ndim:]
        pts = []
        for dy in (-1, 1):
            for dx in (-1, 1):
                point[-2:] = centre + (dy * half[0], dx * half[1])
                pts.append(np.asarray(layer.world_to_data(tuple(point)), dtype=float)[-2:])
        pts = np.asarray(pts) + 0.5  # pixel j covers [j - 0.5, j + 0.5]
        corners = np.stack([pts.min(0), pts.max(0)])
    (y0, x0), (y1, x1) = corners
    y0, x0 = int(max(0, np.floor(y0))), int(max(0, np.floor(x0)))
    y1, x1 = int(min(hw[0], np.ceil(y1))), int(min(hw[1], np.ceil(x1)))
    return (y0, x0, y1, x1) if y1 > y0 and x1 > x0 else (0, 0, 0, 0)


def grown(region: Region, by: float, hw: tuple[int, int]) -> Region:
    y0, x0, y1, x1 = region
    dy, dx = int((y1 - y0) * by), int((x1 - x0) * by)
    return max(0, y0 - dy), max(0, x0 - dx), min(hw[0], y1 + dy), min(hw[1], x1 + dx)


class BoxesView:
    """Keeps ``layer`` (a Shapes layer over the image) showing the boxes of ``table`` near the view.

    ``shown`` are the ids put into the layer (the rows' ``box_id`` features say which row is which);
    :meth:`take_edits` turns what the user did to them into one table edit.
    """

    def __init__(self, table: BoxTable, layer: object, plane: Plane, view: Callable[[], Region | None]):
        self.table, self.layer, self.plane, self.view = table, layer, plane, view
        self.shown = NO_IDS
        self.stale = NO_IDS  # ids whose rectangles must be drawn again (their boxes changed)
        self.in_view = 0  # boxes in the last view looked at
        self.too_many = False  # more than VIEW_BOXES: none shown (the user is told to zoom in)
        ids = layer.features[ID].to_numpy(dtype=np.int64) if ID in layer.features else None
        if ids is None or len(ids) != len(layer.data):
            ids = np.full(len(layer.data), NEW, dtype=np.int64)
        self._set_ids(ids)
        self.shown = ids[ids >= 0]
        # napari's own File > Save would write only these: its writer refuses (fileio.write_boxes)
        layer.metadata = {**layer.metadata, VIEWPORT_KEY: True}

    def _set_ids(self, ids: np.ndarray) -> None:
        self.layer.features = pd.DataFrame({ID: np.asarray(ids, dtype=np.int64)})
        self.layer.feature_defaults = {ID: NEW}  # setting features resets the defaults to the last row

    def layer_ids(self) -> np.ndarray:
        return self.layer.features[ID].to_numpy(dtype=np.int64) if ID in self.layer.features else \
            np.full(len(self.layer.data), NEW, dtype=np.int64)

    # -- following the camera ---------------------------------------------------------------------
    def wanted(self) -> np.ndarray:
        """Ids of the boxes that belong in the layer now (none when too many are in view)."""
        hw = self.plane.hw
        region = self.view() or (0, 0, hw[0], hw[1])
        self.in_view = self.table.count_in(region)
        self.too_many = self.in_view > VIEW_BOXES
        return NO_IDS if self.too_many else self.table.in_region(grown(region, VIEW_MARGIN, hw))[0]

    def follow(self, stale: np.ndarray = NO_IDS) -> list[Callable[[], None]]:
        """The UI steps that bring the layer in step with the view: one removal, then additions of
        ``ADD_BATCH`` rectangles each. Rectangles of ``stale`` ids are replaced (their boxes changed
        in the table, e.g. by an undo)."""
        stale, self.stale = np.concatenate([self.stale, stale]), NO_IDS
        want = self.wanted()
        ids = self.layer_ids()
        gone = ids[(ids >= 0) & (~np.isin(ids, want) | np.isin(ids, stale))]
        keep = np.setdiff1d(ids[ids >= 0], gone)
        todo = np.setdiff1d(want, keep)
        steps: list[Callable[[], None]] = []
        if len(gone):
            steps.append(lambda: self._remove(gone))
        for k in range(0, len(todo), ADD_BATCH):
            steps.append(lambda part=todo[k:k + ADD_BATCH]: self._add(part))
        return steps

    def _remove(self, gone: np.ndarray) -> None:
        ids = self.layer_ids()
        rows = np.flatnonzero(np.isin(ids, gone) & (ids >= 0))
        if not len(rows):
            return
        selected = ids[sorted(i for i in self.layer.selected_data if i < len(ids))]
        self.layer.selected_data = set(rows.tolist())
        self.layer.remove_selected()
        self._reselect(selected)
        left = self.layer_ids()
        self.shown = left[left >= 0]

    def _add(self, ids: np.ndarray) -> None:
        before = self.layer_ids()
        # an edit may have taken some away meanwhile, a later follow may have added them already
        ids = ids[self.table.has(ids) & ~np.isin(ids, before)]
        if not len(ids):
            return
        self.layer.add_rectangles(boxes_to_rectangles(self.table.boxes_of(ids), self.plane),
                                  edge_color=BOX_COLOUR, face_color="transparent",
                                  edge_width=self.layer.current_edge_width)
        self._set_ids(np.concatenate([before, ids]))
        self.shown = np.concatenate([self.shown, ids])

    def _reselect(self, ids: np.ndarray) -> None:
        if len(ids):
            now = self.layer_ids()
            self.layer.selected_data = set(np.flatnonzero(np.isin(now, ids)).tolist())

    # -- edits --------------------------------------------------------------------------------------
    def take_edits(self, got: ShapeBoxes) -> Edit:
        """What the user did to the rectangles since they were shown, as one table edit: rows whose
        id is gone were deleted, rows whose box differs were moved or resized, rows without an id
        (drawn, pasted, or a second copy of one) are new. The new boxes' ids go into the layer."""
        ids = self.layer_ids()
        row_ids = ids[got.rows] if got.rows is not None else np.full(len(got.boxes), NEW, np.int64)
        row_ids = row_ids.copy()
        _, first = np.unique(row_ids, return_index=True)
        again = np.ones(len(row_ids), bool)
        again[first] = False
        row_ids[again & (row_ids >= 0)] = NEW  # a pasted copy keeps its source's id: it is a new box
        row_ids[~self.table.has(row_ids)] = NEW  # e.g. a copy of a box an undo took away
        known = row_ids >= 0
        removed = np.setdiff1d(self.shown, row_ids[known])
        removed = removed[self.table.has(removed)]
        changed = dict(zip(row_ids[known].tolist(), got.boxes[known], strict=True))
        added = got.boxes[~known] if (~known).any() else NO_BOXES
        edit = self.table.edit(removed, changed, added)
        new_ids = edit.added_ids[-len(added):] if len(added) else NO_IDS
        if len(new_ids) or (~known).any() or len(got.boxes) != len(ids):
            ids = ids.copy()
            rows = got.rows if got.rows is not None else np.arange(len(got.boxes))
            ids[rows[known]] = row_ids[known]
            ids[rows[~known]] = new_ids
            self._set_ids(ids)
        self.shown = ids[ids >= 0]
        return edit
