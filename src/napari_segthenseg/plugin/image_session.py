"""Ordinary images: the segmentation in memory, each box's fine result kept for edits.

A run walks the engine with the in-memory output; an edit walks it again with the boxes layer's
boxes and the kept results (:class:`~napari_segthenseg.engine.fine.InMemory`), so only new or
changed boxes go through the fine net and the mask is re-fused from the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine import SegmentResult, omezarr
from ..engine.boxes import NO_BOXES
from ..engine.boxio import write_boxes_csv
from ..engine.fine import InMemory, box_key
from .layers import ShapeBoxes, labels_from_mask
from .session import EngineFactory, Job, JobResult, Session, UiStep

UNDO_STEPS = 100  # box edits that can be taken back


class ImageSession(Session):
    """An image plane held in memory (at most ``LARGE_IMAGE_PX`` pixels, or one slice of a stack)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.known: dict = {}  # fine-net result per box (by box_key) of the current boxes
        self.boxes = NO_BOXES.copy()  # the boxes the segmentation was made from
        self.history: list[np.ndarray] = []  # earlier box sets, for undo

    # -- jobs ------------------------------------------------------------------------------------
    def run_job(self, make_engine: EngineFactory) -> Job:
        data = self.data

        def steps():
            res = yield from make_engine().walk(data)
            return _result(res)

        return Job("run", steps, self._show_run, lambda res, t: f"{len(res.boxes)} boxes, {t:.2f} s")

    def update_job(self, make_engine: EngineFactory, got: ShapeBoxes) -> Job:
        if not np.array_equal(got.boxes, self.boxes):
            self.history = [*self.history, self.boxes][-UNDO_STEPS:]
        return self._segment_job(make_engine, got.boxes)

    def undo_job(self, make_engine: EngineFactory) -> Job | None:
        if not self.history:
            return None
        boxes = self.history.pop()
        self.set_boxes(boxes)
        return self._segment_job(make_engine, boxes, "undo")

    def _segment_job(self, make_engine: EngineFactory, boxes: np.ndarray, name: str = "update") -> Job:
        data, stats, known = self.data, self.stats, dict(self.known)

        def steps():
            res = yield from make_engine().walk(data, boxes, stats=stats, output=InMemory(known))
            return _result(res)

        return Job(name, steps, self._show_update,
                   lambda res, t: f"{len(res.boxes)} boxes, {res.refined} re-segmented, {t:.2f} s")

    def by_hand(self) -> None:
        self.ensure_seg_layer()
        self.ensure_boxes_layer()

    def invalidate(self, model_key: str) -> None:
        super().invalidate(model_key)
        self.known = {}

    def save(self, path: Path) -> tuple[Path, Path]:
        seg_path, boxes_path = Path(f"{path}.ome.zarr"), Path(f"{path}.boxes.csv")
        omezarr.save_label_image(seg_path, np.asarray(self.seg_layer.data).reshape(self.plane.hw))
        write_boxes_csv(boxes_path, self.read_boxes().boxes)
        return seg_path, boxes_path

    # -- showing results ---------------------------------------------------------------------------
    def _show_run(self, res: JobResult, edited: bool) -> list[UiStep]:
        def show() -> None:
            self.known, self.stats, self.history = {}, res.stats, []
            plan = res.rough.plan
            self.show_rough(res.rough.mask, (plan.scale, plan.scale) if plan.tiled else None)
            self.ensure_seg_layer()  # made before the boxes, so the box edges are drawn on top
            if edited:  # the user's boxes are newer than this run: keep them, segment them next
                from napari.utils.notifications import show_info

                show_info("Boxes were edited during the run: your boxes were kept.")
                return
            self.set_boxes(res.boxes)
            self._show_update(res, False)[0]()

        return [show]

    def _show_update(self, res: JobResult, edited: bool) -> list[UiStep]:
        def show() -> None:
            self.known, self.stats, self.boxes = res.known, res.stats, res.boxes
            self.ensure_seg_layer().data = self.plane.expand(res.labels)

        return [show]


def _result(res: SegmentResult) -> JobResult:
    """The walk's result as the session keeps it: labels, and the fine result of every box."""
    with_fine = res.probs is not None and len(res.probs) == len(res.boxes)  # not for a rough-only model
    known = {box_key(b): p for b, p in zip(res.boxes, res.probs, strict=True)} if with_fine else {}
    return JobResult(res.boxes, res.stats, rough=res.rough, labels=labels_from_mask(res.mask), known=known,
                     refined=res.counts.get("refined", 0), timings=res.timings)

