"""Volumes in the plugin: Run segments the whole 3D image with 3D boxes (docs/VOLUMES.md).

The engine's volume walk (:func:`~napari_segthenseg.engine.volume.walk_volume`) runs in the job;
its result layers span the volume: the rough masks (one per slice, each S x S over its slice),
the segmentation (3D instance labels) and the boxes. A 3D box is drawn as one rectangle on
every slice it spans; each rectangle carries the box's index as its ``box`` feature, so an
edit on any slice is an edit of the whole 3D box:

* moving or resizing a rectangle moves or resizes the y/x window of the 3D box;
* deleting a rectangle deletes the 3D box; pasting a copy of it on another slice (napari's
  copy/paste) extends its z-range to that slice; the panel's z-range changes it exactly;
* a rectangle drawn by hand spans ``new_box_span`` slices above and below its slice.

After an edit the boxes layer is redrawn from the 3D boxes, and only the new or changed boxes
go through the fine net; the fused mask is updated where the changed boxes were and are
(:class:`~napari_segthenseg.engine.volume_out.VolumeInMemory`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine import omezarr
from ..engine.boxes import NO_BOXES_3D, changed_boxes, clip_boxes_3d
from ..engine.boxio import write_boxes_csv
from ..engine.progress import Progress
from ..engine.volume import VolumeOptions, VolumeResult, walk_volume
from ..engine.volume_out import VolumeInMemory, box_key
from .layers import (
    BOX_COLOUR,
    KIND,
    RECTANGLE,
    Plane,
    ShapeBoxes,
    labels_from_mask,
    rough_layer,
    seg_layer,
    shape_bounds,
    shapes_in_image_pixels,
)
from .session import EngineFactory, Job, JobResult, Session, UiStep

BOX_ID = "box"  # rectangle feature: the index of the 3D box it draws (-1: drawn by hand, new)
NEW_BOX_SPAN = 2  # slices above and below a hand-drawn box's slice


def boxes3d_to_rectangles(boxes: np.ndarray, plane: Plane) -> tuple[list[np.ndarray], np.ndarray]:
    """Each 3D box as a rectangle on every slice it spans (corners on pixel borders, see
    :func:`.layers.boxes_to_rectangles`), and the box index of each rectangle."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 6)
    ids = np.repeat(np.arange(len(b)), b[:, 3] - b[:, 0])
    zs = np.concatenate([np.arange(z0, z1) for z0, z1 in b[:, [0, 3]]]) if len(b) else np.zeros(0)
    y0, x0, y1, x1 = (b[ids][:, [1, 2, 4, 5]].astype(float) - 0.5).T
    corners = np.stack([np.stack(c, 1) for c in ((y0, x0), (y0, x1), (y1, x1), (y1, x0))], 1)
    lead = np.zeros((len(ids), 4, len(plane.lead)))
    z = np.broadcast_to(zs.astype(float)[:, None, None], (len(ids), 4, 1))
    return list(np.concatenate([lead, z, corners], axis=2)), ids


def rectangles_to_boxes3d(shapes: list[np.ndarray], shape_types: list[str], ids: np.ndarray,
                          known: np.ndarray, shape: tuple[int, int, int], span: int) -> ShapeBoxes:
    """The 3D boxes a boxes layer shows (vertices ``z, y, x`` in image pixels; the module
    docstring says how rectangles become boxes). ``known`` are the boxes the ids refer to."""
    n = len(shapes)
    lo, hi, aligned = shape_bounds(shapes) if n else (np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, bool))
    yx = np.round(np.concatenate([lo, hi], axis=1) + 0.5).astype(np.int64)
    zs = np.array([int(np.round(np.mean(np.asarray(v)[:, 0]))) for v in shapes], dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = []
    for k in sorted(np.unique(ids).tolist(), key=lambda k: (k < 0, k)):  # boxes drawn by hand last
        members = np.flatnonzero(ids == k)
        if k < 0:  # drawn by hand: each its own box around its slice
            out += [[zs[i] - span, *yx[i, :2], zs[i] + span + 1, *yx[i, 2:]] for i in members]
            continue
        if k >= len(known):  # drawn by another tool: the slices its rectangles are on
            i = members[0]
            out.append([zs[members].min(), *yx[i, :2], zs[members].max() + 1, *yx[i, 2:]])
            continue
        z0, y0, x0, z1, y1, x1 = (int(v) for v in known[k])
        if len(np.unique(zs[members][(zs[members] >= z0) & (zs[members] < z1)])) < z1 - z0:
            continue  # a rectangle of it was deleted: the 3D box is deleted
        moved = [i for i in members if tuple(yx[i]) != (y0, x0, y1, x1)]
        win = yx[moved[0]] if moved else (y0, x0, y1, x1)
        zr = (min(z0, zs[members].min()), max(z1, zs[members].max() + 1))  # pasted on a slice: extended
        out.append([zr[0], win[0], win[1], zr[1], win[2], win[3]])
    raw = np.asarray(out, dtype=np.int64).reshape(-1, 6)
    boxes = clip_boxes_3d(raw, shape)
    inside = np.all((raw[:, :3] >= 0) & (raw[:, 3:] <= shape), axis=1)
    odd = int(np.sum((np.asarray(shape_types, dtype=object) != RECTANGLE) | ~aligned)) if n else 0
    return ShapeBoxes(boxes, odd, int((~inside).sum()) - (len(raw) - len(boxes)), len(raw) - len(boxes))


def layer_boxes3d(shapes: list[np.ndarray], ids: object) -> np.ndarray:
    """The 3D boxes a volume's boxes layer draws (vertices ``..., z, y, x``; ``box`` ids), as they
    are drawn: each id's slices and the window of its first rectangle."""
    verts = [np.asarray(v, dtype=float)[:, -3:] for v in shapes]
    if not verts:
        return NO_BOXES_3D.copy()
    ids = np.asarray(ids, dtype=np.int64)
    ids = np.where(ids < 0, ids.max() + 1 + np.arange(len(ids)), ids)  # drawn by hand: one box each
    top = np.ceil(np.max([v.max(0) for v in verts], axis=0)).astype(int) + 1  # nothing is clipped
    return rectangles_to_boxes3d(verts, [RECTANGLE] * len(verts), ids, NO_BOXES_3D, tuple(top), 0).boxes


class VolumeSession(Session):
    """A whole volume held in memory (``plane.depth`` slices), segmented with 3D boxes."""

    def __init__(self, *args, options: VolumeOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = options or VolumeOptions()
        self.known: dict = {}  # fine-net results per 3D box (by box_key) of the fused boxes
        self.mask: np.ndarray | None = None  # the fused mask of ``fused``
        self.fused = NO_BOXES_3D.copy()  # the 3D boxes the mask reflects
        self.boxes3d = NO_BOXES_3D.copy()  # the 3D boxes the layer draws: its rectangles' ids index it
        self.new_box_span = NEW_BOX_SPAN

    # -- jobs ------------------------------------------------------------------------------------
    def run_job(self, make_engine: EngineFactory) -> Job:
        data, plane, options = self.data, self.plane, self.options
        names = {k: self.name(k) for k in ("rough", "segmentation", "boxes")}

        def steps():
            res = yield from walk_volume(make_engine(), data, options=options)
            yield Progress(f"layers: {len(res.boxes)} boxes", 0, 1)
            out = _result(res)
            mask, rough_plan = res.rough.mask, res.rough.plan
            zoom = (rough_plan.scale, rough_plan.scale) if rough_plan.tiled else (
                plane.hw[0] / mask.shape[1], plane.hw[1] / mask.shape[2])
            out.layers = {"rough": rough_layer(np.asarray(mask, dtype=np.uint8), names["rough"], plane, zoom),
                          "seg": seg_layer(plane.expand(out.labels), names["segmentation"], plane),
                          "boxes": self.make_boxes_layer(res.boxes, names["boxes"])}
            return out

        return Job("run", steps, self._show_run,
                   lambda res, t: f"{len(res.boxes)} 3D boxes on {plane.depth} slices, {t:.1f} s")

    def update_job(self, make_engine: EngineFactory, got: ShapeBoxes) -> Job | None:
        boxes = np.asarray(got.boxes, dtype=np.int64).reshape(-1, 6)
        self.redraw(boxes)  # every 3D box on all its slices again (an edit moved one rectangle)
        changed = changed_boxes(self.fused, boxes)
        if len(changed) == 0 and self.mask is not None:
            return None
        data, stats, options = self.data, self.stats, self.options
        out = VolumeInMemory(dict(self.known), self.mask, changed if self.mask is not None else None)

        def steps():
            return _result((yield from walk_volume(make_engine(), data, boxes, stats=stats, output=out,
                                                   options=options)))

        return Job("update", steps, self._show_update,
                   lambda res, t: f"{len(res.boxes)} 3D boxes, {res.refined} re-segmented, {t:.2f} s")

    def by_hand(self) -> None:
        self.ensure_seg_layer()
        self.ensure_boxes_layer()

    def invalidate(self, model_key: str) -> None:
        super().invalidate(model_key)
        self.known, self.mask, self.fused = {}, None, NO_BOXES_3D.copy()

    def save(self, path: Path) -> tuple[Path, Path]:
        seg_path, boxes_path = Path(f"{path}.ome.zarr"), Path(f"{path}.boxes.csv")
        omezarr.save_label_image(seg_path, np.asarray(self.seg_layer.data).reshape(self.plane.shape))
        write_boxes_csv(boxes_path, self.read_boxes().boxes)
        return seg_path, boxes_path

    # -- boxes ---------------------------------------------------------------------------------
    def make_boxes_layer(self, boxes: np.ndarray, name: str) -> object:
        """An editable Shapes layer of 3D boxes (built in a worker thread for a run)."""
        from napari.layers import Shapes

        rects, ids = boxes3d_to_rectangles(boxes, self.plane)
        width = max(1.5, min(self.plane.hw) / 250)
        layer = Shapes(rects or None, ndim=self.plane.ndim, shape_type=RECTANGLE, edge_color=BOX_COLOUR,
                       face_color="transparent", edge_width=width, name=name, metadata={KIND: "boxes"},
                       features={BOX_ID: ids}, feature_defaults={BOX_ID: -1}, **self.plane.layer_kwargs())
        layer.current_edge_color, layer.current_face_color = BOX_COLOUR, "transparent"
        layer.current_edge_width = width
        return layer

    def ensure_boxes_layer(self, edge_width: float | None = None) -> object:
        layer = super().ensure_boxes_layer(edge_width)
        if BOX_ID not in layer.features:
            layer.features = {BOX_ID: np.full(len(layer.data), -1, dtype=np.int64)}
        layer.feature_defaults = {BOX_ID: -1}
        return layer

    def redraw(self, boxes: np.ndarray) -> None:
        """Draw ``boxes`` as the boxes layer's rectangles (every slice of each; ids in order).

        Only what changed is touched: rectangles that already draw an unchanged box on one of its
        slices stay (renumbered), the others are removed, the missing ones added. Replacing all of
        them would cost the UI thread about 0.2 s per 1,000 rectangles (napari builds each).
        """
        layer = self.ensure_boxes_layer()
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 6)
        index = {box_key(b): j for j, b in enumerate(boxes)}
        old = self.boxes3d
        ids = layer.features[BOX_ID].to_numpy() if BOX_ID in layer.features else np.full(len(layer.data), -1)
        verts = shapes_in_image_pixels(layer, self.image_layer, self.plane, axes=3)
        lo, hi, _ = shape_bounds(verts) if len(verts) else (np.zeros((0, 2)), np.zeros((0, 2)), None)
        windows = np.round(np.concatenate([lo, hi], axis=1) + 0.5).astype(np.int64)
        kept, new_ids, drawn = [], [], set()
        for r, k in enumerate(ids.tolist()):
            if not 0 <= k < len(old) or box_key(old[k]) not in index:
                continue
            z = int(np.round(np.mean(np.asarray(verts[r])[:, 0])))
            j = index[box_key(old[k])]
            b = boxes[j]
            if b[0] <= z < b[3] and tuple(windows[r]) == tuple(b[[1, 2, 4, 5]]) and (j, z) not in drawn:
                kept.append(r)
                new_ids.append(j)
                drawn.add((j, z))
        gone = sorted(set(range(len(ids))) - set(kept))
        missing = [(j, z) for j, b in enumerate(boxes) for z in range(b[0], b[3]) if (j, z) not in drawn]
        if gone:
            layer.selected_data = set(gone)
            layer.remove_selected()
        if missing:
            one = np.stack([boxes[j] for j, _ in missing])
            one[:, 0] = [z for _, z in missing]
            one[:, 3] = one[:, 0] + 1
            layer.add_rectangles(boxes3d_to_rectangles(one, self.plane)[0], edge_color=BOX_COLOUR,
                                 face_color="transparent", edge_width=layer.current_edge_width)
        if gone or missing or list(ids) != new_ids:
            layer.features = {BOX_ID: np.asarray(new_ids + [j for j, _ in missing], dtype=np.int64)}
            layer.feature_defaults = {BOX_ID: -1}  # setting the features set the defaults to a row's
        self.boxes3d = boxes

    def read_boxes(self) -> ShapeBoxes:
        layer = self.boxes_layer
        if layer is None:
            return ShapeBoxes(NO_BOXES_3D.copy())
        verts = shapes_in_image_pixels(layer, self.image_layer, self.plane, axes=3)
        feats = layer.features
        ids = feats[BOX_ID].to_numpy() if BOX_ID in feats else np.full(len(verts), -1)
        return rectangles_to_boxes3d(verts, list(layer.shape_type), ids, self.boxes3d, self.plane.shape,
                                     self.new_box_span)

    def selected_z_range(self) -> tuple[int, int] | None:
        """The z-range of the one 3D box whose rectangles are selected (None: none or several)."""
        box = self._selected_box()
        return None if box is None else (int(self.boxes3d[box, 0]), int(self.boxes3d[box, 3]))

    def set_selected_z_range(self, z0: int, z1: int) -> bool:
        """Give the selected 3D box slices ``z0`` to ``z1 - 1`` (clamped); True when it changed."""
        box = self._selected_box()
        if box is None:
            return False
        boxes = self.boxes3d.copy()
        z0, z1 = sorted((int(z0), int(z1)))
        boxes[box, 0], boxes[box, 3] = max(0, z0), min(self.plane.depth, max(z1, z0 + 1))
        if np.array_equal(boxes, self.boxes3d):
            return False
        self.redraw(boxes)  # segmented by the next update (the widget asks for it)
        return True

    def _selected_box(self) -> int | None:
        layer = self.boxes_layer
        if not self.alive(layer) or BOX_ID not in layer.features or not layer.selected_data:
            return None
        ids = set(layer.features[BOX_ID].to_numpy()[sorted(layer.selected_data)].tolist())
        return ids.pop() if len(ids) == 1 and 0 <= next(iter(ids)) < len(self.boxes3d) else None

    # -- showing results ---------------------------------------------------------------------------
    def _show_run(self, res: JobResult, edited: bool) -> list[UiStep]:
        def state() -> None:
            self.stats, self.known, self.mask, self.fused = res.stats, res.known, res.mask, res.boxes
            self.install(rough=res.layers["rough"])

        def boxes() -> None:
            if edited:  # the user's boxes are newer than this run: keep them, segment them next
                from napari.utils.notifications import show_info

                show_info("Boxes were edited during the run: your boxes were kept.")
                return
            self.install(boxes=res.layers["boxes"])
            self.boxes3d = res.boxes

        return [state, lambda: self.install(seg=res.layers["seg"]), boxes]

    def _show_update(self, res: JobResult, edited: bool) -> list[UiStep]:
        def show() -> None:
            self.known, self.stats, self.mask, self.fused = res.known, res.stats, res.mask, res.boxes
            self.ensure_seg_layer().data = self.plane.expand(res.labels)

        return [show]


def _result(res: VolumeResult) -> JobResult:
    """The walk's result as the session keeps it: 3D labels, the mask, each box's fine results."""
    probs = res.probs if res.probs is not None else []
    known = {box_key(b): p for b, p in zip(res.boxes, probs, strict=False)}
    return JobResult(res.boxes, res.stats, labels=labels_from_mask(res.mask), known=known, mask=res.mask,
                     refined=res.counts.get("refined", 0), timings=res.timings)
